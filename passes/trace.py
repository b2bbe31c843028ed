"""Tracing: turn modules into FX graphs whose leaves are the linear layers.

transformers v5 blocks do not trace with a plain `torch.fx.symbolic_trace`:
  * decorated forwards (`@deprecate_kwarg`, `@can_return_tuple`, ...) are `*args, **kwargs`
    wrappers, and FX's argument patching fails on them (`co_varnames is too small`);
  * `**kwargs` of the forward becomes one Proxy, and splatting it into the attention call raises
    "Proxy object cannot be iterated";
  * attention (and a few norms) branch on tensor values or dtypes.

The tracer here handles all three without knowing any architecture:
  * the root forward is unwrapped (`inspect.unwrap`) and its arguments are created by us: one
    placeholder per parameter, the `**kwargs` dict carried by a sentinel key so every call it is
    splatted into can be replayed with the caller's real kwargs at run time (`_splat_call`);
  * a parameter the block's own code compares with None (`if encoder_hidden_states is not None`)
    is traced as None (a Proxy is never None, so tracing it symbolically would silently take
    the "given" branch), and the rewritten block checks at run time that it is still None;
    scalar parameters (bool/int/str defaults) are specialised the same way if the block branches
    on them; every specialisation is guarded at run time, never silent;
  * when tracing fails inside a submodule, that submodule's type becomes a leaf and the trace is
    retried. Only modules that really break tracing become opaque, so an MLP written inline in a
    decoder layer (OPT) or spread over sibling modules (BERT) stays visible, and the leaves are
    analysed on their own afterwards (`traced_units`).
Functional dropout traced with `training=self.training` would be frozen to the trace-time mode;
its flag is re-read from the module at run time instead (a literal `training=False` cannot be told
apart from `self.training` traced in eval mode, and is treated the same way).
"""

from __future__ import annotations

import dis
import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from upcycle.runtime.rewritten_forward import (  # noqa: F401  (run-time half; old pickles name these here)
    RootSignature,
    UpcycledForward,
    _compile_forward,
    _rebuild_forward,
    bind_call,
    splat_call,
)

