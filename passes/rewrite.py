"""Replace matched MLP subgraphs with MoE layers (a transform pass).

Where the traced unit *is* the MLP (its graph holds nothing else), the unit module is swapped
for the MoE layer, so state_dict names read `...mlp.router.weight`. Otherwise (dropout after
the MLP, a residual and a norm around an inline MLP, an MLP spread over sibling modules) the
unit's graph is rewritten: the MLP subgraph becomes one call to an `moe` submodule and every
other node computes as before. The rewritten graph is installed as the unit's own `forward`
(an instance attribute): the module keeps its class, attributes and other submodules, so
`isinstance` checks, hooks registered by class (transformers' output recording), gradient
checkpointing layers and attributes read by the parent model (`layer.attention_type`) keep
working, and state_dict names only change where dense weights became the MoE's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from .find_mlps import MLPMatch, find_mlps
from .manager import Pass, PassContext, PassLog, PassPipeline
from upcycle.runtime.rewritten_forward import RootSignature, UpcycledForward

from .trace import trace_unit

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


def rewrite_graph(gm: fx.GraphModule, matches: list[MLPMatch], moes: list[nn.Module], class_name: str,
                  reserved: nn.Module | None = None) -> tuple[fx.GraphModule, list[str]]:
    """Graph surgery on one unit: each MLP subgraph → call_module to a new MoE submodule.

    New submodule names avoid attributes of `gm` and of `reserved` (the unit it will go into)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    names = []
    for i, (match, moe) in enumerate(zip(matches, moes)):
        name = "moe" if len(matches) == 1 else f"moe_{i}"
        while hasattr(gm, name) or (reserved is not None and hasattr(reserved, name)):
            name = "_" + name
        gm.add_submodule(name, moe)
        down = nodes[match.output_node]
        with gm.graph.inserting_before(down):
            call = gm.graph.call_module(name, (nodes[match.input_node],))
        down.replace_all_uses_with(call)
        for node_name in reversed(match.nodes):  # users first, so each is dead when erased
            gm.graph.erase_node(nodes[node_name])
        names.append(name)
    for node in list(gm.graph.nodes):  # e.g. T5 reads `wo.weight.dtype`: dead reads of consumed weights
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    # no gm.delete_all_unused_submodules(): it would strip children of opaque leaves that the graph
    # reaches by get_attr (`_splat_call`), and those module objects are shared with the model
    gm.recompile()
    new = fx.GraphModule(gm, gm.graph, class_name)  # holds only what the graph references
    return new, names


