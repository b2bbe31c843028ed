"""experiments/reproduce.py --quick: the whole pipeline (pre-training, every variant, part B through
examples/train.py, report, claims, plots) on tiny sizes, and resuming skips finished runs."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_pipeline_and_resume(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "reproduce.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    for needle in ("## The paper's findings at this scale", "upcycled E8G8T8 beats dense continued",
                   "weight scaling lowers the loss", "no aux loss leads to dead experts", "## Part B",
                   "init ppl / pre-trained ppl", "loss at dense's FLOPs"):
        assert needle in report, needle
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["table"]) == 12 and all(c["verdict"] != "not run" for c in results["claims"])
    for png in ("validation_curves.png", "router_load.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    done = sorted(p.parent.name for p in (tmp_path / "runs").glob("*/done.json"))
    assert "pretrain-seed0" in done and "recipe-seed0" in done and len(done) == 13
    # a second run finds everything done and only rewrites the report
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/final.pt")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recipe seed 0" not in proc.stdout and "$ " not in proc.stdout  # nothing retrained
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/final.pt")}
