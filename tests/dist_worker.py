"""Worker for tests/test_distributed.py: run under `torchrun --nproc-per-node N` (gloo, CPU).

    torchrun --nproc-per-node 2 tests/dist_worker.py SCENARIO OUT_DIR [options]

Every scenario builds the same seeded tiny upcycled Llama and the same global batches; a rank
takes its contiguous share of each global batch. The single-process reference (N = 1) takes the
shares one after the other as accumulation micro-batches with loss / N and aux scale 1 / N, which
is what data-parallel gradient averaging computes (losses.py's scale rule). Results go to
OUT_DIR/SCENARIO-rank{r}.pt.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

VOCAB, SEQ, GLOBAL_BATCH = 96, 12, 4


def tiny_upcycled(spec="e8g1t2", layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    from upcycle import compile_upcycle

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = compile_upcycle(LlamaForCausalLM(cfg).eval(), spec)
    return model.train()


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def full_params(model) -> dict:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().clone()
    return out


def train(model, steps: int, world: int, rank: int, lr: float = 1e-2, start: int = 0, opt=None, sched=None) -> list:
    """AdamW steps on the global batches; returns the global mean loss of each step."""
    from upcycle.runtime import set_aux_loss_scale

    opt = opt or torch.optim.AdamW(model.parameters(), lr=lr)
    ref_world = int(os.environ.get("REF_WORLD", "2"))
    micro = 1 if world > 1 else ref_world  # the single-process reference accumulates the shares
    share = GLOBAL_BATCH // (world if world > 1 else ref_world)
    set_aux_loss_scale(model, 1.0 / micro)
    losses = []
    for step in range(start, start + steps):
        batch = global_batch(step)
        opt.zero_grad()
        total = torch.zeros(())
        for m in range(micro):
            i = rank if world > 1 else m
            part = batch[i * share:(i + 1) * share]
            loss = model(input_ids=part, labels=part).loss / micro
            loss.backward()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
        opt.step()
        if sched is not None:
            sched.step()
    return losses


def scenario_fsdp(args, rank, world):
    from upcycle.runtime.distributed import parallelize

    model = tiny_upcycled()
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    parallelize(model, mesh, checkpointing=args.checkpointing, compile=args.compile, param_dtype=None)
    from torch.distributed.tensor import DTensor

    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    losses = train(model, args.steps, world, rank)
    return {"losses": losses, "params": full_params(model), "sharded": sharded, "local_numel": local}


def _setup(world, model=None):
    from upcycle.runtime.distributed import parallelize

    model = model or tiny_upcycled()
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    parallelize(model, mesh, param_dtype=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return model, opt, sched


def scenario_dcp_save(args, rank, world):
    """K steps, checkpoint, then M more steps (the uninterrupted continuation)."""
    from upcycle.runtime.train_checkpoint import save_training_checkpoint

    model, opt, sched = _setup(world)
    first = train(model, args.steps, world, rank, opt=opt, sched=sched)
    save_training_checkpoint(os.path.join(args.out, f"ckpt-w{world}"), model, opt, scheduler=sched,
                             step=args.steps, data_position=args.steps * GLOBAL_BATCH)
    cont = train(model, args.steps, world, rank, opt=opt, sched=sched, start=args.steps)
    return {"first": first, "cont": cont}


def scenario_dcp_resume(args, rank, world):
    """Load the checkpoint written by another world size and continue M steps."""
    from upcycle.runtime.train_checkpoint import load_training_checkpoint

    model, opt, sched = _setup(world)
    progress = load_training_checkpoint(os.path.join(args.out, f"ckpt-w{args.from_world}"), model, opt, sched)
    cont = train(model, args.steps, world, rank, opt=opt, sched=sched, start=progress["step"])
    return {"cont": cont, "progress": progress, "lr": opt.param_groups[0]["lr"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--from-world", type=int, default=2)
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    try:
        result = globals()[f"scenario_{args.scenario}"](args, rank, world)
        torch.save(result, os.path.join(args.out, f"{args.scenario}-rank{rank}.pt"))
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
