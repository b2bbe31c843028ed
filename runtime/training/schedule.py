"""The optimizer and LR schedule of continued training (the upcycling paper's recipe).

AdamW (betas 0.9/0.95, eps 1e-8; weight decay on matrices only), a linear warmup to a peak LR reset
above the dense model's final LR, then cosine decay to `min_lr` at the last step.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """The LR of `step` as a fraction of the peak `lr` (what LambdaLR multiplies by)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr


def lr_lambda(args):
    """`lr_factor` for the trainer's arguments (args.lr, args.min_lr, args.warmup, args.steps)."""
    def f(step: int) -> float:
        return lr_factor(step, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, steps=args.steps)
    return f


def param_groups(model, weight_decay: float):
    """Weight decay on parameters of 2 or more dimensions; none on biases, norms and router biases."""
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def adamw(groups, lr: float):
    """Fused AdamW where it runs (one kernel over all parameters: on CPU 3.5x faster than the foreach
    default for E8G8T8's 693M parameters); DTensor parameters (FSDP) take the foreach path."""
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=not sharded or None)


def scheduler(opt, args):
    """LambdaLR over `lr_lambda(args)`."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))


__all__ = ["lr_factor", "lr_lambda", "param_groups", "adamw", "scheduler"]
