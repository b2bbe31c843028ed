"""Complete-MLP routing (per_slice selection), the output-multiplier placement, shuffled copies,
the combine-mass / complete-MLP telemetry and relaxing per_slice to plain top-K for export."""

import itertools
import sys
from pathlib import Path

import pytest
import torch

from upcycle.runtime import MoEConfig, build_moe, read_router_stats, relax_routing
from upcycle.runtime.router import TopKRouter, per_slice_topk
from upcycle.runtime.telemetry import combine_mass, complete_mlp
from upcycle.specs import SpecError, load_spec

sys.path.insert(0, str(Path(__file__).parent))
from test_weight_mapping import _moe_from, dense, dense_forward  # noqa: E402


def per_slice_reference(scores: torch.Tensor, g: int, copies: int) -> torch.Tensor:
    """A plain loop: for each token and shard position s, the `copies` groups with the highest
    score of expert group·G + s."""
    out = []
    for row in scores:
        chosen = []
        for s in range(g):
            col = [(float(row[grp * g + s]), grp) for grp in range(row.numel() // g)]
            col.sort(key=lambda t: -t[0])
            chosen += [grp * g + s for _, grp in col[:copies]]
        out.append(sorted(chosen))
    return torch.tensor(out)


@pytest.mark.parametrize("e,g,copies", [(8, 8, 1), (4, 2, 2), (3, 4, 1), (2, 1, 1), (5, 3, 2)])
def test_per_slice_topk_matches_loop(e, g, copies):
    scores = torch.randn(37, e * g, generator=torch.Generator().manual_seed(e * 10 + g))
    idx = per_slice_topk(scores, g, copies)
    assert idx.shape == (37, copies * g)
    torch.testing.assert_close(idx.sort(-1).values, per_slice_reference(scores, g, copies), rtol=0, atol=0)
    assert complete_mlp(idx, g).all()


def test_per_slice_router_weights_follow_router_type():
    torch.manual_seed(0)
    x = torch.randn(50, 16)
    for router_type in ("softmax_then_topk", "topk_then_softmax"):
        r = TopKRouter(16, 32, 8, router_type, selection="per_slice", group_size=8)
        out = r(x)
        assert complete_mlp(out.indices, 8).all()
        if router_type == "softmax_then_topk":
            torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices))
        else:
            torch.testing.assert_close(out.weights, torch.softmax(out.logits.gather(1, out.indices), -1))
            torch.testing.assert_close(out.weights.sum(-1), torch.ones(50))


def test_plain_topk_breaks_complete_mlps_where_per_slice_does_not():
    """With rows no longer tied, plain top-K hands some tokens a shard twice (the failure the
    selection exists for); the same scores through per_slice never do."""
    scores = torch.randn(200, 64, generator=torch.Generator().manual_seed(1))
    plain = torch.topk(scores, 8, dim=-1).indices
    assert complete_mlp(plain, 8).float().mean() < 0.2
    assert complete_mlp(per_slice_topk(scores, 8, 1), 8).all()


def test_per_slice_bias_steers_choice_only():
    torch.manual_seed(0)
    r = TopKRouter(8, 16, 4, "softmax_then_topk", expert_bias=True, selection="per_slice", group_size=4)
    x = torch.randn(30, 8)
    r.expert_bias[4:8] = 10.0  # group 1 wins every shard position
    out = r(x)
    assert (out.indices // 4 == 1).all()
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices))  # weights unbiased


def _spec(**router):
    return load_spec({"experts": {"expansion": 4, "granularity": 4, "top_k": 4}, "router": router})


@pytest.mark.parametrize("gated,bias", list(itertools.product([True, False], [False, True])))
def test_per_slice_topk_then_softmax_exact_at_init(gated, bias):
    """Tied rows: every shard position picks the same group, so the layer is one whole copy."""
    w = dense(gated=gated, bias=bias, f=24)
    moe = _moe_from(w, _spec(type="topk_then_softmax", selection="per_slice"), "silu")
    x = torch.randn(40, w.d_model)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense_forward(w, torch.nn.functional.silu, x), atol=1e-5, rtol=1e-5)


def test_per_slice_equals_topk_at_virtual_group_init():
    """Same init, same output: the selections agree while the group rows are tied."""
    w = dense(f=24)
    x = torch.randn(40, w.d_model)
    a = _moe_from(w, _spec(selection="topk"), "silu")
    b = _moe_from(w, _spec(selection="per_slice"), "silu")
    assert (a.router.selection, b.router.selection) == ("topk", "per_slice")
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-6, rtol=1e-6)


