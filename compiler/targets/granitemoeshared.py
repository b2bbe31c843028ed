"""GraniteMoeShared (GraniteMoeSharedForCausalLM): GraniteMoe plus an always-on shared MLP added
to the routed output as it is (`shared_mlp.input_linear` = [gate; up], `output_linear` = down),
which holds our shared expert exactly (its scale folded into output_linear)."""

import torch

from .base import shared_expert_tensors
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
        mlp = shared_expert_tensors(state, c, "")
        return {"shared_mlp.input_linear.weight": torch.cat([mlp["gate_proj.weight"], mlp["up_proj.weight"]]),  # [2·Hs, D]
                "shared_mlp.output_linear.weight": mlp["down_proj.weight"]}  # beside block_sparse_moe, in the layer


ENTRY = GraniteMoeShared()