KW_SENTINEL = "__upcycle_var_kwargs__"
MAX_RETRIES = 16


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: a linear layer stored as weight [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_module(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _is_moe(module: nn.Module) -> bool:
    from upcycle.runtime.moe import MoELayer

    return isinstance(module, MoELayer)


class UnitTraceError(Exception):
    """A module that could not be traced as a whole; `reason` is the one-line cause."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path or '<root>'}: {reason}")
        self.path = path
        self.reason = reason


def _one_line(exc: BaseException) -> str:
    """`Type: first sentence of the message`, short enough for a log line."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = message.split(". ")[0]
    return f"{type(exc).__name__}: {message}"[:200]


def root_forward(module: nn.Module) -> types.FunctionType:
    """The function that runs when `module` is called, without decorators.

    An instance-level `forward` (set by our rewrite, or by a user) wins over the class's, since
    that is what `module(...)` executes."""
    inst = module.__dict__.get("forward")
    if isinstance(inst, UpcycledForward):
        return inst.traceable()
    if inst is not None:
        func = getattr(inst, "__func__", None)
        if not isinstance(func, types.FunctionType) or getattr(inst, "__self__", None) is not module:
            raise TypeError(f"{type(module).__name__} has an instance forward that is not a bound method")
        return func if hasattr(func, "_upcycle_signature") else inspect.unwrap(func)
    return inspect.unwrap(type(module).forward)


def _loaded_names(ins: dis.Instruction) -> list[str]:
    if not ins.opname.startswith("LOAD_FAST"):
        return []
    return list(ins.argval) if isinstance(ins.argval, tuple) else [ins.argval]


def none_tested_names(fn: types.FunctionType) -> set[str]:
    """Local names the function's own bytecode compares with None (`x is None`, `x is not None`)."""
    return set(_none_tested(fn.__code__))


@functools.lru_cache(maxsize=1024)
def _none_tested(code: types.CodeType) -> frozenset[str]:
    instrs = list(dis.get_instructions(code))
    names: set[str] = set()
    for i, ins in enumerate(instrs):
        if ins.opname == "IS_OP" and i >= 2:
            a, b = instrs[i - 2], instrs[i - 1]
            for x, y in ((a, b), (b, a)):
                if y.opname == "LOAD_CONST" and y.argval is None:
                    names.update(_loaded_names(x)[-1:])
        elif "IF_NONE" in ins.opname or "IF_NOT_NONE" in ins.opname:
            if i >= 1:
                names.update(_loaded_names(instrs[i - 1])[-1:])
    return frozenset(names)


_SCALARS = (bool, int, float, str)


def plan_root_signature(fn: types.FunctionType, specialize_scalars: bool) -> RootSignature:
    stored = getattr(fn, "_upcycle_signature", None)
    if stored is not None:  # a forward we installed: re-trace it exactly as it was traced
        return RootSignature(stored.signature, dict(stored.concrete))
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise TypeError("forward takes no `self`")
    tested = none_tested_names(fn)
    concrete: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is inspect.Parameter.empty:
            continue
        if p.default is None and p.name in tested:
            concrete[p.name] = None
        elif specialize_scalars and type(p.default) in _SCALARS:
            concrete[p.name] = p.default
    return RootSignature(sig, concrete)


# ---------------------------------------------------------------------------------------------
# the tracer


class UpcycleTracer(fx.Tracer):
    """Keeps linear layers, MoE layers, modules named in `extra_leaves` and modules of
    `leaf_types` as call_module nodes; remembers which submodules were being traced through
    when an exception was raised."""

    def __init__(self, extra_leaves: frozenset[str] = frozenset(), leaf_types: frozenset[type] = frozenset(),
                 specialize_scalars: bool = False):
        super().__init__()
        self.extra_leaves = extra_leaves
        self.leaf_types = leaf_types
        self.specialize_scalars = specialize_scalars
        self.root_signature: RootSignature | None = None
        self._stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_linear_module(m) or module_qualified_name in self.extra_leaves or _is_moe(m) or type(m) in self.leaf_types:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        self._stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "_upcycle_stack"):
                try:
                    exc._upcycle_stack = (list(self._stack), type(m))
                except Exception:  # exceptions that refuse attributes: attributed to the root
                    pass
            raise
        finally:
            self._stack.pop()

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        if not is_module:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        fn = root_forward(self.root)
        rs = plan_root_signature(fn, self.specialize_scalars)
        self.root_signature = rs
        placeholders = []
        for p in rs.graph_inputs():
            if p.kind is p.VAR_KEYWORD:
                proxy = self.create_proxy("placeholder", p.name, ({},), {})
                placeholders.append({KW_SENTINEL: proxy})
            else:
                default = () if p.default is inspect.Parameter.empty else (p.default,)
                if default and not isinstance(default[0], (type(None), *_SCALARS)):
                    default = ()  # the rewritten forward always passes every value
                placeholders.append(self.create_proxy("placeholder", p.name, default, {}))

        def call(root, *values):
            it = iter(values)
            args, kwargs = [root], {}
            for p in rs.params:
                if p.kind is p.VAR_POSITIONAL:
                    continue
                v = rs.concrete[p.name] if p.name in rs.concrete else next(it)
                if p.kind is p.VAR_KEYWORD:
                    kwargs.update(v)
                elif p.kind is p.KEYWORD_ONLY:
                    kwargs[p.name] = v
                elif p.kind is p.POSITIONAL_ONLY:
                    args.append(v)
                else:
                    kwargs[p.name] = v
            return fn(*args, **kwargs)

        return call, [self.root, *placeholders]


# ---------------------------------------------------------------------------------------------
# graph clean-up after tracing

_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}


def _lower_var_kwargs(graph: fx.Graph) -> None:
    """Calls that received the sentinel dict become `_splat_call(callee, args, kwargs, <kwargs>)`."""
    for node in list(graph.nodes):
        if KW_SENTINEL not in node.kwargs or node.op not in ("call_module", "call_function", "call_method"):
            continue
        extra = node.kwargs[KW_SENTINEL]
        kwargs = {k: v for k, v in node.kwargs.items() if k != KW_SENTINEL}
        with graph.inserting_before(node):
            if node.op == "call_module":
                callee = graph.get_attr(node.target)
                args = tuple(node.args)
            elif node.op == "call_function":
                callee = node.target
                args = tuple(node.args)
            else:  # call_method: self is args[0]
                callee = graph.call_function(getattr, (node.args[0], node.target))
                args = tuple(node.args[1:])
            new = graph.call_function(splat_call, (callee, args, kwargs, extra))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _live_dropout_flags(graph: fx.Graph) -> None:
    """F.dropout(x, p, training=<constant>) → training read from the block at run time."""
    flag = None
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _DROPOUTS:
            continue
        if "training" in node.kwargs and isinstance(node.kwargs["training"], bool):
            if flag is None:
                with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
                    flag = graph.get_attr("training")
            node.kwargs = {**node.kwargs, "training": flag}
        elif len(node.args) >= 3 and isinstance(node.args[2], bool):
            if flag is None:
                with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
                    flag = graph.get_attr("training")
            node.args = (*node.args[:2], flag, *node.args[3:])


