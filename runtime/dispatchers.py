"""Where a layer's routed slots are computed. The layer calls its dispatcher with the routing it
chose and the experts' backend; the dispatcher decides where the experts run. `LOCAL`: every expert
on this process. Expert parallelism (expert_parallel.shard_experts_) installs an
`AllToAllDispatcher` with the same call; the layer does not know which (parallelism is applied
from outside, as torchtitan and Megatron-Core do it)."""

from __future__ import annotations

import torch


class LocalDispatcher:
    """Every expert on this process: the backend runs them on the tokens as they are."""

    state = None  # parallel state (None: not sharded)

    def __call__(self, layer, tokens: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 run_experts) -> torch.Tensor:
        return run_experts(layer.experts, tokens, indices, weights)  # [tokens, D]


LOCAL = LocalDispatcher()

__all__ = ["LocalDispatcher", "LOCAL"]
