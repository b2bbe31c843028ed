"""Qwen3-MoE (Qwen3MoeForCausalLM) for Qwen3 sources: the same attention with its per-head q/k
RMSNorms (carried by name), softmax_then_topk as `norm_topk_prob: false` and topk_then_softmax as
`true`, fine-grained experts via `moe_intermediate_size`, dense layers via `mlp_only_layers`.
It has no shared expert, and one sliding window for all layers or none."""

from .base import Target, sliding_layers


class Qwen3Moe(Target):
    name = "qwen3_moe"
    title = "Qwen3-MoE"
    architecture = "Qwen3MoeForCausalLM"
    config_class = "Qwen3MoeConfig"
    sources = ("qwen3",)
    router_modes = {"softmax_then_topk": {"norm_topk_prob": False}, "topk_then_softmax": {"norm_topk_prob": True}}
    dense_layers = True
    exactness = "exact in both router modes (`norm_topk_prob`); q/k norms carried; dense layers via `mlp_only_layers`"
    order = 2

    def source_problem(self, src, plan):
        window, types = sliding_layers(src)
        if window is not None and len(set(types)) > 1:
            return ("Qwen3-MoE applies one sliding window to every layer; this Qwen3 slides on "
                    f"{types.count('sliding_attention')} of {len(types)} layers")
        return None

    def config_kwargs(self, src, plan):
        c = plan.moe
        window, _ = sliding_layers(src)
        return dict(
            intermediate_size=src.intermediate_size, moe_intermediate_size=c.d_expert, num_experts=c.num_experts,
            decoder_sparse_step=1, mlp_only_layers=list(plan.dense_layers),
            attention_bias=bool(getattr(src, "attention_bias", False)),
            use_sliding_window=window is not None, sliding_window=window,
        )


ENTRY = Qwen3Moe()
