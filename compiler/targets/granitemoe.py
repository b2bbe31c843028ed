"""GraniteMoe (GraniteMoeForCausalLM) for Granite sources without a shared expert: Granite's
multipliers (embedding, attention, residual, logits scaling) carried; the router takes the top-K
logits and a softmax over them (topk_then_softmax, its only mode). Every layer is MoE, experts have
`intermediate_size` width; the block is `block_sparse_moe` with the router at `router.weight`."""

from .base import Target

MULTIPLIERS = ("embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier")


class GraniteMoe(Target):
    name = "granitemoe"
    title = "GraniteMoe"
    architecture = "GraniteMoeForCausalLM"
    config_class = "GraniteMoeConfig"
    sources = ("granite",)
    router_modes = {"topk_then_softmax": {}}
    block = "block_sparse_moe"
    router_name = "router.weight"
    exactness = "exact for topk_then_softmax (its only router); Granite's four multipliers carried"
    order = 4

    def config_kwargs(self, src, plan):
        c = plan.moe
        return dict(intermediate_size=c.d_expert, num_local_experts=c.num_experts,
                    attention_bias=bool(getattr(src, "attention_bias", False)),
                    **{m: getattr(src, m) for m in MULTIPLIERS})


ENTRY = GraniteMoe()
