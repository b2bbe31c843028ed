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


__all__ = ["ACTIVATIONS", "HOMOGENEITY_DEGREE", "get_activation"]
