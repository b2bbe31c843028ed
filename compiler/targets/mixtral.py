"""Mixtral (MixtralForCausalLM): Llama / Mistral with topk_then_softmax, full-width experts in every
layer and no shared expert. Mixtral's router is softmax → top-k → renormalise: the same weights as
topk_then_softmax. The default for that case (Mixtral is the format most tools read)."""

from .base import Target, sliding_layers


class Mixtral(Target):
    name = "mixtral"
    title = "Mixtral"
    architecture = "MixtralForCausalLM"
    config_class = "MixtralConfig"
    sources = ("llama", "mistral")
    router_modes = {"topk_then_softmax": {}}
    fine_grained = False
    exactness = "exact (softmax → top-k → renormalise is topk_then_softmax)"
    order = 0

    def source_problem(self, src, plan):
        if getattr(src, "attention_bias", False) or getattr(src, "mlp_bias", False):
            return "attention_bias/mlp_bias are set; Mixtral has no attention or MLP biases"
        return None

    def config_kwargs(self, src, plan):
        window, _ = sliding_layers(src)
        return dict(intermediate_size=plan.moe.d_expert, num_local_experts=plan.moe.num_experts, sliding_window=window)


ENTRY = Mixtral()
