"""Variants from the literature as spec options: shared experts, Drop-Upcycling, router init
(virtual_group / random / kmeans) and layer selection for mixed dense/MoE models."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from upcycle import compile_upcycle
from upcycle.passes.weight_mapping import (
    DenseMLPWeights,
    expert_weights,
    plan_scaling,
    router_init,
    shared_expert_weights,
    spherical_kmeans,
)
from upcycle.runtime import MoELayer
from upcycle.runtime.activations import get_activation
from upcycle.specs import SpecError, load_spec


def _spec(e, g, t, router="topk_then_softmax", shared=0, **kw):
    return load_spec({"experts": {"expansion": e, "granularity": g, "top_k": t, "shared_experts": shared},
                      "router": {"type": router, **kw.pop("router_kw", {})}, **kw})


def _dense(d=16, f=48, gated=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731
    return DenseMLPWeights(up=r(f, d), down=r(d, f), gate=r(f, d) if gated else None,
                           up_bias=r(f) if bias else None, gate_bias=r(f) if bias and gated else None,
                           down_bias=r(d) if bias else None)


def _dense_forward(w, act, x):
    up = x @ w.up.T + (0 if w.up_bias is None else w.up_bias)
    h = act(x @ w.gate.T + (0 if w.gate_bias is None else w.gate_bias)) * up if w.gate is not None else act(up)
    return h @ w.down.T + (0 if w.down_bias is None else w.down_bias)


def _moe(w, s, act="silu"):
    """The compiler's own builder (compiler.pipeline.moe_from_dense), on the reference expert loop."""
    from upcycle.compiler.pipeline import moe_from_dense

    moe = moe_from_dense(w, act, s, plan_scaling(s, act, w.gate is not None), index=0)
    moe.backend = "reference"
    return moe.eval()


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


@pytest.fixture
def llama4():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------ shared experts

def test_shared_expert_holds_first_shards_and_routed_the_rest():
    w = _dense(f=48)
    s = _spec(3, 4, 3, shared=1)  # G = 4, S = 1: shared width 12, routed = 3 copies of shards 1, 2, 3
    assert s.experts.num_experts == 9 and s.experts.routed_granularity == 3
    shared = shared_expert_weights(w, s)
    assert torch.equal(shared["up_proj.weight"], w.up[:12]) and torch.equal(shared["down_proj.weight"], w.down[:, :12])
    routed = expert_weights(w, s, plan_scaling(s, "silu", True), torch.Generator())
    assert routed["up_proj"].shape == (9, 12, 16)
    for e in range(9):
        rows = slice(12 * (1 + e % 3), 12 * (2 + e % 3))
        assert torch.equal(routed["gate_proj"][e], w.gate[rows])
        assert torch.equal(routed["down_proj"][e], w.down[:, rows] * 3.0)  # a = G' = 3 on W2 (SiLU)


@pytest.mark.parametrize("act,gated,bias", [("silu", True, False), ("silu", True, True), ("gelu", False, True),
                                            ("relu", True, False)])
@pytest.mark.parametrize("g,shared", [(4, 1), (4, 2), (3, 2), (6, 3)])
def test_shared_experts_exact_with_topk_then_softmax(act, gated, bias, g, shared):
    """T = G − S (one whole virtual group of the remaining shards): shared + routed = dense exactly."""
    w = _dense(f=48, gated=gated, bias=bias)
    s = _spec(4, g, g - shared, shared=shared)
    moe = _moe(w, s, act)
    x = torch.randn(64, w.d_model)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _dense_forward(w, get_activation(act), x), atol=1e-5, rtol=1e-5)


