"""Elementwise activations the runtime knows by name: one registry entry per activation.

Experts apply their activation by name (not by holding the dense model's activation module) so a
saved MoE can be rebuilt from its config alone, and so weight scaling can ask whether the
activation is positively homogeneous (only then can a scale factor be split across matrices).
Each entry carries everything the other places need, so adding an activation is one entry here
(plus its branch in the Triton kernels' `act_fwd` / `act_grad`, selected by `triton_code`):

    fn           the function (the reference, the grouped backend, identification of dense MLPs)
    backward     (grad, x) -> grad · act'(x), with the numerics of autograd (grouped backward)
    homogeneity  d with act(s·x) = s^d · act(x) for s > 0, or None (weight-scaling placement)
    triton_code  the constexpr the Triton kernels branch on
    hf_names     transformers' `hidden_act` spellings (the export checks the source model's)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _relu2(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _quick_gelu_backward(grad: Tensor, x: Tensor) -> Tensor:
    s = torch.sigmoid(1.702 * x)
    return grad * (s + 1.702 * x * s * (1 - s))


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]
    homogeneity: Optional[int]
    triton_code: int
    hf_names: tuple[str, ...]


REGISTRY: dict[str, Activation] = {a.name: a for a in (
    Activation("silu", F.silu, lambda g, x: torch.ops.aten.silu_backward(g, x), None, 0, ("silu", "swish")),
    Activation("gelu", F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="none"), None, 1,
               ("gelu",)),
    Activation("gelu_tanh", _gelu_tanh, lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"), None, 2,
               ("gelu_pytorch_tanh", "gelu_new")),
    Activation("quick_gelu", _quick_gelu, _quick_gelu_backward, None, 3, ("quick_gelu",)),
    Activation("relu", F.relu, lambda g, x: torch.ops.aten.threshold_backward(g, x, 0), 1, 4, ("relu",)),
    Activation("relu2", _relu2, lambda g, x: g * (2 * F.relu(x)), 2, 5, ("relu2",)),
)}

# views by field, for the callers that need one
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {n: a.fn for n, a in REGISTRY.items()}
HOMOGENEITY_DEGREE: dict[str, Optional[int]] = {n: a.homogeneity for n, a in REGISTRY.items()}


def lookup(name: str) -> Activation:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    return lookup(name).fn


def activation_backward(name: str, grad: Tensor, x: Tensor) -> Tensor:
    """grad · act'(x) for the activation called `name` (same numerics as autograd)."""
    return lookup(name).backward(grad, x)


__all__ = ["Activation", "REGISTRY", "ACTIVATIONS", "HOMOGENEITY_DEGREE", "lookup", "get_activation",
           "activation_backward"]
