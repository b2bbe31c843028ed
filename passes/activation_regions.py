"""Find the activation between two linears from the dataflow, however it is written.

Starting at a linear node, grow the set of parameter-free nodes computed only from its output
(an activation module, F.silu, or an inline formula such as GPT-2's tanh-GELU polynomial), cut
it at the node that feeds a linear or a product, and identify the unary function it computes
by evaluating it on a probe grid. A region whose output has half the input width is a fused
GLU (Phi-3's `gate_up_proj` followed by chunk): we identify which half is the gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from upcycle.runtime.activations import ACTIVATIONS

from .linears import MUL_TARGETS, linear_ref

# GLU layouts of a fused [gate | up] projection output of width 2H
GLU_LAYOUTS = ("gate_first", "up_first", "interleaved_gate_first", "interleaved_up_first")

# What a region computing its input unchanged is called (dropout in eval mode, dtype casts, a
# contiguous copy): not an activation, a pass-through that the matcher folds into its start node.
IDENTITY = "identity"


@dataclass
class ActivationRegion:
    start: str  # the linear node whose output feeds the region
    exit: str  # the node whose value leaves the region
    nodes: tuple[str, ...]  # region nodes in graph order (excludes start)
    activation: str | None  # a name in ACTIVATIONS, None if not recognised
    glu_layout: str | None  # set when the region is act(gate) ⊙ up over one fused projection
    description: str  # what the region computes, for messages


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _is_parameter_free_call(node: fx.Node, root: nn.Module) -> bool:
    from upcycle.runtime.rewritten_forward import splat_call

    if node.op == "call_function" and node.target is splat_call:
        return False  # a call into an opaque (leaf) module
    if node.op in ("call_function", "call_method"):
        return True
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        return not any(True for _ in mod.parameters()) and not any(True for _ in mod.buffers())
    return False


def _is_product(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in MUL_TARGETS:
        return sum(isinstance(a, fx.Node) for a in node.args) == 2
    return node.op == "call_method" and node.target == "mul"


def grow_region(start: fx.Node, root: nn.Module) -> list[fx.Node]:
    """Parameter-free nodes after `start` whose tensor inputs all come from start or the region."""
    region: list[fx.Node] = []
    members = {start}
    node = start.next
    while node.op != "output":
        inputs = [n for n in _node_inputs(node) if n.op != "get_attr"]
        if (
            inputs
            and all(n in members for n in inputs)
            and _is_parameter_free_call(node, root)
            and linear_ref(node, root) is None
        ):
            region.append(node)
            members.add(node)
        node = node.next
    return region


def region_exit(region: list[fx.Node], root: nn.Module) -> fx.Node | None:
    """The one region node that feeds a linear or a product outside the region, if unique."""
    members = set(region)
    exits = [
        n for n in region
        if any(u not in members and (linear_ref(u, root) is not None or _is_product(u)) for u in n.users)
    ]
    return exits[0] if len(exits) == 1 else None


def _ancestors_within(exit_node: fx.Node, members: set[fx.Node]) -> list[fx.Node]:
    keep, stack = set(), [exit_node]
    while stack:
        n = stack.pop()
        if n in keep or n not in members:
            continue
        keep.add(n)
        stack.extend(_node_inputs(n))
    return [n for n in exit_node.graph.nodes if n in keep]


def region_function(start: fx.Node, nodes: list[fx.Node], exit_node: fx.Node, root: nn.Module) -> fx.GraphModule:
    """The region as a standalone unary GraphModule t -> exit(t)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: g.placeholder("t")}
    for n in nodes:
        for inp in _node_inputs(n):
            if inp.op == "get_attr" and inp not in env:
                env[inp] = g.node_copy(inp)
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[exit_node])
    return fx.GraphModule(root, g)


def _probe_grid(rows: int, width: int) -> torch.Tensor:
    grid = torch.linspace(-8.0, 8.0, rows * width, dtype=torch.float32)
    perm = torch.randperm(grid.numel(), generator=torch.Generator().manual_seed(0))
    return grid[perm].reshape(rows, width)  # [rows, width]


def _split_glu(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    h = t.shape[-1] // 2
    if layout == "gate_first":
        return t[..., :h], t[..., h:]
    if layout == "up_first":
        return t[..., h:], t[..., :h]
    if layout == "interleaved_gate_first":
        return t[..., 0::2], t[..., 1::2]
    return t[..., 1::2], t[..., 0::2]


def identify(fn: nn.Module, width: int) -> tuple[str | None, str | None, str]:
    """(activation, glu_layout, description) of a unary region on inputs of `width` features."""
    x = _probe_grid(8, width)
    was_training = fn.training
    fn.eval()
    try:
        with torch.no_grad():
            y = fn(x.clone())
    except Exception as exc:
        return None, None, f"region could not be evaluated ({type(exc).__name__}: {exc})"
    finally:
        fn.train(was_training)
    if not isinstance(y, torch.Tensor):
        return None, None, f"region returns {type(y).__name__}, not a tensor"
    y = y.float()
    if y.shape == x.shape:
        if torch.equal(y, x):
            return IDENTITY, None, "identity (pass-through)"
        for name, act in ACTIVATIONS.items():
            if torch.allclose(y, act(x), atol=1e-5, rtol=1e-5):
                return name, None, name
        return None, None, "elementwise function matching none of " + ", ".join(ACTIVATIONS)
    if width % 2 == 0 and y.shape == (x.shape[0], width // 2):
        for layout in GLU_LAYOUTS:
            gate, up = _split_glu(x, layout)
            for name, act in ACTIVATIONS.items():
                if torch.allclose(y, act(gate) * up, atol=1e-5, rtol=1e-5):
                    return name, layout, f"{name} GLU over a fused projection ({layout})"
        return None, None, "half-width function of a fused projection matching no GLU form"
    return None, None, f"maps width {width} to shape {tuple(y.shape)}"


def _consumer_width(exit_node: fx.Node, root: nn.Module) -> int | None:
    for user in exit_node.users:
        ref = linear_ref(user, root)
        if ref is not None:
            return ref.shape(root)[1]
    return None


def find_region(start: fx.Node, root: nn.Module, width: int | None = None) -> ActivationRegion | None:
    """The region after `start` (a linear, or a product), identified on inputs of `width`
    features (default: the in-features of the linear the region feeds)."""
    grown = grow_region(start, root)
    if not grown:
        return None
    exit_node = region_exit(grown, root)
    if exit_node is None:
        return None
    if width is None:
        width = _consumer_width(exit_node, root)
        if width is None:
            return None
    nodes = _ancestors_within(exit_node, set(grown))
    act, layout, desc = identify(region_function(start, nodes, exit_node, root), width)
    return ActivationRegion(start.name, exit_node.name, tuple(n.name for n in nodes), act, layout, desc)
