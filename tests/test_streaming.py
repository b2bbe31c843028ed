"""Streaming conversion: same model as in memory, transformers-layout shards, every input tensor
accounted for, atomic output that survives an interruption."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import upcycle
from upcycle.compiler.checkpoint import ShardWriter
from upcycle.compiler.cli import run
from upcycle.compiler.errors import ModelError
from upcycle.compiler.loading import load_model
from upcycle.compiler.pipeline import upcycle_model
from upcycle.compiler.saving import save, tensor_accounting
from upcycle.compiler.streaming import stream_upcycle
from upcycle.passes.rewrite import RewriteRecord
from upcycle.runtime import MoELayer


def _cfg(tie=False, layers=2):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, tie_word_embeddings=tie, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("stream-models")
    torch.manual_seed(0)
    LlamaForCausalLM(_cfg(tie=False)).save_pretrained(root / "untied")
    torch.manual_seed(1)
    LlamaForCausalLM(_cfg(tie=True)).save_pretrained(root / "tied", max_shard_size="20KB")  # sharded input
    return root


SPEC = "e8g1t2"


def _in_memory(path, out, spec=SPEC):
    loaded = load_model(path)
    res = upcycle_model(loaded.model, spec)
    save(res.model, out, spec=spec, report=res.report, source=loaded, records=res.records)
    return out


# every expert and router row distinct (Drop-Upcycling re-initialises each copy differently, random
# router rows): the equality below sees any reordering, which identical copies would hide
DISTINCT = {"experts": {"expansion": 4, "granularity": 2, "top_k": 2, "drop_upcycling": 0.5},
            "router": {"init": "random"}}


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_stream_equals_in_memory(models, tmp_path, name):
    src = models / name
    res = stream_upcycle(DISTINCT, src, tmp_path / "s", max_shard_bytes=30_000)
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    shards = sorted((tmp_path / "s").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    a = upcycle.load(tmp_path / "s").state_dict()
    b = upcycle.load(_in_memory(src, tmp_path / "m", DISTINCT)).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same seed -> same router init, same experts
    up = a["model.layers.0.mlp.experts.up_proj"]
    n = up.shape[0]
    assert not any(torch.equal(up[i], up[j]) for i in range(n) for j in range(i + 1, n))  # all distinct
    m = res.manifest
    assert m["streaming"] is True and "synthetic" in m["verification"]
    for fname, entry in m["files"].items():  # sha256 computed while writing matches the bytes on disk
        assert hashlib.sha256((tmp_path / "s" / fname).read_bytes()).hexdigest() == entry["sha256"], fname
    acc = m["tensors"]
    assert "model.layers.0.mlp.up_proj.weight" in acc["transformed"]
    assert "model.layers.0.mlp.router.weight" in acc["transformed"]["model.layers.0.mlp.up_proj.weight"]
    assert "model.embed_tokens.weight" in acc["copied"]
    assert len(res.report.layers) == 2 and all(c["passed"] for c in res.report.layers)


def test_manifest_accounts_every_input_tensor(models, tmp_path):
    from safetensors import safe_open

    src = models / "tied"
    stream_upcycle(SPEC, src, tmp_path / "s")
    acc = json.loads((tmp_path / "s" / "upcycle.json").read_text())["tensors"]
    names = set()
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    accounted = set(acc["copied"]) | set(acc["transformed"]) | set(acc["dropped"])
    assert names == accounted
    # the in-memory path writes the same accounting
    _in_memory(src, tmp_path / "m")
    acc_m = json.loads((tmp_path / "m" / "upcycle.json").read_text())["tensors"]
    assert set(acc_m["transformed"]) == set(acc["transformed"])


def test_tied_duplicate_in_checkpoint_is_dropped_with_reason(models, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "dup"
    src.mkdir()
    (src / "config.json").write_text((models / "tied" / "config.json").read_text())
    state = {}
    for f in (models / "tied").glob("*.safetensors"):
        state.update(load_file(str(f)))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    res = stream_upcycle(SPEC, src, tmp_path / "s")
    dropped = res.manifest["tensors"]["dropped"]
    assert "lm_head.weight" in dropped and "tied to model.embed_tokens.weight" in dropped["lm_head.weight"]


def test_accounting_refuses_to_lose_a_tensor():
    rec = RewriteRecord("mlp", "mlp", "replace_module", "mlp", ["mlp.up.weight", "mlp.down.weight"])
    acc = tensor_accounting(["a", "mlp.up.weight", "mlp.down.weight"], [rec], ["a", "mlp.experts.up_proj"])
    assert acc["copied"] == ["a"] and acc["transformed"]["mlp.up.weight"] == ["mlp.experts.up_proj"]
    with pytest.raises(ModelError, match="'b' would be lost"):
        tensor_accounting(["a", "b", "mlp.up.weight"], [rec], ["a", "mlp.experts.up_proj"])


def test_interrupted_run_leaves_nothing_and_reruns(models, tmp_path):
    class Interrupting(ShardWriter):
        def write(self, name, tensor):
            if self._pos == 5:
                raise KeyboardInterrupt
            super().write(name, tensor)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        stream_upcycle(SPEC, models / "untied", out, max_shard_bytes=30_000, writer_factory=Interrupting)
    assert list(tmp_path.iterdir()) == []  # no output, no temp folder
    stream_upcycle(SPEC, models / "untied", out)
    assert isinstance(upcycle.load(out).model.layers[1].mlp, MoELayer)
    with pytest.raises(upcycle.UpcycleError, match="--force"):
        stream_upcycle(SPEC, models / "untied", out)
    stream_upcycle(SPEC, models / "untied", out, force=True)


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_layer_checks_run_while_writing_and_a_failing_one_leaves_nothing(models, tmp_path, monkeypatch, fmt):
    """Layer checks are deferred to the producer's waits for the disk: every layer is still checked,
    in order, and a layer that fails stops the run before the output exists."""
    import upcycle.compiler.pipeline as pipeline
    from upcycle.compiler.errors import VerificationError
    from upcycle.passes.verify import check_layer

    seen, waiting = [], []

    class Slow(ShardWriter):  # a writer queue of one byte: the producer waits after every buffer
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self._io._max_pending = 1
            real = self._io._wait
            self._io._wait = lambda ready: (waiting.append(1), real(ready))[1]

    def recording(path, *a, **k):
        seen.append(path)
        check = check_layer(path, *a, **k)
        if fail and path.endswith("layers.1.mlp"):
            check.passed = False
        return check

    monkeypatch.setattr(pipeline, "check_layer", recording)
    fail = False
    res = stream_upcycle(SPEC, models / "untied", tmp_path / "ok", writer_factory=Slow, fmt=fmt) if fmt == "native" \
        else stream_upcycle(SPEC, models / "untied", tmp_path / "ok", fmt=fmt)
    assert seen == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [c["mlp_path"] for c in res.report.layers] == seen and all(c["passed"] for c in res.report.layers)
    assert fmt == "hf" or waiting
    fail, seen = True, []
    with pytest.raises(VerificationError, match="layers.1.mlp"):
        stream_upcycle(SPEC, models / "untied", tmp_path / "bad", fmt=fmt)
    assert not (tmp_path / "bad").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_cli_stream_and_generate(models, tmp_path, capsys):
    out = tmp_path / "o"
    assert run([SPEC, str(models / "tied"), "-o", str(out), "--stream", "--no-progress", "--max-shard-size", "40KB"]) == 0
    assert "streamed" in capsys.readouterr().out
    model = upcycle.load(out)
    ids = torch.randint(0, 96, (1, 5))
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 7)
    assert run([SPEC, str(models / "tied"), "--dry-run", "--stream"]) == 0
    assert "MLPs found: 2, rewritten: 2" in capsys.readouterr().out


def test_single_safetensors_and_pt_state_dict_inputs(models, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    src = models / "untied"
    # a bare .safetensors with --config (config elsewhere)
    weights = tmp_path / "w" / "weights.safetensors"
    weights.parent.mkdir()
    weights.write_bytes((src / "model.safetensors").read_bytes())
    assert run([SPEC, str(weights), "--config", str(src / "config.json"), "-o", str(tmp_path / "a"), "--no-progress",
                "--no-stream"]) == 0
    assert run([SPEC, str(weights), "--config", str(src), "-o", str(tmp_path / "b"), "--stream", "--no-progress"]) == 0
    assert run([SPEC, str(weights), "--config", str(src), "-o", str(tmp_path / "d"), "--no-progress"]) == 0
    # a .pt state dict (weights_only) with config.json beside it
    pt_dir = tmp_path / "pt"
    pt_dir.mkdir()
    dense = LlamaForCausalLM.from_pretrained(src)
    torch.save(dense.state_dict(), pt_dir / "model.pt")
    (pt_dir / "config.json").write_text((src / "config.json").read_text())
    assert run([SPEC, str(pt_dir / "model.pt"), "-o", str(tmp_path / "c"), "--no-progress"]) == 0
    capsys.readouterr()
    sds = [upcycle.load(tmp_path / n).state_dict() for n in "abc"]
    for k in sds[0]:
        assert torch.equal(sds[0][k], sds[1][k]) and torch.equal(sds[0][k], sds[2][k]), k
    manifest = json.loads((tmp_path / "a" / "upcycle.json").read_text())
    assert manifest["tensors"]["copied"] and manifest["streaming"] is False
    # the default for a safetensors input is the streaming path (the fast one), with the same result
    assert json.loads((tmp_path / "d" / "upcycle.json").read_text())["streaming"] is True
    d = upcycle.load(tmp_path / "d").state_dict()
    assert all(torch.equal(d[k], sds[0][k]) for k in sds[0])


def test_gpt2_stream_equals_in_memory(tmp_path):
    """GPT-2's MLP (Conv1D, inline in its block's unit) streams too; the rewrite edits the traced
    unit, so the streamed mapping must work on a copy of the dense MLP's nodes."""
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96,
                                                                 bos_token_id=1, eos_token_id=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    stream_upcycle(DISTINCT, tmp_path / "gpt2", tmp_path / "s")
    a = upcycle.load(tmp_path / "s").state_dict()
    b = upcycle.load(_in_memory(tmp_path / "gpt2", tmp_path / "m", DISTINCT)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_profile_phases_are_measured_and_fit_in_the_total(models, tmp_path):
    """StreamResult.profile: the main thread's phases run one after another, so they add up to no more
    than the total; the writer's threads report their own time."""
    res = stream_upcycle(SPEC, models / "untied", tmp_path / "out")
    p = res.profile
    main = p["plan_s"] + p["read_s"] + p["map_s"] + p["check_s"] + p["probe_s"] + p["producer_wait_s"]
    assert 0 < main <= p["total_s"] + 1e-3 and p["total_s"] == res.seconds
    assert all(p[k] > 0 for k in ("plan_s", "read_s", "map_s", "check_s", "write_s", "sha256_s", "fsync_s"))


def test_benchmark_baseline_reads_the_input_and_writes_the_output_bytes_in_shards(models, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from convert import child_io

    src = models / "untied"
    in_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    want = 2 * in_bytes + 123  # more than the input: it is read again from the start
    res = child_io(str(src), str(want), str(tmp_path / "io"), str(in_bytes // 3))
    sizes = sorted(f.stat().st_size for f in (tmp_path / "io").iterdir())
    assert res["bytes"] == want == sum(sizes) and max(sizes) == in_bytes // 3 and len(sizes) == -(-want // (in_bytes // 3))
    data = b"".join(f.read_bytes() for f in sorted((tmp_path / "io").iterdir()))
    raw = b"".join(f.read_bytes() for f in sorted(src.glob("*.safetensors")))
    assert data == (raw * 3)[:want]


@pytest.mark.parametrize("fail", [False, True])
def test_the_kernel_is_asked_for_every_input_byte_once_and_the_readahead_stops(models, tmp_path, monkeypatch, fail):
    """compiler/readahead.py: from the start of a streamed conversion every byte of every checkpoint
    file is requested once, in file order (shards in turn), and the thread ends with the
    conversion, also when it fails (here: the writer raises)."""
    import os
    import threading

    import upcycle.compiler.readahead as ra
    from upcycle.compiler.checkpoint import checkpoint_files

    calls = []
    real = os.posix_fadvise

    def advise(fd, off, n, advice):  # the readahead thread's requests recorded (other callers pass through)
        if threading.current_thread().name != "upcycle-readahead":
            return real(fd, off, n, advice)
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), off, n))

    monkeypatch.setattr(ra.os, "posix_fadvise", advise)
    monkeypatch.setattr(ra, "request_bytes", lambda path: 4096)
    src = models / "tied"  # sharded
    files = checkpoint_files(src)
    assert len(files) > 1

    class Failing(ShardWriter):
        def write(self, name, tensor):
            raise OSError(28, "No space left on device")

    if fail:
        with pytest.raises(OSError):
            stream_upcycle(SPEC, src, tmp_path / "s", writer_factory=Failing)
    else:
        stream_upcycle(SPEC, src, tmp_path / "s")
    assert not any(t.name == "upcycle-readahead" for t in threading.enumerate())
    if fail:
        return
    got = {}
    for path, off, n in calls:  # each byte of each file at most once
        for b in range(off, off + n):
            assert (path, b) not in got
            got[(path, b)] = True
    want = {(str(f), b) for f in files for b in range(f.stat().st_size)}
    assert set(got) == want
    order = [(files.index(Path(p)), off) for p, off, _ in calls]
    assert order == sorted(order)