def _old_shared_scheme(w, e, g, t, shared, act="silu"):
    """The earlier mapping: shared expert = first S shards, routed = full E·G copies with E·G²/T."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # partial virtual groups: that is the point of the comparison
        s_routed = _spec(e, g, t, router="softmax_then_topk")
    moe_routed = _moe(w, s_routed, act)
    s_sh = _spec(e, g, t, router="softmax_then_topk", shared=shared)
    sh = shared_expert_weights(w, s_sh)
    sh.pop("down_proj.bias", None)

    def forward(x):
        h = get_activation(act)(x @ sh["gate_proj.weight"].T) * (x @ sh["up_proj.weight"].T)
        return moe_routed(x) + h @ sh["down_proj.weight"].T
    return forward


@pytest.mark.filterwarnings("ignore:.*virtual groups cannot be whole")  # the no-shared baselines
@pytest.mark.parametrize("e,g,t,shared", [(8, 8, 7, 1), (4, 4, 2, 2), (8, 4, 3, 1)])
def test_shared_experts_softmax_then_topk_closer_than_unadjusted(e, g, t, shared):
    torch.manual_seed(0)
    w = _dense(d=32, f=64)
    x = torch.randn(512, 32)
    ref = _dense_forward(w, torch.nn.functional.silu, x)
    with torch.no_grad():
        new = _moe(w, _spec(e, g, t, router="softmax_then_topk", shared=shared))(x)
        old = _old_shared_scheme(w, e, g, t, shared)(x)
        base = _moe(w, _spec(e, g, t, router="softmax_then_topk"))(x)  # no shared expert
    err_new, err_old, err_base = (float((y - ref).norm() / ref.norm()) for y in (new, old, base))
    assert err_new < 0.5 * err_old, (err_new, err_old)
    # T a multiple of G − S: the exact shared part also makes it closer than no shared expert at all
    assert err_new < err_base, (err_new, err_base)


def test_shared_experts_must_leave_routed_shards():
    with pytest.raises(SpecError, match="shared_experts.*< granularity"):
        _spec(8, 2, 1, shared=2)
    with pytest.raises(SpecError, match="shared_experts.*< granularity"):
        _spec(8, 1, 1, shared=1)


def test_shared_experts_on_llama_exact_and_counted(llama4):
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        ref = llama4(input_ids=ids).logits
    spec = {"experts": {"expansion": 2, "granularity": 4, "top_k": 3, "shared_experts": 1},
            "router": {"type": "topk_then_softmax"}}
    model, report = compile_upcycle(llama4, spec, return_report=True)
    layers = moe_layers(model)
    assert len(layers) == 4
    assert layers[0].shared_expert.up_proj.weight.shape == (16, 32)  # S·F/G = 1·64/4
    assert layers[0].experts.up_proj.shape == (6, 16, 32)  # E·(G − S) = 6 routed experts
    assert all(c["exact_expected"] and c["passed"] for c in report.layers)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref).abs().max() <= 1e-5
    entry = report.plan["entries"][0]
    assert entry["num_experts"] == 6 and entry["moe_params"] == 6 * 3 * 32 * 16 + 3 * 32 * 16 + 6 * 32


# ------------------------------------------------------------------------------ Drop-Upcycling

DROP = {"experts": {"expansion": 4, "granularity": 1, "top_k": 2, "drop_upcycling": 0.5},
        "router": {"type": "topk_then_softmax"}}


def _compile(model, spec, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_upcycle(copy.deepcopy(model), spec, return_report=True, **kw)


def test_drop_upcycling_is_seeded(llama4):
    a, _ = _compile(llama4, {**DROP, "seed": 3})
    b, _ = _compile(llama4, {**DROP, "seed": 3})
    c, _ = _compile(llama4, {**DROP, "seed": 4})
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.experts.up_proj"], sc["model.layers.0.mlp.experts.up_proj"])


@pytest.mark.parametrize("r,g", [(0.5, 1), (0.75, 4)])
def test_drop_upcycling_changes_fraction_r_of_units_per_expert(llama4, r, g):
    base = {"experts": {"expansion": 2, "granularity": g, "top_k": g}, "router": {"type": "topk_then_softmax"}}
    drop = {**base, "experts": {**base["experts"], "drop_upcycling": r}}
    m0, _ = _compile(llama4, base)
    m1, _ = _compile(llama4, drop)
    h = 64 // g
    for l0, l1 in zip(moe_layers(m0), moe_layers(m1)):
        for name in ("gate_proj", "up_proj"):
            changed = (getattr(l0.experts, name) != getattr(l1.experts, name)).any(dim=-1)  # [N, H]
            assert changed.sum(dim=1).tolist() == [round(r * h)] * (2 * g)
        cols = (l0.experts.down_proj != l1.experts.down_proj).any(dim=1)  # [N, H]: down columns of the same units
        rows = (l0.experts.up_proj != l1.experts.up_proj).any(dim=-1)
        assert torch.equal(cols, rows)


def test_drop_upcycling_is_not_claimed_exact(llama4):
    _, exact = _compile(llama4, {**DROP, "experts": {**DROP["experts"], "drop_upcycling": 0.0}})
    assert all(c["exact_expected"] for c in exact.layers)
    _, report = _compile(llama4, DROP)
    assert report.layers and not any(c["exact_expected"] for c in report.layers)
    assert all(c["passed"] for c in report.layers)  # not a failure: just not exact
    assert all(c["rel_error"] > 1e-3 for c in report.layers)
    assert report.model_rel_error > 1e-3


# ------------------------------------------------------------------------------ router init

def _clusters(k=4, per=64, d=32, seed=0, noise=0.05, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1) * 3.0
    common = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * offset  # shared mean, as in LMs
    labels = torch.arange(k).repeat_interleave(per)
    x = centres[labels] + common + noise * 3.0 * torch.randn(k * per, d, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return x[perm], labels[perm]


def test_spherical_kmeans_recovers_clusters():
    x, labels = _clusters(k=5)
    _, assign = spherical_kmeans(x, 5, torch.Generator().manual_seed(0))
    # a bijection between found clusters and true ones
    pairs = set(zip(labels.tolist(), assign.tolist()))
    assert len(pairs) == 5 and len({a for _, a in pairs}) == 5


@pytest.mark.parametrize("g,offset", [(1, 0.0), (4, 0.0), (2, 2.0)])
def test_kmeans_router_routes_clusters_to_distinct_groups(g, offset):
    e = 4
    x, labels = _clusters(k=e, offset=offset)
    s = load_spec({"experts": {"expansion": e, "granularity": g, "top_k": g}, "router": {"init": "kmeans", "init_std": 0.02}})
    w = router_init(s, 32, torch.Generator().manual_seed(0), inputs=x)  # [E·G, D]
    assert w.shape == (e * g, 32)
    for grp in range(e):  # virtual groups: G equal rows
        assert torch.equal(w[grp * g:(grp + 1) * g], w[grp * g:grp * g + 1].expand(g, -1))
    norms = w.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.02 * 32 ** 0.5))  # the random init's expected norm
    # fresh tokens from the same clusters
    x2, labels2 = _clusters(k=e, offset=offset, seed=0, noise=0.05)
    x2 = x2 + 0.02 * torch.randn_like(x2)
    group = (x2 @ w.T).argmax(dim=-1) // g
    mapping = {}
    for lab, grp in zip(labels2.tolist(), group.tolist()):
        assert mapping.setdefault(lab, grp) == grp  # every cluster goes to one group
    assert len(set(mapping.values())) == e  # distinct clusters, distinct groups
    # and the top-G experts of a token are one whole group (exact start for topk_then_softmax)
    top = (x2 @ w.T).topk(g, dim=-1).indices // g
    assert bool((top == top[:, :1]).all())


def test_kmeans_router_is_seeded_and_uses_probe_inputs(llama4):
    spec = {"experts": {"expansion": 4, "granularity": 2, "top_k": 2}, "router": {"type": "topk_then_softmax", "init": "kmeans"}}
    a, rep = _compile(llama4, spec)
    b, _ = _compile(llama4, spec)
    vg, _ = _compile(llama4, {**spec, "router": {"type": "topk_then_softmax"}})
    wa = moe_layers(a)[1].router.weight
    assert torch.equal(wa, moe_layers(b)[1].router.weight)
    assert not torch.equal(wa, moe_layers(vg)[1].router.weight)
    assert torch.equal(wa[0::2], wa[1::2])  # virtual groups of G = 2
    assert all(c["exact_expected"] and c["passed"] for c in rep.layers)  # T = G: still exact
    # the probe batch's MLP inputs spread over several groups
    ids = torch.randint(0, 96, (4, 16))
    counts = torch.zeros(4)
    hook_out = []
    layer = moe_layers(a)[1]
    h = layer.register_forward_pre_hook(lambda m, args: hook_out.append(m.router(args[0].reshape(-1, 32)).indices))
    with torch.no_grad():
        a(input_ids=ids)
    h.remove()
    counts += torch.bincount(hook_out[0][:, 0] // 2, minlength=4)
    assert int((counts > 0).sum()) >= 2


def test_kmeans_without_probe_inputs_falls_back_with_warning(llama4):
    spec = {"experts": {"expansion": 2, "granularity": 1, "top_k": 1}, "router": {"init": "kmeans"}}
    mlp = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))
    with pytest.warns(UserWarning, match="kmeans.*virtual_group"):
        model = compile_upcycle(mlp, spec)  # a bare MLP: no token ids to probe with, no example inputs
    assert isinstance(model, MoELayer)
    # with verification off the probe still runs to calibrate kmeans (no warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = compile_upcycle(copy.deepcopy(llama4), {**spec, "verify": {"enabled": False}})
    assert len(moe_layers(model)) == 4


def test_random_router_init_has_no_groups():
    s = load_spec({"experts": {"expansion": 4, "granularity": 2, "top_k": 2}, "router": {"init": "random"}})
    w = router_init(s, 16, torch.Generator().manual_seed(0))
    assert w.shape == (8, 16) and not torch.equal(w[0], w[1])


# ------------------------------------------------------------------------------ layer selection

@pytest.mark.parametrize("layers,moe_idx", [
    ({"every": 2}, [0, 2]),
    ({"every": 2, "offset": 1}, [1, 3]),
    ({"first": 1}, [0]),
    ({"last": 2}, [2, 3]),
    ({"match": r"layers\.(0|3)\."}, [0, 3]),
    ([1, -1], [1, 3]),
    ("all", [0, 1, 2, 3]),
])
def test_layer_selection_mixed_dense_moe_exact(llama4, layers, moe_idx):
    from transformers.models.llama.modeling_llama import LlamaMLP

    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = llama4(input_ids=ids).logits
    g = 1 + len(moe_idx) % 2  # coarse and fine-grained experts across the cases
    spec = {"experts": {"expansion": 2, "granularity": g, "top_k": 2},
            "router": {"type": "topk_then_softmax"}, "layers": layers}
    model, report = _compile(llama4, spec)
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert [i for i, k in enumerate(kinds) if k is MoELayer] == moe_idx
    assert all(k is LlamaMLP for i, k in enumerate(kinds) if i not in moe_idx)
    assert len(report.layers) == len(moe_idx) and all(c["exact_expected"] and c["passed"] for c in report.layers)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref).abs().max() <= 1e-5
