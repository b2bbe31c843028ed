"""experiments/reproduce.py --quick: the whole pipeline (pre-training, every variant, part B through
examples/train.py, report, claims, plots) on tiny sizes, and resuming skips finished runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_pipeline_and_resume(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "reproduce.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    for needle in ("## The paper's findings at this scale", "upcycled E8G8T8 beats dense continued",
                   "weight scaling lowers the loss", "no aux loss leads to dead experts", "## Part B",
                   "init ppl / pre-trained ppl", "loss at dense's FLOPs"):
        assert needle in report, needle
    rep = _load_reproduce()
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["table"]) == len(rep.VARIANTS) and all(c["verdict"] != "not run" for c in results["claims"])
    assert set(results["part_b"]) == set(rep.PART_B) >= {"dense", "recipe", "e8g1t2", "e8g8t8_per_slice_tks"}
    smollm2_claims = [c for c in results["claims"] if "SmolLM2-135M" in c["claim"]]
    assert len(smollm2_claims) == 10 and all(c["verdict"] != "not run" for c in smollm2_claims)
    for png in ("validation_curves.png", "router_load.png", "smollm2_validation_curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    done = sorted(p.parent.name for p in (tmp_path / "runs").glob("*/done.json"))
    assert "pretrain-seed0" in done and "recipe-seed0" in done and len(done) == 1 + len(rep.VARIANTS)
    # a second run finds everything done and only rewrites the report
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/final.pt")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recipe seed 0" not in proc.stdout and "$ " not in proc.stdout  # nothing retrained
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/final.pt")}
    # side-by-side throughput of every variant, then the report quotes it with the ratio to dense
    proc = subprocess.run(cmd + ["--throughput"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    speeds = json.loads((tmp_path / "throughput.json").read_text())["tokens_per_s"]
    assert len(speeds) == len(rep.VARIANTS) and all(v > 0 for v in speeds.values())
    report = (tmp_path / "REPORT.md").read_text()
    assert "measured side by side" in report and "(1.00x)" in report
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/final.pt")}


def _load_reproduce():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "experiments" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("reproduce", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_part_b_active_parameters_match_the_compiled_model():
    """Part B's active count comes from the config and spec alone; it must equal the compiled
    model's non-expert parameters plus top_k / (E x G) of its expert parameters."""
    import torch
    import transformers

    from upcycle import compile_upcycle

    reproduce = _load_reproduce()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    for experts in ({"expansion": 8, "granularity": 1, "top_k": 2}, {"expansion": 8, "granularity": 8, "top_k": 8}):
        torch.manual_seed(0)
        moe = compile_upcycle(transformers.LlamaForCausalLM(cfg), {"experts": experts, "verify": {"enabled": False}})
        total = sum(p.numel() for p in moe.parameters())
        expert = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
        assert expert > 0
        want = total - expert + expert * experts["top_k"] // (experts["expansion"] * experts["granularity"])
        run_json = {"spec": {"experts": experts, "layers": "all"}, "dense_config": cfg.to_dict()}
        assert reproduce._part_b_active(run_json, total) == want


def test_claims_pair_runs_by_seed():
    """Seeds differ by more than the variants do (each seed pre-trains its own model), so a claim
    compares a variant with its baseline seed by seed. Here the baseline's mean over three seeds is
    lower than the single-seed variant, yet on the one seed both ran the variant is 1% lower: the
    verdict must come from that pair."""
    rep = _load_reproduce()
    base = {0: {"final": 1.10}, 1: {"final": 1.00}, 2: {"final": 1.00}}  # mean 1.033
    variant = {0: {"final": 1.089}}  # 1% below seed 0's baseline, above the 3-seed mean
    p = rep.paired(variant, base, "final")
    assert p["seeds"] == [0] and abs(p["mean"] - (-0.01)) < 1e-12 and p["margin"] == rep.ONE_SEED_MARGIN
    assert rep._verdict(p["mean"], p["margin"]) == "reproduced"
    # three seeds: margin = t(2) x sd / sqrt(3), floored at 0.5%
    a = {s: {"final": v} for s, v in enumerate([0.98, 0.985, 0.975])}
    b = {s: {"final": 1.0} for s in range(3)}
    p = rep.paired(a, b, "final")
    assert abs(p["margin"] - 4.303 * 0.005 / 3 ** 0.5) < 1e-9 and rep._verdict(p["mean"], p["margin"]) == "reproduced"
    a[1]["final"] = 1.03  # one seed against: the interval now spans zero
    p = rep.paired(a, b, "final")
    assert rep._verdict(p["mean"], p["margin"]) == "inconclusive"
    # a seed missing its value is left out, not counted as zero
    a[2]["final"] = None
    assert rep.paired(a, b, "final")["seeds"] == [0, 1]