@dataclass
class TraceResult:
    graph_module: fx.GraphModule
    leaves: dict[str, str] = field(default_factory=dict)  # submodule path -> why it was kept opaque
    signature: RootSignature | None = None


def _leaf_paths(module: nn.Module, leaf_types: dict[type, str]) -> dict[str, str]:
    out = {}
    for name, m in module.named_modules():
        if name and type(m) in leaf_types and not any(name.startswith(p + ".") for p in out):
            out[name] = leaf_types[type(m)]
    return out


def trace_unit(module: nn.Module, extra_leaves: frozenset[str] = frozenset(), path: str = "") -> TraceResult:
    """Trace `module` with linears as leaves; submodules whose type breaks tracing become leaves
    (retrying), and the root's scalar arguments are specialised if its own code branches on
    them. Raises UnitTraceError when the root's own code cannot be traced."""
    leaf_types: dict[type, str] = {}
    specialize = False
    first_error = None
    for _ in range(MAX_RETRIES):
        tracer = UpcycleTracer(extra_leaves, frozenset(leaf_types), specialize)
        try:
            graph = tracer.trace(module)
        except Exception as exc:
            stack = getattr(exc, "_upcycle_stack", None)
            first_error = first_error or exc
            if stack and stack[1] not in leaf_types and stack[1] is not type(module):
                leaf_types[stack[1]] = _one_line(exc)
                continue
            if not specialize and not stack:
                specialize = True
                continue
            raise UnitTraceError(path, _one_line(exc if stack or specialize else first_error)) from exc
        _lower_var_kwargs(graph)
        _live_dropout_flags(graph)
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
        return TraceResult(gm, _leaf_paths(module, leaf_types), tracer.root_signature)
    raise UnitTraceError(path, f"still failing after {MAX_RETRIES} retries: {_one_line(first_error)}")


def trace_module(module: nn.Module, extra_leaves: frozenset[str] = frozenset()) -> fx.GraphModule:
    """The unit's graph (see trace_unit); raises UnitTraceError if it cannot be traced."""
    return trace_unit(module, extra_leaves).graph_module


def has_linear_descendant(module: nn.Module) -> bool:
    """Whether the module holds anything a linear could use: a linear layer or a matrix parameter
    (graphs from torch.export apply F.linear to get_attr parameters, with no Linear modules)."""
    return any(is_linear_module(m) for m in module.modules()) or any(p.dim() >= 2 for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# top-down traversal


@dataclass
class TracedUnit:
    """A module that traced, with its graph. `path` is its name in the model ('' = root);
    `leaves` are its submodules kept opaque because they broke tracing (analysed separately)."""

    path: str
    module: nn.Module
    graph_module: fx.GraphModule
    leaves: dict[str, str] = field(default_factory=dict)
    signature: RootSignature | None = None


@dataclass
class UntracedBlock:
    """A module whose own code could not be traced: its children are analysed instead."""

    path: str
    reason: str
    linears: list[str]  # its direct linear children (not analysed together)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def traced_units(model: nn.Module) -> Iterator[TracedUnit | UntracedBlock]:
    """Top-down: a TracedUnit for every maximal traceable module holding linear layers (its
    opaque leaves are then visited on their own), and an UntracedBlock for every module whose
    own forward failed to trace (its children are visited instead)."""
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if is_linear_module(module) or not has_linear_descendant(module):
            continue
        children = []
        if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList)):
            children = list(module.named_children())
        else:
            try:
                result = trace_unit(module, path=path)
            except UnitTraceError as exc:
                direct = [n for n, c in module.named_children() if is_linear_module(c)]
                yield UntracedBlock(path, exc.reason, direct)
                children = list(module.named_children())
            else:
                yield TracedUnit(path, module, result.graph_module, result.leaves, result.signature)
                children = [(p, module.get_submodule(p)) for p in result.leaves]
        for name, child in reversed(children):
            stack.append((_join(path, name), child))
