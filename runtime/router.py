"""Token-choice top-K router. Routing math runs in fp32 whatever the model dtype."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class RouterOutput(NamedTuple):
    indices: torch.Tensor  # [tokens, top_k] int64 expert ids
    weights: torch.Tensor  # [tokens, top_k] fp32 combine weights
    probs: torch.Tensor  # [tokens, num_experts] fp32 softmax over all experts
    logits: torch.Tensor  # [tokens, num_experts] fp32


class TopKRouter(nn.Module):
    """softmax_then_topk keeps the top-K probabilities of a softmax over all experts (the
    paper's choice: kept weights sum to < 1); topk_then_softmax renormalises over the kept K
    (Mixtral: kept weights sum to 1)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, router_type: str, bias: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_type = router_type
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # [N, D]
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        bias = None if self.bias is None else self.bias.float()
        logits = F.linear(x.float(), self.weight.float(), bias)  # [tokens, N]
        probs = torch.softmax(logits, dim=-1)  # [tokens, N]
        if self.router_type == "softmax_then_topk":
            weights, indices = torch.topk(probs, self.top_k, dim=-1)  # [tokens, K]
        else:
            top_logits, indices = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top_logits, dim=-1)  # [tokens, K]
        return RouterOutput(indices, weights, probs, logits)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, type={self.router_type}"
