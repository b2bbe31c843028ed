"""upcycle-compile end to end on a saved tiny model, and bad inputs (one clear line, exit 2)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import upcycle
from upcycle.compiler.cli import run
from upcycle.runtime import MoELayer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_dry_run_prints_plan(model_dir, capsys):
    assert run(["e8g8t8", str(model_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp" in out and "model.layers.1.mlp" in out
    assert "gated" in out and "silu" in out
    assert "MLPs found: 2, rewritten: 2" in out
    assert "active per token" in out


def test_explain_lists_units(model_dir, capsys):
    assert run(["e8g1t2", str(model_dir), "--dry-run", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "traced units:" in out and "MLPs matched:" in out


def test_compile_save_load_roundtrip(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "moe"
    assert run(["e8g1t2-topk-then-softmax", str(model_dir), "-o", str(out_dir), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "yes: passed" in text
    for name in ("model.safetensors", "upcycle_spec.yaml", "report.json", "report.txt", "upcycle.json", "config.json"):
        assert (out_dir / name).is_file(), name
    model = upcycle.load(out_dir)
    assert isinstance(model.model.layers[0].mlp, MoELayer)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() <= 1e-5
    assert model.generate(ids[:1], max_new_tokens=2, do_sample=False).shape == (1, 11)


def test_existing_output_needs_force(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "exists"
    out_dir.mkdir()
    assert run(["e8g1t2", str(model_dir), "-o", str(out_dir)]) == 2
    assert "--force" in capsys.readouterr().err


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "upcycle.compiler.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("spec_text,needle", [
    ("experts: {expansion: 8, granularity: 8, top_k: 99}\n", "experts.top_k"),
    ("experts:\n  expansoin: 8\n", "did you mean 'expansion'"),
    ("experts: [1, 2\n", "spec.yaml:2:1: malformed YAML"),
    ("router: {type: softmax}\n", "router.type"),
])
def test_bad_spec_one_line_exit_2_no_output(model_dir, tmp_path, spec_text, needle):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    out_dir = tmp_path / "never"
    r = _cli(str(spec), str(model_dir), "-o", str(out_dir))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_missing_model_path(tmp_path):
    r = _cli("e8g1t2", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "no such file or directory" in r.stderr and "Traceback" not in r.stderr


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)), path)
    r = _cli("e8g1t2", str(path), "--dry-run")
    assert r.returncode == 2 and "--trust-pickle" in r.stderr and "Traceback" not in r.stderr
    r = _cli("e8g1t2", str(path), "--dry-run", "--trust-pickle")
    assert r.returncode == 0, r.stderr
    assert "MLPs found: 1" in r.stdout


def test_export_program_input(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(4, 8)
    path = tmp_path / "prog.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    out_dir = tmp_path / "out"
    assert run(["e8g1t2-topk-then-softmax", str(path), "-o", str(out_dir), "--no-progress"]) == 0
    loaded = upcycle.load(out_dir)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-5
    assert any(isinstance(m, MoELayer) for m in loaded.modules())


def test_console_script_installed():
    exe = Path(sys.executable).parent / "upcycle-compile"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "spec" in r.stdout
