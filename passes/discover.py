"""Analysis pass: every MLP of a model, in model order, and the blocks that could not be read.

For each MLP it also picks the unit to rewrite: the deepest module that holds all of the MLP's
linears and traces on its own with the same match; failing that, the unit it was found in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .find_mlps import MLPMatch, find_mlps
from .rewrite import linear_paths
from .trace import TracedUnit, trace_module, traced_units


@dataclass
class FoundMLP:
    index: int  # position in model order (what layer selection counts)
    match: MLPMatch  # as found in the unit chosen for the rewrite
    rewrite_unit: str
    key: tuple[str, ...]  # absolute weight names: the MLP's identity

    @property
    def path(self) -> str:
        return self.match.path


@dataclass
class Discovery:
    mlps: list[FoundMLP] = field(default_factory=list)
    untraced: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (block, why, its linears)
    units: list[str] = field(default_factory=list)  # traced units, for --explain


def _module_order(model: nn.Module) -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(model.named_modules())}


def discover_mlps(model: nn.Module) -> Discovery:
    result = Discovery()
    seen: dict[tuple[str, ...], FoundMLP] = {}
    for unit in traced_units(model):
        if not isinstance(unit, TracedUnit):
            result.untraced.append((unit.path, unit.reason, unit.linears))
            continue
        result.units.append(unit.path or "<root>")
        for match in find_mlps(unit.graph_module, unit.path):
            key = linear_paths(match)
            if key in seen:
                continue
            seen[key] = FoundMLP(-1, match, unit.path, key)
    for found in seen.values():
        _prefer_smallest_unit(model, found)
    order = _module_order(model)
    first_linear = lambda f: min(order.get(name.rsplit(".", 1)[0], 1 << 30) for name in f.key)  # noqa: E731
    result.mlps = sorted(seen.values(), key=first_linear)
    for i, found in enumerate(result.mlps):
        found.index = i
    return result


def _prefer_smallest_unit(model: nn.Module, found: FoundMLP) -> None:
    path = found.match.path
    if path == found.rewrite_unit:
        return
    try:
        gm = trace_module(model.get_submodule(path) if path else model)
    except Exception:
        return
    for match in find_mlps(gm, path):
        if linear_paths(match) == found.key:
            found.match, found.rewrite_unit = match, path
            return