def _delete(unit: nn.Module, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = unit.get_submodule(parent_path) if parent_path else unit
    delattr(parent, name)


def install_rewrite(unit: nn.Module, gm: fx.GraphModule, matches: list[MLPMatch], moes: list[nn.Module],
                    signature: RootSignature, where: str = "") -> list[str]:
    """Rewrite the unit's graph and make it the unit's forward; the dense linears leave the unit.
    Returns the local names of the MoE submodules."""
    consumed_modules, consumed_params = set(), set()
    for m in matches:
        for ref in m.linears:
            if ref.kind == "module":
                consumed_modules.add(ref.module_path)
            else:
                consumed_params.update(a for a in (ref.weight_attr, ref.bias_attr) if a)
    new_gm, names = rewrite_graph(gm, matches, moes, f"{type(unit).__name__}Upcycled", reserved=unit)
    for name, moe in zip(names, moes):
        unit.add_module(name, moe)
    referenced = set()
    for node in new_gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        referenced.add(node.target)
        owner_path, _, attr = node.target.rpartition(".")
        owner = unit.get_submodule(owner_path) if owner_path else unit
        value = getattr(owner, attr, None)
        # tensor constants the tracer stored as plain attributes: buffers, so .to(device) moves them
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and attr not in owner._buffers:
            delattr(owner, attr)
            owner.register_buffer(attr, value, persistent=False)
    for path in sorted(consumed_modules, key=lambda p: -p.count(".")):
        _delete(unit, path)
    for path in consumed_params:
        _delete(unit, path)
    # modules emptied by the removal (BERT's `intermediate` once its dense is gone) and no longer used
    ancestors = {".".join(p.split(".")[:k]) for p in consumed_modules | consumed_params for k in range(1, p.count(".") + 1)}
    for path in sorted(ancestors, key=lambda p: -p.count(".")):
        try:
            mod = unit.get_submodule(path)
        except AttributeError:
            continue
        used = any(t == path or t.startswith(path + ".") for t in referenced)
        if not used and next(iter(mod.parameters()), None) is None and next(iter(mod.buffers()), None) is None:
            _delete(unit, path)
    code = new_gm.graph.python_code(root_module="self")
    unit.forward = UpcycledForward(unit, code.src, code.globals, signature, where)
    return names


class RewriteMLPs(Pass):
    """Transform pass: rewrite the MLPs in `ctx.options['targets']` with `ctx.options['make_moe']`."""

    name = "rewrite-mlps"
    kind = "transform"
    description = ("re-trace each unit (deepest first), swap a unit that is exactly the MLP for the MoE layer, or "
                   "rewrite the unit's graph (MLP subgraph → call to `moe`) and install it as the unit's forward")

    def run(self, ctx: PassContext):
        targets: dict[tuple[str, ...], str] = ctx.options["targets"]
        make_moe: MakeMoE = ctx.options["make_moe"]
        model = ctx.model
        by_unit: dict[str, list[tuple[str, ...]]] = {}
        for key, unit in targets.items():
            by_unit.setdefault(unit, []).append(key)
        for unit_path in sorted(by_unit, key=lambda p: (-p.count(".") - bool(p), p)):
            unit = model.get_submodule(unit_path) if unit_path else model
            traced = trace_unit(unit, path=unit_path)
            gm = traced.graph_module
            wanted = set(by_unit[unit_path])
            matches = [m for m in find_mlps(gm, unit_path) if linear_paths(m) in wanted]
            if {linear_paths(m) for m in matches} != wanted:
                missing = wanted - {linear_paths(m) for m in matches}
                raise RuntimeError(f"MLP(s) {sorted(missing)} no longer found when re-tracing {unit_path or '<root>'}")
            consumed_by = []
            for m in matches:
                consumed = []
                for ref in m.linears:
                    consumed += [".".join(p for p in (unit_path, n) if p) for n in ref.parameter_names(gm)]
                consumed_by.append(consumed)
            moes = [make_moe(m, gm) for m in matches]
            if len(matches) == 1 and is_whole_unit(gm, matches[0]):
                mode, moe_paths = "replace_module", [unit_path]
                if unit_path:
                    _set_submodule(model, unit_path, moes[0])
                else:
                    model = moes[0]
                how = f"module swapped for {type(moes[0]).__name__}"
            else:
                local = install_rewrite(unit, gm, matches, moes, traced.signature, unit_path)
                mode = "rewrite_graph"
                moe_paths = [".".join(p for p in (unit_path, n) if p) for n in local]
                how = f"graph rewritten, installed as {type(unit).__name__}.forward of this instance"
            for m, moe_path, consumed in zip(matches, moe_paths, consumed_by):
                ctx.records.append(RewriteRecord(m.path, unit_path, mode, moe_path, consumed))
                yield m.path, f"{mode}: {how}; MoE at {moe_path or '<root>'}; consumed {', '.join(consumed)}"
        ctx.model = model

    def summary(self, ctx):
        return f"{len(ctx.records)} MLPs rewritten"


def rewrite_mlps(model: nn.Module, targets: dict[tuple[str, ...], str], make_moe: MakeMoE,
                 logs: list[PassLog] | None = None) -> tuple[nn.Module, list[RewriteRecord]]:
    """Rewrite every MLP named in `targets` ({linear_paths: preferred unit path}).

    Units are re-traced right before their rewrite (deepest first, MoE layers stay leaves), so a
    unit rewritten after its descendants sees the model as it is now. Returns the (possibly new)
    root module and one record per MLP; the pass's log is appended to `logs` if given.
    """
    pipeline = PassPipeline([RewriteMLPs()])
    ctx = pipeline.run(PassContext(model, options={"targets": targets, "make_moe": make_moe}))
    if logs is not None:
        logs.extend(pipeline.logs)
    return ctx.model, ctx.records
