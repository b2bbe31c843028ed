"""Inputs a careless or hostile user could give, tried as against a tool we did not write. Each is
checked for its exit code, one line, no traceback, nothing at -o, the input unchanged, and (where
the input carries code) that the code never ran: a marker file it would write stays absent."""

import json
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _hostile import (address_space_cap, check_refusal, cli, copy_dir, entries, llama_config, llama_dir, marker_payload,  # noqa: E402
                      snapshot, write_run_folder)

import upcycle  # noqa: E402
from upcycle.compiler.cli import run  # noqa: E402
from upcycle.compiler.errors import ModelError  # noqa: E402

SPEC = "e8g1t2"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("good") / "llama")


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "code from the input ran"


class _Payload:
    """Unpickling this runs `exec(source)`: what a hostile pickle does."""

    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


def _refused(capsys, tmp_path, args, needle, *, inputs=(), code=2, out=None, main=None, prog="upcycle-compile"):
    out = out or tmp_path / "out"
    before_in = {str(p): snapshot(p) for p in inputs}
    before = entries(out.parent)
    capsys.readouterr()
    rc = (main or run)([*map(str, args), "-o", str(out)] + (["--no-progress"] if main is None else []))
    line = check_refusal(rc, capsys.readouterr().err, needle=needle, out=out, prog=prog, code=code)
    assert entries(out.parent) == before
    for p in inputs:
        assert snapshot(p) == before_in[str(p)], f"{p} changed"
    return line


# ---- code in the input never runs ----------------------------------------------------------------

def test_pickled_module_refused(tmp_path, capsys, marker):
    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        pickle.dump(_Payload(marker_payload(marker)), f)
    _refused(capsys, tmp_path, [SPEC, path], "--trust-pickle", inputs=[path])


def test_pickle_posing_as_a_state_dict_refused(tmp_path, capsys, marker, good):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_bytes((good / "config.json").read_bytes())
    path = tmp_path / "w" / "weights.pt"
    torch.save({"model.embed_tokens.weight": _Payload(marker_payload(marker))}, path)
    _refused(capsys, tmp_path, [SPEC, path], "refused", inputs=[tmp_path / "w"])


