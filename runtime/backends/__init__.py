"""Execution paths for routed experts, by name: one module per backend (runtime/registry.py).

Each backend runs (experts, x [tokens, D], indices [tokens, K], weights [tokens, K]) -> [tokens, D]
and must equal `reference`. An entry names the function (imported on first use: kernels load
their dependencies only when chosen), says whether it can run here, and summarises itself for the
spec schema and help texts. `auto` is not an entry but a rule over them: the first of AUTO_ORDER
that can run. On an H200 (bf16, fwd+bwd, benchmarks/moe_layer_h200.json) grouped_mm beat the
Triton kernels in 7 of 8 layer shapes (up to 2x at E8G1T2, d_model 2048), so Triton is opt-in.

`register_backend(name, fn)` adds a function at run time (experiments, user kernels); the spec
accepts only the entries declared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..registry import collect

ExpertsFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    load: Callable[[], ExpertsFn]  # -> the function, imported when first resolved
    available: Callable[[], bool] = lambda: True
    order: int = 100


BACKENDS: dict[str, Backend] = collect(__name__)
AUTO_ORDER = ("grouped", "reference")  # auto: the first of these that can run
_registered: dict[str, ExpertsFn] = {}  # register_backend: run-time additions (and resolved entries)


def backend_names() -> tuple[str, ...]:
    """The spec's `runtime.backend` choices: auto, then every declared backend."""
    return ("auto", *BACKENDS)


def register_backend(name: str, fn: ExpertsFn) -> None:
    _registered[name] = fn


def available_backends() -> list[str]:
    """Names that can run in this environment (declared and available, or registered)."""
    return sorted({n for n, b in BACKENDS.items() if b.available()} | set(_registered))


def _lookup(name: str) -> ExpertsFn | None:
    if name in _registered:
        return _registered[name]
    entry = BACKENDS.get(name)
    if entry is None or not entry.available():
        return None
    fn = _registered[name] = entry.load()
    return fn


def resolve_backend(name: str, device: torch.device) -> ExpertsFn:
    """`auto` picks the first runnable of AUTO_ORDER (the grouped path's own `auto` strategy then
    picks per device)."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            fn = _lookup(candidate)
            if fn is not None:
                return fn
    fn = _lookup(name)
    if fn is None:
        why = "not available here" if name in BACKENDS else "unknown MoE backend"
        raise ValueError(f"{why}: {name!r}; available: {available_backends()}")
    return fn


__all__ = ["Backend", "BACKENDS", "backend_names", "register_backend", "available_backends", "resolve_backend"]
