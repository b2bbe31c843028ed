"""Aux-loss-free load balancing (DeepSeek-V3): a per-expert routing bias moved against the load.

Once per optimizer step, for every MoE layer with `balancing: bias | both`:

    load  = slots routed to each expert since the last update (all micro-batches, all ranks)
    bias += rate · sign(mean(load) − load)

The bias only shifts which experts are chosen (router.py), so an overloaded expert is chosen less
next step without any gradient. The update runs from a global optimizer step pre-hook, installed
when the first such layer is built: any optimizer that steps the layer's router weight updates its
bias, in any training loop, after however many accumulation micro-batches. Layers whose router is
not in the optimizer being stepped are left alone; a frozen router can be balanced by calling
`update_expert_bias(model)` yourself. Counts live in no-grad buffers that activation checkpointing's
recompute does not touch, and are summed over data-parallel ranks when a process group is up, so
every rank applies the same update.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from .layers import moe_layers

_LAYERS: "weakref.WeakSet" = weakref.WeakSet()
_HOOK = None


def register_bias_layer(layer: nn.Module) -> None:
    """Called by MoELayer.__init__ for bias-balanced layers; installs the global hook once."""
    global _HOOK
    _LAYERS.add(layer)
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _HOOK = register_optimizer_step_pre_hook(_on_optimizer_step)


def _on_optimizer_step(optimizer, args, kwargs) -> None:
    if not _LAYERS:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    layers = [m for m in list(_LAYERS) if id(m.router.weight) in stepped]
    if layers:
        _update(layers)


@torch.no_grad()
def _update(layers: list) -> None:
    from .telemetry import _all_reduce_

    _all_reduce_([m.balance_counts for m in layers])
    for m in layers:
        load = m.balance_counts.float()  # [N]
        if load.sum() > 0:  # no tokens since the last step: nothing to learn from
            m.router.expert_bias.add_(m.config.bias_update_rate * torch.sign(load.mean() - load))
        m.balance_counts.zero_()


def update_expert_bias(model: nn.Module) -> int:
    """Apply the bias update to every bias-balanced MoE layer of `model` now (for loops that step
    no optimizer over the router). Returns the number of layers updated."""
    layers = [m for m in moe_layers(model).values() if m.config.uses_bias]
    if layers:
        _update(layers)
    return len(layers)


__all__ = ["register_bias_layer", "update_expert_bias"]
