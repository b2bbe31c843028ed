"""Save and reload a trained upcycled model in each of the three loops, on the real SmolLM2-135M.

    .venv/bin/python examples/save_reload.py [--layers first:2] [--steps 3]

(a) your own loop: train a few steps, model.save_pretrained + tokenizer, upcycle.load, same logits;
(b) transformers' Trainer: train, checkpoint, upcycle.load(checkpoint-N), same logits; plain
    AutoModelForCausalLM refuses the folder;
(c) torchrun + FSDP2 (examples/train.py, 2 processes): DCP checkpoint -> upcycle-export-run ->
    upcycle.load, and the same run exported as a transformers MoE (--format hf).
Prints one line per check. Real English text: the KJV (Debian's bible-kjv), as everywhere here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="e8g8t8")
    ap.add_argument("--layers", default="first:2", help="MoE layers (all: the whole model, ~13 GB with AdamW)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not sys.stderr.isatty():  # transformers' loading/writing bars are noise in a log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    import upcycle
    from upcycle.specs import load_spec
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from upcycle.runtime.training.data import kjv_split
    from smollm2_upcycle import smollm2_dir  # the cached dequantised SmolLM2 folder (made on first use)

    work = Path(args.out or tempfile.mkdtemp(prefix="upcycle-save-reload-"))
    src = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(src)
    train_text, val_text = kjv_split()
    ids = tok(train_text[:20000], return_tensors="pt")["input_ids"][0]
    batches = ids[: (len(ids) // 128) * 128].view(-1, 128)[: 4 * args.steps]
    probe = tok(val_text[:400], return_tensors="pt")["input_ids"][:, :64]
    kind, _, n = args.layers.partition(":")
    spec = load_spec(args.spec).to_dict()
    spec["layers"] = "all" if kind == "all" else {kind: int(n)}

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=probe).logits

    def fresh():
        return upcycle.compile_upcycle(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), spec)

    # (a) own loop
    model = fresh().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for b in batches.split(4):
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(work / "own-loop")
    tok.save_pretrained(work / "own-loop")
    again = upcycle.load(work / "own-loop")
    print(f"(a) own loop: {args.steps} steps, save_pretrained -> upcycle.load: logits equal: "
          f"{torch.equal(logits(again), logits(model))}")
    try:
        AutoModelForCausalLM.from_pretrained(work / "own-loop")
        print("(a) plain AutoModelForCausalLM: LOADED (a dense model: this must not happen)")
    except Exception as exc:  # noqa: BLE001 - the refusal is the point
        print(f"(a) plain AutoModelForCausalLM refuses it: {type(exc).__name__}: {str(exc).splitlines()[0][:110]}")
    del model, again, opt

    # (b) Trainer
    model = fresh()
    data = [{"input_ids": b, "labels": b} for b in batches]
    targs = TrainingArguments(output_dir=str(work / "trainer"), max_steps=args.steps, save_steps=args.steps,
                              per_device_train_batch_size=4, learning_rate=1e-4, report_to=[], use_cpu=True,
                              logging_steps=1, disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=data, processing_class=tok).train()
    ckpt = work / "trainer" / f"checkpoint-{args.steps}"
    again = upcycle.load(ckpt)
    same_tok = AutoTokenizer.from_pretrained(ckpt)("In the beginning")["input_ids"] == tok("In the beginning")["input_ids"]
    print(f"(b) Trainer: {ckpt.name} -> upcycle.load: logits equal: {torch.equal(logits(again), logits(model))}; "
          f"tokenizer in the checkpoint encodes identically: {same_tok}")
    del model, again

    # (c) torchrun + FSDP2, then upcycle-export-run
    run = work / "torchrun"
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    train = [str(ROOT / "examples" / "train.py"), "--run-dir", str(run), "--spec", args.spec, "--layers", args.layers,
             "--steps", str(args.steps), "--seq-len", "128", "--batch", "4", "--eval-every", str(args.steps),
             "--eval-seqs", "4", "--checkpoint-every", str(args.steps), "--threads", "1"]
    subprocess.run(torchrun + train, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    export = [py, "-m", "upcycle.compiler.export_run", str(run)]
    subprocess.run(export + ["-o", str(work / "torchrun-native")], check=True, stdout=subprocess.DEVNULL)
    native = upcycle.load(work / "torchrun-native")
    hf_ok = "skipped"
    if args.spec in ("e8g1t2", "e8g8t8"):
        r = subprocess.run(export + ["-o", str(work / "torchrun-hf"), "--format", "hf"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        if r.returncode == 0:
            hf = AutoModelForCausalLM.from_pretrained(work / "torchrun-hf", dtype=torch.float32)
            err = (logits(hf) - logits(native)).abs().max().item()
            hf_ok = f"{type(hf).__name__}, max |logit diff| vs native {err:.2e}"
        else:
            hf_ok = f"refused: {r.stderr.strip().splitlines()[-1][:140]}"
    print(f"(c) torchrun x2 + FSDP2: {args.steps} steps -> upcycle-export-run -> upcycle.load: "
          f"{type(native).__name__} with {sum(p.numel() for p in native.parameters()) / 1e6:.0f}M parameters; "
          f"--format hf: {hf_ok}")
    print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    from upcycle.runtime.training.data import exit_code

    sys.exit(exit_code(main))
