"""Token-choice top-K router. Routing math runs in fp32 whatever the model dtype, autocast included.

Why fp32 for real: the softmax over N experts and the top-K choice are sensitive to rounding
(bf16 keeps 8 bits of mantissa, so near-equal experts of a virtual group tie or swap at random).
`.float()` alone is undone by an enclosing `torch.autocast`, which recasts F.linear's inputs; the
router therefore disables autocast for its own matmul, and keeps its weight an fp32 parameter
when the model is cast (`model.to(torch.bfloat16)`, `.half()`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .routers import router_type as _router_type


class RouterOutput(NamedTuple):
    indices: torch.Tensor  # [tokens, top_k] int64 expert ids
    weights: torch.Tensor  # [tokens, top_k] fp32 combine weights
    probs: torch.Tensor  # [tokens, num_experts] fp32 softmax over all experts
    logits: torch.Tensor  # [tokens, num_experts] fp32


def per_slice_topk(scores: torch.Tensor, group_size: int, copies: int) -> torch.Tensor:
    """Complete-MLP selection: scores [tokens, N] -> expert ids [tokens, T], T = copies · G.

    Experts come in N/G virtual groups of G shards, expert g·G + s holding shard s (weight_mapping's
    layout). For every shard position s the `copies` best groups are taken, so each token always
    gets every shard of the dense MLP the same number of times (a complete MLP, or `copies` of them)
    while the shards may come from different groups. Plain top-K instead lets the G rows of a group
    drift apart in training and hands tokens some shards twice and others not at all.
    """
    tokens = scores.shape[0]
    per_slice = scores.view(tokens, -1, group_size)  # [tokens, N/G groups, G shard positions]
    group = torch.topk(per_slice, copies, dim=1).indices  # [tokens, copies, G]
    slot = torch.arange(group_size, device=scores.device)  # [G]
    return (group * group_size + slot).reshape(tokens, copies * group_size)  # [tokens, T]


class TopKRouter(nn.Module):
    """The router type (runtime/routers/: softmax_then_topk, topk_then_softmax, ...) says which
    scores the choice is made on and how the kept experts are weighted.

    `selection` says which K experts are kept: "topk" the K highest scores overall, "per_slice"
    the T/G highest of each shard position (per_slice_topk). The weights of the kept experts
    follow the router type in both cases.

    With `expert_bias` (aux-loss-free balancing, DeepSeek-V3) a per-expert bias is added to the
    softmax probabilities used for the top-K *choice* only, for both router types (probabilities
    order experts as logits do, and give the bias one scale, [0, 1], whatever the logits' range).
    The combine weights stay those of the unbiased scores, so the bias steers load without
    entering the model's output or the router's gradient.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, router_type: str, bias: bool = False,
                 expert_bias: bool = False, selection: str = "topk", group_size: int = 1):
        super().__init__()
        if selection == "per_slice" and (num_experts % group_size or top_k % group_size):
            raise ValueError(f"per_slice selection needs group_size={group_size} to divide num_experts={num_experts} "
                             f"and top_k={top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        _router_type(router_type)  # an unknown name fails here, not at the first forward
        self.router_type = router_type
        self.selection = selection  # mutable: relax_routing() switches per_slice to topk
        self.group_size = group_size
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=torch.float32))  # [N, D]
        self.bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32)) if bias else None
        # learned by the balancing rule, not by gradients: a persistent buffer (None: not used)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32) if expert_bias else None)
        nn.init.normal_(self.weight, std=0.02)

    @property
    def kind(self):
        """The registry entry of `router_type` (looked up, not stored: modules stay picklable)."""
        return _router_type(self.router_type)

    def _apply(self, fn, recurse=True):
        """Casts keep the router's fp32 tensors fp32 (device moves still apply)."""

        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.is_floating_point() and out.dtype != torch.float32:
                out = out.float()
            return out

        return super()._apply(keep_fp32, recurse)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            logits = F.linear(x.float(), self.weight.float(), bias)  # [tokens, N] fp32
        probs = torch.softmax(logits, dim=-1)  # [tokens, N]
        eb = self.expert_bias
        # the choice: on probabilities when a balancing bias is added (one scale, [0, 1]), else on the
        # router type's own scores (softmax order = logit order, so both choose the same experts)
        score = self.kind.scores(logits, probs)  # [tokens, N]
        if eb is not None:
            score = probs + eb
        if self.selection == "per_slice":
            indices = per_slice_topk(score, self.group_size, self.top_k // self.group_size)  # [tokens, K]
        else:
            indices = torch.topk(score, self.top_k, dim=-1).indices  # [tokens, K]
        weights = self.kind.weights(logits, probs, indices)  # [tokens, K]
        return RouterOutput(indices, weights, probs, logits)

    def extra_repr(self) -> str:
        bias = ", expert_bias" if self.expert_bias is not None else ""
        sel = f", selection=per_slice(G={self.group_size})" if self.selection == "per_slice" else ""
        return f"num_experts={self.num_experts}, top_k={self.top_k}, type={self.router_type}{sel}{bias}"
