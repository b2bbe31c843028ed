"""FlexOlmo (FlexOlmoForCausalLM) for OLMo 2 sources: transformers' format holding OLMo 2's
attention (q/k RMSNorm over the whole projection) and its post-attention / post-feedforward norms
with MoE MLPs; both router modes through `norm_topk_prob`. Every layer is MoE, experts have
`intermediate_size` width (fine-grained experts fit), and there is no shared expert."""

from .base import Target


class FlexOlmo(Target):
    name = "flex_olmo"
    title = "FlexOlmo"
    architecture = "FlexOlmoForCausalLM"
    config_class = "FlexOlmoConfig"
    sources = ("olmo2",)
    router_modes = {"softmax_then_topk": {"norm_topk_prob": False}, "topk_then_softmax": {"norm_topk_prob": True}}
    exactness = "exact in both router modes (`norm_topk_prob`); OLMo 2's q/k norms and post-norms carried"
    order = 3

    def config_kwargs(self, src, plan):
        c = plan.moe
        return dict(intermediate_size=c.d_expert, num_experts=c.num_experts,
                    attention_bias=bool(getattr(src, "attention_bias", False)))


ENTRY = FlexOlmo()
