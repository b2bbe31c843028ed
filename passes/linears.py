"""Where a linear node's weights live, and how to read them in nn.Linear orientation."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .trace import is_conv1d, is_linear_module


@dataclass(frozen=True)
class LinearRef:
    """A linear layer used by the graph: y = x · Wᵀ + b with W [out, in].

    kind: 'module' (nn.Linear / Conv1D called as a submodule) or 'function' (F.linear on
    parameters reached by get_attr). Paths are relative to the traced unit.
    """

    kind: str
    module_path: str = ""
    weight_attr: str = ""
    bias_attr: str = ""
    transposed: bool = False  # weight stored [in, out] (Conv1D)

    def weight(self, root: nn.Module) -> torch.Tensor:
        w = _get(root, self.weight_attr) if self.kind == "function" else root.get_submodule(self.module_path).weight
        return w.t() if self.transposed else w  # [out, in]

    def bias(self, root: nn.Module) -> torch.Tensor | None:
        if self.kind == "function":
            return _get(root, self.bias_attr) if self.bias_attr else None
        return root.get_submodule(self.module_path).bias

    def shape(self, root: nn.Module) -> tuple[int, int]:
        out_f, in_f = self.weight(root).shape
        return int(out_f), int(in_f)

    def parameter_names(self, root: nn.Module) -> list[str]:
        """Names (relative to the unit) of the tensors this linear owns: what the rewrite consumes."""
        if self.kind == "function":
            return [a for a in (self.weight_attr, self.bias_attr) if a]
        mod = root.get_submodule(self.module_path)
        return [f"{self.module_path}.{n}" for n, _ in mod.named_parameters(recurse=False)]


def _get(root: nn.Module, dotted: str) -> torch.Tensor:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}


def linear_ref(node: fx.Node, root: nn.Module) -> LinearRef | None:
    """The LinearRef of `node` if it applies a linear layer to one activation input, else None."""
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        if is_linear_module(mod):
            return LinearRef("module", module_path=node.target, transposed=is_conv1d(mod))
        return None
    if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
        args = list(node.args) + [None] * 3
        weight = node.kwargs.get("weight", args[1])
        bias = node.kwargs.get("bias", args[2])
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            bias_attr = bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else ""
            if bias is not None and not bias_attr:
                return None
            return LinearRef("function", weight_attr=weight.target, bias_attr=bias_attr)
    return None


def linear_input(node: fx.Node) -> fx.Node | None:
    """The activation input of a linear node."""
    x = node.kwargs.get("input", node.args[0] if node.args else None)
    return x if isinstance(x, fx.Node) else None


MUL_TARGETS = {operator.mul, torch.mul, torch.Tensor.mul, "mul", torch.ops.aten.mul.Tensor}
