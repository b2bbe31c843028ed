"""examples/train.py end to end on a tiny model (--quick): kill and resume, 2 processes, export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
ARGS = ["--quick", "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4", "--log-every", "100"]


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def _train(run, *extra, nproc=None, expect=0, **env):
    head = [sys.executable, str(TRAIN)] if nproc is None else \
        [str(TORCHRUN), "--nproc-per-node", str(nproc), "--master-port", str(29700 + os.getpid() % 200), str(TRAIN)]
    proc = subprocess.run(head + ARGS + ["--run-dir", str(run), *extra], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc.stdout


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_killed_run_resumes_with_identical_losses(tmp_path):
    _train(tmp_path / "a")
    _train(tmp_path / "b", expect=-9, UPCYCLE_TRAIN_KILL_AT_STEP="6")  # SIGKILL in step 7: last checkpoint 4
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000004"]
    out = _train(tmp_path / "b", "--resume")
    assert "resumed from" in out and "at step 4" in out
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert list(b) == list(range(1, 9))  # steps redone after the checkpoint are not listed twice
    for step in range(1, 9):
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    sa, sb = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("a", "b"))
    assert sa["val_loss_end"] == pytest.approx(sb["val_loss_end"], rel=1e-6)
    assert sa["val_loss_end"] < sa["val_loss_start"]  # it learns
    assert (tmp_path / "a" / "router_load.png").stat().st_size > 1000
    assert "tokens/s" in out and "peak memory" in out


def test_two_processes_match_accumulation_and_export(tmp_path):
    _train(tmp_path / "one", "--accum", "2")
    _train(tmp_path / "two", nproc=2)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5), step

    import upcycle
    from upcycle.compiler.export_run import export_run, rebuild_run_model
    from upcycle.runtime.train_checkpoint import load_model_weights

    native = export_run(tmp_path / "two", tmp_path / "native")
    model = upcycle.load(native).eval()
    ref, _ = rebuild_run_model(tmp_path / "two")
    load_model_weights(tmp_path / "two" / "checkpoints" / "step-000008", ref)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)
    init, _ = rebuild_run_model(tmp_path / "two")  # the trained weights differ from the start
    assert not torch.equal(init.model.layers[0].mlp.router.weight, model.model.layers[0].mlp.router.weight)
    from upcycle.compiler.export_run import main as export_main

    assert export_main([str(tmp_path / "two"), "-o", str(tmp_path / "hf"), "--format", "hf"]) == 0
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert export_main([str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2
