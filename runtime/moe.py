"""The MoE layer that replaces a dense MLP: router + routed experts (+ optional shared expert).

Its forward has the dense MLP's signature, x [..., D] -> [..., D], so it drops into the
model unchanged; router losses are kept on the layer (`last_aux_loss`) for `aux_loss(model)`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


from .activations import get_activation
from .config import MoEConfig
from .dispatch import resolve_backend
from .experts import GroupedExperts
from .losses import load_balancing_loss, z_loss
from .router import TopKRouter


class SharedExpert(nn.Module):
    """An always-on dense MLP beside the routed experts (Qwen-MoE / DeepSeek-MoE style)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        d, h = config.d_model, config.shared_d_ffn
        self.gated = config.gated
        self.act_fn = get_activation(config.activation)
        self.gate_proj = nn.Linear(d, h, bias=config.first_bias) if config.gated else None
        self.up_proj = nn.Linear(d, h, bias=config.first_bias)
        self.down_proj = nn.Linear(h, d, bias=config.output_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(x)
        h = self.act_fn(self.gate_proj(x)) * up if self.gated else self.act_fn(up)
        return self.down_proj(h)


class MoELayer(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = TopKRouter(
            config.d_model, config.num_experts, config.top_k, config.router_type, bias=config.router_bias
        )
        self.experts = GroupedExperts(config)
        self.shared_expert = SharedExpert(config) if config.shared_d_ffn > 0 else None
        self.backend = config.backend
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [tokens, D]
        route = self.router(tokens)
        run_experts = resolve_backend(self.backend, tokens.device)
        out = run_experts(self.experts, tokens, route.indices, route.weights)  # [tokens, D]
        if self.shared_expert is not None:
            out = out + self.config.shared_scale * self.shared_expert(tokens)
        if self.training:
            loss = self.config.aux_loss_coef * load_balancing_loss(route.probs, route.indices, self.config.num_experts)
            if self.config.z_loss_coef:
                loss = loss + self.config.z_loss_coef * z_loss(route.logits)
            self.last_aux_loss = loss
        return out.reshape(shape)

    def extra_repr(self) -> str:
        c = self.config
        return f"backend={self.backend}, shared_d_ffn={c.shared_d_ffn}"


def build_moe(config: MoEConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MoELayer:
    return MoELayer(config).to(device=device, dtype=dtype)


__all__ = ["MoELayer", "SharedExpert", "build_moe"]
