"""Shared builders for the backend tests: an expert bank, a routing, and a forward+backward run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from upcycle.runtime import GroupedExperts, MoEConfig, reference_forward

# max |a - b| / max |b| bounds per dtype (the backends and the reference both run in that dtype);
# the worst seen over all cases was 2.3e-3 in fp16 and 1.5e-2 in bf16, so these leave 2x margin
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    tokens: int = 37
    d_model: int = 24
    d_expert: int = 40
    num_experts: int = 6
    top_k: int = 2
    gated: bool = True
    activation: str = "silu"
    first_bias: bool = False
    output_bias: bool = False
    routing: str = "random"  # random | empty_experts | one_expert

    def config(self) -> MoEConfig:
        return MoEConfig(
            d_model=self.d_model, d_expert=self.d_expert, num_experts=self.num_experts, top_k=self.top_k,
            gated=self.gated, activation=self.activation, first_bias=self.first_bias, output_bias=self.output_bias,
        )


def build(case: Case, dtype=torch.float32, device="cpu", seed=0):
    """-> experts, x [T, D], indices [T, K], weights [T, K] fp32 (random, non-trivial values)."""
    g = torch.Generator().manual_seed(seed)
    experts = GroupedExperts(case.config())
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    experts = experts.to(device=device, dtype=dtype)
    x = torch.randn(case.tokens, case.d_model, generator=g).to(device=device, dtype=dtype)
    logits = torch.randn(case.tokens, case.num_experts, generator=g)
    if case.routing == "empty_experts":  # experts 0 and the last one never chosen
        logits[:, 0] = logits[:, -1] = -1e4
    if case.routing == "one_expert":
        logits[:, 1] = 1e4
    weights, indices = torch.softmax(logits, -1).topk(case.top_k, -1)
    if case.routing == "one_expert":  # all weight on the one expert would hide the others' grads
        weights = torch.rand(weights.shape, generator=g) + 0.1
    return experts, x, indices.to(device), weights.to(device)


def run(fn, experts, x, indices, weights, backward=True):
    """Forward and backward with a fixed non-uniform output grad -> [out, dx, dweights, *dparams]."""
    experts.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(backward)
    weights = weights.detach().clone().requires_grad_(backward)
    out = fn(experts, x, indices, weights)
    if not backward:
        return [out]
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=g).to(out)
    out.backward(grad)
    params = [p.grad for _, p in sorted(experts.named_parameters())]
    return [out, x.grad, weights.grad] + params


def names(experts) -> list[str]:
    return ["out", "dx", "dweights"] + ["d" + n for n, _ in sorted(experts.named_parameters())]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_matches(got, want, labels, tol):
    assert len(got) == len(want)
    for label, a, b in zip(labels, got, want):
        assert a is not None and b is not None, label
        assert a.shape == b.shape and a.dtype == b.dtype, (label, a.shape, b.shape, a.dtype, b.dtype)
        err = rel_err(a, b)
        assert err <= tol, f"{label}: rel err {err:.2e} > {tol:.0e}"


def reference(experts, x, indices, weights):
    return reference_forward(experts, x, indices, weights)
