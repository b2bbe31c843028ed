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


def _setup(world, model=None, ep=False):
    from upcycle.runtime.distributed import parallelize

    model = model or tiny_upcycled()
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    parallelize(model, mesh, param_dtype=None, ep_mesh=mesh if ep else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return model, opt, sched


def scenario_dcp_save(args, rank, world):
    """K steps, checkpoint, then M more steps (the uninterrupted continuation)."""
    from upcycle.runtime.train_checkpoint import save_training_checkpoint

    model, opt, sched = _setup(world, ep=args.ep)
    first = train(model, args.steps, world, rank, opt=opt, sched=sched)
    save_training_checkpoint(os.path.join(args.out, f"ckpt-w{world}"), model, opt, scheduler=sched,
                             step=args.steps, data_position=args.steps * GLOBAL_BATCH)
    cont = train(model, args.steps, world, rank, opt=opt, sched=sched, start=args.steps)
    return {"first": first, "cont": cont}


def scenario_dcp_resume(args, rank, world):
    """Load the checkpoint written by another world size and continue M steps."""
    from upcycle.runtime.train_checkpoint import load_training_checkpoint

    model, opt, sched = _setup(world, ep=args.ep)
    progress = load_training_checkpoint(os.path.join(args.out, f"ckpt-w{args.from_world}"), model, opt, sched)
    cont = train(model, args.steps, world, rank, opt=opt, sched=sched, start=progress["step"])
    return {"cont": cont, "progress": progress, "lr": opt.param_groups[0]["lr"]}


def scenario_ep_layer(args, rank, world):
    """One MoE layer, experts split over the ranks, skewed routing and an expert with no tokens;
    the reference runs the full layer on both ranks' tokens (computed on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh

    from upcycle.runtime import MoEConfig, build_moe
    from upcycle.runtime.expert_parallel import shard_experts_

    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_expert=24, num_experts=8, top_k=2, gated=True, activation="silu",
                    first_bias=True, output_bias=True, backend=args.backend, balancing="none")  # task grads only
    ref = build_moe(cfg).train()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        ref.router.weight[:3] += 0.6  # experts 0-2 (rank 0's block) favoured: skewed traffic
        ref.router.weight[5] = -5.0  # expert 5 never chosen
    xs = [torch.randn(7 + 5 * r, 16, generator=torch.Generator().manual_seed(10 + r)) + 0.4 for r in range(world)]
    gs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(20 + r)) for r, x in enumerate(xs)]
    import copy

    layer = copy.deepcopy(ref)
    x_all = torch.cat(xs).requires_grad_()
    (ref(x_all) * torch.cat(gs)).sum().backward()
    shard_experts_(layer, init_device_mesh("cpu", (world,)))
    x = xs[rank].clone().requires_grad_()
    out = layer(x)
    (out * gs[rank]).sum().backward()
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    rows = slice(sum(t.shape[0] for t in xs[:rank]), sum(t.shape[0] for t in xs[:rank + 1]))
    local = {n: p.grad.to_local() for n, p in layer.experts.named_parameters()}
    e0, e1 = layer.ep.first, layer.ep.first + layer.ep.num_local
    want = {n: p.grad[e0:e1] for n, p in ref.experts.named_parameters()}
    return {"out": out.detach(), "out_ref": ref(x_all)[rows].detach(), "dx": x.grad, "dx_ref": x_all.grad[rows],
            "router": router_grad, "router_ref": ref.router.weight.grad, "experts": local, "experts_ref": want}


def scenario_ep_fsdp(args, rank, world):
    """A tiny upcycled Llama with experts split over the ranks and FSDP over the same ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    from upcycle.runtime.distributed import parallelize

    model = tiny_upcycled()
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        parallelize(model, mesh, ep_mesh=mesh, param_dtype=None)
    losses = train(model, args.steps, world, rank)
    return {"losses": losses, "params": full_params(model)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--from-world", type=int, default=2)
    ap.add_argument("--backend", default="grouped")
    ap.add_argument("--ep", action="store_true", help="experts split over the ranks (with FSDP)")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    result = globals()[f"scenario_{args.scenario}"](args, rank, world)
    torch.save(result, os.path.join(args.out, f"{args.scenario}-rank{rank}.pt"))
    if world > 1:
        # only on success (a rank that failed exits and torchrun stops its peers; a collective
        # teardown there would wait on them): every rank's work is finished before any rank tears
        # gloo's pairs down (tearing them down while a peer still used them aborted a rank once in CI)
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