def _untied(moe, seed=0):
    with torch.no_grad():
        moe.router.weight.add_(torch.randn(moe.router.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return moe


@pytest.mark.parametrize("router_type", ["softmax_then_topk", "topk_then_softmax"])
def test_per_slice_grouped_backend_matches_reference_fwd_bwd(router_type):
    """The routing is new, the experts' paths are not: grouped = reference on per-slice indices."""
    w = dense(f=24)
    x = torch.randn(33, w.d_model)
    outs = {}
    for backend in ("reference", "grouped"):
        moe = _untied(_moe_from(w, _spec(type=router_type, selection="per_slice"), "silu")).train()
        moe.backend = backend
        xi = x.clone().requires_grad_(True)
        y = moe(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[backend] = (y.detach(), xi.grad, moe.router.weight.grad, moe.experts.down_proj.grad)
    for ref, got in zip(outs["reference"], outs["grouped"]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_output_multiplier_placement_same_function_dense_scale_weights():
    w = dense(f=24, bias=True)
    x = torch.randn(40, w.d_model)
    paper = _spec(type="softmax_then_topk")  # a = E·G²/T = 16: the factor whose placement is tested
    on_down = _untied(_moe_from(w, paper, "silu"))
    assert on_down.router.selection == "per_slice"  # auto, E4G4T4
    as_output = _untied(_moe_from(w, load_spec({**paper.to_dict(), "scaling_placement": "output"}), "silu"))
    assert as_output.config.output_multiplier == 16.0 and on_down.config.output_multiplier == 1.0
    assert on_down.config.scale_factor == as_output.config.scale_factor == 16.0
    # weights at the dense scale: the down projections of one copy are the dense ones
    torch.testing.assert_close(as_output.experts.down_proj[0], w.down[:, :6])
    torch.testing.assert_close(on_down.experts.down_proj[0], 16.0 * w.down[:, :6])
    with torch.no_grad():
        torch.testing.assert_close(as_output(x), on_down(x), atol=1e-5, rtol=1e-5)


def test_shuffle_keeps_each_copy_a_partition_and_exactness():
    """Qwen-style shuffled copies: copy c's G shards hold a permutation of the dense hidden units,
    so a whole group still is the dense MLP, while copies differ shard by shard."""
    w = dense(f=24)
    s = load_spec({"experts": {"expansion": 4, "granularity": 4, "top_k": 4, "shuffle": True},
                   "router": {"type": "topk_then_softmax"}})
    moe = _moe_from(w, s, "silu")
    up = moe.experts.up_proj.detach()  # [16, 6, D]
    dense_rows = {tuple(r.tolist()) for r in w.up}
    for c in range(4):
        rows = [tuple(r.tolist()) for r in up[c * 4:(c + 1) * 4].reshape(-1, w.d_model)]
        assert set(rows) == dense_rows and len(rows) == 24
    assert not torch.equal(up[0], up[4])
    x = torch.randn(30, w.d_model)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense_forward(w, torch.nn.functional.silu, x), atol=1e-5, rtol=1e-5)


def test_combine_mass_is_one_at_uniform_router_and_follows_sharpening():
    e, g, t = 8, 8, 8
    a = e * g * g / t
    uniform = torch.full((5, t), 1.0 / (e * g))
    torch.testing.assert_close(combine_mass(uniform, a, g), torch.ones(5))
    one_group = torch.full((5, t), 1.0 / g)  # the router sure of one copy: the output is E x dense
    torch.testing.assert_close(combine_mass(one_group, a, g), torch.full((5,), float(e)))


def test_telemetry_reports_mass_and_complete_fraction():
    cfg = dict(d_model=16, d_expert=8, num_experts=32, top_k=8, gated=True, activation="silu",
               virtual_group_size=8, scale_factor=32.0, backend="reference", router_type="softmax_then_topk")
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    fractions = {}
    for selection in ("topk", "per_slice"):
        layer = build_moe(MoEConfig(**cfg, selection=selection)).train()
        torch.nn.init.normal_(layer.router.weight, std=1.0)
        layer(x)
        (stats,) = read_router_stats(layer).values()
        probs = torch.softmax(x @ layer.router.weight.detach().T, -1)
        idx = torch.topk(probs, 8, -1).indices if selection == "topk" else per_slice_topk(probs, 8, 1)
        expected = (probs.gather(1, idx).sum(-1) * 32.0 / 8).mean()
        assert stats.combine_mass == pytest.approx(float(expected), rel=1e-5)
        fractions[selection] = stats.complete_mlp_fraction
    assert fractions["per_slice"] == 1.0 and fractions["topk"] < 0.5


def test_relax_routing_switches_layers_and_saved_spec(tiny_llama, tmp_path):
    import upcycle

    spec = {"experts": {"expansion": 2, "granularity": 2, "top_k": 2}, "router": {"selection": "per_slice"},
            "verify": {"enabled": False}}
    model = upcycle.compile_upcycle(tiny_llama, spec)
    layers = upcycle.runtime.moe_layers(model)
    assert all(m.router.selection == "per_slice" for m in layers.values())
    assert relax_routing(model) == len(layers) == 2
    assert all(m.router.selection == "topk" and m.config.selection == "topk" for m in layers.values())
    assert relax_routing(model) == 0
    model.save_pretrained(tmp_path / "ckpt")
    back = upcycle.load(tmp_path / "ckpt")
    assert all(m.router.selection == "topk" for m in upcycle.runtime.moe_layers(back).values())
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("experts,selection", [
    ({"expansion": 8, "granularity": 8, "top_k": 8}, "per_slice"),
    ({"expansion": 8, "granularity": 8, "top_k": 16}, "per_slice"),
    ({"expansion": 8, "granularity": 8, "top_k": 4}, "topk"),  # no complete MLP fits in 4 shards
    ({"expansion": 8, "granularity": 1, "top_k": 2}, "topk"),  # G = 1: the same thing
    ({"expansion": 4, "granularity": 4, "top_k": 3, "shared_experts": 1}, "per_slice"),  # G - S = 3
])
def test_auto_selection_is_per_slice_where_groups_can_be_complete(experts, selection):
    spec = load_spec({"experts": experts})
    assert spec.router.selection == "auto" and spec.selection == selection
    assert load_spec({"experts": experts, "router": {"selection": "topk"}}).selection == "topk"


def test_per_slice_needs_top_k_multiple_of_granularity():
    with pytest.raises(SpecError) as exc:
        load_spec({"experts": {"expansion": 8, "granularity": 8, "top_k": 4}, "router": {"selection": "per_slice"}})
    assert "router.selection" in str(exc.value) and "multiple of granularity 8" in str(exc.value)
    with pytest.raises(ValueError):
        MoEConfig(d_model=4, d_expert=2, num_experts=16, top_k=4, gated=True, activation="silu",
                  virtual_group_size=8, selection="per_slice")
