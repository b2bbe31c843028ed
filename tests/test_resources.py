"""The pre-flight budget: impossible conversions are refused before any tensor is allocated, with both
numbers and what would fit; --force-resources goes ahead; --dry-run shows the estimates. Budgets
are made small with UPCYCLE_MEMORY_BUDGET / UPCYCLE_DISK_BUDGET (compiler/resources.py), so no test
needs a machine that is actually short of memory or disk."""

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _hostile import address_space_cap, check_refusal, entries, llama_config, llama_dir, snapshot  # noqa: E402

import upcycle  # noqa: E402
from upcycle.compiler import resources  # noqa: E402
from upcycle.compiler.cli import run  # noqa: E402
from upcycle.compiler.resources import ResourceError  # noqa: E402
from upcycle.runtime import MoELayer  # noqa: E402

HUGE = {"experts": {"expansion": 100000, "granularity": 1, "top_k": 2}}  # the 200,000 experts


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture
def address_space_guard():
    with address_space_cap():
        yield


@pytest.fixture
def huge_spec(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("experts: {expansion: 100000, granularity: 1, top_k: 2}\n")
    return path


def _refused(capsys, tmp_path, args, needle):
    out = tmp_path / "out"
    before = entries(tmp_path)
    capsys.readouterr()
    rc = run([*args, "-o", str(out), "--no-progress"])
    return check_refusal(rc, capsys.readouterr().err, needle=needle, out=out, parent_before=before)


# ---- memory --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [[], ["--stream"], ["--format", "hf"], ["--stream", "--format", "hf"]])
def test_huge_expansion_refused_before_any_work(model, huge_spec, tmp_path, capsys, monkeypatch, mode,
                                                address_space_guard):
    """200,000 experts on a tiny Llama (20 GB RSS and the OOM killer before): refused in seconds."""
    monkeypatch.setenv(resources.ENV_MEMORY, "2GB")
    before = snapshot(model)
    t0 = time.perf_counter()
    line = _refused(capsys, tmp_path, [str(huge_spec), str(model), *mode], "not enough memory")
    assert time.perf_counter() - t0 < 30
    assert "2.00 GB is available (UPCYCLE_MEMORY_BUDGET)" in line and "--force-resources" in line
    assert "experts.expansion <= " in line  # what would fit
    needs = float(line.split("it needs about ")[1].split()[0])
    assert needs > 2 and line.split("it needs about ")[1].split()[1] in ("GB", "TB")
    assert snapshot(model) == before


def test_in_memory_refusal_suggests_stream_when_it_fits(monkeypatch):
    from upcycle.compiler.preflight import Preflight, check_in_memory

    pre = Preflight(None, None, resources.Estimate("in-memory conversion", 300_000_000, 1000, (("x", 300_000_000),)),
                    resources.Estimate("streaming conversion", 40_000_000, 1000))
    monkeypatch.setenv(resources.ENV_MEMORY, "100MB")
    with pytest.raises(ResourceError, match=r"would fit: --stream \(about 40.00 MB\)"):
        check_in_memory(pre, None)
    monkeypatch.setenv(resources.ENV_MEMORY, "10MB")  # nothing fits: no suggestion of --stream
    with pytest.raises(ResourceError) as info:
        check_in_memory(pre, None)
    assert "--stream" not in str(info.value)


def _smollm2_estimates(spec="e8g8t8"):
    """Estimates for SmolLM2-135M's shapes (fp32), planned on the meta device: no weights needed."""
    from upcycle.compiler.loading import meta_skeleton
    from upcycle.compiler.pipeline import analyse
    from upcycle.specs import load_spec

    cfg = llama_config(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)
    cfg.architectures = ["LlamaForCausalLM"]
    model = meta_skeleton(cfg, torch.float32)
    spec = load_spec(spec)
    plan = analyse(model, spec)[2]
    w = resources.workload(plan, spec, model, itemsize=4)
    return resources.in_memory(w), resources.streaming(w)


def test_estimates_agree_with_measured_peaks():
    """docs/benchmarks.md's measured peak RSS of SmolLM2-135M e8g8t8 (whole process, 0.25 GB of it the interpreter
    with torch and transformers): 3.8 GB in memory, 0.74 GB streamed. The estimates, which exclude the
    interpreter, must be within 0.7x-1.6x of the rest, so they neither refuse jobs that fit nor let
    through ones that do not."""
    mem, stream = _smollm2_estimates()
    assert 0.7 * (3.8e9 - 0.25e9) <= mem.memory <= 1.6 * (3.8e9 - 0.25e9), resources.fmt_bytes(mem.memory)
    assert 0.7 * (0.74e9 - 0.25e9) <= stream.memory <= 1.6 * (0.74e9 - 0.25e9), resources.fmt_bytes(stream.memory)
    assert abs(mem.output - 2.77e9) < 0.05e9  # the output folder's 2.77 GB


def test_force_resources_goes_ahead(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(resources.ENV_MEMORY, "1KB")
    monkeypatch.setenv(resources.ENV_DISK, "1KB")
    _refused(capsys, tmp_path, ["e8g1t2", str(model)], "not enough memory")
    out = tmp_path / "forced"
    assert run(["e8g1t2", str(model), "-o", str(out), "--no-progress", "--force-resources"]) == 0
    assert isinstance(upcycle.load(out, force_resources=True).model.layers[0].mlp, MoELayer)


def test_compile_upcycle_raises_before_building(monkeypatch, address_space_guard):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config()).eval()
    monkeypatch.setenv(resources.ENV_MEMORY, "2GB")
    with pytest.raises(ResourceError, match="not enough memory") as info:
        upcycle.compile_upcycle(model, HUGE)
    assert isinstance(info.value, upcycle.UpcycleError)
    assert not any(isinstance(m, MoELayer) for m in model.modules())  # nothing was rewritten
    monkeypatch.setenv(resources.ENV_MEMORY, "1KB")
    moe = upcycle.compile_upcycle(model, "e8g1t2", force_resources=True)
    assert any(isinstance(m, MoELayer) for m in moe.modules())


def test_stream_upcycle_raises_before_reading(model, tmp_path, monkeypatch, address_space_guard):
    from upcycle.compiler.checkpoint import TensorReader
    from upcycle.compiler.streaming import stream_upcycle

    reads = []
    real = TensorReader.get
    monkeypatch.setattr(TensorReader, "get", lambda self, name: reads.append(name) or real(self, name))
    monkeypatch.setenv(resources.ENV_MEMORY, "1MB")
    with pytest.raises(ResourceError, match="streaming conversion"):
        stream_upcycle(HUGE, model, tmp_path / "o")
    assert reads == [] and entries(tmp_path) == set()


def test_load_checks_memory(model, tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert run(["e8g1t2", str(model), "-o", str(out), "--no-progress"]) == 0
    monkeypatch.setenv(resources.ENV_MEMORY, "10KB")
    with pytest.raises(ResourceError, match="upcycle.load"):
        upcycle.load(out)
    assert isinstance(upcycle.load(out, force_resources=True).model.layers[1].mlp, MoELayer)


def test_huge_probe_batch_refused(model, tmp_path, capsys):
    """--probe-tokens far beyond memory (the attention scores alone are petabytes): no MemoryError half-way."""
    _refused(capsys, tmp_path, ["e8g1t2", str(model), "--probe-tokens", "100000000"], "verification")


# ---- disk ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [[], ["--stream"], ["--format", "hf"], ["--stream", "--format", "hf"]])
def test_disk_too_small_refused_before_any_work(model, tmp_path, capsys, monkeypatch, mode):
    monkeypatch.setenv(resources.ENV_DISK, "100KB")
    line = _refused(capsys, tmp_path, ["e8g1t2", str(model), *mode], "not enough disk space")
    assert "100.00 KB is UPCYCLE_DISK_BUDGET" in line and "another -o" in line


def test_python_writers_check_disk(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from upcycle.compiler.export_hf import export_hf

    moe = upcycle.compile_upcycle(LlamaForCausalLM(llama_config()).eval(), "e8g1t2")
    monkeypatch.setenv(resources.ENV_DISK, "10KB")
    for write in (lambda o: upcycle.save(moe, o, spec="e8g1t2"), lambda o: export_hf(moe, o, spec="e8g1t2"),
                  lambda o: moe.save_pretrained(o)):
        with pytest.raises(ResourceError, match="not enough disk space"):
            write(tmp_path / "o")
        assert entries(tmp_path) == set()
    upcycle.save(moe, tmp_path / "forced", spec="e8g1t2", force_resources=True)
    moe.save_pretrained(tmp_path / "forced-pretrained", force_resources=True)
    assert (tmp_path / "forced-pretrained" / "upcycle.json").is_file()


# ---- the plan table ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [[], ["--no-stream"], ["--stream"]])
def test_dry_run_shows_estimates(model, capsys, monkeypatch, mode):
    assert run(["e8g1t2", str(model), "--dry-run", *mode]) == 0
    out = capsys.readouterr().out
    what = "in-memory conversion" if mode == ["--no-stream"] else "streaming conversion"  # streaming: the default
    assert f"memory ({what}): about " in out and "available" in out and ": fits" in out
    assert "output: about " in out
    monkeypatch.setenv(resources.ENV_MEMORY, "1KB")
    assert run(["e8g1t2", str(model), "--dry-run", *mode]) == 0  # a dry run shows, it does not refuse
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_dry_run_of_a_loaded_input_shows_estimates(tmp_path, capsys):
    m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    path = tmp_path / "prog.pt2"
    torch.export.save(torch.export.export(m, (torch.randn(2, 8),)), str(path))
    assert run(["e8g1t2", str(path), "--dry-run"]) == 0
    assert "memory (in-memory conversion): about " in capsys.readouterr().out


# ---- what is available ---------------------------------------------------------------------------

def _fake_proc(tmp_path, cgroup_line, mount_line):
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup_line + "\n")
    (proc / "mountinfo").write_text(mount_line + "\n")
    return tmp_path / "proc"


def test_cgroup_v2_limit_counts_every_level(tmp_path):
    root = tmp_path / "cg"
    leaf = root / "user.slice" / "job"
    leaf.mkdir(parents=True)
    (root / "user.slice" / "memory.max").write_text("4000000000\n")
    (root / "user.slice" / "memory.current").write_text("3500000000\n")
    (root / "user.slice" / "memory.stat").write_text("anon 1\ninactive_file 500000000\n")
    (leaf / "memory.max").write_text("max\n")
    (leaf / "memory.current").write_text("100\n")
    proc = _fake_proc(tmp_path, "0::/user.slice/job", f"30 25 0:27 / {root} rw - cgroup2 cgroup2 rw")
    got = resources.cgroup_available(proc)
    assert got.bytes == 4_000_000_000 - (3_500_000_000 - 500_000_000)  # the parent's limit; cache is reclaimable
    assert "cgroup limit 4.00 GB" in got.source


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    root = tmp_path / "memory"
    leaf = root / "docker" / "abc"
    leaf.mkdir(parents=True)
    (leaf / "memory.limit_in_bytes").write_text("2147483648\n")
    (leaf / "memory.usage_in_bytes").write_text("1073741824\n")
    (leaf / "memory.stat").write_text("total_inactive_file 73741824\n")
    (root / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # "no limit"
    (root / "memory.usage_in_bytes").write_text("5\n")
    proc = _fake_proc(tmp_path, "4:memory:/docker/abc", f"35 31 0:32 / {root} rw,relatime - cgroup cgroup rw,memory")
    assert resources.cgroup_available(proc).bytes == 2147483648 - (1073741824 - 73741824)
    (leaf / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert resources.cgroup_available(proc) is None


def test_budget_env_is_a_cap_and_checked(monkeypatch):
    real = resources.available_memory()
    monkeypatch.setenv(resources.ENV_MEMORY, "3MB")
    assert resources.available_memory() == resources.Available(3_000_000, resources.ENV_MEMORY)
    monkeypatch.setenv(resources.ENV_MEMORY, "1000TB")  # a cap never adds memory
    assert resources.available_memory().bytes <= max(real.bytes, 1)
    monkeypatch.setenv(resources.ENV_MEMORY, "lots")
    with pytest.raises(upcycle.UpcycleError, match="UPCYCLE_MEMORY_BUDGET 'lots'"):
        resources.available_memory()


def test_bad_budget_env_is_one_line(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(resources.ENV_DISK, "-5GB")
    _refused(capsys, tmp_path, ["e8g1t2", str(model)], "UPCYCLE_DISK_BUDGET '-5GB'")


def test_estimates_scale_with_expansion(model):
    from upcycle.compiler.preflight import plan_checkpoint

    small, big = plan_checkpoint({"experts": {"expansion": 2}}, model), plan_checkpoint({"experts": {"expansion": 16}}, model)
    extra = resources.FILES_OVERHEAD_BYTES
    assert big.in_memory.memory > small.in_memory.memory and big.in_memory.output - extra > 4 * (small.in_memory.output - extra)
    fit = big.in_memory.largest_fitting_expansion(small.in_memory.memory)
    assert 1 <= fit < 16  # "what would fit" points at an expansion that fits
    mem, stream = _smollm2_estimates("e8g1t2")  # at real sizes streaming holds far less
    assert stream.memory < mem.memory / 3
