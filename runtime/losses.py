"""Router regularisers. Each MoE layer keeps its last loss; `aux_loss(model)` sums them so the
user's own training loop needs one added line."""

from __future__ import annotations

import torch
import torch.nn as nn


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard form N · Σ_e f_e · P_e (1.0 when perfectly balanced).

    probs: [tokens, N] softmax over all experts; indices: [tokens, K] chosen experts.
    f_e is the fraction of routed slots sent to e (no gradient), P_e the mean probability of e.
    """
    counts = torch.zeros(num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, indices.reshape(-1), torch.ones(indices.numel(), device=probs.device))
    fraction = counts / max(indices.numel(), 1)  # [N]
    mean_prob = probs.float().mean(dim=0)  # [N]
    return num_experts * torch.sum(fraction * mean_prob)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition, keeps logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the weighted router losses of every MoE layer's last forward (0 if none)."""
    from .moe import MoELayer  # local: moe imports this module

    total = None
    for module in model.modules():
        if isinstance(module, MoELayer) and module.last_aux_loss is not None:
            total = module.last_aux_loss if total is None else total + module.last_aux_loss
    if total is None:
        return torch.zeros(())
    return total
