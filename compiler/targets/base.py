"""What every export target shares: the plan it is given, the checks of the layer's shape against
the format, the common config fields, and the standard tensor mapping.

Layout in transformers 5.x, the same for every format here: the router is one [N, D] matrix
(`gate.weight`, GraniteMoe: `router.weight`), the experts are fused 3-D tensors
`experts.gate_up_proj` [N, 2·H, D] (gate rows first, then up rows: the forward chunks it in two)
and `experts.down_proj` [N, D, H], the orientation of our GroupedExperts. A target module says
what differs: which sources and router modes it holds, its config, where the block sits in a
decoder layer and how a shared expert or a routing bias is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from upcycle.runtime.config import MoEConfig

from ..errors import UpcycleError


class ExportError(UpcycleError):
    """The upcycled model has no transformers MoE format (one line saying why)."""


@dataclass
class ExportPlan:
    """A model's export, decided before anything is written."""

    target: "Target"
    moe_layers: list[int]  # decoder layers whose MLP is an MoE layer
    dense_layers: list[int]  # decoder layers that kept their dense MLP
    moe: MoEConfig  # the (common) shape of the MoE layers
    source_type: str  # the dense model's config.model_type
    expert_bias: bool = False  # some layer routes with a trained aux-loss-free bias
    candidates: list[str] = field(default_factory=list)  # targets holding this source family


