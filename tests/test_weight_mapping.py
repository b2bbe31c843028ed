"""docs/algorithm.md §2, §3, §5: shards, virtual groups, scaling factors and placements."""

import itertools

import pytest
import torch

from upcycle.passes.weight_mapping import (
    DenseMLPWeights,
    Scaling,
    expert_weights,
    plan_scaling,
    router_init,
    scaling_factor,
)

from upcycle.specs import load_spec


def spec(e, g, t, router="softmax_then_topk", **kw):
    return load_spec({"experts": {"expansion": e, "granularity": g, "top_k": t}, "router": {"type": router}, **kw})


def dense(d=12, f=24, gated=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731  (outputs O(1), as in real MLPs)
    return DenseMLPWeights(
        up=r(f, d), down=r(d, f), gate=r(f, d) if gated else None,
        up_bias=r(f) if bias else None, gate_bias=r(f) if bias and gated else None, down_bias=r(d) if bias else None,
    )


def dense_forward(w: DenseMLPWeights, act, x):
    up = x @ w.up.T + (0 if w.up_bias is None else w.up_bias)
    if w.gate is not None:
        h = act(x @ w.gate.T + (0 if w.gate_bias is None else w.gate_bias)) * up
    else:
        h = act(up)
    return h @ w.down.T + (0 if w.down_bias is None else w.down_bias)


@pytest.mark.parametrize("e,g,t,router,expected", [
    (8, 8, 8, "softmax_then_topk", 64.0),
    (8, 1, 1, "softmax_then_topk", 8.0),
    (8, 1, 2, "softmax_then_topk", 4.0),
    (8, 1, 2, "topk_then_softmax", 1.0),
    (8, 8, 8, "topk_then_softmax", 8.0),
])
def test_scaling_factor_table(e, g, t, router, expected):
    assert scaling_factor(spec(e, g, t, router)) == expected


def test_split_placements_match_paper():
    # E8G8T8: a = 64, cube-root split gives 4 per matrix (GLU with ReLU is homogeneous: exact split)
    s = plan_scaling(spec(8, 8, 8), "relu", gated=True)
    assert s.placement == "split" and s.first == pytest.approx(4.0) and s.down == pytest.approx(4.0)
    # E8G1T1: a = 8, plain ReLU MLP splits a^(1/2) ... per matrix, squared ReLU a^(1/3) = 2
    assert plan_scaling(spec(8, 1, 1), "relu2", gated=False).first == pytest.approx(2.0)
    assert plan_scaling(spec(8, 1, 1), "relu", gated=False).first == pytest.approx(8 ** 0.5)
    # SiLU is not homogeneous: the whole factor goes on the down projection
    s = plan_scaling(spec(8, 8, 8), "silu", gated=True)
    assert (s.placement, s.first, s.down) == ("down_proj", 1.0, 64.0)
    # explicit balanced: the paper's cube root everywhere, flagged inexact for SiLU
    b = plan_scaling(spec(8, 8, 8, scaling_placement="balanced"), "silu", gated=True)
    assert b.first == pytest.approx(4.0) and not b.exact
    assert plan_scaling(spec(8, 1, 2, "topk_then_softmax"), "silu", True).factor == 1.0


def test_virtual_group_router_rows_repeat_consecutively():
    s = spec(4, 3, 3)
    w = router_init(s, 16, torch.Generator().manual_seed(0))  # [12, 16]
    assert w.shape == (12, 16)
    for group in range(4):
        rows = w[group * 3:(group + 1) * 3]
        assert torch.equal(rows, rows[:1].expand(3, -1))
    assert not torch.equal(w[0], w[3])
    std = s.router.init_std
    assert abs(float(w.std()) - std) < 0.5 * std


@pytest.mark.parametrize("gated,bias", [(True, False), (False, True), (True, True)])
def test_experts_sharing_a_router_row_hold_each_shard_once(gated, bias):
    e, g = 3, 4
    w = dense(gated=gated, bias=bias)
    out = expert_weights(w, spec(e, g, g), Scaling(1.0, 1.0, 1.0, "none", True), torch.Generator())
    h = w.d_ffn // g
    for expert in range(e * g):
        shard = expert % g
        rows = slice(shard * h, (shard + 1) * h)
        assert torch.equal(out["up_proj"][expert], w.up[rows])
        assert torch.equal(out["down_proj"][expert], w.down[:, rows])
        if gated:
            assert torch.equal(out["gate_proj"][expert], w.gate[rows])  # gate/up re-paired per shard
    # one virtual group's shards together are the dense MLP exactly (act is elementwise)
    x = torch.randn(5, w.d_model)
    total = torch.zeros(5, w.d_model)
    for expert in range(g):  # group 0
        sub = DenseMLPWeights(
            up=out["up_proj"][expert], down=out["down_proj"][expert],
            gate=out["gate_proj"][expert] if gated else None,
            up_bias=out["up_bias"][expert] if bias else None,
            gate_bias=out["gate_bias"][expert] if bias and gated else None,
            down_bias=out["down_bias"][expert] if bias else None,
        )
        total += dense_forward(sub, torch.nn.functional.silu, x)
    torch.testing.assert_close(total, dense_forward(w, torch.nn.functional.silu, x), atol=1e-5, rtol=1e-5)


def _moe_from(w, s, act, scale=None):
    """The compiler's own builder (compiler.pipeline.moe_from_dense), on the reference expert loop."""
    from upcycle.compiler.pipeline import moe_from_dense

    moe = moe_from_dense(w, act, s, scale or plan_scaling(s, act, w.gate is not None), index=0)
    moe.backend = "reference"
    return moe.eval()


@pytest.mark.parametrize("act,gated,bias,e,g", list(itertools.product(["silu", "relu", "gelu_tanh", "relu2"], [True, False], [False, True], [2, 4], [1, 4])))
def test_exact_cases_equal_dense(act, gated, bias, e, g):
    """topk_then_softmax with G = 1 (T any) or T = G (virtual groups): the MoE is the dense MLP."""
    w = dense(gated=gated, bias=bias, f=24)
    t = g if g > 1 else 2
    s = spec(e, g, t, "topk_then_softmax")
    moe = _moe_from(w, s, act)
    from upcycle.runtime.activations import get_activation

    x = torch.randn(40, w.d_model)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense_forward(w, get_activation(act), x), atol=1e-5, rtol=1e-5)


