"""Expert parallelism: each rank of an `ep` group holds N / ep experts; tokens travel to their
experts' ranks and back with all-to-all.

Per MoE layer and forward (router replicated, experts sharded in contiguous blocks: rank r holds
experts r·N/ep … (r+1)·N/ep − 1):

    slots sorted by expert                   order [S], token [S]          (S = tokens · K)
    counts per (rank, local expert)          exchanged first: [ep, N/ep] all-to-all (one host sync)
    rows x[token] to their ranks             all_to_all_single (autograd)  [S, D] -> [R, D]
    local experts on the received rows       any backend, weight 1         [R, D]
    results back to the sending rank         all_to_all_single (autograd)  [R, D] -> [S, D]
    combine Σ_k w · y per token              scatter-add in fp32           [T, D]

No [tokens, experts] tensor is built. Gradients reach x (through both all-to-alls), the local
experts, and the router (through w, applied on the sending rank). The token counts make this path
eager-only (torch.compile would need the split sizes as graph inputs); the experts themselves
still run through the compiled-friendly custom ops.

With FSDP on the same ranks (`parallelize(..., ep_mesh=...)`), the expert weights are not sharded
further and their gradients, which sum the contributions of every rank's tokens, are divided by
the data-parallel degree like FSDP divides the rest (`expert_grad_divide_factor`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .grouped import add_rows
from .layers import moe_layers


@dataclass
class EPState:
    mesh: object  # 1-D DeviceMesh of the ep dimension
    group: object  # its process group
    rank: int
    size: int
    num_local: int  # experts on this rank
    first: int  # global id of this rank's first expert


EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj", "gate_bias", "up_bias", "down_bias")


def shard_experts_(layer: nn.Module, ep_mesh) -> EPState:
    """Keep only this rank's contiguous block of experts (in place) as DTensor parameters sharded
    on dim 0 over `ep_mesh` (so state dicts and DCP checkpoints hold every expert, once), and route
    through all-to-all."""
    from torch.distributed.tensor import DTensor, Shard

    group = ep_mesh.get_group()
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    n = layer.config.num_experts
    if n % size:
        raise ValueError(f"{n} experts cannot be split over an expert-parallel group of {size} ranks")
    local = n // size
    first = rank * local
    experts = layer.experts
    with torch.no_grad():
        for name in EXPERT_PARAMS:
            p = getattr(experts, name)
            if p is not None:
                shard = DTensor.from_local(p[first:first + local].detach().clone(), ep_mesh, [Shard(0)], run_check=False)
                setattr(experts, name, nn.Parameter(shard, requires_grad=p.requires_grad))
    layer.dispatcher = AllToAllDispatcher(EPState(ep_mesh, group, rank, size, local, first))
    return layer.ep


class _LocalExperts:
    """The experts' local shards, with GroupedExperts' interface for the backends."""

    def __init__(self, experts: nn.Module, dtype: torch.dtype, num_local: int):
        for name in EXPERT_PARAMS:
            p = getattr(experts, name)
            t = None if p is None else (p.to_local() if hasattr(p, "to_local") else p)
            setattr(self, name, None if t is None else t.to(dtype))
        self.num_experts = num_local
        self.gated, self.activation, self.act_fn = experts.gated, experts.activation, experts.act_fn
        self.expert_forward = lambda e, x: type(experts).expert_forward(self, e, x)  # reference backend


def _a2a(x: Tensor, out_splits: list, in_splits: list, group) -> Tensor:
    import torch.distributed._functional_collectives as fc

    y = fc.all_to_all_single_autograd(x, out_splits, in_splits, group)
    return fc.wait_tensor(y)


class AllToAllDispatcher:
    """The layer's dispatcher once its experts are sharded: slots to their experts' ranks and back."""

    def __init__(self, state: EPState):
        self.state = state

    def __call__(self, layer, tokens: Tensor, indices: Tensor, weights: Tensor, run_experts) -> Tensor:
        return ep_forward(layer, tokens, indices, weights, run_experts)


def ep_forward(layer: nn.Module, x: Tensor, indices: Tensor, weights: Tensor, run_experts) -> Tensor:
    """x [T, D], indices [T, K] (global expert ids), weights [T, K] -> [T, D]."""
    ep: EPState = layer.ep
    t, k = indices.shape
    n = ep.num_local * ep.size
    flat = indices.reshape(-1)  # [S]
    order = torch.argsort(flat, stable=True)  # [S]: by expert, hence by destination rank
    token = torch.div(order, k, rounding_mode="floor")  # [S]
    counts = torch.zeros(n, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=ep.group)  # [ep · N/ep]: (source rank, local expert)
    send_splits = counts.view(ep.size, ep.num_local).sum(1).tolist()
    recv_splits = recv_counts.view(ep.size, ep.num_local).sum(1).tolist()
    x_recv = _a2a(x.index_select(0, token), recv_splits, send_splits, ep.group)  # [R, D]
    local_ids = torch.arange(ep.num_local, device=x.device).repeat(ep.size)  # [ep · N/ep]
    local_e = torch.repeat_interleave(local_ids, recv_counts)  # [R] local expert of each received row
    ones = torch.ones(local_e.shape[0], 1, device=x.device)
    local = _LocalExperts(layer.experts, x.dtype, ep.num_local)
    y_recv = run_experts(local, x_recv, local_e[:, None], ones)  # [R, D]
    y = _a2a(y_recv, send_splits, recv_splits, ep.group)  # [S, D] in sorted-slot order
    w = weights.reshape(-1)[order].float()  # [S]
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    return add_rows(out, token, y.float() * w[:, None]).to(x.dtype)  # [T, D]


def expert_params(model: nn.Module) -> list:
    """The expert-parallel (DTensor) parameters of every EP layer of `model`."""
    return [p for m in moe_layers(model).values() if m.ep is not None
            for name in EXPERT_PARAMS if (p := getattr(m.experts, name)) is not None]


__all__ = ["EPState", "AllToAllDispatcher", "shard_experts_", "ep_forward", "expert_params"]