def _armed_export_archive(tmp_path, marker) -> Path:
    """A torch.export archive whose first weight is declared pickled: torch.export.load would run it."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))

    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(Tiny().eval(), (torch.randn(2, 8),)), str(good))
    src = zipfile.ZipFile(good)
    items = {n: src.read(n) for n in src.namelist()}
    cfg_name = next(n for n in items if n.endswith("model_weights_config.json"))
    cfg = json.loads(items[cfg_name])
    first = next(iter(cfg["config"]))
    cfg["config"][first]["use_pickle"] = True
    items[cfg_name] = json.dumps(cfg).encode()
    weight = next(n for n in items if n.endswith("weights/" + cfg["config"][first]["path_name"]))
    items[weight] = pickle.dumps(_Payload(marker_payload(marker)))
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as dst:
        for n, d in items.items():
            dst.writestr(n, d)
    good.unlink()
    return evil


def test_export_archive_with_pickled_weights_refused(tmp_path, capsys, marker):
    evil = _armed_export_archive(tmp_path, marker)
    _refused(capsys, tmp_path, [SPEC, evil], "holds pickled objects", inputs=[evil])
    _refused(capsys, tmp_path, [SPEC, evil, "--dry-run"], "holds pickled objects", inputs=[evil])


def test_remote_code_in_config_never_runs(good, tmp_path, capsys, marker):
    """auto_map pointing at a modeling file beside the weights: read as the plain architecture
    (model_type llama) or refused (an unknown model_type), never imported."""
    src = copy_dir(good, tmp_path / "remote")
    (src / "evil.py").write_text(marker_payload(marker))
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    cfg["architectures"] = ["EvilModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    for flags in ([], ["--stream"]):
        out = tmp_path / f"o{len(flags)}"
        assert run([SPEC, str(src), "-o", str(out), "--no-progress", *flags]) == 0
        assert isinstance(upcycle.load(out).model.layers[0].mlp, upcycle.MoELayer)
    cfg["model_type"] = "evil"
    (src / "config.json").write_text(json.dumps(cfg))
    for flags in ([], ["--stream"]):
        _refused(capsys, tmp_path, [SPEC, src, *flags], "model_type", inputs=[src])


def test_yaml_python_tags_never_run(good, tmp_path, capsys, marker):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"experts: !!python/object/apply:exec [{marker_payload(marker).strip()!r}]\n")
    _refused(capsys, tmp_path, [spec, good], "spec.yaml", inputs=[spec, good])


@pytest.fixture
def run_dir(tmp_path):
    from transformers import LlamaForCausalLM

    from upcycle.specs import load_spec

    torch.manual_seed(0)
    cfg = llama_config()
    moe = upcycle.compile_upcycle(LlamaForCausalLM(cfg).eval(), SPEC)
    return write_run_folder(tmp_path / "run", moe, load_spec(SPEC).to_dict(), cfg)


def test_checkpoint_metadata_pickle_never_runs(run_dir, tmp_path, capsys, marker):
    """DCP's .metadata is a pickle; a hostile one (with checksums.json removed, as an attacker
    would) is refused by the restricted unpickler, in upcycle-export-run and on --resume."""
    from upcycle.compiler.export_run import main

    ckpt = run_dir / "checkpoints" / "step-000001"
    (ckpt / "checksums.json").unlink()
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(_Payload(marker_payload(marker)), f)
    _refused(capsys, tmp_path, [run_dir], "refusing to unpickle it", inputs=[run_dir], main=main,
             prog="upcycle-export-run")
    from upcycle.runtime.train_checkpoint import CheckpointError, load_training_checkpoint

    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_training_checkpoint(ckpt, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_checkpoint_metadata_pointing_outside_the_folder(run_dir, tmp_path, capsys):
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    from upcycle.compiler.export_run import main

    ckpt = run_dir / "checkpoints" / "step-000001"
    (ckpt / "checksums.json").unlink()
    meta = FileSystemReader(str(ckpt)).read_metadata()  # our own, trusted file: read plainly to edit it
    for info in meta.storage_data.values():
        info.relative_path = "../../../../etc/hostname"
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    _refused(capsys, tmp_path, [run_dir], "not a plain file name", inputs=[run_dir], main=main,
             prog="upcycle-export-run")


TINY = llama_config().to_dict()


@pytest.mark.parametrize("info,needle", [
    ("{", "run.json"), ("[]", "run.json"), (json.dumps({"source": "x"}), "run.json"),
    (json.dumps({"source": {"kind": "upcycled", "path": 3}}), "run.json"),
    (json.dumps({"source": {}, "dense_config": {"model_type": "nope"}, "spec": {}}), "run.json"),
    (json.dumps({"source": {}, "dense_config": TINY, "spec": {"experts": {"expansion": "x"}}}), "experts.expansion"),
    (json.dumps({"source": {}, "dense_config": TINY, "spec": {}, "relax_routing_step": "0"}), "relax_routing_step"),
    ("[" * 100000, "run.json"),
])
def test_hostile_run_json(run_dir, tmp_path, capsys, info, needle):
    from upcycle.compiler.export_run import main

    (run_dir / "run.json").write_text(info)
    _refused(capsys, tmp_path, [run_dir], needle, inputs=[run_dir], main=main, prog="upcycle-export-run")


def test_run_json_describing_a_huge_model(run_dir, tmp_path, capsys, monkeypatch):
    """A dense_config with transformers' Llama defaults is a 7B-parameter model: building it would take
    28 GB; refused on the meta device before anything is allocated."""
    from upcycle.compiler import resources
    from upcycle.compiler.export_run import main

    monkeypatch.setenv(resources.ENV_MEMORY, "2GB")  # refused on any machine, so nothing big is ever built
    (run_dir / "run.json").write_text(json.dumps({"source": {}, "dense_config": {"model_type": "llama"}, "spec": {}}))
    with address_space_cap():
        line = _refused(capsys, tmp_path, [run_dir], "not enough memory for the rebuild of the run's model",
                        inputs=[run_dir], main=main, prog="upcycle-export-run")
    assert " GB" in line.split("it needs about ")[1][:12]


# ---- inputs that would hang, exhaust memory or crash a parser ------------------------------------

def test_config_that_is_a_fifo_or_a_device(good, tmp_path, capsys):
    src = copy_dir(good, tmp_path / "m")
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")  # opening it for reading would wait for a writer forever
    for flags in ([], ["--stream"], ["--dry-run"]):
        _refused(capsys, tmp_path, [SPEC, src, *flags], "config.json", inputs=[src / "model.safetensors"])
    _refused(capsys, tmp_path, [SPEC, src / "model.safetensors", "--config", src / "config.json"],
             "not a regular file")
    _refused(capsys, tmp_path, [SPEC, src / "model.safetensors", "--config", "/dev/zero"], "not a regular file")


def test_weights_that_are_a_fifo(good, tmp_path, capsys):
    src = copy_dir(good, tmp_path / "m")
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    for flags in ([], ["--stream"]):
        _refused(capsys, tmp_path, [SPEC, src, *flags], "is not a regular file")
    os.symlink("/dev/zero", src / "zero.gguf")
    _refused(capsys, tmp_path, [SPEC, src / "zero.gguf"], "is not a regular file")


def test_huge_and_deep_json(good, tmp_path, capsys):
    src = copy_dir(good, tmp_path / "m")
    with open(src / "config.json", "wb") as f:  # sparse: 200 MB on paper, nothing on disk
        f.truncate(200 << 20)
    _refused(capsys, tmp_path, [SPEC, src], "too large", inputs=[src])
    (src / "config.json").write_text("[" * 200000)
    for flags in ([], ["--stream"]):
        _refused(capsys, tmp_path, [SPEC, src, *flags], "nested too deeply", inputs=[src])


def test_huge_and_odd_spec_files(good, tmp_path, capsys):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(2 << 20)
    _refused(capsys, tmp_path, [big, good], "over 1048576 bytes")
    _refused(capsys, tmp_path, ["/dev/zero", good], "not a regular file")
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    _refused(capsys, tmp_path, [fifo, good], "not a regular file")


def _with_header(src: Path, edit) -> None:
    raw = (src / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    new = edit(header)
    new = new if isinstance(new, bytes) else json.dumps(new).encode()
    new += b" " * (-len(new) % 8)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _first(header):
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("edit,needle", [
    (lambda h: {**h, _first(h): {**h[_first(h)], "dtype": ["F32"]}}, "corrupt safetensors header entry"),
    (lambda h: {**h, _first(h): {**h[_first(h)], "data_offsets": ["0", "4"]}}, "corrupt safetensors header entry"),
    (lambda h: {**h, _first(h): {**h[_first(h)], "shape": [-1, 4]}}, "corrupt safetensors header entry"),
    (lambda h: {**h, _first(h): {**h[_first(h)], "shape": [1 << 40, 1 << 40]}}, "needs"),
    (lambda h: {**h, _first(h): "x"}, "corrupt safetensors header entry"),
    (lambda h: [1, 2], "expected an object"),
    (lambda h: b"[" * 100000, "nested too deeply"),
    (lambda h: {**h, "\x1b]0;owned\x07\x1b[2J": h[_first(h)]}, "\\x1b"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_hostile_safetensors_headers(good, tmp_path, capsys, edit, needle, stream):
    src = copy_dir(good, tmp_path / "m")
    _with_header(src, edit)
    line = _refused(capsys, tmp_path, [SPEC, src] + (["--stream"] if stream else []), needle, inputs=[src])
    assert "\x1b" not in line and "\x07" not in line  # nothing from the file drives the terminal


def test_index_naming_files_outside_the_folder(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    src = tmp_path / "sharded"
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(src, max_shard_size="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../../etc/hostname"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    for flags in ([], ["--stream"]):
        _refused(capsys, tmp_path, [SPEC, src, *flags], "not a plain file name", inputs=[src])
    index["weight_map"][name] = 7
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(capsys, tmp_path, [SPEC, src, "--stream"], "not a valid safetensors index", inputs=[src])


def test_paths_with_control_characters_stay_one_line(good, tmp_path, capsys):
    odd = tmp_path / "evil\nname\x1b[31m"
    odd.mkdir()
    line = _refused(capsys, tmp_path, [SPEC, odd], "no config.json")
    assert "\\n" in line and "\\x1b" in line


# ---- outputs that would destroy something --------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_overlapping_the_input_refused_even_with_force(good, tmp_path, capsys, where):
    src = copy_dir(good, tmp_path / "in" / "model")
    out = {"same": src, "inside": src / "moe", "parent": tmp_path / "in"}[where]
    before = snapshot(tmp_path / "in")
    for flags in ([], ["--stream"]):
        capsys.readouterr()
        rc = run([SPEC, str(src), "-o", str(out), "--force", "--no-progress", *flags])
        check_refusal(rc, capsys.readouterr().err, needle="overlap the input")
    assert snapshot(tmp_path / "in") == before


def test_force_replaces_only_an_earlier_output(good, tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (tmp_path / "file").write_text("x")
    os.symlink(home, tmp_path / "link")
    for target, needle in ((home, "not an upcycle output"), (tmp_path / "file", "is a file"),
                           (tmp_path / "link", "is a symlink")):
        before = snapshot(home)
        capsys.readouterr()
        rc = run([SPEC, str(good), "-o", str(target), "--force", "--no-progress"])
        check_refusal(rc, capsys.readouterr().err, needle=needle)
        assert snapshot(home) == before and (tmp_path / "file").read_text() == "x"
    out = tmp_path / "out"  # an earlier output, and an empty folder, are replaced
    assert run([SPEC, str(good), "-o", str(out), "--no-progress"]) == 0
    assert run(["e8g8t8", str(good), "-o", str(out), "--no-progress", "--force"]) == 0
    (tmp_path / "empty").mkdir()
    assert run([SPEC, str(good), "-o", str(tmp_path / "empty"), "--no-progress", "--force"]) == 0
    assert "E8G8T8" in (out / "report.txt").read_text()


def test_python_api_refuses_the_same(good, tmp_path):
    from upcycle.compiler.streaming import stream_upcycle

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep")
    from transformers import LlamaForCausalLM

    moe = upcycle.compile_upcycle(LlamaForCausalLM(llama_config()), SPEC)
    with pytest.raises(upcycle.UpcycleError, match="not an upcycle output"):
        upcycle.save(moe, home, spec=SPEC, force=True)
    with pytest.raises(upcycle.UpcycleError, match="overlap the input"):
        stream_upcycle(SPEC, good, good, force=True)
    assert (home / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_subprocess_refusals_have_no_traceback(good, tmp_path, marker):
    """The same rules through the real entry point (a fresh interpreter, stderr as a user sees it)."""
    evil = _armed_export_archive(tmp_path, marker)
    pickled = tmp_path / "model.pt"
    with open(pickled, "wb") as f:
        pickle.dump(_Payload(marker_payload(marker)), f)
    for args, needle in (([SPEC, evil], "pickled objects"), ([SPEC, pickled], "--trust-pickle"),
                         ([SPEC, good, "--probe-tokens", "0"], "--probe-tokens"),
                         ([SPEC, good, "--max-shard-size", "lots"], "--max-shard-size")):
        r = cli([*args, "-o", tmp_path / "o"])
        check_refusal(r.returncode, r.stderr, needle=needle, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ModelError):
        upcycle.compiler.loading.load_model(evil)
