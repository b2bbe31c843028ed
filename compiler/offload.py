"""A model's own forward on a meta-device skeleton, each module's weights read just before it runs
and dropped after: the streaming conversion's whole-model probe in bounded memory.

Why the model's own forward rather than re-implementing a decoder layer: every architecture
(rotary or learned positions, multipliers, parallel blocks, rewritten GraphModule units) then
runs exactly as it does in memory, so the calibration probe sees the same hidden states either
way. Peak memory is one unit's weights plus the activations of the probe batch.

Units (what is materialised at once): an MoE layer (its weights come from the dense MLP through
the mapping, `fetch_moe`), a GraphModule (a rewritten unit: its code may read any tensor below it),
otherwise each module that owns tensors itself. Non-persistent buffers (rotary inv_freq, causal
masks) are not in checkpoints: `real_buffers` builds them once, from the config, with parameters
on the meta device.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from upcycle.runtime.moe import MoELayer


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters are created on the meta device, buffers where they are computed (CPU)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def real_buffers(config, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """{buffer path: tensor} of the model built from `config`, computed on CPU (params on meta)."""
    from .loading import model_class_for

    cls = model_class_for(config)
    with _parameters_on_meta():
        model = cls._from_config(config, dtype=dtype) if dtype else cls._from_config(config)
    return {n: b for n, b in model.named_buffers() if not b.is_meta}


def fill_buffers(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Meta buffers of `model` replaced by the real ones of the same path (others left)."""
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name in buffers:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._buffers[attr] = buffers[name].to(buf.dtype) if buffers[name].is_floating_point() else buffers[name]


def _meta_names(module: nn.Module, recurse: bool, skip: tuple[str, ...] = ()) -> list[str]:
    """Local names of the meta parameters and buffers a unit materialises (not those under `skip`)."""
    named = list(module.named_parameters(recurse=recurse, remove_duplicate=False))
    named += list(module.named_buffers(recurse=recurse, remove_duplicate=False))
    return [n for n, t in named if t is not None and t.is_meta and not any(n.startswith(s + ".") for s in skip)]


def _units(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """(path, module, local tensor names) of every unit. MoE layers are units of their own (their
    weights come from the mapping), also inside a GraphModule unit, which takes the rest of its
    subtree; other modules take the tensors they own directly."""
    units, covered, moe_paths = [], [], []
    for path, module in model.named_modules():
        inside = any(path.startswith(c + ".") for c in covered)
        if isinstance(module, MoELayer) and not any(path.startswith(m + ".") for m in moe_paths):
            units.append((path, module, list(module.state_dict())))
            moe_paths.append(path)
            continue
        if inside or any(path.startswith(m + ".") for m in moe_paths):
            continue
        if isinstance(module, fx.GraphModule) and path:
            moes = tuple(n for n, m in module.named_modules() if isinstance(m, MoELayer) and n)
            units.append((path, module, _meta_names(module, recurse=True, skip=moes)))
            covered.append(path)
        else:
            names = _meta_names(module, recurse=False)
            if names:
                units.append((path, module, names))
    return units


def _swap(module: nn.Module, dotted: str, value, restore: bool = False):
    """Put `value` at `dotted` (cast to the dtype there, unless restoring a saved object); returns
    what was there."""
    owner_path, _, attr = dotted.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    store = owner._parameters if attr in owner._parameters else owner._buffers
    old = store[attr]
    if not restore:
        value = value.to(old.dtype)
        if store is owner._parameters:
            value = nn.Parameter(value, requires_grad=False)
    store[attr] = value
    return old


@contextlib.contextmanager
def offloaded(model: nn.Module, fetch: Callable[[str], torch.Tensor],
              fetch_moe: Callable[[str], dict] | None = None):
    """Within the block, `model(...)` runs with every unit's meta tensors replaced by real ones for
    the duration of its forward, then put back (the very objects: ties survive). `fetch(name)`
    gives a tensor by its model state-dict name; `fetch_moe(path)` an MoE layer's state."""
    handles = []

    def before(path, module, names):
        def hook(_m, _args):
            if isinstance(module, MoELayer):
                state = fetch_moe(path)
            else:
                state = {n: fetch(f"{path}.{n}" if path else n) for n in names}
            saved = {n: _swap(module, n, state[n]) for n in names}
            if isinstance(module, MoELayer):
                module.init_runtime_buffers(torch.device("cpu"))
            module.__dict__["_offload_saved"] = saved
        return hook

    def after(module):
        def hook(_m, _args, _out):
            for n, old in module.__dict__.pop("_offload_saved", {}).items():
                _swap(module, n, old, restore=True)
            if isinstance(module, MoELayer):
                module.init_runtime_buffers(torch.device("meta"))
        return hook

    try:
        for path, module, names in _units(model):
            handles.append(module.register_forward_pre_hook(before(path, module, names)))
            handles.append(module.register_forward_hook(after(module)))
        yield model
    finally:
        for h in handles:
            h.remove()


__all__ = ["offloaded", "real_buffers", "fill_buffers"]
