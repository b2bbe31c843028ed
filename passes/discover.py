"""Analysis passes: every MLP of a model, in model order, and the blocks that could not be read.

    trace-units          top-down tracing (linears as leaves, failing submodules as opaque leaves)
    activation-regions   contract the parameter-free regions after each linear, identified by probing
    match-mlps           subgraph matching of plain / gated / fused-GLU MLPs on the contracted graph
    choose-rewrite-unit  per MLP, the deepest module holding all its linears that traces with the
                         same match (the MLP module itself where there is one)
    check-coverage       blocks whose linears look like an MLP but that no pass could handle, with why

`discover_mlps(model)` runs them and returns a `Discovery` (with the pass logs for `explain()`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from .activation_regions import _node_inputs
from .find_mlps import MLPMatch, contract, find_mlps
from .linears import linear_input, linear_ref
from .manager import Pass, PassContext, PassLog, PassPipeline, explain as explain_logs
from .rewrite import linear_paths
from .trace import TracedUnit, UnitTraceError, is_conv1d, is_linear_module, trace_module, traced_units


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
    problems: list[str] = field(default_factory=list)  # blocks that look like MLPs but were not handled
    log: list[PassLog] = field(default_factory=list)  # what each analysis pass decided
    passes: list[Pass] = field(default_factory=list)

    def explain(self) -> str:
        """The analysis passes with their timings and decisions per block, then the MLPs found."""
        lines = [explain_logs(self.log, self.passes).rstrip("\n"), "",
                 "then (compiler): select layers -> weight mapping -> rewrite-mlps (transform) -> verify", "",
                 "traced units:", *[f"  {u}" for u in self.units]]
        if self.untraced:
            lines.append("blocks that did not trace as a whole (their children were analysed instead):")
            lines += [f"  {p or '<root>'}: {why}" + (f" (direct linears: {', '.join(lin)})" if lin else "")
                      for p, why, lin in self.untraced]
        lines.append(f"MLPs matched: {len(self.mlps)}")
        for f in self.mlps:
            m = f.match
            lines.append(f"  [{f.index}] {f.path or '<root>'}: {m.kind}, activation {m.activation or '?'} "
                         f"({m.activation_desc}), rewrite unit {f.rewrite_unit or '<root>'}, nodes {', '.join(m.nodes)}"
                         + (f"; problems: {'; '.join(m.problems)}" if m.problems else ""))
        if self.problems:
            lines.append(f"not handled: {len(self.problems)}")
            lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines) + "\n"


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _ref_name(unit_path: str, ref) -> str:
    return _join(unit_path, ref.module_path or ref.weight_attr)


# ---------------------------------------------------------------------------------------------


class TraceUnits(Pass):
    name = "trace-units"
    kind = "analysis"
    description = ("trace top-down with linears as leaves; a submodule type that breaks tracing becomes an opaque "
                   "leaf (analysed on its own), a block whose own code does not trace is split into its children")

    def run(self, ctx):
        for unit in traced_units(ctx.model):
            if isinstance(unit, TracedUnit):
                ctx.units.append(unit)
                n_lin = sum(1 for n in unit.graph_module.graph.nodes if linear_ref(n, unit.graph_module) is not None)
                text = f"traced ({len(unit.graph_module.graph.nodes)} nodes, {n_lin} linears)"
                if unit.signature is not None and unit.signature.concrete:
                    text += f"; specialised {unit.signature.describe()} (checked at run time)"
                if unit.leaves:
                    text += "; opaque: " + ", ".join(f"{p} ({why})" for p, why in unit.leaves.items())
                yield unit.path, text
            else:
                ctx.untraced.append(unit)
                yield unit.path, f"did not trace ({unit.reason}); its children are analysed instead"

    def summary(self, ctx):
        return f"{len(ctx.units)} units traced, {len(ctx.untraced)} blocks split"


class ActivationRegions(Pass):
    name = "activation-regions"
    kind = "analysis"
    description = ("after each linear, the parameter-free nodes computed only from it, cut where they feed a linear "
                   "or a product, identified by evaluating them on a probe grid (activation, fused GLU, or identity)")

    def run(self, ctx):
        for unit in ctx.units:
            gm = unit.graph_module
            c = contract(gm)
            ctx.contracted[unit.path] = c
            for rid, region in c.regions.items():
                start = _ref_name(unit.path, c.linears[region.start])
                yield start, f"activation region {region.description} ({', '.join(region.nodes)})"
            for start, nodes in c.passthrough.items():
                where = _ref_name(unit.path, c.linears[start]) if start in c.linears else _join(unit.path, start)
                yield where, f"identity pass-through folded in ({', '.join(nodes)})"

    def summary(self, ctx):
        return f"{sum(len(c.regions) for c in ctx.contracted.values())} activation regions"


class MatchMLPs(Pass):
    name = "match-mlps"
    kind = "analysis"
    description = "networkx subgraph matching: linear→act→linear, gated linear→act→mul←linear→linear, fused GLU"

    def run(self, ctx):
        for unit in ctx.units:
            matches = find_mlps(unit.graph_module, unit.path, ctx.contracted.get(unit.path))
            ctx.matches[unit.path] = matches
            for m in matches:
                names = ", ".join(_ref_name(unit.path, r) for r in m.linears)
                text = f"{m.kind} MLP, activation {m.activation or '?'} ({m.activation_desc}), D={m.d_model} F={m.d_ffn}: {names}"
                if m.problems:
                    text += "; cannot be rewritten: " + "; ".join(m.problems)
                yield m.path, text + f" [found in {unit.path or '<root>'}]"

    def summary(self, ctx):
        return f"{sum(len(v) for v in ctx.matches.values())} matches (before de-duplication)"


class ChooseRewriteUnit(Pass):
    name = "choose-rewrite-unit"
    kind = "analysis"
    description = ("the same MLP seen from several units is kept once; it is rewritten in the deepest module holding "
                   "all its linears that traces with the same match")

    def run(self, ctx):
        seen: dict[tuple[str, ...], FoundMLP] = {}
        for unit in ctx.units:
            for match in ctx.matches.get(unit.path, []):
                key = linear_paths(match)
                if key not in seen:
                    seen[key] = FoundMLP(-1, match, unit.path, key)
        decisions = []
        for found in seen.values():
            how = _prefer_smallest_unit(ctx.model, found)
            decisions.append((found.path, how))
        order = {name: i for i, (name, _) in enumerate(ctx.model.named_modules())}
        first = {f.key: min(order.get(n.rsplit(".", 1)[0], 1 << 30) for n in f.key) for f in seen.values()}
        ctx.mlps = sorted(seen.values(), key=lambda f: first[f.key])
        for i, found in enumerate(ctx.mlps):
            found.index = i
        return decisions

    def summary(self, ctx):
        return f"{len(ctx.mlps)} MLPs"


def _prefer_smallest_unit(model: nn.Module, found: FoundMLP) -> str:
    path = found.match.path
    if path == found.rewrite_unit:
        return f"rewrite unit {path or '<root>'} (where it was found)"
    try:
        gm = trace_module(model.get_submodule(path) if path else model)
    except UnitTraceError as exc:
        return f"rewrite unit {found.rewrite_unit or '<root>'}: {path} alone does not trace ({exc.reason})"
    for match in find_mlps(gm, path):
        if linear_paths(match) == found.key:
            found.match, found.rewrite_unit = match, path
            return f"rewrite unit {path} (the module holding its linears traces alone)"
    return f"rewrite unit {found.rewrite_unit or '<root>'}: {path} alone does not show the same MLP"


# ---------------------------------------------------------------------------------------------


def _shape(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    out_f, in_f = (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])
    return int(out_f), int(in_f)


def _mlp_like_pairs(shapes: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
    """(up, down) pairs with up: D→F and down: F→D, F > D: an expand-then-contract pair."""
    pairs = []
    for a, (fa, da) in shapes.items():
        for b, (db, fb) in shapes.items():
            if a != b and fa == fb and da == db and fa > da:
                pairs.append((a, b))
    return pairs


def _feeding_linears(node: fx.Node, gm: fx.GraphModule, limit: int = 64) -> set[fx.Node] | None:
    """Linear nodes whose outputs alone (with constants) compute `node`; None if anything else feeds it."""
    found, seen, stack = set(), set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > limit:
            return None
        if linear_ref(n, gm) is not None:
            found.add(n)
            continue
        if n.op == "get_attr":
            continue
        if n.op in ("placeholder", "output") or n.op == "call_module":
            return None
        stack.extend(_node_inputs(n))
    return found


class CheckCoverage(Pass):
    name = "check-coverage"
    kind = "analysis"
    description = ("linears that look like an MLP (D→F, F→D with F > D) but are in no match: named with the reason, "
                   "never skipped silently")

    def run(self, ctx):
        matched = {name.rsplit(".", 1)[0] for f in ctx.mlps for name in f.key}
        matched |= set(k for f in ctx.mlps for k in f.key)
        # blocks whose own code did not trace: only shapes are known
        by_type: dict[str, list[str]] = {}
        for block in ctx.untraced:
            module = ctx.model.get_submodule(block.path) if block.path else ctx.model
            shapes = {n: _shape(module.get_submodule(n)) for n in block.linears if _join(block.path, n) not in matched}
            for up, down in _mlp_like_pairs(shapes):
                msg = (f"{block.path or '<root>'}: linears {up}, {down} look like an MLP but the block did not trace: "
                       f"{block.reason}")
                by_type.setdefault(type(module).__name__, []).append(msg)
                ctx.problems.append(msg)
                yield block.path, msg
        # traced units: an expand/contract pair connected only through each other, with no match
        for unit in ctx.units:
            gm = unit.graph_module
            c = ctx.contracted.get(unit.path)
            nodes = {n.name: n for n in gm.graph.nodes}
            for down_name, down in c.linears.items() if c else []:
                if _ref_name(unit.path, down) in matched:
                    continue
                d_model, f = down.shape(gm)
                x = linear_input(nodes[down_name])
                feeders = _feeding_linears(x, gm) if x is not None else None
                if not feeders or len(feeders) > 2:
                    continue
                refs = [c.linears[n.name] for n in feeders]
                if any(_ref_name(unit.path, r) in matched for r in refs):
                    continue
                if any(r.shape(gm)[1] != d_model or r.shape(gm)[0] not in (f, 2 * f) for r in refs) or f <= d_model:
                    continue
                region = c.regions.get(f"act:{sorted(feeders, key=lambda n: n.name)[0].name}")
                why = f"activation region: {region.description}" if region else "no recognised activation between them"
                names = ", ".join(sorted(_ref_name(unit.path, r) for r in refs) + [_ref_name(unit.path, down)])
                msg = f"{unit.path or '<root>'}: linears {names} look like an MLP but match no supported pattern ({why})"
                ctx.problems.append(msg)
                yield unit.path, msg

    def summary(self, ctx):
        return f"{len(ctx.problems)} problems"


ANALYSIS_PASSES = (TraceUnits, ActivationRegions, MatchMLPs, ChooseRewriteUnit, CheckCoverage)


def discover_mlps(model: nn.Module) -> Discovery:
    passes = [cls() for cls in ANALYSIS_PASSES]
    pipeline = PassPipeline(passes)
    ctx = pipeline.run(PassContext(model))
    return Discovery(
        mlps=ctx.mlps,
        untraced=[(b.path, b.reason, b.linears) for b in ctx.untraced],
        units=[u.path or "<root>" for u in ctx.units],
        problems=ctx.problems,
        log=pipeline.logs,
        passes=passes,
    )
