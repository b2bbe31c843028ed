"""Ernie 4.5-MoE (Ernie4_5_MoeForCausalLM) for Ernie 4.5 sources: the same attention and norms;
the router is softmax → top-K → renormalise (topk_then_softmax), its choice made on the
probabilities plus `moe_statics.e_score_correction_bias`, which is exactly how our aux-loss-free
bias steers the choice (router.py), so a trained routing bias exports too. Shared experts are
`moe_num_shared_experts` × the expert width, added as they are: ours is S shards of width F/G.
Dense layers must form the format's pattern: MoE on layers start ≤ i ≤ end with (i + 1) a multiple
of the interval."""

from .base import ExportPlan, Target, shared_expert_tensors


def moe_layer_pattern(moe: list[int], num_layers: int) -> tuple[int, int, int] | None:
    """(start, end, interval) whose layers are exactly `moe`, or None."""
    start, end = moe[0], moe[-1]
    for interval in range(1, num_layers + 1):
        if [i for i in range(start, end + 1) if (i + 1) % interval == 0] == moe:
            return start, end, interval
    return None


class Ernie45Moe(Target):
    name = "ernie4_5_moe"
    title = "Ernie 4.5-MoE"
    architecture = "Ernie4_5_MoeForCausalLM"
    config_class = "Ernie4_5_MoeConfig"
    sources = ("ernie4_5",)
    router_modes = {"topk_then_softmax": {}}
    dense_layers = True
    shared_expert = True
    trained_bias = True
    shared_in_expert_widths = True
    exactness = ("exact for topk_then_softmax (its only router); shared experts; a trained aux-loss-free bias "
                 "held in `moe_statics`; MoE layers as start/end/interval")
    order = 6

    def source_problem(self, src, plan: ExportPlan):
        if moe_layer_pattern(plan.moe_layers, src.num_hidden_layers) is None:
            return (f"Ernie 4.5-MoE places MoE layers as start/end/interval; layers {plan.moe_layers[:6]} "
                    "are not such a pattern")
        return None

    def config_kwargs(self, src, plan):
        c = plan.moe
        start, end, interval = moe_layer_pattern(plan.moe_layers, src.num_hidden_layers)
        return dict(intermediate_size=src.intermediate_size, moe_intermediate_size=c.d_expert,
                    moe_num_experts=c.num_experts, moe_num_shared_experts=c.shared_d_ffn // c.d_expert,
                    moe_layer_start_index=start, moe_layer_end_index=end, moe_layer_interval=interval,
                    use_bias=bool(getattr(src, "use_bias", False)))

    def extra_tensors(self, state, c):
        w = state["router.weight"]
        bias = state.get("router.expert_bias")
        out = {"mlp.gate.moe_statics.e_score_correction_bias": (bias if bias is not None else w.new_zeros(c.num_experts))[None]}  # [1, N]
        if c.shared_d_ffn:
            out.update(shared_expert_tensors(state, c, "mlp.shared_experts."))
        return out


ENTRY = Ernie45Moe()
