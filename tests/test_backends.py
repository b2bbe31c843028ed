"""Every fast expert path equals the reference loop: forward and all gradients, on awkward cases.

The `grouped` backend is checked in each of its strategies (`loop`, `grouped_mm`, `padded`);
the Triton backend has its own file (test_backends_triton.py, interpreter on CPU).
"""

import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _moe_cases import TOL, Case, assert_matches, build, names, reference, rel_err, run  # noqa: E402

from upcycle.runtime import MoEConfig, available_backends, build_moe, resolve_backend  # noqa: E402
from upcycle.runtime.grouped import STRATEGIES, grouped_forward, plan_routing  # noqa: E402

# on a GPU machine the same cases run on the GPU (torch._grouped_mm's CUDA kernels, cuBLAS)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {
    "gated_silu": Case(),
    "plain_relu2": Case(gated=False, activation="relu2"),
    "gated_gelu_tanh_biases": Case(activation="gelu_tanh", first_bias=True, output_bias=True),
    "plain_gelu_tanh_biases": Case(gated=False, activation="gelu_tanh", first_bias=True, output_bias=True),
    "gated_relu2_first_bias": Case(activation="relu2", first_bias=True),
    "plain_silu_output_bias": Case(gated=False, output_bias=True),
    "empty_experts": Case(routing="empty_experts", first_bias=True, output_bias=True),
    "one_expert": Case(top_k=1, routing="one_expert", output_bias=True),
    "top_k_equals_n": Case(top_k=6, first_bias=True),
    "gelu_quick_gelu": Case(activation="quick_gelu", tokens=5, num_experts=8, top_k=3),
    "gelu_erf_relu": Case(gated=False, activation="gelu", tokens=16, d_model=32, d_expert=16),
    "relu": Case(activation="relu", tokens=11),
}


