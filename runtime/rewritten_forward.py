"""The forward of a unit whose graph the compiler rewrote (GPT-2, OPT, BERT blocks: an MLP written
inline or spread over sibling modules): the generated code of the rewritten FX graph, installed as
the unit's own `forward`.

It lives in the runtime because a trained model holds it: loading, training and pickling an
upcycled model need this module, never the tracer (passes/ builds these objects, the runtime runs
them).
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


def splat_call(fn, args, kwargs, extra):
    """Replays a call that received the traced block's `**kwargs`: fn(*args, **kwargs, **extra)."""
    return fn(*args, **kwargs, **extra)


@dataclass
class RootSignature:
    """How the root forward's parameters were turned into graph inputs.

    params: the forward's parameters after `self`; concrete: those traced as constants (they
    are not graph inputs; a rewritten block checks at run time that callers pass the same value).
    The graph's placeholders are the remaining params in order (VAR_POSITIONAL excluded, the
    VAR_KEYWORD dict included)."""

    signature: inspect.Signature
    concrete: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> list[inspect.Parameter]:
        return list(self.signature.parameters.values())[1:]

    def graph_inputs(self) -> list[inspect.Parameter]:
        return [p for p in self.params if p.name not in self.concrete and p.kind is not p.VAR_POSITIONAL]

    def describe(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.concrete.items())


def bind_call(rs: RootSignature, where: str, module: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """Values for the graph's placeholders from a real call, checking the specialised ones."""
    bound = rs.signature.bind(module, *args, **kwargs)
    bound.apply_defaults()
    values = []
    for p in rs.params:
        v = bound.arguments.get(p.name)
        if p.name in rs.concrete:
            expected = rs.concrete[p.name]
            same = v is expected or (not isinstance(v, torch.Tensor) and type(v) is type(expected) and v == expected)
            if not same:
                raise TypeError(
                    f"{where}: this upcycled block was traced with {p.name}={expected!r} (its code branches on it), "
                    f"but was called with {p.name}={type(v).__name__ if isinstance(v, torch.Tensor) else repr(v)}"
                )
        elif p.kind is p.VAR_POSITIONAL:
            if v:
                raise TypeError(f"{where}: this upcycled block was traced without extra positional arguments")
        elif p.kind is p.VAR_KEYWORD:
            values.append(dict(v or {}))
        else:
            values.append(v)
    return values


class UpcycledForward:
    """A unit's rewritten graph, installed as that instance's `forward` (see rewrite.install_rewrite).

    Calls bind the caller's arguments to the traced signature (checking specialised ones) and run
    the graph's generated code with `self` = the unit, so submodules are looked up on the unit at
    run time. Pickling keeps the generated source and re-compiles it (a bound method would pickle
    as `getattr(unit, 'forward')` and silently fall back to the dense class forward); deepcopy
    binds the copy to the copied unit."""

    def __init__(self, module: nn.Module, src: str, globals_: dict, signature: RootSignature, where: str):
        self.__self__ = module
        self.signature = signature
        self.where = where
        self._src = src
        self._globals = globals_
        self._fn = _compile_forward(src, globals_)

    def __call__(self, *args, **kwargs):
        module = self.__self__
        return self._fn(module, *bind_call(self.signature, self.where, module, args, kwargs))

    @property
    def code(self) -> str:
        return self._src

    def traceable(self) -> types.FunctionType:
        """`forward(self, *args, **kwargs)` for tracing this unit again, with the same graph inputs."""
        fn, rs, where = self._fn, self.signature, self.where

        def forward(self, *args, **kwargs):
            return fn(self, *bind_call(rs, where, self, args, kwargs))

        forward.__signature__ = rs.signature
        forward._upcycle_signature = rs
        return forward

    def __reduce__(self):
        portable = {k: (("module", v.__name__) if isinstance(v, types.ModuleType) else ("object", v))
                    for k, v in self._globals.items() if k != "__builtins__"}
        sig = self.signature.signature
        plain = sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
                            return_annotation=inspect.Signature.empty)
        return (_rebuild_forward, (self.__self__, self._src, portable, RootSignature(plain, self.signature.concrete),
                                   self.where))

    def __deepcopy__(self, memo):
        import copy

        return UpcycledForward(copy.deepcopy(self.__self__, memo), self._src, self._globals, self.signature, self.where)

    def __repr__(self) -> str:
        return f"<upcycled forward of {type(self.__self__).__name__} {self.where or '<root>'}>"


def _compile_forward(src: str, globals_: dict) -> types.FunctionType:
    namespace = dict(globals_)
    exec(compile(src, "<upcycled forward>", "exec"), namespace)  # FX-generated code of the rewritten graph
    return namespace["forward"]


def _rebuild_forward(module, src, portable, signature, where):
    import importlib

    globals_ = {k: importlib.import_module(v) if kind == "module" else v for k, (kind, v) in portable.items()}
    return UpcycledForward(module, src, globals_, signature, where)
