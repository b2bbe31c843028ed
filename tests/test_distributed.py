"""Distributed training on CPU: `torchrun --nproc-per-node 2` (gloo) against one process.

The workers (tests/dist_worker.py) train a seeded tiny upcycled Llama with AdamW. The single-process
reference takes each rank's share of the global batch as a gradient-accumulation micro-batch with
loss / 2 and aux scale 1/2 (the documented rule), which is what FSDP's gradient averaging computes.
Tolerance: losses and parameters equal to 1e-6 relative (they come out bitwise equal in fp32 here;
the bound leaves room for a different reduction order elsewhere).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# every test here launches torchrun (gloo, 2 processes); the slow ones are marked one by one
pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
# torchrun as a module of this interpreter: a copied virtual environment's `torchrun` script may name
# another interpreter in its #! line (and so import another checkout)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _run(nproc: int, scenario: str, out: Path, *extra: str, timeout: int = 600) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(29500 + os.getpid() % 1000),
           str(WORKER), scenario, str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"{scenario}-rank{r}.pt") for r in range(nproc)]


def _close(a, b, tol=1e-6):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k], tol)
        return
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() <= tol


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--checkpointing",)], ids=["fsdp", "fsdp+checkpointing"])
def test_fsdp_two_ranks_match_one_process(tmp_path, extra):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = _run(2, "fsdp", tmp_path / "two", *extra)
    one = _run(1, "fsdp", tmp_path / "one", *extra)
    assert two[0]["sharded"] > 0 and two[0]["local_numel"] * 2 >= one[0]["local_numel"]  # really sharded
    assert two[0]["local_numel"] < one[0]["local_numel"]
    _close(two[0]["losses"], one[0]["losses"])
    _close(two[0]["params"], one[0]["params"])
    _close(two[1]["params"], one[0]["params"])


@pytest.mark.slow
def test_fsdp_with_per_block_compile_matches_one_process(tmp_path):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = _run(2, "fsdp", tmp_path / "two", "--compile", "--steps", "2")
    one = _run(1, "fsdp", tmp_path / "one", "--compile", "--steps", "2")  # same compiled blocks
    _close(two[0]["losses"], one[0]["losses"], 1e-5)
    _close(two[0]["params"], one[0]["params"], 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_dcp_checkpoint_resumes_on_another_world_size(tmp_path, saved, resumed):
    saver = _run(saved, "dcp_save", tmp_path)
    assert (tmp_path / f"ckpt-w{saved}" / ".metadata").is_file()
    assert not (tmp_path / f"ckpt-w{saved}.partial").exists()
    resumed_runs = _run(resumed, "dcp_resume", tmp_path, "--from-world", str(saved))
    for r in resumed_runs:
        assert r["progress"] == {"step": 3, "data_position": 12}
        _close(r["cont"], saver[0]["cont"])
    assert resumed_runs[0]["lr"] == pytest.approx(1e-2 / 7)  # the scheduler resumed at step 3, then 3 more


@pytest.mark.parametrize("backend", ["grouped", "reference"])
def test_expert_parallel_layer_equals_the_single_process_layer(tmp_path, backend):
    """EP = 2: each rank holds 4 of 8 experts; skewed routing (rank 0's experts favoured), experts
    with no tokens; forward rows, input gradients, the summed router gradient and each rank's expert
    gradients equal the full layer's on both ranks' tokens (task loss only)."""
    runs = _run(2, "ep_layer", tmp_path, "--backend", backend)
    for r in runs:
        _close(r["out"], r["out_ref"], 1e-6)
        _close(r["dx"], r["dx_ref"], 1e-6)
        _close(r["router"], r["router_ref"], 1e-6)
        _close(r["experts"], r["experts_ref"], 1e-6)
    idle = [float(g.abs().sum()) == 0.0 for r in runs for g in r["experts"]["up_proj"]]
    assert any(idle) and not all(idle)  # some experts got no tokens at all


@pytest.mark.slow
def test_expert_parallel_with_fsdp_matches_one_process(tmp_path):
    """EP x FSDP on the same 2 ranks. Losses equal to 1e-6; parameters to 1e-3 relative: expert
    gradients are summed over ranks then divided (the reference averages micro-batches), and
    AdamW's normalisation magnifies the last-bit differences of near-zero gradients."""
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = _run(2, "ep_fsdp", tmp_path / "two")
    one = _run(1, "ep_fsdp", tmp_path / "one")
    _close(two[0]["losses"], one[0]["losses"])
    _close(two[0]["params"], one[0]["params"], 1e-3)


@pytest.mark.slow
def test_expert_parallel_checkpoint_resumes_in_one_process(tmp_path):
    saver = _run(2, "dcp_save", tmp_path, "--ep")
    resumed = _run(1, "dcp_resume", tmp_path, "--from-world", "2")
    _close(resumed[0]["cont"], saver[0]["cont"])
