"""topk_then_softmax: the K largest logits kept, their weights a softmax over those K (sum 1;
Mixtral's softmax -> top-K -> renormalise gives the same weights). transformers: Mixtral,
Qwen-MoE's `norm_topk_prob: true`, GraniteMoe, Ernie 4.5-MoE."""

from . import RouterType


def _weights(logits, probs, indices):
    return logits.gather(1, indices).softmax(dim=-1)  # [tokens, K], sum 1


ENTRY = RouterType(
    name="topk_then_softmax",
    summary="the top-K logits, renormalised by a softmax over those K (sum 1; Mixtral's)",
    scores=lambda logits, probs: logits,  # same order as probs, without the softmax's rounding
    weights=_weights,
    # kept weights sum to 1: one virtual group's G' shards weighted 1/G' each, so a = G'
    scaling=lambda e, g, t: float(g),
    exact_at_init=True,
    expected=("this spec does not reproduce the dense MLP exactly (docs/algorithm.md §6 lists "
              "which specs are exact); the whole-model numbers below say how far the model moved"),
    order=1,
)
