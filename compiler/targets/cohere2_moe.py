"""Cohere2-MoE (Cohere2MoeForCausalLM) for Command R7B-style Cohere2 sources: the same parallel
attention + MLP block on one LayerNorm, the same sliding-window layer pattern and logit scale.
The router takes the top-K logits and a softmax over them (`expert_selection_fn: softmax`:
topk_then_softmax); shared experts are `num_shared_experts` × the expert width, summed as they
are. Every layer is MoE (its dense layers force rotary embeddings the dense Cohere2 layer does not
have). Its forward computes no load-balancing loss (transformers 5.x): the export is exact for
inference, but training it in transformers does not balance the routers (router_aux_loss_coef is
written for the record and unused)."""

from .base import Target, shared_expert_tensors, sliding_layers


class Cohere2Moe(Target):
    name = "cohere2_moe"
    title = "Cohere2-MoE"
    architecture = "Cohere2MoeForCausalLM"
    config_class = "Cohere2MoeConfig"
    sources = ("cohere2",)
    router_modes = {"topk_then_softmax": {"expert_selection_fn": "softmax", "norm_topk_prob": False}}
    shared_expert = True
    shared_in_expert_widths = True
    router_loss = False
    exactness = ("exact for topk_then_softmax (its softmax selection); Cohere2's LayerNorm, logit scale and sliding "
                 "windows carried; shared experts summed; no router loss in its forward (training it in "
                 "transformers does not balance)")
    order = 7

    def common_kwargs(self, src, plan):
        kw = super().common_kwargs(src, plan)
        kw.update(layer_norm_eps=src.layer_norm_eps, rms_norm_eps=None)  # None: LayerNorm, as Cohere2
        return kw

    def config_kwargs(self, src, plan):
        c = plan.moe
        window, _ = sliding_layers(src)
        rope = getattr(src, "rope_parameters", None) or {}
        return dict(intermediate_size=c.d_expert, num_experts=c.num_experts, logit_scale=src.logit_scale,
                    num_shared_experts=c.shared_d_ffn // c.d_expert, shared_expert_combination_strategy="sum",
                    attention_bias=bool(getattr(src, "attention_bias", False)), sliding_window=window,
                    layer_types=list(src.layer_types), mlp_layer_types=["sparse"] * src.num_hidden_layers,
                    rope_theta=rope.get("rope_theta", 10000.0))

    def extra_tensors(self, state, c):
        return shared_expert_tensors(state, c, "mlp.shared_experts.") if c.shared_d_ffn else {}


ENTRY = Cohere2Moe()
