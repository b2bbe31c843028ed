"""Padding out of the router's loss and statistics.

An MoE layer sees only hidden states [..., D]; which of them are padding is known to the model's
caller (the attention mask). `attach_token_mask(model)` adds a forward pre-hook to the model that
hands the `attention_mask` of each call to every MoE layer for the duration of that call; the
layers then leave pad tokens out of the load-balancing loss, the z-loss and the telemetry (pad
tokens are still computed: their outputs are masked downstream as usual). The compiler installs
it on models whose forward takes `attention_mask`.

A mask of shape [B, S] applies to hidden states [B, T, D] when S ≥ T (the last T positions: with a
KV cache the mask also covers past tokens); anything else is ignored.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn

from .layers import moe_layers


class _MaskHook:
    """Picklable pre/post hook pair (a closure would make the model unpicklable)."""

    def __init__(self, layers: list, position: Optional[int]):
        self.layers = layers
        self.position = position  # index of attention_mask among positional args (after self)

    def pre(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for layer in self.layers:
            layer.token_mask = mask
        return None

    def post(self, module, args, kwargs, output):
        for layer in self.layers:
            layer.token_mask = None
        return None


def attach_token_mask(model: nn.Module) -> bool:
    """Install the hook on `model` if its forward takes `attention_mask`. Returns whether it did."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return False
    if "attention_mask" not in params:
        return False
    if any(isinstance(h, _MaskHook) for h in _hook_owners(model)):
        return True
    layers = list(moe_layers(model).values())
    if not layers:
        return False
    hook = _MaskHook(layers, params.index("attention_mask"))
    model.register_forward_pre_hook(hook.pre, with_kwargs=True)
    model.register_forward_hook(hook.post, with_kwargs=True, always_call=True)
    return True


def _hook_owners(model: nn.Module) -> list:
    return [getattr(h, "__self__", None) for h in model._forward_pre_hooks.values()]


def flat_token_mask(mask: Optional[torch.Tensor], shape: torch.Size) -> Optional[torch.Tensor]:
    """[B, S] attention mask -> [tokens] float mask for hidden states of `shape` [B, T, D], or None."""
    if mask is None or len(shape) != 3 or mask.shape[0] != shape[0] or mask.shape[1] < shape[1]:
        return None
    return mask[:, mask.shape[1] - shape[1]:].reshape(-1).to(torch.float32)


__all__ = ["attach_token_mask", "flat_token_mask"]
