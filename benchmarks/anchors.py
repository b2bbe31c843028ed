"""Other projects' MoE layers, loaded with the weights of one of ours, for side-by-side timings.

Each builder returns a module computing the same function as `layer` (same router, same routing
rule: softmax, top-K, weights renormalised over the kept experts; same expert weights), or raises
`AnchorUnavailable` with the reason (package missing, an API that moved): a benchmark reports the
reason instead of dropping the row.

torchtitan: PyPI `torchtitan` (0.3), its `MoE` = TokenChoiceTopKRouter (score_func softmax,
route_norm) + LocalTokenDispatcher + GroupedExperts. Its experts always run `torch._grouped_mm`
in bf16 (the layer casts its inputs and weights), on CPU too; that is the layer as it ships.
Installed for benchmarks without its training dependencies, beside the checkout:
    bash benchmarks/setup_anchors.sh      # into .bench-deps, which this module puts on sys.path
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BENCH_DEPS = Path(__file__).resolve().parents[1] / ".bench-deps"
if BENCH_DEPS.is_dir() and str(BENCH_DEPS) not in sys.path:
    sys.path.append(str(BENCH_DEPS))  # after the environment's own packages: torch stays the venv's


class AnchorUnavailable(RuntimeError):
    pass


def torchtitan_moe(layer):
    """torchtitan's MoE layer holding `layer`'s router and expert weights."""
    try:
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.moe import MoE, GroupedExperts, RoutedExperts, TokenChoiceTopKRouter
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
    except Exception as exc:  # not installed, or an import chain that changed
        raise AnchorUnavailable(f"torchtitan does not import ({type(exc).__name__}: {exc})") from None
    c = layer.config
    if not c.gated or c.activation != "silu" or c.router_type != "topk_then_softmax" or c.selection != "topk":
        raise AnchorUnavailable("torchtitan's layer is SwiGLU experts with softmax-top-K-renormalise routing only")
    cfg = MoE.Config(
        num_experts=c.num_experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=c.d_model, hidden_dim=c.d_expert, num_experts=c.num_experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=c.num_experts, top_k=c.top_k)),
        router=TokenChoiceTopKRouter.Config(
            num_experts=c.num_experts, gate=Linear.Config(in_features=c.d_model, out_features=c.num_experts),
            top_k=c.top_k, score_func="softmax", route_norm=True),
        load_balance_coeff=None,
    )
    moe = cfg.build()
    ex = layer.experts
    with torch.no_grad():
        moe.router.gate.weight.copy_(layer.router.weight)
        inner = moe.routed_experts.inner_experts
        inner.w1_EFD.copy_(ex.gate_proj)  # [N, H, D]
        inner.w3_EFD.copy_(ex.up_proj)  # [N, H, D]
        inner.w2_EDF.copy_(ex.down_proj)  # [N, D, H]
    return moe.to(device=layer.router.weight.device, dtype=ex.up_proj.dtype)


__all__ = ["AnchorUnavailable", "torchtitan_moe"]