def grouped(strategy):
    return partial(grouped_forward, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_grouped_fp32_matches_reference(case, strategy):
    experts, x, indices, weights = build(CASES[case], device=DEVICE)
    want = run(reference, experts, x, indices, weights)
    got = run(grouped(strategy), experts, x, indices, weights)
    assert_matches(got, want, names(experts), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_grouped_low_precision_matches_reference(case, strategy, dtype):
    """Both run in the low dtype; compared with the same per-dtype bound."""
    experts, x, indices, weights = build(CASES[case], dtype=dtype, device=DEVICE)
    want = run(reference, experts, x, indices, weights)
    got = run(grouped(strategy), experts, x, indices, weights)
    assert_matches(got, want, names(experts), TOL[dtype])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grouped_low_precision_close_to_fp32_truth(strategy):
    """The bf16 path is no further from the fp32 truth than the bf16 reference is (x2 slack)."""
    case = CASES["gated_silu"]
    experts, x, indices, weights = build(case, device=DEVICE)
    truth = run(reference, experts, x, indices, weights)
    low = build(case, dtype=torch.bfloat16, device=DEVICE)
    ref_low = run(reference, *low)
    got_low = run(grouped(strategy), *low)
    for label, t, r, g in zip(names(experts), truth, ref_low, got_low):
        assert rel_err(g.float(), t.float()) <= 2 * rel_err(r.float(), t.float()) + 1e-3, label


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grouped_no_grad_and_zero_tokens(strategy):
    experts, x, indices, weights = build(Case(first_bias=True, output_bias=True), device=DEVICE)
    with torch.no_grad():
        assert rel_err(grouped_forward(experts, x, indices, weights, strategy), reference(experts, x, indices, weights)) <= 1e-5
    # zero tokens: an empty output, and empty-input grads
    x0, i0, w0 = x[:0].clone().requires_grad_(), indices[:0], weights[:0].clone().requires_grad_()
    out = grouped_forward(experts, x0, i0, w0, strategy)
    assert out.shape == (0, x.shape[1])
    out.sum().backward()  # only through the op: its backward must run and give x an (empty) grad
    assert x0.grad is not None and x0.grad.shape == x0.shape


def test_grouped_odd_size_falls_back_from_grouped_mm():
    """d_model 25 breaks _grouped_mm's 16-byte stride rule; the strategy still works (padded)."""
    experts, x, indices, weights = build(Case(d_model=25, d_expert=7), device=DEVICE)
    want = run(reference, experts, x, indices, weights)
    got = run(grouped("grouped_mm"), experts, x, indices, weights)
    assert_matches(got, want, names(experts), 1e-5)


def test_plan_routing():
    indices = torch.tensor([[2, 0], [2, 3], [0, 2]])
    plan = plan_routing(indices, 5)
    flat = indices.reshape(-1)
    assert flat[plan.order].tolist() == [0, 0, 2, 2, 2, 3]
    assert plan.order.tolist() == [1, 4, 0, 2, 5, 3]  # stable: token order kept inside a segment
    assert plan.token.tolist() == [0, 2, 0, 1, 2, 1]
    assert plan.offsets.tolist() == [2, 2, 5, 6, 6]


def test_one_expert_moe_equals_dense_mlp():
    """MegaBlocks property: N = K = 1 with weight 1 is exactly the dense MLP."""
    cfg = MoEConfig(d_model=24, d_expert=40, num_experts=1, top_k=1, gated=True, activation="silu")
    layer = build_moe(cfg)
    x = torch.randn(13, 24)
    wg, wu, wd = layer.experts.gate_proj[0], layer.experts.up_proj[0], layer.experts.down_proj[0]
    dense = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    for strategy in STRATEGIES:
        out = grouped_forward(layer.experts, x, torch.zeros(13, 1, dtype=torch.long), torch.ones(13, 1), strategy)
        torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["grouped", "auto"])
def test_moe_layer_backends_agree_with_router_grads(backend):
    """Whole layer: router + experts; the router weight's gradient flows through the combine weights."""
    cfg = MoEConfig(d_model=24, d_expert=40, num_experts=6, top_k=2, gated=True, activation="silu",
                    first_bias=True, output_bias=True)
    torch.manual_seed(0)
    ref_layer = build_moe(cfg)
    for p in ref_layer.parameters():
        nn.init.normal_(p, std=0.3)
    layer = build_moe(MoEConfig(**{**cfg.to_dict(), "backend": backend}))
    layer.load_state_dict(ref_layer.state_dict())
    ref_layer.backend = "reference"
    x = torch.randn(2, 19, 24)
    outs = []
    for m in (ref_layer, layer):
        y = m(x)
        y.square().sum().backward()  # the router loss rides along in autograd
        outs.append([y] + [p.grad for _, p in sorted(m.named_parameters())])
    for label, a, b in zip(["out"] + [n for n, _ in sorted(layer.named_parameters())], outs[1], outs[0]):
        assert rel_err(a, b) <= 1e-5, label


def test_registry():
    assert {"reference", "grouped"} <= set(available_backends())
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) is resolve_backend("grouped", cpu)
    with pytest.raises(ValueError, match="unknown MoE backend"):
        resolve_backend("nope", cpu)
    with pytest.raises(ValueError, match="unknown grouped strategy"):
        grouped_forward(*build(Case()), strategy="nope")


def test_padded_falls_back_to_loop_when_routing_is_skewed():
    """N × largest segment rows: one hot expert would allocate N times the routed rows."""
    from upcycle.runtime.grouped import avoid_wasteful_padding

    balanced = torch.tensor([10, 20, 30, 40])  # 4 experts x 10 rows
    skewed = torch.tensor([1, 2, 3, 40])  # one expert holds 37 of 40
    assert avoid_wasteful_padding("padded", balanced, 40) == "padded"
    assert avoid_wasteful_padding("padded", skewed, 40) == "padded"  # 4 x 37 <= 4 x 40: still within bound
    many = torch.tensor([37] * 15 + [40])  # 16 experts, the first holds 37 of 40 rows
    assert avoid_wasteful_padding("padded", many, 40) == "loop"  # 16 x 37 rows for 40 routed
    assert avoid_wasteful_padding("loop", many, 40) == "loop"
    experts, x, indices, weights = build(Case(num_experts=16, top_k=1, routing="one_expert"), device=DEVICE)
    want = run(reference, experts, x, indices, weights)
    got = run(grouped("padded"), experts, x, indices, weights)
    assert_matches(got, want, names(experts), TOL[torch.float32])


