"""`parallelize`: activation checkpointing, torch.compile and FSDP2 applied to a built MoE model.

In the style of torchtitan's parallelize functions, for any model holding MoE layers (upcycled
in memory, or loaded from an output folder): the *blocks* are found from the module tree (the
items of the ModuleLists whose children hold MoE layers: the decoder layers of a transformers
model), then, per block and in this order,

    activation checkpointing  the block's forward runs under torch.utils.checkpoint (non-reentrant);
                              module names are unchanged, so checkpoints stay compatible
    torch.compile             per block (`block.compile()`): one graph per block, compiled once
    fully_shard               FSDP2 on the mesh, bf16 parameters and fp32 gradient reduction by
                              default (MixedPrecisionPolicy); every parameter is sharded on dim 0,
                              which for the stacked experts [N, H, D] is the expert dimension

and finally `fully_shard` on the root (embeddings, head, norms). Router losses need nothing here:
FSDP averages the router's gradient over ranks exactly as it averages the task loss's (losses.py).

    mesh = init_device_mesh("cpu", (world,))        # or "cuda"
    model = parallelize(model, mesh, checkpointing=True, compile=False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .moe import MoELayer, moe_layers


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated modules that hold MoE layers, in model order: the children of every
    ModuleList / Sequential that has an MoE layer below one of its children. With none (MoE
    layers directly in a custom model), the MoE layers themselves; in a model without MoE layers
    (a dense baseline), the items of its longest ModuleList."""
    blocks: list[nn.Module] = []
    seen: set[int] = set()
    for container in model.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or isinstance(container, MoELayer):
            continue
        for child in container.children():
            if id(child) in seen:
                continue
            if any(isinstance(m, MoELayer) for m in child.modules()) and not _inside(child, blocks):
                blocks.append(child)
                seen.add(id(child))
    # keep the outermost blocks only (a ModuleList inside a block must not split it)
    blocks = [b for b in blocks if not any(b is not o and _contains(o, b) for o in blocks)]
    if not blocks:
        blocks = list(moe_layers(model).values())
    if not blocks:  # a dense model (the baseline): the items of its longest ModuleList
        lists = [c for c in model.modules() if isinstance(c, nn.ModuleList) and len(c) > 1]
        blocks = list(max(lists, key=len)) if lists else []
    return blocks


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _inside(module: nn.Module, blocks: list) -> bool:
    return any(_contains(b, module) for b in blocks)


class _CheckpointedForward:
    """block.forward replaced by this: the original forward under non-reentrant checkpointing.
    An object rather than a closure so the model stays picklable and deep-copyable."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def apply_checkpointing(block: nn.Module) -> None:
    if not isinstance(block.__dict__.get("forward"), _CheckpointedForward):
        block.forward = _CheckpointedForward(block.forward)


class _Divide:
    """Gradient hook dividing by the data-parallel degree (picklable, unlike a lambda)."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, grad):
        return grad / self.factor


@dataclass(frozen=True)
class ParallelPlan:
    """What `parallelize` did, for logs."""

    blocks: int
    checkpointing: bool
    compiled: bool
    sharded: bool
    expert_parallel: bool
    param_dtype: Optional[torch.dtype]
    reduce_dtype: Optional[torch.dtype]


def parallelize(
    model: nn.Module,
    mesh=None,
    *,
    checkpointing: bool = False,
    compile: bool = False,
    param_dtype: Optional[torch.dtype] = torch.bfloat16,
    reduce_dtype: Optional[torch.dtype] = torch.float32,
    reshard_after_forward: bool = True,
    ep_mesh=None,
) -> nn.Module:
    """Apply expert parallelism (when `ep_mesh` is given) / checkpointing / per-block compile /
    FSDP2 (when `mesh` is given) in place; returns the model, with `model.parallel_plan`
    describing what was applied.

    With both meshes (EP x FSDP, e.g. the same ranks for both), the experts are sharded over
    `ep_mesh` only; FSDP shards everything else over `mesh`, and the expert gradients (each the sum
    over every rank's tokens) are divided by `mesh`'s size, as FSDP averages the rest."""
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no MoE layer and no ModuleList of blocks found; nothing to parallelize")
    ignored = None
    if ep_mesh is not None:
        from .expert_parallel import expert_params, shard_experts_
        for layer in moe_layers(model).values():
            shard_experts_(layer, ep_mesh)
        ignored = set(expert_params(model))
        if mesh is not None and mesh.size() > 1:
            for p in ignored:
                p.register_hook(_Divide(float(mesh.size())))
    mp = None
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        if checkpointing:
            apply_checkpointing(block)
        if compile:
            block.compile()
        if mesh is not None:
            # routers keep fp32 parameters in compute too (router.py): their own small FSDP group
            fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype)
            for layer in moe_layers(block).values():
                fully_shard(layer.router, mesh=mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                        ignored_params=ignored)
    if mesh is not None:
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored)
    model.parallel_plan = ParallelPlan(len(blocks), checkpointing, compile, mesh is not None, ep_mesh is not None,
                                       param_dtype if mesh is not None else None,
                                       reduce_dtype if mesh is not None else None)
    return model


__all__ = ["find_blocks", "apply_checkpointing", "parallelize", "ParallelPlan"]
