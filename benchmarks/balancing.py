"""Load imbalance before and after each balancing option, on a skewed toy task.

One MoE layer (d_model 16, 8 experts, top-2) whose router favours experts 0 and 1 for every input
(their router rows get +0.3; inputs have mean 0.5), trained by SGD (lr 1e-2) on a regression
target, 64 tokens per step. Imbalance = max/mean of the slots per expert in one step (1.0 =
balanced, 4.0 = everything on two of eight experts). Options: none, aux_loss (coef 1e-2 and 1.0,
through autograd), bias (aux-loss-free, rate 2e-3 per step), both; each router type.

    python benchmarks/balancing.py [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from upcycle.runtime import MoEConfig, build_moe, read_router_stats

# (label, balancing, aux coef): the paper's coef 1e-2, and 1.0 to show the gradient path at work
OPTIONS = (("none", "none", 0.0), ("aux_loss 1e-2", "aux_loss", 0.01), ("aux_loss 1.0", "aux_loss", 1.0),
           ("bias", "bias", 0.0), ("both (1e-2)", "both", 0.01))
ROUTERS = ("softmax_then_topk", "topk_then_softmax")


def skewed_run(balancing: str, router_type: str, steps: int = 300, rate: float = 2e-3, seed: int = 0,
               aux_coef: float = 0.01):
    """-> (imbalance per step, the trained layer)."""
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=16, d_expert=24, num_experts=8, top_k=2, gated=True, activation="silu",
                    router_type=router_type, balancing=balancing, bias_update_rate=rate,
                    aux_loss_coef=aux_coef if balancing in ("aux_loss", "both") else 0.0, virtual_group_size=2)
    layer = build_moe(cfg).train()
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.02)
        layer.router.weight[:2] += 0.3  # experts 0, 1 favoured by every token
    data = torch.randn(512, 16, generator=torch.Generator().manual_seed(seed)) + 0.5
    target = torch.randn(512, 16, generator=torch.Generator().manual_seed(seed + 1))
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    curve = []
    for step in range(steps):
        lo = (step * 64) % 512
        opt.zero_grad()
        F.mse_loss(layer(data[lo:lo + 64]), target[lo:lo + 64]).backward()
        opt.step()
        curve.append(read_router_stats(layer)[""].max_over_mean_load)
    return curve, layer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    print(f"{'router':<20}{'balancing':<15}{'first step':>11}{'last 50 steps (mean over seeds)':>34}")
    for router in ROUTERS:
        for label, option, coef in OPTIONS:
            curves = [skewed_run(option, router, args.steps, seed=s, aux_coef=coef)[0] for s in range(args.seeds)]
            first = statistics.mean(c[0] for c in curves)
            tail = statistics.mean(statistics.mean(c[-50:]) for c in curves)
            rows.append({"router": router, "balancing": label, "first": first, "last50": tail})
            print(f"{router:<20}{label:<15}{first:>11.2f}{tail:>34.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "seeds": args.seeds, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
