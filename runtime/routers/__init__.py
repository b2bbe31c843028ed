"""Router types: how a token's kept experts are weighted. One module per type (runtime/registry.py).

A type carries everything that depends on it: the scores the top-K choice is made on, the combine
weights of the kept experts, the weight-scaling factor `weight_scaling: auto` gives the experts
(passes/weight_mapping.py), whether the layer can equal the dense MLP exactly at init, and the
line the conversion report prints about it. The spec schema's `router.type` choices, MoEConfig's
check and the export targets' router modes are read from here.

Functions take fp32 tensors: logits and probs [tokens, N], indices [tokens, K].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import collect


@dataclass(frozen=True)
class RouterType:
    name: str
    summary: str  # one line for help texts and the JSON Schema
    # (logits, probs) -> [tokens, N] scores whose K largest are kept (only their order matters)
    scores: Callable
    # (logits, probs, indices) -> [tokens, K] combine weights of the kept experts
    weights: Callable
    # (E, G', T) -> the factor a that `weight_scaling: auto` puts on every expert's output so a
    # token's kept experts add up to the dense MLP's scale (docs/algorithm.md §5)
    scaling: Callable[[int, int, int], float]
    # kept weights sum to 1, so T = G' shards of one virtual group, each weighted 1/G', times a = G'
    # rebuild the dense MLP exactly: the layer can start exact
    exact_at_init: bool
    # the report's "expected here" line ({top_k} is filled in)
    expected: str
    order: int = 100


ROUTER_TYPES: dict[str, RouterType] = collect(__name__)


def router_type(name: str) -> RouterType:
    try:
        return ROUTER_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown router type {name!r}; one of {', '.join(ROUTER_TYPES)}") from None


__all__ = ["RouterType", "ROUTER_TYPES", "router_type"]
