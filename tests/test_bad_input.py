"""Bad input to `upcycle-compile`: one clear line (what is wrong, where, what would be valid), exit 2,
no traceback unless --debug, and no output (nor temp folder) left behind. Streaming and in-memory
paths are both exercised where they read the input differently."""

import errno
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import upcycle
from upcycle.compiler import checkpoint
from upcycle.compiler.cli import run

SPEC = "e8g1t2"


def _cfg(**kw):
    from transformers import LlamaConfig

    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good") / "llama"
    LlamaForCausalLM(_cfg()).save_pretrained(path)
    return path


def _copy(src, dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _expect_error(capsys, tmp_path, args, needle, out_name="out"):
    out = tmp_path / out_name
    capsys.readouterr()
    before = set(tmp_path.iterdir())
    rc = run([*args, "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("upcycle-compile: error: "), err
    assert needle in err, err
    assert not out.exists()
    assert set(tmp_path.iterdir()) == before  # no temp folder left either
    return err


# ---- spec problems ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,needle", [
    ("experts: [1, 2\n", "malformed YAML"),
    ("experts:\n  expansoin: 8\n", "did you mean 'expansion'"),
    ("bogus: 1\n", "bogus"),
    ("experts: {expansion: eight}\n", "experts.expansion"),
    ("experts: {expansion: 2, granularity: 1, top_k: 3}\n", "top_k"),
])
def test_bad_spec(good, tmp_path, capsys, text, needle):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    _expect_error(capsys, tmp_path, [str(spec), str(good)], needle)
    spec.unlink()


# ---- model path problems ----------------------------------------------------------------------

def test_missing_model_path(tmp_path, capsys):
    _expect_error(capsys, tmp_path, [SPEC, str(tmp_path / "nope")], "no such file or directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_model_path(good, tmp_path, capsys):
    bad = _copy(good, tmp_path / "m")
    os.chmod(bad / "model.safetensors", 0)
    try:
        _expect_error(capsys, tmp_path, [SPEC, str(bad / "model.safetensors"), "--config", str(bad)], "permission denied")
        _expect_error(capsys, tmp_path, [SPEC, str(bad), "--stream"], "cannot read")
    finally:
        os.chmod(bad / "model.safetensors", 0o644)


def test_directory_without_config(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    _expect_error(capsys, tmp_path, [SPEC, str(tmp_path / "m")], "no config.json")


def test_bare_safetensors_without_config(good, tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "x.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    _expect_error(capsys, tmp_path, [SPEC, str(tmp_path / "w" / "x.safetensors")], "--config")


# ---- broken checkpoints -----------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_truncated_safetensors(good, tmp_path, capsys, stream):
    bad = _copy(good, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # header now declares more bytes than the file has
    _expect_error(capsys, tmp_path, [SPEC, str(bad)] + (["--stream"] if stream else []), "truncated safetensors file")


@pytest.mark.parametrize("stream", [False, True])
def test_corrupt_safetensors_header(good, tmp_path, capsys, stream):
    bad = _copy(good, tmp_path / "m")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:20] = b"\x00\xffgarbage!!\x01"
    (bad / "model.safetensors").write_bytes(bytes(data))
    _expect_error(capsys, tmp_path, [SPEC, str(bad)] + (["--stream"] if stream else []), "corrupt safetensors header")


def test_header_length_beyond_file(good, tmp_path, capsys):
    bad = _copy(good, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])
    _expect_error(capsys, tmp_path, [SPEC, str(bad), "--stream"], "header length")


def test_header_offsets_beyond_file(good, tmp_path, capsys):
    bad = _copy(good, tmp_path / "m")
    state = load_file(str(bad / "model.safetensors"))
    raw = (bad / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    start, end = header[name]["data_offsets"]
    numel = (end - start) // 4
    header[name]["data_offsets"][1] = end + 4 * numel  # declares more bytes than exist ...
    header[name]["shape"] = [numel * 2]  # ... consistently with its shape
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    del state
    _expect_error(capsys, tmp_path, [SPEC, str(bad)], "truncated safetensors file")


@pytest.mark.parametrize("stream", [False, True])
def test_config_and_weights_disagree_in_shape(good, tmp_path, capsys, stream):
    bad = _copy(good, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _expect_error(capsys, tmp_path, [SPEC, str(bad)] + (["--stream"] if stream else []), "config and weights disagree")
    assert "in the checkpoint but" in err and "config.json" in err


def test_missing_shard_named_in_index(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    src = tmp_path / "sharded"
    LlamaForCausalLM(_cfg()).save_pretrained(src, max_shard_size="20KB")
    shards = sorted(src.glob("model-*.safetensors"))
    shards[1].unlink()
    for stream in ([], ["--stream"]):
        _expect_error(capsys, tmp_path, [SPEC, str(src), *stream], f"names shard '{shards[1].name}'")


@pytest.mark.parametrize("stream", [False, True])
def test_quantized_integer_weights(good, tmp_path, capsys, stream):
    bad = _copy(good, tmp_path / "m")
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = torch.randint(-8, 8, (64, 32), dtype=torch.int8)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    _expect_error(capsys, tmp_path, [SPEC, str(bad)] + (["--stream"] if stream else []), "quantized or integer weights")


# ---- models the compiler cannot upcycle -------------------------------------------------------

def test_no_mlp_found(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)).eval()
    path = tmp_path / "lin.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 8),)), str(path))
    _expect_error(capsys, tmp_path, [SPEC, str(path)], "no MLP found")


@pytest.mark.parametrize("stream", [False, True])
def test_unsupported_activation(tmp_path, capsys, stream):
    from transformers import LlamaForCausalLM

    src = tmp_path / "tanh"
    LlamaForCausalLM(_cfg(hidden_act="tanh")).save_pretrained(src)
    err = _expect_error(capsys, tmp_path, [SPEC, str(src)] + (["--stream"] if stream else []), "unsupported activation")
    assert "silu" in err  # says what would be valid


# ---- the environment: full disk, existing output ----------------------------------------------

def test_full_disk_streaming(good, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = checkpoint._BackgroundIO._write

    def write(file, data):  # on the writer's thread: the error must reach the user all the same
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device", file.name)
        real(file, data)

    monkeypatch.setattr(checkpoint._BackgroundIO, "_write", staticmethod(write))
    _expect_error(capsys, tmp_path, [SPEC, str(good), "--stream"], "No space left on device")


def test_full_disk_in_memory(good, tmp_path, capsys, monkeypatch):
    from upcycle.compiler import saving

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saving, "st_save_model", boom)
    _expect_error(capsys, tmp_path, [SPEC, str(good), "--no-stream"], "No space left on device")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(upcycle.UpcycleError):
        run([SPEC, str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--debug"])


def test_subprocess_no_traceback(good, tmp_path):
    bad = _copy(good, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:100])
    r = subprocess.run([sys.executable, "-m", "upcycle.compiler.cli", SPEC, str(bad), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


# ---- CLI-level fuzz of spec files: never an internal error, never a traceback -----------------

def test_fuzz_spec_files(good, tmp_path_factory):
    hypothesis = pytest.importorskip("hypothesis")
    import yaml
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keys = st.sampled_from(["experts", "router", "layers", "verify", "seed", "weight_scaling", "expansion",
                            "granularity", "top_k", "type", "init", "mode", "indices", "probe_tokens", "x"])
    leaf = st.one_of(st.integers(-3, 70), st.floats(allow_nan=True), st.text(max_size=6), st.booleans(), st.none())
    tree = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(keys, c, max_size=3)), max_leaves=8)
    docs = st.one_of(tree.map(lambda t: yaml.safe_dump(t)), st.text(max_size=40))
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(docs)
    def check(text):
        spec = folder / "spec.yaml"
        spec.write_text(text)
        rc = run([str(spec), str(good), "--dry-run"])
        assert rc in (0, 2)

    check()
    del hypothesis


def test_unreadable_model_path_simulated(good, tmp_path, capsys, monkeypatch):
    """Permission denied as seen by a non-root user (the test may run as root, which reads anything)."""
    import builtins

    target = str(good / "model.safetensors")
    real_open = builtins.open

    def guarded(file, *a, **k):
        if str(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    _expect_error(capsys, tmp_path, [SPEC, str(good), "--stream"], "Permission denied")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    # the pre-flight reads the header (open: "Permission denied") before the loader's access check
    _expect_error(capsys, tmp_path, [SPEC, target, "--config", str(good)], "ermission denied")
