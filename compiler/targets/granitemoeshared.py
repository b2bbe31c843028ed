"""GraniteMoeShared (GraniteMoeSharedForCausalLM): GraniteMoe plus an always-on shared MLP added
to the routed output as it is (`shared_mlp.input_linear` = [gate; up], `output_linear` = down),
which holds our shared expert exactly (its scale folded into output_linear)."""

import torch

from .granitemoe import GraniteMoe


class GraniteMoeShared(GraniteMoe):
    name = "granitemoeshared"
    title = "GraniteMoeShared"
    architecture = "GraniteMoeSharedForCausalLM"
    config_class = "GraniteMoeSharedConfig"
    shared_expert = True
    exactness = "exact for topk_then_softmax; multipliers carried; shared expert added as is (`shared_mlp`)"
    order = 5

    def config_kwargs(self, src, plan):
        return {**super().config_kwargs(src, plan), "shared_intermediate_size": plan.moe.shared_d_ffn}

    def extra_tensors(self, state, c):
        if not c.shared_d_ffn:
            return {}
        gate_up = torch.cat([state["shared_expert.gate_proj.weight"], state["shared_expert.up_proj.weight"]])  # [2·Hs, D]
        down = state["shared_expert.down_proj.weight"]  # [D, Hs]
        return {"shared_mlp.input_linear.weight": gate_up,  # beside block_sparse_moe, in the decoder layer
                "shared_mlp.output_linear.weight": down * c.shared_scale if c.shared_scale != 1.0 else down}


ENTRY = GraniteMoeShared()
