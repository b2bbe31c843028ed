"""Optional expert capacity (dropless is the default).

With capacity factor cf each expert takes at most C = ceil(cf · real slots / N) slots per forward;
the slots beyond C with the lowest router probability are dropped: their combine weight becomes 0,
so the token keeps only its other experts (and the residual path). Pad tokens are dropped first.
The dropped slots are still computed by the grouped kernels (whose cost does not depend on a
fixed capacity): this is the routing rule of capacity-based MoEs, for parity with models trained
that way, not a speed-up.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def capacity_keep(indices: Tensor, slot_probs: Tensor, num_experts: int, capacity_factor: float,
                  mask: Optional[Tensor] = None) -> Tensor:
    """indices [T, K], slot_probs [T, K] (router probability of each chosen expert), mask [T] ->
    kept [T, K] bool. No host sync: capacity and ranks stay tensors."""
    t, k = indices.shape
    flat_e = indices.reshape(-1)  # [S]
    prio = slot_probs.reshape(-1).float()  # [S] in [0, 1]
    real = torch.ones(t, device=indices.device) if mask is None else mask.float()
    if mask is not None:
        prio = torch.where(real.repeat_interleave(k) > 0, prio, torch.full_like(prio, -1.0))
    key = flat_e.float() * 4.0 + (1.0 - prio)  # expert-major, then most probable first
    order = torch.argsort(key, stable=True)  # [S]
    counts = torch.zeros(num_experts, dtype=torch.long, device=indices.device)
    counts.scatter_add_(0, flat_e, torch.ones_like(flat_e))  # [N] (bincount's shape is data-dependent)
    starts = torch.cumsum(counts, 0) - counts  # [N]
    pos_sorted = torch.arange(flat_e.numel(), device=indices.device) - starts[flat_e[order]]
    pos = torch.empty_like(pos_sorted).scatter_(0, order, pos_sorted)  # [S] rank within its expert
    capacity = torch.ceil(capacity_factor * real.sum() * k / num_experts)
    return (pos < capacity).reshape(t, k)


__all__ = ["capacity_keep"]
