"""experiments/diagnose.py --quick: the fast diagnostic's pipeline end to end (tiny Llama on bytes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_diagnose_quick_runs_and_reports(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "diagnose.py"), "--quick", "--out", str(tmp_path),
           "--only", "dense", "recipe", "per_slice", "per_slice_relax50", "e8g1t2_output", "e8g1t2_tks_kmeans",
           "e8g2t1_shared1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    assert "| dense continued |" in table and "per-slice selection" in table
    per_slice = json.loads((tmp_path / "per_slice.json").read_text())
    # per_slice routing always hands tokens complete MLPs; the telemetry says so at every step
    assert all(r["complete_mlp_fraction"] == 1.0 for r in per_slice["rows"] if "complete_mlp_fraction" in r)
    relaxed = json.loads((tmp_path / "per_slice_relax50.json").read_text())
    (switch,) = [r for r in relaxed["rows"] if r.get("relaxed")]
    assert switch["step"] == 3 and "val_after_relax" in switch
    # k-means routers cluster training text (no fall-back to virtual groups); both start exactly at dense
    assert "kmeans needs the MLP's inputs" not in out.stderr
    start = {n: json.loads((tmp_path / f"{n}.json").read_text())["rows"][0]["val_loss"]
             for n in ("dense", "e8g1t2_tks_kmeans", "e8g2t1_shared1")}
    assert abs(start["e8g1t2_tks_kmeans"] - start["dense"]) < 1e-4 and abs(start["e8g2t1_shared1"] - start["dense"]) < 1e-4
    # a second call skips what is finished
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0 and "step 0 val" not in again.stdout
