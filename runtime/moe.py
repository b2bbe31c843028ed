"""The MoE layer that replaces a dense MLP: router + routed experts (+ optional shared expert).

Its forward has the dense MLP's signature, x [..., D] -> [..., D], so it drops into the
model unchanged. In training its router losses ride along in autograd, so the model trains with
load balancing in any loop that calls `loss.backward()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


from .activations import get_activation
from .config import MoEConfig
from .backends import resolve_backend
from .dispatchers import LOCAL
from .experts import GroupedExperts
from .layers import MoELayerBase, moe_layers
from .balancing import register_bias_layer
from .capacity import capacity_keep
from .losses import attach_aux_loss, load_balancing_loss, z_loss
from .router import TopKRouter
from .telemetry import NUM_SCALARS, accumulate, recomputing
from .token_mask import flat_token_mask


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


class MoELayer(MoELayerBase):
    """Router + routed experts (+ shared expert), with the router's training machinery built in:
    router losses attached to autograd (losses.py), aux-loss-free bias balancing (balancing.py),
    optional capacity (capacity.py), padding masks (token_mask.py) and telemetry (telemetry.py)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = TopKRouter(
            config.d_model, config.num_experts, config.top_k, config.router_type, bias=config.router_bias,
            expert_bias=config.uses_bias, selection=config.selection, group_size=config.virtual_group_size,
        )
        self.experts = GroupedExperts(config)
        self.shared_expert = SharedExpert(config) if config.shared_d_ffn > 0 else None
        self.backend = config.backend
        self.token_mask = None  # [B, S] attention mask of the current model call (token_mask.py)
        self.track_stats = True  # telemetry buffers updated in training forwards (off: benchmarks)
        self.dispatcher = LOCAL  # where the routed slots are computed (expert_parallel.py installs all-to-all)
        self.init_runtime_buffers()
        if config.uses_bias:
            register_bias_layer(self)

    @property
    def ep(self):
        """The expert-parallel state (expert_parallel.EPState) when experts are sharded, else None."""
        return self.dispatcher.state

    def __setstate__(self, state):
        """Unpickled and deep-copied layers join the bias-balancing registry too."""
        state.pop("ep", None)  # layers pickled before dispatchers existed
        state.setdefault("dispatcher", LOCAL)
        super().__setstate__(state)
        if self.config.uses_bias:
            register_bias_layer(self)

    def init_runtime_buffers(self, device=None) -> None:
        """(Re)create the non-persistent training buffers, zeroed: statistics since the last read,
        the last weighted router loss (for logging), the attached loss's gradient scale."""
        n = self.config.num_experts
        device = device if device is not None else self.router.weight.device
        if device.type == "meta" and device != self.router.weight.device:
            device = self.router.weight.device
        f32 = dict(device=device, dtype=torch.float32)
        self.register_buffer("stat_load", torch.zeros(n, **f32), persistent=False)
        self.register_buffer("stat_scalars", torch.zeros(NUM_SCALARS, **f32), persistent=False)
        self.register_buffer("last_aux_loss", torch.zeros((), **f32), persistent=False)
        self.register_buffer("aux_loss_scale", torch.ones((), **f32), persistent=False)
        if self.config.uses_bias:
            self.register_buffer("balance_counts", torch.zeros(n, **f32), persistent=False)

    def _apply(self, fn, recurse=True):
        """Casts keep the fp32 statistics fp32 (device moves still apply)."""
        out = super()._apply(fn, recurse)
        for name in ("stat_load", "stat_scalars", "last_aux_loss", "aux_loss_scale", "balance_counts"):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [tokens, D]
        mask = flat_token_mask(self.token_mask, shape)  # [tokens] or None
        cfg = self.config
        route = self.router(tokens)
        weights = route.weights  # [tokens, K] fp32
        kept = None
        if cfg.capacity_factor is not None:
            kept = capacity_keep(route.indices, route.probs.gather(1, route.indices), cfg.num_experts,
                                 cfg.capacity_factor, mask)
            weights = weights * kept
        if self.training and (cfg.uses_aux_loss or cfg.z_loss_coef or self.track_stats):
            lb = load_balancing_loss(route.probs, route.indices, cfg.num_experts, mask)
            z = z_loss(route.logits, mask) if cfg.z_loss_coef else lb.new_zeros(())
            loss = (cfg.aux_loss_coef * lb if cfg.uses_aux_loss else lb.new_zeros(())) + cfg.z_loss_coef * z
            if torch.is_grad_enabled() and (cfg.uses_aux_loss or cfg.z_loss_coef):
                weights = attach_aux_loss(weights, loss, self.aux_loss_scale)
            if self.track_stats and not recomputing():
                accumulate(self, route.indices, route.probs, weights.detach(), kept, mask, lb, z)
                self.last_aux_loss.copy_(loss.detach())
        if cfg.output_multiplier != 1.0:  # scaling_placement "output": a on the combine weights, [tokens, K]
            weights = weights * cfg.output_multiplier
        run_experts = resolve_backend(self.backend, tokens.device)
        out = self.dispatcher(self, tokens, route.indices, weights, run_experts)  # [tokens, D]
        if self.shared_expert is not None:
            out = out + self.config.shared_scale * self.shared_expert(tokens)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        c = self.config
        extra = f", capacity_factor={c.capacity_factor}" if c.capacity_factor is not None else ""
        return f"backend={self.backend}, shared_d_ffn={c.shared_d_ffn}, balancing={c.balancing}{extra}"


def materialize(layer: MoELayer, device, dtype: torch.dtype | None = None, state: dict | None = None) -> MoELayer:
    """The one way a layer built on the meta device becomes real. With `state` (its full state
    dict) the tensors are taken as they are (assign: no copy, their dtypes kept: experts in the
    model's dtype, the router fp32); without, storage is allocated uninitialised on `device` in
    `dtype` (to be loaded from a checkpoint). Either way the training buffers start zeroed."""
    if state is None:
        layer = layer.to_empty(device=device)
        if dtype is not None:
            layer = layer.to(dtype)  # the router and the statistics stay fp32 (their _apply)
    else:
        layer.load_state_dict(state, assign=True, strict=True)
    layer.init_runtime_buffers(torch.device(device) if device is not None else None)
    return layer.to(device)


def relax_routing(model: nn.Module) -> int:
    """Switch every per_slice layer to plain top-K selection (same router weights, same weights of
    the kept experts), the routing that transformers' MoE formats hold. Run it for the last steps of
    training so the exported model is the one that was trained; the saved spec follows. Returns the
    number of layers switched."""
    from dataclasses import replace

    switched = 0
    for layer in moe_layers(model).values():
        if layer.config.selection != "topk":
            layer.config = replace(layer.config, selection="topk")
            layer.router.selection = "topk"
            switched += 1
    spec = getattr(model, "_upcycle_spec", None)
    if spec is not None and getattr(spec.router, "selection", "topk") != "topk":
        model._upcycle_spec = replace(spec, router=replace(spec.router, selection="topk"))
    return switched


def build_moe(config: MoEConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MoELayer:
    return MoELayer(config).to(device=device, dtype=dtype)


__all__ = ["MoELayer", "SharedExpert", "build_moe", "materialize", "moe_layers", "relax_routing"]
