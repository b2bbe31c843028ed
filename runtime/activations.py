"""Elementwise activations the runtime knows by name.

Experts apply their activation by name (not by holding the dense model's activation module) so a
saved MoE can be rebuilt from its config alone, and so weight scaling can ask whether the
activation is positively homogeneous (only then can a scale factor be split across matrices).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "relu2": _relu2,
}

# Degree of positive homogeneity: act(s·x) = s^d · act(x) for s > 0. None: not homogeneous.
HOMOGENEITY_DEGREE: dict[str, int | None] = {
    "silu": None,
    "gelu": None,
    "gelu_tanh": None,
    "quick_gelu": None,
    "relu": 1,
    "relu2": 2,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def identify_activation(fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """Name an opaque elementwise function by evaluating it on a probe grid.

    Used for activation modules or inline subgraphs whose type we do not know: two functions
    that agree to 1e-5 on 2001 points in [-8, 8] (and are elementwise) are the same activation
    for our purposes. Returns None when nothing matches.
    """
    x = torch.linspace(-8.0, 8.0, 2001, dtype=torch.float32)
    try:
        with torch.no_grad():
            y = fn(x.clone())
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    # elementwise check: permuting the input permutes the output
    perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y_perm = fn(x[perm].clone())
    except Exception:
        return None
    if not torch.allclose(y_perm, y[perm], atol=1e-6):
        return None
    for name, ref in ACTIVATIONS.items():
        if torch.allclose(y.float(), ref(x), atol=1e-5, rtol=1e-5):
            return name
    return None


__all__ = ["ACTIVATIONS", "HOMOGENEITY_DEGREE", "get_activation", "identify_activation"]
