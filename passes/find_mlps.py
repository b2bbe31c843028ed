"""Find MLP blocks in a traced graph by subgraph matching on its dataflow (networkx).

The FX graph becomes a networkx DiGraph in which each activation region is contracted into
one `act` node; MLPs are then the monomorphic images of two small pattern graphs:

    plain:  linear ─▶ act ─▶ linear
    gated:  linear ─▶ act ─▶ mul ◀─ linear,  mul ─▶ linear   (both first linears share their input)
    fused gated (one projection, GLU region): the plain pattern with a GLU-valued act

Attribute names never enter into it: `w1/w2/w3`, `nn.Sequential`, Conv1D and F.linear all look
the same once traced.

Dropout between an MLP's linears (T5's `wi → act → dropout → wo`, GPT-2-style `act → dropout`)
is an identity in eval mode, so it is folded into the match and is not carried into the experts:
after upcycling, that dropout no longer applies in training. Dropout outside the MLP (after the
down projection, in attention, on the residual) is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx
from networkx.algorithms.isomorphism import DiGraphMatcher

from .activation_regions import IDENTITY, ActivationRegion, _is_product, find_region
from .linears import LinearRef, linear_input, linear_ref


@dataclass
class MLPMatch:
    """One MLP found in the graph of the traced unit at `unit_path`."""

    unit_path: str
    gated: bool
    activation: str | None
    activation_desc: str
    down: LinearRef
    up: LinearRef  # the first projection (for fused GLU: the fused gate_up projection)
    gate: LinearRef | None = None
    glu_layout: str | None = None  # set for a fused gate_up projection
    input_node: str = ""
    output_node: str = ""  # the down projection's node
    nodes: tuple[str, ...] = ()  # every graph node the MLP consists of
    d_model: int = 0
    d_ffn: int = 0
    problems: list[str] = field(default_factory=list)  # why it cannot be rewritten (empty: it can)

    @property
    def linears(self) -> list[LinearRef]:
        return [r for r in (self.gate, self.up, self.down) if r is not None]

    @property
    def path(self) -> str:
        """Module path of the MLP: the deepest module holding all its linears."""
        parts = [r.module_path or r.weight_attr.rsplit(".", 1)[0] for r in self.linears]
        prefix = _common_prefix([p.split(".") for p in parts])
        local = ".".join(prefix)
        return ".".join(p for p in (self.unit_path, local) if p)

    @property
    def kind(self) -> str:
        if self.glu_layout:
            return "gated (fused gate_up)"
        return "gated" if self.gated else "plain"


def _common_prefix(paths: list[list[str]]) -> list[str]:
    if not paths:
        return []
    out = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    # a linear's own name is never the MLP: drop it if every path was identical
    if all(len(p) == len(out) for p in paths):
        out = out[:-1]
    return out


def _pattern(edges: list[tuple[str, str]], kinds: dict[str, str]) -> nx.DiGraph:
    g = nx.DiGraph()
    for name, kind in kinds.items():
        g.add_node(name, kind=kind)
    g.add_edges_from(edges)
    return g


GATED = _pattern(
    [("g", "a"), ("a", "m"), ("u", "m"), ("m", "d")],
    {"g": "linear", "u": "linear", "a": "act", "m": "mul", "d": "linear"},
)
PLAIN = _pattern([("l1", "a"), ("a", "l2")], {"l1": "linear", "a": "act", "l2": "linear"})


@dataclass
class Contracted:
    """The contracted dataflow of one graph: what the activation-region pass decided."""

    graph: nx.DiGraph
    regions: dict[str, ActivationRegion]  # 'act:<start>' -> region
    linears: dict[str, LinearRef]  # node name -> linear
    passthrough: dict[str, tuple[str, ...]]  # linear or product node -> identity nodes folded into it


def contract(gm: fx.GraphModule) -> Contracted:
    """Contracted dataflow graph: node ids are FX node names, or 'act:<start>' for a region.

    Pass-through regions (computing the identity: eval-mode dropout, casts, copies) after a
    linear or a product are folded into that node, so `mul → dropout → down` (T5's gated FFN)
    reads as `mul → down`; a matched MLP lists those nodes among its own.
    """
    return Contracted(*_contract(gm))


def _contract(gm: fx.GraphModule):
    linears: dict[str, LinearRef] = {}
    for node in gm.graph.nodes:
        ref = linear_ref(node, gm)
        if ref is not None:
            linears[node.name] = ref
    regions: dict[str, ActivationRegion] = {}
    passthrough: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for node in gm.graph.nodes:
        is_linear = node.name in linears
        if node.name in owner or not (is_linear or _is_product(node)):
            continue
        width = linears[node.name].shape(gm)[0] if is_linear else None
        region = find_region(node, gm, width)
        if region is None or any(n in owner for n in region.nodes):
            continue
        if region.activation == IDENTITY:
            passthrough[node.name] = region.nodes
            for n in region.nodes:
                owner[n] = node.name
        elif is_linear:
            rid = f"act:{node.name}"
            regions[rid] = region
            for n in region.nodes:
                owner[n] = rid

    g = nx.DiGraph()
    for node in gm.graph.nodes:
        nid = owner.get(node.name, node.name)
        if nid in regions:
            g.add_node(nid, kind="act")
        elif nid in linears:
            g.add_node(nid, kind="linear")
        elif nid != node.name or _is_product(node):
            g.add_node(nid, kind="mul")
        else:
            g.add_node(nid, kind=node.op)
        for inp in node.all_input_nodes:
            src = owner.get(inp.name, inp.name)
            if src != nid:
                g.add_edge(src, nid)
    return g, regions, linears, passthrough


def _kind_match(a: dict, b: dict) -> bool:
    return a["kind"] == b["kind"]


def find_mlps(gm: fx.GraphModule, unit_path: str = "", contracted: Contracted | None = None) -> list[MLPMatch]:
    """Every MLP in the graph, in graph order, each with the problems that block its rewrite."""
    c = contracted or contract(gm)
    g, regions, linears, passthrough = c.graph, c.regions, c.linears, c.passthrough
    nodes_by_name = {n.name: n for n in gm.graph.nodes}
    used: set[str] = set()
    found: list[MLPMatch] = []

    for pattern, gated in ((GATED, True), (PLAIN, False)):
        matcher = DiGraphMatcher(g, pattern, node_match=_kind_match)
        for mapping in matcher.subgraph_monomorphisms_iter():
            role = {v: k for k, v in mapping.items()}
            if any(n in used for n in role.values()):
                continue
            if gated:
                gate_n, up_n, down_n, act_id = role["g"], role["u"], role["d"], role["a"]
                if linear_input(nodes_by_name[gate_n]) is not linear_input(nodes_by_name[up_n]):
                    continue
                extra = [role["m"]]
            else:
                gate_n, up_n, down_n, act_id = None, role["l1"], role["l2"], role["a"]
                extra = []
            region = regions[act_id]
            if region.start != (gate_n or up_n):
                continue
            match = _build_match(gm, unit_path, linears, nodes_by_name, region, gate_n, up_n, down_n, extra, passthrough)
            found.append(match)
            used.update([n for n in (gate_n, up_n, down_n, act_id, *extra) if n])
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    found.sort(key=lambda m: order[m.output_node])
    return found


def _build_match(gm, unit_path, linears, nodes_by_name, region, gate_n, up_n, down_n, extra, passthrough) -> MLPMatch:
    problems: list[str] = []
    up, down = linears[up_n], linears[down_n]
    gate = linears[gate_n] if gate_n else None
    up_out, d_model = up.shape(gm)
    down_out, down_in = down.shape(gm)
    glu_layout = region.glu_layout
    d_ffn = up_out // 2 if glu_layout else up_out
    if region.activation is None:
        problems.append(f"unsupported activation: {region.description}")
    if gate is not None and gate.shape(gm) != (up_out, d_model):
        problems.append(f"gate {gate.shape(gm)} and up {(up_out, d_model)} projections differ in shape")
    if down_in != d_ffn:
        problems.append(f"down projection takes {down_in} features, hidden width is {d_ffn}")
    if down_out != d_model:
        problems.append(f"MLP maps width {d_model} to {down_out}; an MoE layer needs equal widths")
    inner = [n for n in (gate_n, up_n, *extra) if n]
    folded = [p for n in inner for p in passthrough.get(n, ())]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    member_names = sorted({*inner, *region.nodes, *folded, down_n}, key=order.__getitem__)
    members = set(member_names)
    for name in member_names:
        if name == down_n:
            continue
        outside = [u.name for u in nodes_by_name[name].users if u.name not in members]
        if outside:
            problems.append(f"hidden value {name!r} is also used by {outside} outside the MLP")
    x = linear_input(nodes_by_name[up_n])
    return MLPMatch(
        unit_path=unit_path,
        gated=gate is not None or glu_layout is not None,
        activation=region.activation,
        activation_desc=region.description,
        down=down,
        up=up,
        gate=gate,
        glu_layout=glu_layout,
        input_node=x.name if x is not None else "",
        output_node=down_n,
        nodes=tuple(member_names),
        d_model=d_model,
        d_ffn=d_ffn,
        problems=problems,
    )
