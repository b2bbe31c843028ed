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

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _run(nproc: int, scenario: str, out: Path, *extra: str, timeout: int = 600) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [str(TORCHRUN), "--nproc-per-node", str(nproc), "--master-port", str(29500 + os.getpid() % 1000),
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


@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_dcp_checkpoint_resumes_on_another_world_size(tmp_path, saved, resumed):
    saver = _run(saved, "dcp_save", tmp_path)
    assert (tmp_path / f"ckpt-w{saved}" / ".metadata").is_file()
    assert not (tmp_path / f"ckpt-w{saved}.partial").exists()
    resumed_runs = _run(resumed, "dcp_resume", tmp_path, "--from-world", str(saved))
    for r in resumed_runs:
        assert r["progress"] == {"step": 3, "data_position": 12}
        _close(r["cont"], saver[0]["cont"])
    assert resumed_runs[0]["lr"] == pytest.approx(1e-2 / 4)  # the scheduler resumed at step 3
