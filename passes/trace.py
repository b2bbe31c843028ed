"""Tracing: turn modules into FX graphs whose leaves are the linear layers.

transformers models do not trace whole (`co_varnames is too small`, Proxy iteration), so we
trace top-down: a module that traces gives one graph for everything below it; one that fails
is split into its children. Linear-like modules stay leaves so the graph shows where weights
are used; everything parameter-free (activation modules, arithmetic) is traced through, which
is what lets the matcher see an activation however it is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch.fx as fx
import torch.nn as nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: a linear layer stored as weight [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_module(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _is_moe(module: nn.Module) -> bool:
    from upcycle.runtime.moe import MoELayer

    return isinstance(module, MoELayer)


class UpcycleTracer(fx.Tracer):
    """Keeps linear layers (and any module named in `extra_leaves`) as call_module nodes."""

    def __init__(self, extra_leaves: frozenset[str] = frozenset()):
        super().__init__()
        self.extra_leaves = extra_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_linear_module(m) or module_qualified_name in self.extra_leaves or _is_moe(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class TracedUnit:
    """A module that traced, with its graph. `path` is its name in the model ('' = root)."""

    path: str
    module: nn.Module
    graph_module: fx.GraphModule


def trace_module(module: nn.Module, extra_leaves: frozenset[str] = frozenset()) -> fx.GraphModule:
    tracer = UpcycleTracer(extra_leaves)
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def has_linear_descendant(module: nn.Module) -> bool:
    """Whether the module holds anything a linear could use: a linear layer or a matrix parameter
    (graphs from torch.export apply F.linear to get_attr parameters, with no Linear modules)."""
    return any(is_linear_module(m) for m in module.modules()) or any(p.dim() >= 2 for p in module.parameters())


@dataclass
class UntracedBlock:
    """A module that failed to trace and holds linear layers directly (e.g. attention)."""

    path: str
    reason: str
    linears: list[str]


def traced_units(model: nn.Module) -> Iterator[TracedUnit | UntracedBlock]:
    """Top-down: a TracedUnit for every maximal traceable module holding linear layers, and an
    UntracedBlock for every module that failed to trace while holding linears itself, so callers
    can say which block could not be analysed as a whole, and why."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if is_linear_module(module) or not has_linear_descendant(module):
            continue
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            try:
                yield TracedUnit(path, module, trace_module(module))
                continue
            except Exception as exc:  # tracing failures are data here: we split and go on
                message = str(exc).splitlines()[0] if str(exc) else ""
                direct = [n for n, c in module.named_children() if is_linear_module(c)]
                if direct:
                    yield UntracedBlock(path, f"{type(exc).__name__}: {message}", direct)
        for name, child in reversed(list(module.named_children())):
            stack.append((f"{path}.{name}" if path else name, child))
