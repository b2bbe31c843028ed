"""Replace matched MLP subgraphs with MoE layers.

Where the traced unit *is* the MLP (its graph holds nothing else), the unit module is swapped
for the MoE layer, so state_dict names read `...mlp.router.weight`. Otherwise (dropout after
the MLP, a residual and a norm around an inline MLP) the unit's graph is rewritten: the MLP
subgraph becomes one call to an `moe` submodule and every other node computes as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx
import torch.nn as nn

from .find_mlps import MLPMatch, find_mlps
from .trace import trace_module

MakeMoE = Callable[[MLPMatch, nn.Module], nn.Module]


@dataclass
class RewriteRecord:
    mlp_path: str  # module path of the MLP that was replaced
    unit_path: str  # module whose graph was rewritten (or that was swapped)
    mode: str  # "replace_module" or "rewrite_graph"
    moe_path: str  # where the MoE layer now lives
    consumed: list[str] = field(default_factory=list)  # dense tensors (absolute names) turned into MoE weights


def linear_paths(match: MLPMatch, unit_path: str | None = None) -> tuple[str, ...]:
    """Absolute names of the MLP's weight tensors: the identity of an MLP across re-traces."""
    base = match.unit_path if unit_path is None else unit_path
    names = []
    for ref in match.linears:
        local = ref.module_path or ref.weight_attr
        names.append(".".join(p for p in (base, local) if p))
    return tuple(sorted(names))


def is_whole_unit(gm: fx.GraphModule, match: MLPMatch) -> bool:
    """True when the unit computes exactly the MLP: input → MLP → output, nothing else."""
    compute = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    if any(n.name not in match.nodes for n in compute):
        return False
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = output.args[0]
    return (
        isinstance(returned, fx.Node)
        and returned.name == match.output_node
        and len([p for p in placeholders if p.users]) == 1
        and any(p.name == match.input_node for p in placeholders)
    )


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def rewrite_graph(gm: fx.GraphModule, matches: list[MLPMatch], moes: list[nn.Module], class_name: str) -> tuple[fx.GraphModule, list[str]]:
    """Graph surgery on one unit: each MLP subgraph → call_module to a new MoE submodule."""
    nodes = {n.name: n for n in gm.graph.nodes}
    names = []
    for i, (match, moe) in enumerate(zip(matches, moes)):
        name = "moe" if len(matches) == 1 else f"moe_{i}"
        while hasattr(gm, name):
            name = "_" + name
        gm.add_submodule(name, moe)
        down = nodes[match.output_node]
        with gm.graph.inserting_before(down):
            call = gm.graph.call_module(name, (nodes[match.input_node],))
        down.replace_all_uses_with(call)
        for node_name in reversed(match.nodes):  # users first, so each is dead when erased
            gm.graph.erase_node(nodes[node_name])
        names.append(name)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    new = fx.GraphModule(gm, gm.graph, class_name)
    return new, names


def rewrite_mlps(model: nn.Module, targets: dict[tuple[str, ...], str], make_moe: MakeMoE) -> tuple[nn.Module, list[RewriteRecord]]:
    """Rewrite every MLP named in `targets` ({linear_paths: preferred unit path}).

    Units are re-traced right before their rewrite (deepest first, MoE layers stay leaves), so a
    unit rewritten after its descendants sees the model as it is now. Returns the (possibly new)
    root module and one record per MLP.
    """
    by_unit: dict[str, list[tuple[str, ...]]] = {}
    for key, unit in targets.items():
        by_unit.setdefault(unit, []).append(key)
    records: list[RewriteRecord] = []
    for unit_path in sorted(by_unit, key=lambda p: (-p.count(".") - bool(p), p)):
        unit = model.get_submodule(unit_path) if unit_path else model
        gm = trace_module(unit)
        wanted = set(by_unit[unit_path])
        matches = [m for m in find_mlps(gm, unit_path) if linear_paths(m) in wanted]
        if {linear_paths(m) for m in matches} != wanted:
            missing = wanted - {linear_paths(m) for m in matches}
            raise RuntimeError(f"MLP(s) {sorted(missing)} no longer found when re-tracing {unit_path or '<root>'}")
        moes = [make_moe(m, gm) for m in matches]
        if len(matches) == 1 and is_whole_unit(gm, matches[0]):
            new_unit, mode, moe_paths = moes[0], "replace_module", [unit_path]
        else:
            new_unit, local = rewrite_graph(gm, matches, moes, f"{type(unit).__name__}Upcycled")
            mode = "rewrite_graph"
            moe_paths = [".".join(p for p in (unit_path, n) if p) for n in local]
        if unit_path:
            _set_submodule(model, unit_path, new_unit)
        else:
            model = new_unit
        for m, moe_path in zip(matches, moe_paths):
            consumed = []
            for ref in m.linears:
                consumed += [".".join(p for p in (unit_path, n) if p) for n in ref.parameter_names(unit)]
            records.append(RewriteRecord(m.path, unit_path, mode, moe_path, consumed))
    return model, records
