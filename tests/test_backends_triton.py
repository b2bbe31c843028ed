"""The Triton backend and each of its kernels against plain PyTorch.

On a GPU the kernels run compiled; on CPU they run in the Triton interpreter (TRITON_INTERPRET=1,
set by the module fixture before the kernel modules are first imported), at small sizes, in fp32 and fp16 only
(bf16 arithmetic is wrong in the interpreter). Tiles are 16-32 wide, so D = 24, H = 40 exercise
the masks. The whole file takes well under a minute on 2 CPU cores.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()

sys.path.insert(0, str(Path(__file__).parent))
from _moe_cases import TOL, Case, assert_matches, build, names, reference, run  # noqa: E402

from upcycle.runtime.kernels import triton_available  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The kernel modules, imported with TRITON_INTERPRET=1 on CPU (triton.jit reads it when a
    kernel is defined); the variable is restored afterwards so other tests do not see it."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from upcycle.runtime.kernels import backend, gate_up

        if not ON_GPU and type(gate_up.gate_up_kernel).__name__ != "InterpretedFunction":
            pytest.skip("kernel modules were imported before TRITON_INTERPRET=1 was set; run this file alone")
        yield backend
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


CASES = {
    "gated_silu": Case(),
    "plain_relu2_biases": Case(gated=False, activation="relu2", first_bias=True, output_bias=True),
    "gated_gelu_tanh_biases": Case(activation="gelu_tanh", first_bias=True, output_bias=True),
    "empty_experts": Case(routing="empty_experts", activation="gelu", first_bias=True),
    "one_expert": Case(top_k=1, routing="one_expert", activation="quick_gelu", output_bias=True),
    "top_k_equals_n": Case(top_k=6, tokens=9, activation="relu"),
}


# every case in fp32; two in each lower precision
RUNS = [(c, torch.float32) for c in CASES] + [
    (c, d) for d in DTYPES[1:] for c in ("gated_silu", "plain_relu2_biases")
]


@pytest.mark.parametrize("case,dtype", RUNS, ids=[f"{c}-{str(d).split('.')[-1]}" for c, d in RUNS])
def test_triton_backend_matches_reference(case, dtype, kernels):
    experts, x, indices, weights = build(CASES[case], dtype=dtype, device=DEVICE)
    want = run(reference, experts, x, indices, weights)
    from upcycle.runtime.backends.triton import triton_forward

    got = run(triton_forward, experts, x, indices, weights)
    assert_matches(got, want, names(experts), TOL[dtype])


def test_triton_backend_registered_and_zero_tokens(kernels):
    from upcycle.runtime import resolve_backend

    fn = resolve_backend("triton", torch.device(DEVICE))
    experts, x, indices, weights = build(Case(), device=DEVICE)
    with torch.no_grad():  # inference: no pre-activations written, same output
        torch.testing.assert_close(fn(experts, x, indices, weights), reference(experts, x, indices, weights),
                                   rtol=1e-5, atol=1e-5)
    x0 = x[:0].clone().requires_grad_()
    out = fn(experts, x0, indices[:0], weights[:0])
    assert out.shape == (0, x.shape[1])
    out.sum().backward()
    assert x0.grad.shape == x0.shape


# --- each kernel against its reference (awkward routings: empty experts, one hot expert) ------

ROUTINGS = ["random", "empty_experts", "one_expert"]


def _plan(routing, tokens=37, n=6, k=2):
    from upcycle.runtime.grouped import plan_routing

    _, _, indices, weights = build(Case(tokens=tokens, num_experts=n, top_k=k, routing=routing), device=DEVICE)
    return plan_routing(indices, n), weights


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_gate_up_kernel(routing, gated, kernels):
    from upcycle.runtime.kernels.gate_up import reference_gate_up, triton_gate_up

    plan, _ = _plan(routing)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 24, generator=g).to(DEVICE)
    gw = torch.randn(6, 40, 24, generator=g).to(DEVICE) if gated else None
    uw, ub = torch.randn(6, 40, 24, generator=g).to(DEVICE), torch.randn(6, 40, generator=g).to(DEVICE)
    got = triton_gate_up(x, plan.token, plan.offsets, gw, uw, None, ub, "silu", True, 16, 32, 16)
    want = reference_gate_up(x, plan.token, plan.offsets, gw, uw, None, ub, "silu")
    for a, b in zip(got, want):
        if a.numel():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    h_only = triton_gate_up(x, plan.token, plan.offsets, gw, uw, None, ub, "silu", False, 16, 32, 16)
    assert h_only[1].numel() == h_only[2].numel() == 0
    torch.testing.assert_close(h_only[0], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_scatter_gemm_kernel(routing, kernels):
    from upcycle.runtime.kernels.scatter_gemm import reference_scatter_gemm, triton_scatter_gemm

    plan, weights = _plan(routing)
    s = plan.order.shape[0]
    g = torch.Generator().manual_seed(0)
    a, a2 = torch.randn(s, 40, generator=g).to(DEVICE), torch.randn(s, 17, generator=g).to(DEVICE)
    b = torch.randn(6, 24, 40, generator=g).to(DEVICE).transpose(1, 2)  # strided, like Wdᵀ
    b2, bias = torch.randn(6, 17, 24, generator=g).to(DEVICE), torch.randn(6, 24, generator=g).to(DEVICE)
    scale = weights.reshape(-1)[plan.order]
    for args in [(a, b, None, None, bias, scale), (a, b, a2, b2, None, None)]:
        got = triton_scatter_gemm(*args, plan.order, plan.offsets, 2, 16, 16, 16)
        want = reference_scatter_gemm(*args, plan.order, plan.offsets, 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_down_backward_kernel(routing, gated, kernels):
    from upcycle.runtime.kernels.down_backward import reference_down_backward, triton_down_backward

    plan, weights = _plan(routing)
    s = plan.order.shape[0]
    g = torch.Generator().manual_seed(0)
    dout, wd = torch.randn(37, 24, generator=g).to(DEVICE), torch.randn(6, 24, 40, generator=g).to(DEVICE)
    gp, up = torch.randn(s, 40, generator=g).to(DEVICE), torch.randn(s, 40, generator=g).to(DEVICE)
    scale = weights.reshape(-1)[plan.order]
    args = (dout, plan.token, plan.offsets, wd, gp if gated else up, up, scale, gated, "gelu_tanh")
    got = triton_down_backward(*args, 16, 16, 16)
    want = reference_down_backward(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_expert_wgrad_kernel(routing, kernels):
    from upcycle.runtime.kernels.expert_wgrad import reference_expert_wgrad, triton_expert_wgrad

    plan, weights = _plan(routing)
    s = plan.order.shape[0]
    g = torch.Generator().manual_seed(0)
    dout, h = torch.randn(37, 24, generator=g).to(DEVICE), torch.randn(s, 40, generator=g).to(DEVICE)
    scale = weights.reshape(-1)[plan.order]
    for args in [(dout, h, plan.token, None, scale), (h, dout, None, plan.token, None)]:
        got = triton_expert_wgrad(*args, plan.offsets, torch.float32, 16, 16, 32)
        want = reference_expert_wgrad(*args, plan.offsets, torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_block_schedule_matches_loop():
    from upcycle.runtime.kernels.schedule import block_schedule, reference_block_schedule

    offsets = torch.tensor([0, 10, 10, 30, 37, 37])
    for bm in (4, 16, 64):
        expert, row = block_schedule(offsets, 37, bm)
        ref_expert, ref_row = reference_block_schedule(offsets, 37, bm)
        active = expert < offsets.shape[0]
        assert torch.equal(expert, ref_expert) and torch.equal(row[active], ref_row[active])


@pytest.mark.skipif(ON_GPU, reason="on a GPU the tests above compile every kernel for real")
def test_kernels_compile_for_sm90():
    """The interpreter misses what only the compiler rejects: compile each kernel to an H100 cubin
    (ptxas bundled with triton) in a fresh process without TRITON_INTERPRET."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "upcycle.runtime.kernels.check"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout
