"""softmax_then_topk: a softmax over all N experts, the K largest probabilities kept as they are
(the paper's choice; kept weights sum to < 1). transformers: Qwen-MoE's `norm_topk_prob: false`."""

from . import RouterType


def _weights(logits, probs, indices):
    return probs.gather(1, indices)  # [tokens, K], sum < 1


ENTRY = RouterType(
    name="softmax_then_topk",
    summary="softmax over all experts, the top-K probabilities kept as they are (sum < 1; the paper's)",
    scores=lambda logits, probs: probs,
    weights=_weights,
    # a near-uniform router gives each kept expert about 1/N: a = N·G'/T = E·G'²/T restores the
    # dense scale on average over the token's T kept shards
    scaling=lambda e, g, t: e * g * g / t,
    exact_at_init=False,
    expected=("softmax_then_topk keeps only the top {top_k} of the experts' softmax weights, so the MoE "
              "equals the dense MLP only as far as the router is uniform: a rel err of 0.1-1 per layer is "
              "normal with the default init_std (0.02; near 0 with 1e-3, which trains worse), and without "
              "scaling the output is a fraction of the dense one (rel err near 1). What matters is the "
              "whole-model error and probe loss below, and continued training recovers the rest (the "
              "paper's recipe)"),
    order=0,
)
