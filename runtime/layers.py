"""The walk over a model's MoE layers, in one place: `moe_layers(model)`.

It finds every `MoELayerBase`, the base class of runtime/moe.py's `MoELayer`. Both live here, in
a module that imports nothing else of the runtime, so that the pieces the layer is built from
(losses, telemetry, balancing, token_mask, expert_parallel: moe.py imports them) walk a model
without importing moe.py back (no import circle, not even a delayed one).
"""

from __future__ import annotations

import torch.nn as nn


class MoELayerBase(nn.Module):
    """What `moe_layers` finds: the base of `upcycle.runtime.MoELayer` (it adds nothing)."""


def moe_layers(model: nn.Module) -> dict:
    """{module path: MoELayer} of a model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayerBase)}


__all__ = ["MoELayerBase", "moe_layers"]