def test_activation_registry_is_the_one_source():
    """Each entry's backward equals autograd of its function; homogeneity holds where claimed;
    Triton codes are distinct; the transformers names exist in transformers' ACT2FN."""
    from transformers.activations import ACT2FN

    from upcycle.compiler.export_hf import _ACT
    from upcycle.runtime.activations import REGISTRY
    from upcycle.runtime.kernels.activations import ACT_CODES

    x = torch.linspace(-4, 4, 101, dtype=torch.float64, requires_grad=True)
    g = torch.randn(101, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name, a in REGISTRY.items():
        (auto,) = torch.autograd.grad(a.fn(x), x, g)
        torch.testing.assert_close(a.backward(g, x.detach()), auto, msg=name)
        if a.homogeneity is not None:
            torch.testing.assert_close(a.fn(3.0 * x), 3.0 ** a.homogeneity * a.fn(x), msg=name)
        else:
            assert not torch.allclose(a.fn(3.0 * x), 3.0 * a.fn(x)), name
        assert all(h in ACT2FN for h in a.hf_names), name
    assert sorted(ACT_CODES.values()) == list(range(len(REGISTRY)))
    assert _ACT == {n: a.hf_names for n, a in REGISTRY.items()}


def test_expert_runs_cut_contiguously_by_token_count():
    from upcycle.runtime.grouped import expert_runs

    sizes = [10, 0, 10, 10, 10, 1, 1, 40]
    experts = [e for e, n in enumerate(sizes) if n]
    assert expert_runs(sizes, experts, 2) == [[0, 2, 3, 4, 5], [6, 7]]  # 41 + 41 tokens
    assert expert_runs(sizes, experts, 3) == [[0, 2, 3], [4, 5, 6], [7]]
    assert expert_runs(sizes, experts, 1) == [experts]
    assert expert_runs([5], [0], 4) == [[0]]
    assert expert_runs([4] * 64, list(range(64)), 2) == [list(range(32)), list(range(32, 64))]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", ["gated_silu", "empty_experts", "gated_gelu_tanh_biases", "plain_silu_output_bias"])
def test_loop_split_over_threads_matches_reference(case, threads, monkeypatch):
    """CPU `loop` runs experts on several threads (one core each) when torch has several: forward
    and every gradient still equal the reference, and torch's thread count is restored."""
    import upcycle.runtime.grouped as G

    monkeypatch.setattr(G, "PARALLEL_MIN_MACS", 0)  # these small cases would stay on one thread
    calls = []
    real = G.expert_runs
    monkeypatch.setattr(G, "expert_runs", lambda *a: calls.append(a[-1]) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c = CASES[case]
        experts, x, indices, weights = build(Case(**{**c.__dict__, "num_experts": 12, "tokens": 53}))
        want = run(reference, experts, x, indices, weights)
        got = run(grouped("loop"), experts, x, indices, weights)
        assert torch.get_num_threads() == threads
        assert calls == ([threads, threads] if threads > 1 else [])  # forward and backward were split
        assert_matches(got, want, names(experts), TOL[torch.float32])
    finally:
        torch.set_num_threads(before)


def test_loop_error_on_a_worker_thread_is_raised_and_threads_restored(monkeypatch):
    import upcycle.runtime.grouped as G

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    calls = []

    def body(run_experts, acc):
        calls.append(list(run_experts))
        if len(calls) == 2 or run_experts[0] != 0:
            raise RuntimeError("worker failed")

    try:
        with pytest.raises(RuntimeError, match="worker failed"):
            G.over_experts(body, list(range(8)), [3] * 8, torch.zeros(4, 2), macs_per_row=1 << 24)
        assert torch.get_num_threads() == 2 and sorted(map(tuple, calls)) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    finally:
        torch.set_num_threads(before)
