"""Router regularisers, and how they reach the gradients without the user's loss.

Each MoE layer attaches its weighted router loss (load balancing and z-loss) to the autograd graph
of its own forward with `attach_aux_loss`: an identity on the router's combine weights whose
backward also sends d(loss)/d(loss) = scale into the loss's graph (the technique of Megatron-Core's
MoEAuxLossAutoScaler). So any `loss.backward()` through the layer's output trains the router to
balance: transformers' Trainer, Lightning, a plain loop. One loss per layer, summed over layers
(as Megatron-Core and the paper do).

Scale rule. The attached gradient is `aux_loss_scale` (default 1) per forward. If your loss is
averaged over A gradient-accumulation micro-batches (loss / A before backward), set the scale to
1/A so the router loss is averaged the same way; data-parallel averaging (DDP, FSDP) needs no
change, since it averages the router's gradients exactly as it averages the rest. A loss scaled
by a factor s before backward (fp16 GradScaler: s = scaler.get_scale()) needs scale s/A.
`set_aux_loss_scale(model, scale)` sets it on every layer (a buffer: no recompile).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .layers import moe_layers


def load_balancing_loss(probs: Tensor, indices: Tensor, num_experts: int, mask: Optional[Tensor] = None) -> Tensor:
    """Switch/GShard form N · Σ_e f_e · P_e (1.0 when perfectly balanced).

    probs: [tokens, N] softmax over all experts; indices: [tokens, K] chosen experts; mask: [tokens]
    1 for real tokens, 0 for padding (None: all real). f_e is the fraction of routed slots sent to
    e (no gradient), P_e the mean probability of e over real tokens. No tokens: 0.
    """
    k = indices.shape[-1]
    m = probs.new_ones(probs.shape[0]) if mask is None else mask.to(torch.float32)  # [tokens]
    counts = torch.zeros(num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, indices.reshape(-1), m.repeat_interleave(k))  # [N]
    real = m.sum()
    fraction = counts / (real * k).clamp_min(1.0)  # [N]
    mean_prob = (probs.float() * m[:, None]).sum(0) / real.clamp_min(1.0)  # [N]
    return num_experts * torch.sum(fraction * mean_prob)


def z_loss(logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """ST-MoE router z-loss: mean over real tokens of the squared log-partition (keeps logits small)."""
    z = torch.logsumexp(logits.float(), dim=-1).square()  # [tokens]
    if mask is None:
        return z.sum() / max(z.shape[0], 1)
    m = mask.to(torch.float32)
    return (z * m).sum() / m.sum().clamp_min(1.0)


class _AttachAuxLoss(torch.autograd.Function):
    """weights -> weights (a copy of the tiny [tokens, K] tensor); backward also yields `scale` as
    the gradient of `loss`, so the loss joins every backward that passes through the layer."""

    @staticmethod
    def forward(ctx, weights: Tensor, loss: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        ctx.loss_dtype = loss.dtype
        return weights.clone()

    @staticmethod
    def backward(ctx, grad_weights: Tensor):
        (scale,) = ctx.saved_tensors
        return grad_weights, scale.to(ctx.loss_dtype).reshape(()), None


def attach_aux_loss(weights: Tensor, loss: Tensor, scale: Tensor) -> Tensor:
    """Identity on `weights` [tokens, K] that adds `scale · loss` to whatever is differentiated
    through it. Call only when `torch.is_grad_enabled()`."""
    return _AttachAuxLoss.apply(weights, loss, scale)


def _moe_layers(model: nn.Module):
    return moe_layers(model).values()


def aux_loss(model: nn.Module) -> Tensor:
    """Sum over MoE layers of the weighted router loss of each layer's last training forward,
    **detached**: for logging only. The loss already reaches the gradients through autograd;
    adding this to your loss changes nothing (it has no graph), so old code cannot count it twice."""
    total = None
    for layer in _moe_layers(model):
        v = layer.last_aux_loss
        total = v.clone() if total is None else total + v.to(total.device)
    return torch.zeros(()) if total is None else total


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Gradient scale of the attached router losses on every MoE layer (see the module docstring:
    1/A under A-step gradient accumulation with an averaged loss)."""
    if not scale >= 0:
        raise ValueError(f"aux loss scale must be a number >= 0, got {scale!r}")
    for layer in _moe_layers(model):
        layer.aux_loss_scale.fill_(float(scale))


__all__ = ["load_balancing_loss", "z_loss", "attach_aux_loss", "aux_loss", "set_aux_loss_scale"]
