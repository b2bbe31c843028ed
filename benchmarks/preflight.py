"""How good are the pre-flight estimates, and what does the integrity check cost on load?

    python benchmarks/preflight.py [--hidden 512 --layers 6 --spec e8g1t2]

For a synthetic Llama saved to a temp folder, each conversion (in memory, streamed) runs in a fresh
child process that first imports everything, then resets its peak-RSS counter (/proc/self/clear_refs)
and converts: the measured peak is what the conversion added to the resident set, the quantity the
estimate predicts (the interpreter with torch is already resident, and not in MemAvailable either).
Then upcycle.load is timed with and without the sha256 check, page cache hot, and sha256_file alone.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch, transformers, upcycle
from upcycle.compiler import cli, preflight, resources
from upcycle.compiler.streaming import plan_on_meta

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

spec, model, out, mode = sys.argv[1:5]
if mode == "load":  # `model` is an output folder here
    from upcycle.compiler import reload

    folder = Path(model)
    config = reload.load_base_config(folder)
    sizes = [f.stat().st_size for f in reload.weight_files(folder)]
    est = resources.loading(reload._dense_bytes(config, reload._config_dtype(config)), sum(sizes), max(sizes))
    upcycle.load(folder, verify=False)  # imports and class resolution out of the measurement
    Path("/proc/self/clear_refs").write_text("5")
    before = rss("VmRSS")
    t0 = time.perf_counter()
    upcycle.load(folder)
    print(json.dumps({"mode": mode, "estimate": est.memory, "measured": rss("VmHWM") - before,
                      "seconds": time.perf_counter() - t0}))
    sys.exit(0)
flags = ["--stream"] if mode == "streaming" else []
cli.run([spec, model, "--dry-run", *flags])  # imports, class resolution and the plan: out of the measurement
pre = preflight.plan_checkpoint(spec, model)
est = pre.streaming if mode == "streaming" else pre.in_memory
Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
before = rss("VmRSS")
t0 = time.perf_counter()
assert cli.run([spec, model, "-o", out, "--no-progress", *flags]) == 0
seconds = time.perf_counter() - t0
print(json.dumps({"mode": mode, "estimate": est.memory, "measured": rss("VmHWM") - before, "seconds": seconds,
                  "estimate_output": est.output, "output": sum(p.stat().st_size for p in Path(out).iterdir())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--spec", default="e8g1t2")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    results = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                          num_attention_heads=8, num_key_value_heads=4, vocab_size=args.vocab)
        LlamaForCausalLM(cfg).save_pretrained(d / "dense")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        runs = []
        for mode in ("in memory", "streaming", "load"):
            out = d / mode.replace(" ", "-")
            src = d / "in-memory" if mode == "load" else d / "dense"
            r = subprocess.run([sys.executable, "-c", CHILD, args.spec, str(src), str(out), mode],
                               capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"{mode}: {r.stderr[-3000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row["ratio"] = row["estimate"] / max(row["measured"], 1)
            runs.append(row)
        results["conversions"] = runs

        import upcycle
        from upcycle.runtime.checksums import sha256_file

        out = d / "in-memory"
        size = sum(p.stat().st_size for p in out.iterdir())
        upcycle.load(out)  # page cache and imports warm
        timings = {}
        for verify in (False, True, False, True):
            t0 = time.perf_counter()
            upcycle.load(out, verify=verify)
            timings.setdefault(verify, []).append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sha256_file(out / "model.safetensors")
        hash_s = time.perf_counter() - t0
        results["load"] = {"folder_bytes": size, "seconds_verify_off": min(timings[False]),
                           "seconds_verify_on": min(timings[True]),
                           "sha256_file_GBps": (out / "model.safetensors").stat().st_size / hash_s / 1e9}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
