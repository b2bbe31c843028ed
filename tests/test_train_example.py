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
# torchrun as a module of this interpreter: a copied virtual environment's `torchrun` script may name
# another interpreter in its #! line (and so import another checkout)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ARGS = ["--quick", "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4", "--log-every", "100"]


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def _train(run, *extra, nproc=None, expect=0, **env):
    head = [sys.executable, str(TRAIN)] if nproc is None else \
        [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(29700 + os.getpid() % 200), str(TRAIN)]
    proc = subprocess.run(head + ARGS + ["--run-dir", str(run), *extra], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc.stdout


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_match_accumulation_and_export(tmp_path):
    # relaxed half-way, so the sharded run's last checkpoint has a transformers format (a trained
    # per-slice model has none)
    _train(tmp_path / "one", "--accum", "2", "--relax-routing-at", "0.5")
    _train(tmp_path / "two", "--relax-routing-at", "0.5", nproc=2)
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
    assert json.loads((tmp_path / "two" / "run.json").read_text())["relax_routing_step"] == 4
    upcycle.relax_routing(ref)  # the run's last steps routed with plain top-K
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


@pytest.mark.slow
def test_per_slice_run_relaxes_and_exports_to_transformers_exactly(tmp_path):
    """A model trained with per_slice routing ends its run on plain top-K (--relax-routing-at, 0.9 by
    default; 0.5 here), so its last checkpoint exports to a transformers format, equal to what was
    trained; a checkpoint taken before the switch is refused for --format hf (it routes per slice)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("experts: {expansion: 2, granularity: 2, top_k: 2}\nrouter: {selection: per_slice}\n")
    run = tmp_path / "run"
    out = _train(run, "--spec", str(spec), "--relax-routing-at", "0.5", "--keep", "3")
    assert "step 4: per_slice routing relaxed to plain top-K for the last 4 steps" in out
    assert json.loads((run / "run.json").read_text())["relax_routing_step"] == 4
    router = [json.loads(ln) for ln in (run / "router.jsonl").read_text().splitlines()]
    complete = [min(s["complete_mlp_fraction"] for s in r["layers"].values()) for r in router]
    assert complete[:4] == [1.0] * 4  # per_slice: every token gets complete MLPs until the switch

    import upcycle
    from upcycle.compiler.export_run import main as export_main
    from transformers import AutoModelForCausalLM

    assert export_main([str(run), "-o", str(tmp_path / "native")]) == 0
    native = upcycle.load(tmp_path / "native").eval()
    assert all(m.router.selection == "topk" for m in upcycle.runtime.moe_layers(native).values())
    assert export_main([str(run), "-o", str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, native(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # step 4's checkpoint predates the switch: a trained per-slice model has no transformers format
    assert export_main([str(run), "-o", str(tmp_path / "hf4"), "--format", "hf", "--step", "4"]) == 2