def test_homogeneous_split_is_exact_for_softmax_then_topk_uniform_router():
    """With a zero router every probability is 1/N; with T = N every expert is kept, and with
    a = E·G²/T = G (ReLU passes the scale through): Σ_e (1/N)·a·shard_e = (G/N)·E·dense = dense,
    since each of the E copies' G shards sum to the dense MLP."""
    w = dense(gated=True)
    s_all = spec(4, 4, 16)
    moe = _moe_from(w, s_all, "relu")
    x = torch.randn(16, w.d_model)
    with torch.no_grad():
        moe.router.weight.zero_()
        torch.testing.assert_close(moe(x), dense_forward(w, torch.relu, x), atol=1e-5, rtol=1e-5)


def test_softmax_then_topk_keeps_one_virtual_group_scaled_by_its_probability():
    """T = G < N exercises the top-k choice: with virtual-group rows every token keeps one whole
    group (G identical probabilities p), so for a homogeneous activation the layer is a·p(x)·dense(x)
    — the scaling factor a multiplied by the kept probability, per token."""
    w = dense(gated=True)
    s = spec(4, 4, 4)  # N = 16, T = 4 = G
    moe = _moe_from(w, s, "relu")
    with torch.no_grad():
        moe.router.weight.mul_(40.0)  # decisive routing: different tokens pick different groups
        x = torch.randn(32, w.d_model)
        route = moe.router(x)
        groups = torch.div(route.indices, 4, rounding_mode="floor")
        assert (groups == groups[:, :1]).all()  # one whole group per token ...
        assert groups[:, 0].unique().numel() > 1  # ... not the same one for every token
        p = route.weights[:, :1]  # [tokens, 1]: the group's members share one probability
        torch.testing.assert_close(route.weights, p.expand(-1, 4))
        a = plan_scaling(s, "relu", True).factor
        torch.testing.assert_close(moe(x), a * p * dense_forward(w, torch.relu, x), atol=1e-5, rtol=1e-4)


def test_auto_scaling_beats_none():
    torch.manual_seed(0)
    w = dense(d=32, f=64, gated=True)
    s_auto, s_none = spec(8, 8, 8), spec(8, 8, 8, weight_scaling="none")
    x = torch.randn(256, 32)
    ref = dense_forward(w, torch.nn.functional.silu, x)
    with torch.no_grad():
        err_auto = (_moe_from(w, s_auto, "silu")(x) - ref).norm() / ref.norm()
        err_none = (_moe_from(w, s_none, "silu")(x) - ref).norm() / ref.norm()
    assert err_auto < 0.5 * err_none


def test_drop_upcycling_reinitialises_a_fraction_per_expert():
    w = dense(d=8, f=40, gated=True)
    s = spec(2, 1, 1)
    s_drop = load_spec({"experts": {"expansion": 2, "granularity": 1, "top_k": 1, "drop_upcycling": 0.5}})
    base = expert_weights(w, s, Scaling(1, 1, 1, "none", True), torch.Generator().manual_seed(0))
    drop = expert_weights(w, s_drop, Scaling(1, 1, 1, "none", True), torch.Generator().manual_seed(0))
    changed = (drop["up_proj"] != base["up_proj"]).any(dim=-1)  # [N, H]
    assert changed.sum(dim=1).tolist() == [20, 20]
    assert not torch.equal(changed[0], changed[1])  # each copy drops different units
