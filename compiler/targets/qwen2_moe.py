"""Qwen2-MoE (Qwen2MoeForCausalLM): Llama / Mistral (`qkv_bias: false`) and Qwen2 (`qkv_bias: true`).

softmax_then_topk is `norm_topk_prob: false`, topk_then_softmax `norm_topk_prob: true`;
fine-grained experts via `moe_intermediate_size = F/G`; dense layers among MoE ones via
`mlp_only_layers`; per-layer sliding windows via `layer_types`.

Shared expert: transformers scales it by sigmoid(shared_expert_gate · x). The gate weight is set
to zero (sigmoid(0) = 1/2) and the shared expert's down projection doubled, so the exported layer
equals ours exactly at init, and the gate trains from there. Without a shared expert of ours,
Qwen2-MoE still builds one: it gets width 1 and all-zero weights (its output is exactly 0, and its
gradients are 0, so training keeps it at 0); width 0 would make transformers warn about
zero-element tensors on every load.
"""

from .base import Target, shared_expert_tensors, sliding_layers


class Qwen2Moe(Target):
    name = "qwen2_moe"
    title = "Qwen2-MoE"
    architecture = "Qwen2MoeForCausalLM"
    config_class = "Qwen2MoeConfig"
    sources = ("llama", "mistral", "qwen2")
    router_modes = {"softmax_then_topk": {"norm_topk_prob": False}, "topk_then_softmax": {"norm_topk_prob": True}}
    dense_layers = True
    shared_expert = True
    exactness = ("exact in both router modes (`norm_topk_prob`); shared expert through its sigmoid gate "
                 "(zeroed, W2 doubled)")
    order = 1

    def source_problem(self, src, plan):
        if plan.source_type != "qwen2" and (getattr(src, "attention_bias", False) or getattr(src, "mlp_bias", False)):
            return "attention_bias/mlp_bias are set; Qwen2-MoE has q/k/v biases only (no o_proj or MLP bias)"
        return None

    def config_kwargs(self, src, plan):
        c = plan.moe
        window, types = sliding_layers(src)
        return dict(
            intermediate_size=src.intermediate_size, moe_intermediate_size=c.d_expert, num_experts=c.num_experts,
            shared_expert_intermediate_size=c.shared_d_ffn or 1, decoder_sparse_step=1,
            mlp_only_layers=list(plan.dense_layers), qkv_bias=plan.source_type == "qwen2",
            use_sliding_window=window is not None, sliding_window=window,
            max_window_layers=getattr(src, "max_window_layers", 0), layer_types=types,
        )

    def extra_tensors(self, state, c):
        w = state["router.weight"]
        d = c.d_model
        if c.shared_d_ffn:
            # sigmoid(0) = 1/2 gates it in transformers: double W2 so the product is shared_scale · W2
            out = shared_expert_tensors(state, c, "mlp.shared_expert.", factor=2.0)
        else:  # no shared expert: width 1, all zeros (output exactly 0, gradients 0: it stays 0)
            out = {"mlp.shared_expert.gate_proj.weight": w.new_zeros(1, d),
                   "mlp.shared_expert.up_proj.weight": w.new_zeros(1, d),
                   "mlp.shared_expert.down_proj.weight": w.new_zeros(d, 1)}
        out["mlp.shared_expert_gate.weight"] = w.new_zeros(1, d)
        return out


ENTRY = Qwen2Moe()
