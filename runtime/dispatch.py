"""Execution paths for routed experts, by name. Each takes (experts, x [tokens, D],
indices [tokens, K], weights [tokens, K]) and returns [tokens, D]; all must equal `reference`.

    reference  loop over experts with torch.where (experts.py): the ground truth
    grouped    slots sorted by expert, one custom op per direction (grouped.py); strategies
               `loop` (CPU default), `grouped_mm` (torch._grouped_mm), `padded` (bmm)
    triton     Triton kernels, forward and backward (kernels/); registered when triton imports

`auto` picks grouped (its own `auto` strategy: `loop` on CPU, `torch._grouped_mm` on CUDA where it
runs, else `padded`), else reference. On an H200 (bf16, fwd+bwd, benchmarks/moe_layer_h200.json)
grouped_mm beat the Triton kernels in 7 of 8 layer shapes (up to 2x at E8G1T2, d_model 2048), so
Triton is opt-in (`backend: triton`). Registration happens in runtime/__init__.py.
"""

from __future__ import annotations

from typing import Callable

import torch

from .experts import GroupedExperts, reference_forward

ExpertsFn = Callable[[GroupedExperts, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_BACKENDS: dict[str, ExpertsFn] = {"reference": reference_forward}


class LocalDispatcher:
    """Where a layer's routed slots are computed: here, every expert on this process, so the
    backend runs them on the tokens as they are. Expert parallelism installs another dispatcher
    (expert_parallel.AllToAllDispatcher) with the same call; the layer does not know which."""

    state = None  # parallel state (None: not sharded)

    def __call__(self, layer, tokens: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 run_experts: ExpertsFn) -> torch.Tensor:
        return run_experts(layer.experts, tokens, indices, weights)  # [tokens, D]


LOCAL = LocalDispatcher()


def register_backend(name: str, fn: ExpertsFn) -> None:
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def resolve_backend(name: str, device: torch.device) -> ExpertsFn:
    """`auto` picks the fastest registered path for the device."""
    if name == "auto":
        for candidate in ("grouped", "reference"):
            if candidate in _BACKENDS:
                return _BACKENDS[candidate]
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown MoE backend {name!r}; available: {available_backends()}") from None
