"""Routed experts stored as stacked tensors, and the reference forward (a loop over experts).

Weights use nn.Linear orientation, one matrix per expert, stacked on dim 0, the same layout as
transformers' fused MoE checkpoints, so grouped kernels and exporters read them without copies:
    gate_proj [N, H, D], up_proj [N, H, D], down_proj [N, D, H]   (H = d_expert)
The loop below is the ground truth every fast path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import get_activation
from .config import MoEConfig


class GroupedExperts(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        n, h, d = config.num_experts, config.d_expert, config.d_model
        self.num_experts = n
        self.gated = config.gated
        self.activation = config.activation
        self.act_fn = get_activation(config.activation)
        self.gate_proj = nn.Parameter(torch.empty(n, h, d)) if config.gated else None
        self.up_proj = nn.Parameter(torch.empty(n, h, d))
        self.down_proj = nn.Parameter(torch.empty(n, d, h))
        self.gate_bias = nn.Parameter(torch.zeros(n, h)) if config.gated and config.first_bias else None
        self.up_bias = nn.Parameter(torch.zeros(n, h)) if config.first_bias else None
        self.down_bias = nn.Parameter(torch.zeros(n, d)) if config.output_bias else None
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens: x [tokens_e, D] -> [tokens_e, D]."""
        up = F.linear(x, self.up_proj[e], None if self.up_bias is None else self.up_bias[e])  # [t, H]
        if self.gated:
            gate = F.linear(x, self.gate_proj[e], None if self.gate_bias is None else self.gate_bias[e])
            h = self.act_fn(gate) * up  # [t, H]
        else:
            h = self.act_fn(up)
        return F.linear(h, self.down_proj[e], None if self.down_bias is None else self.down_bias[e])

    def extra_repr(self) -> str:
        n, d, h = self.down_proj.shape
        return f"num_experts={n}, d_model={d}, d_expert={h}, gated={self.gated}, activation={self.activation}"


def reference_forward(
    experts: GroupedExperts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """x [tokens, D], indices/weights [tokens, K] -> [tokens, D]: Σ_k w_k · expert_{i_k}(x)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [tokens, D]
    for e in range(experts.num_experts):
        token_ids, slot = torch.where(indices == e)
        if token_ids.numel() == 0:
            continue
        y = experts.expert_forward(e, x[token_ids])  # [t_e, D]
        out.index_add_(0, token_ids, y.float() * weights[token_ids, slot].unsqueeze(-1).float())
    return out.to(x.dtype)