class Interleaved:
    """cat([a, b], dim=1) of two [N, H, ...] stacks without the copy (the fused gate_up_proj):
    the shard writer streams a[0], b[0], a[1], b[1], ..., the same bytes as the concatenation, and
    a layer's peak memory keeps one stack less."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b

    @property
    def shape(self) -> tuple:
        return (self.a.shape[0], self.a.shape[1] + self.b.shape[1], *self.a.shape[2:])

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    def to(self, dtype) -> "Interleaved":
        return Interleaved(self.a.to(dtype), self.b.to(dtype))

    def detach(self) -> "Interleaved":
        return Interleaved(self.a.detach(), self.b.detach())

    def parts(self):
        for a, b in zip(self.a, self.b):
            yield a
            yield b


def hf_aux_loss_coef(c: MoEConfig, num_moe_layers: int) -> float:
    """transformers' coefficient giving our balancing pressure on each router.

    Ours: Σ over MoE layers of coef · N Σ_e f_e P_e, with f_e the share of the T·K slots.
    transformers (every format here, `load_balancing_loss_func`): coef' · N Σ_e F_e P̄_e over the
    layers pooled, with F_e slots per token (K times our share) and P̄ the mean over layers·tokens.
    Its gradient on layer l's mean probability is coef' · N · K · f_e / L against our coef · N · f_e,
    so coef' = coef · L / K: equal gradients when the layers' loads agree (exactly for one MoE
    layer; with several, transformers balances the pooled load rather than each layer's)."""
    if not c.uses_aux_loss:
        return 0.0
    return c.aux_loss_coef * num_moe_layers / c.top_k


def sliding_layers(src) -> tuple[int | None, list[str]]:
    """(window or None, per-layer attention types) of a source config (Mistral: every layer;
    Qwen2/3: layers from max_window_layers on, when use_sliding_window)."""
    window = getattr(src, "sliding_window", None) if getattr(src, "use_sliding_window", True) else None
    types = getattr(src, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window else "full_attention"] * src.num_hidden_layers
    if window is None:
        types = ["full_attention"] * src.num_hidden_layers
    return window, list(types)


def head_dim(src) -> int:
    return getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads


class Target:
    """One transformers MoE format. Subclasses (one per module of this package) set the class
    attributes and override `source_problem`, `config_kwargs` and `extra_tensors` where the format
    differs from the common case."""

    name = ""  # --target NAME (the transformers model_type)
    title = ""  # in messages and docs/export.md
    architecture = ""  # the transformers class, e.g. "MixtralForCausalLM"
    config_class = ""  # e.g. "MixtralConfig"
    sources: tuple[str, ...] = ()  # dense model types whose every other layer the format holds as is
    # router type -> config fields expressing it (the router modes the format holds)
    router_modes: dict[str, dict] = {}
    block = "mlp"  # decoder layer attribute holding the MoE block
    router_name = "gate.weight"  # the router matrix inside the block
    dense_layers = False  # dense MLP layers among MoE ones
    fine_grained = True  # experts narrower than the dense intermediate size
    shared_expert = False  # holds our shared expert
    shared_in_expert_widths = False  # its shared expert is a whole number of expert widths
    trained_bias = False  # holds a trained aux-loss-free routing bias (router.balancing: bias)
    router_loss = True  # its forward adds the load-balancing loss (router_aux_loss_coef) in training
    exactness = ""  # what equals ours, for docs/export.md's table and the export record
    order = 100  # among targets that fit exactly, the lowest order is the default

    # -- fitting -----------------------------------------------------------------------------
    def why_not(self, src, plan: ExportPlan) -> str | None:
        """None if the format holds the upcycled model exactly, else what it lacks (one clause)."""
        c = plan.moe
        if plan.source_type not in self.sources:
            return f"{self.title} holds {', '.join(self.sources)} models, not {plan.source_type}"
        if c.router_type not in self.router_modes:
            return (f"{self.title}'s router is {' / '.join(self.router_modes)} only, not {c.router_type} "
                    "(set router.type accordingly)")
        if plan.dense_layers and not self.dense_layers:
            return f"{self.title} has no dense MLP layers among MoE ones (layers {plan.dense_layers[:4]} kept theirs)"
        if c.d_expert != src.intermediate_size and not self.fine_grained:
            return f"{self.title} holds full-width experts (granularity 1) only"
        if c.shared_d_ffn and not self.shared_expert:
            return f"{self.title} has no shared expert"
        if self.shared_in_expert_widths and c.shared_d_ffn % c.d_expert:
            return f"{self.title}'s shared experts are whole multiples of the expert width"
        if plan.expert_bias and not self.trained_bias:
            return f"{self.title}'s router cannot hold a trained aux-loss-free bias (router.balancing: bias)"
        return self.source_problem(src, plan)

    def source_problem(self, src, plan: ExportPlan) -> str | None:
        """Source-specific checks (attention biases, sliding windows, ...)."""
        return None

    # -- config ------------------------------------------------------------------------------
    def common_kwargs(self, src, plan: ExportPlan) -> dict:
        c = plan.moe
        return dict(
            vocab_size=src.vocab_size, hidden_size=src.hidden_size, num_hidden_layers=src.num_hidden_layers,
            num_attention_heads=src.num_attention_heads, num_key_value_heads=src.num_key_value_heads,
            hidden_act=src.hidden_act, max_position_embeddings=src.max_position_embeddings,
            initializer_range=src.initializer_range, rms_norm_eps=getattr(src, "rms_norm_eps", None),
            tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
            rope_parameters=getattr(src, "rope_parameters", None), attention_dropout=getattr(src, "attention_dropout", 0.0),
            bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
            num_experts_per_tok=c.top_k, output_router_logits=True,
            router_aux_loss_coef=hf_aux_loss_coef(c, len(plan.moe_layers)),
            **self.router_modes[c.router_type],
        )

    def config_kwargs(self, src, plan: ExportPlan) -> dict:
        """The format's own fields (expert count and width, dense layers, ...)."""
        raise NotImplementedError

    def config(self, src, plan: ExportPlan, dtype: torch.dtype):
        import transformers

        cls = getattr(transformers, self.config_class)
        cfg = cls(**self.common_kwargs(src, plan), **self.config_kwargs(src, plan))
        cfg.head_dim = head_dim(src)  # the attention modules read getattr(config, "head_dim", hidden / heads)
        cfg.dtype = dtype
        cfg.architectures = [self.architecture]
        return cfg

    # -- tensors -----------------------------------------------------------------------------
    def moe_prefix(self, i: int) -> str:
        return f"model.layers.{i}.{self.block}."

    def rename(self, name: str) -> str:
        """A tensor outside the MoE layers, in the target's names (the same for every format here)."""
        return name

    def layer_tensors(self, state: dict, c: MoEConfig, i: int, dtype: torch.dtype,
                      concat: bool = True) -> dict:
        """One MoE layer in the target's names and layout, from the layer's own state dict (local
        names). The same function serves the in-memory export (a module's state) and the streaming
        one (tensors mapped from the checkpoint, or meta tensors to plan the shapes). Everything is
        written in the model's dtype, the router included (transformers keeps one dtype).
        concat=False: the fused gate_up_proj as an `Interleaved` (for the shard writer, no copy)."""
        prefix = self.moe_prefix(i)
        gate, up = state["experts.gate_proj"], state["experts.up_proj"]
        down = state["experts.down_proj"]
        out = {
            prefix + self.router_name: state["router.weight"],  # [N, D]
            prefix + "experts.gate_up_proj": torch.cat([gate, up], dim=1) if concat else Interleaved(gate, up),  # [N, 2H, D]
            # scaling_placement "output": the fixed multiplier folds into the down projections
            prefix + "experts.down_proj": down * c.output_multiplier if c.output_multiplier != 1.0 else down,  # [N, D, H]
        }
        layer = f"model.layers.{i}."
        for name, value in self.extra_tensors(state, c).items():
            out[layer + name] = value
        return {k: v.detach().to(dtype) for k, v in out.items()}

    def extra_tensors(self, state: dict, c: MoEConfig) -> dict:
        """Shared expert, routing bias, ... (names inside the decoder layer: `mlp.shared_expert...`;
        GraniteMoeShared keeps its shared MLP beside the block)."""
        return {}


def shared_expert_tensors(state: dict, c: MoEConfig, prefix: str, factor: float = 1.0) -> dict:
    """Our shared expert as a gate/up/down MLP at `prefix`, its output scale (times `factor`)
    folded into the down projection: the format adds the MLP's output as it is."""
    scale = c.shared_scale * factor
    down = state["shared_expert.down_proj.weight"]  # [D, Hs]
    return {prefix + "gate_proj.weight": state["shared_expert.gate_proj.weight"],  # [Hs, D]
            prefix + "up_proj.weight": state["shared_expert.up_proj.weight"],  # [Hs, D]
            prefix + "down_proj.weight": down * scale if scale != 1.0 else down}


__all__ = ["ExportError", "shared_expert_tensors", "ExportPlan", "Interleaved", "Target", "hf_aux_loss_coef", "sliding_layers", "head_dim"]
