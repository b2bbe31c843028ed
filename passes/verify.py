"""Verification: run the same probe inputs through each dense MLP and its MoE replacement.

Dense inputs/outputs are captured with hooks on the MLP's first and last linear before the
rewrite, so no dense copy of the model is kept. Each MoE is then run on the captured input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class LayerCheck:
    mlp_path: str
    max_abs_error: float
    rel_error: float  # ||moe - dense|| / ||dense||
    rel_error_unscaled: float | None  # same layer built with weight_scaling none (for comparison)
    output_norm: float  # ||dense|| / sqrt(tokens): the output scale the errors are relative to
    exact_expected: bool
    passed: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ProbeCapture:
    """Captures the input of dense MLPs through a forward pre-hook on their first linear (the
    dense output a layer is checked against is computed from it, not captured)."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def watch(self, key: str, first: nn.Module) -> None:
        def grab_in(_m, args, _key=key):
            self.inputs.setdefault(_key, args[0].detach().reshape(-1, args[0].shape[-1]).clone())

        self._handles.append(first.register_forward_pre_hook(grab_in))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def compare(dense_out: torch.Tensor, moe_out: torch.Tensor) -> tuple[float, float]:
    diff = (moe_out.float() - dense_out.float())
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    rel = float(diff.norm() / dense_out.float().norm().clamp_min(1e-12))
    return max_abs, rel


@torch.no_grad()
def check_layer(mlp_path: str, moe: nn.Module, x: torch.Tensor, dense_out: torch.Tensor, *, exact_expected: bool,
                tolerance: float, unscaled: nn.Module | float | None = None) -> LayerCheck:
    """`unscaled`: the layer without weight scaling, or the number its output is the scaled output
    times (when the scale is a pure output factor), for the `rel err (no scaling)` column."""
    moe_out = moe(x)
    max_abs, rel = compare(dense_out, moe_out)
    if isinstance(unscaled, float):
        rel_unscaled = compare(dense_out, moe_out.float() * unscaled)[1]
    else:
        rel_unscaled = compare(dense_out, unscaled(x))[1] if unscaled is not None else None
    scale = float(dense_out.float().abs().max()) if dense_out.numel() else 0.0
    # exact cases: max abs error within tolerance of the output's own scale (fp32 summation order)
    passed = (max_abs <= tolerance * max(1.0, scale)) if exact_expected else True
    norm = float(dense_out.float().norm() / max(dense_out.shape[0], 1) ** 0.5)
    return LayerCheck(mlp_path, max_abs, rel, rel_unscaled, norm, exact_expected, passed)
