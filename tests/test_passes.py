"""One test (or a few) per pass: build a tiny module, run the pass, check what it decided."""

from __future__ import annotations

import functools
import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from upcycle.passes.activation_regions import IDENTITY, find_region
from upcycle.passes.discover import (
    ActivationRegions,
    CheckCoverage,
    ChooseRewriteUnit,
    MatchMLPs,
    TraceUnits,
    discover_mlps,
)
from upcycle.passes.find_mlps import contract, find_mlps
from upcycle.passes.linears import linear_ref
from upcycle.passes.manager import FunctionPass, PassContext, PassPipeline, explain
from upcycle.passes.mlp_subgraph import mlp_function
from upcycle.passes.rewrite import install_rewrite, rewrite_graph, rewrite_mlps
from upcycle.passes.trace import UnitTraceError, UntracedBlock, TracedUnit, trace_unit, traced_units
from upcycle.passes.weight_mapping import extract_dense_weights

D, FF = 16, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# activation regions: the same activation written as a module, a function and inline


class ReLU2(nn.Module):
    def forward(self, x):
        return F.relu(x).square()


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def relu2(x):
    return torch.square(F.relu(x))


ACTS = {
    "silu": [nn.SiLU(), F.silu, lambda x: x * torch.sigmoid(x)],
    "gelu": [nn.GELU(), F.gelu, lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))],
    "gelu_tanh": [nn.GELU(approximate="tanh"), functools.partial(F.gelu, approximate="tanh"),
                  lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))],
    "relu": [nn.ReLU(), F.relu, lambda x: torch.clamp(x, min=0)],
    "relu2": [ReLU2(), relu2, lambda x: torch.relu(x) ** 2],
    "quick_gelu": [QuickGELU(), quick_gelu, lambda x: x * torch.sigmoid(1.702 * x)],
}


class PlainMLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc1 = nn.Linear(D, FF)
        self.fc2 = nn.Linear(FF, D)
        if isinstance(act, nn.Module):
            self.act = act
        else:
            self._act = act

    def forward(self, x):
        act = self.act if hasattr(self, "act") else self._act
        return self.fc2(act(self.fc1(x)))


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("form", ["module", "function", "inline"])
def test_activation_region_identified(name, form):
    act = ACTS[name][["module", "function", "inline"].index(form)]
    gm = trace_unit(PlainMLP(act)).graph_module
    region = find_region(_node(gm, "fc1"), gm, FF)
    assert region is not None and region.activation == name, region
    assert region.glu_layout is None


def test_identity_region_is_a_pass_through():
    m = nn.Sequential(nn.Linear(D, FF), nn.Dropout(0.3), nn.Linear(FF, D)).eval()
    gm = trace_unit(m).graph_module
    region = find_region(_node(gm, "0"), gm, FF)
    assert region.activation == IDENTITY
    assert find_mlps(gm) == []  # no activation: not an MLP


def test_unknown_activation_is_described():
    gm = trace_unit(PlainMLP(torch.sin)).graph_module
    region = find_region(_node(gm, "fc1"), gm, FF)
    assert region.activation is None and "matching none of" in region.description
    (match,) = find_mlps(gm)
    assert match.problems and "unsupported activation" in match.problems[0]


class FusedGLU(nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.gate_up = nn.Linear(D, 2 * FF, bias=False)
        self.down = nn.Linear(FF, D, bias=False)
        self.layout = layout

    def forward(self, x):
        h = self.gate_up(x)
        if self.layout == "gate_first":
            gate, up = h.chunk(2, dim=-1)
        elif self.layout == "up_first":
            up, gate = h.chunk(2, dim=-1)
        elif self.layout == "interleaved_gate_first":
            gate, up = h[..., 0::2], h[..., 1::2]
        else:
            up, gate = h[..., 0::2], h[..., 1::2]
        return self.down(F.silu(gate) * up)


@pytest.mark.parametrize("layout", ["gate_first", "up_first", "interleaved_gate_first", "interleaved_up_first"])
def test_fused_glu_layouts(layout):
    torch.manual_seed(0)
    m = FusedGLU(layout)
    gm = trace_unit(m).graph_module
    region = find_region(_node(gm, "gate_up"), gm, 2 * FF)
    assert (region.activation, region.glu_layout) == ("silu", layout)
    (match,) = find_mlps(gm)
    assert match.kind == "gated (fused gate_up)" and match.d_ffn == FF and not match.problems
    # the weights read back in the identified layout recompute the module exactly
    w = extract_dense_weights(match, gm)
    x = torch.randn(5, D)
    ref = m(x)
    got = F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)
    assert torch.allclose(got, ref, atol=1e-6)


# ------------------------------------------------------------------------------------------
# pattern matching


class Gated(nn.Module):
    def __init__(self, same_input=True):
        super().__init__()
        self.gate = nn.Linear(D, FF, bias=False)
        self.up = nn.Linear(D, FF, bias=False)
        self.down = nn.Linear(FF, D, bias=False)
        self.same_input = same_input

    def forward(self, x):
        u = self.up(x if self.same_input else x * 2)
        return self.down(F.silu(self.gate(x)) * u)


class GatedWithDropout(Gated):
    """T5DenseGatedActDense: dropout between the product and the down projection."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.down(self.drop(F.gelu(self.gate(x)) * self.up(x)))


class LeakyHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, FF)
        self.fc2 = nn.Linear(FF, D)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        return self.fc2(h), h.mean()


def test_match_gated_plain_fused():
    (g,) = find_mlps(trace_unit(Gated()).graph_module)
    assert g.kind == "gated" and g.activation == "silu" and g.d_model == D and g.d_ffn == FF
    assert {g.gate.module_path, g.up.module_path, g.down.module_path} == {"gate", "up", "down"}
    (p,) = find_mlps(trace_unit(PlainMLP(nn.GELU())).graph_module)
    assert p.kind == "plain" and p.activation == "gelu"
    (f,) = find_mlps(trace_unit(FusedGLU("gate_first")).graph_module)
    assert f.kind == "gated (fused gate_up)"


def test_match_requires_shared_input_for_gated():
    assert all(m.kind != "gated" for m in find_mlps(trace_unit(Gated(same_input=False)).graph_module))


def test_match_folds_pass_through_between_product_and_down():
    gm = trace_unit(GatedWithDropout().eval()).graph_module
    (m,) = find_mlps(gm)
    assert m.kind == "gated" and m.activation == "gelu" and "drop" in m.nodes and not m.problems


def test_match_rejects_hidden_value_used_outside():
    (m,) = find_mlps(trace_unit(LeakyHidden()).graph_module)
    assert m.problems and "also used by" in " ".join(m.problems)


def test_match_with_functional_linear():
    class FunctionalMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = nn.Parameter(torch.randn(FF, D))
            self.w_out = nn.Parameter(torch.randn(D, FF))

        def forward(self, x):
            return F.linear(F.relu(F.linear(x, self.w_in)), self.w_out)

    (m,) = find_mlps(trace_unit(FunctionalMLP()).graph_module)
    assert m.up.kind == "function" and m.activation == "relu"


# ------------------------------------------------------------------------------------------
# rewrite


class PreNormBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, FF)
        self.fc2 = nn.Linear(FF, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        y = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(y), y.sum(-1)


def test_rewrite_graph_keeps_other_nodes():
    torch.manual_seed(0)
    block = PreNormBlock().eval()
    gm = trace_unit(block).graph_module
    (match,) = find_mlps(gm)
    dense_fn = mlp_function(gm, match)  # stands in for an MoE layer: computes the MLP exactly
    before = [(n.op, n.target) for n in gm.graph.nodes if n.name not in match.nodes]
    new, names = rewrite_graph(gm, [match], [dense_fn], "PreNormBlockUpcycled")
    assert names == ["moe"]
    after = [(n.op, n.target) for n in new.graph.nodes]
    assert [a for a in after if a != ("call_module", "moe")] == before
    x = torch.randn(4, D)
    for a, b in zip(new(x), block(x)):
        assert torch.equal(a, b)
    # an MoE stand-in that outputs zeros leaves exactly the residual path
    zero = new.moe = _Zero()
    new.recompile()
    head, total = new(x)
    assert torch.allclose(total, x.sum(-1)) and zero.calls == 1


class _Zero(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.zeros_like(x)


def test_rewrite_mlps_installs_forward_on_the_same_instance():
    torch.manual_seed(0)
    model = nn.Sequential(PreNormBlock()).eval()
    x = torch.randn(4, D)
    ref = model(x)
    disc = discover_mlps(model)
    targets = {f.key: f.rewrite_unit for f in disc.mlps}
    assert list(targets.values()) == ["0"]
    block = model[0]
    logs = []
    model, records = rewrite_mlps(model, targets, lambda m, gm: mlp_function(gm, m), logs=logs)
    assert model[0] is block and isinstance(block, PreNormBlock)
    assert records[0].mode == "rewrite_graph" and records[0].moe_path == "0.moe"
    assert records[0].consumed == ["0.fc1.weight", "0.fc1.bias", "0.fc2.weight", "0.fc2.bias"]
    assert not hasattr(block, "fc1") and "0.moe" in dict(model.named_modules())
    for a, b in zip(model(x), ref):
        assert torch.equal(a, b)
    assert logs and logs[0].name == "rewrite-mlps" and logs[0].decisions[0][0] == "0"


# ------------------------------------------------------------------------------------------
# tracing


def keeps_signature(fn):
    """A transformers-style decorator: a *args/**kwargs wrapper (FX: `co_varnames is too small`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class Opaque(nn.Module):
    """Branches on a tensor value (like attention implementations): cannot be traced."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.seen_kwargs = {}

    def forward(self, x, **kwargs):
        self.seen_kwargs = dict(kwargs)
        if x.abs().sum() > 0:
            x = x + 1
        return self.proj(x), None


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Opaque()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, FF)
        self.fc2 = nn.Linear(FF, D)

    @keeps_signature
    def forward(self, x, mask=None, extra=None, **kwargs):
        h, _ = self.attn(x, **kwargs)
        if extra is not None:
            h = h + extra
        h = x + h
        return h + self.fc2(F.relu(self.fc1(self.norm(h))))


def test_trace_unit_makes_failing_children_opaque():
    result = trace_unit(DecoderLayer())
    assert list(result.leaves) == ["attn"] and "control flow" in result.leaves["attn"]
    assert result.signature.concrete == {"extra": None}  # compared with None in the layer's own code
    (m,) = find_mlps(result.graph_module)
    assert m.activation == "relu"
    units = list(traced_units(nn.Sequential(DecoderLayer())))
    # the Sequential traces (the layer's decorated forward is traced through), attn stays opaque and is
    # then visited on its own, where its own code fails
    assert isinstance(units[0], TracedUnit) and units[0].path == "" and list(units[0].leaves) == ["0.attn"]
    assert isinstance(units[1], UntracedBlock) and units[1].path == "0.attn" and units[1].linears == ["proj"]


def test_trace_unit_reports_the_root_failure():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UnitTraceError, match="control flow"):
        trace_unit(Bad(), path="blk")


def test_rewritten_layer_replays_kwargs_and_guards_specialisation():
    torch.manual_seed(0)
    layer = DecoderLayer().eval()
    x = torch.randn(2, 3, D)
    ref = layer(x, flag=7)
    assert layer.attn.seen_kwargs == {"flag": 7}
    traced = trace_unit(layer)
    (m,) = find_mlps(traced.graph_module)
    install_rewrite(layer, traced.graph_module, [m], [mlp_function(traced.graph_module, m)], traced.signature, "l0")
    layer.attn.seen_kwargs = {}
    assert torch.equal(layer(x, flag=7), ref)
    assert layer.attn.seen_kwargs == {"flag": 7}  # **kwargs reached the opaque child at run time
    with pytest.raises(TypeError, match="traced with extra=None"):
        layer(x, extra=torch.ones(D))
    # a second trace of the rewritten layer goes through the installed forward: it sees the stand-in
    # (a traceable GraphModule here, an opaque MoELayer in real use), not the deleted fc1/fc2
    assert [m.path for m in find_mlps(trace_unit(layer).graph_module)] == ["moe"]


def test_functional_dropout_reads_training_flag_at_run_time():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)

        def forward(self, x):
            return F.dropout(self.fc(x), p=0.5, training=self.training)

    gm = trace_unit(Drop().eval()).graph_module
    drop = next(n for n in gm.graph.nodes if n.target is F.dropout)
    assert drop.kwargs["training"].op == "get_attr" and drop.kwargs["training"].target == "training"


# ------------------------------------------------------------------------------------------
# pass infrastructure and the analysis passes


def test_pass_pipeline_logs_decisions_and_timings():
    def first(ctx):
        ctx.options["seen"] = 1
        return [("", "looked at the root"), ("a.b", "decided x")]

    def second(ctx):
        time.sleep(0.05)  # the log must time the pass itself
        return [("a.b", f"saw {ctx.options['seen']}")]

    p = PassPipeline([FunctionPass("first", first), FunctionPass("second", second, kind="transform")])
    p.run(PassContext(nn.Linear(2, 2)))
    assert [(log.name, log.kind) for log in p.logs] == [("first", "analysis"), ("second", "transform")]
    assert p.logs[0].decisions == [("<root>", "looked at the root"), ("a.b", "decided x")]
    assert p.logs[1].seconds >= 0.05 > p.logs[0].seconds
    text = explain(p.logs)
    assert "pipeline: first (analysis) -> second (transform)" in text and "a.b: saw 1" in text


class Residual(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(self.ln(x))


def _ctx_after(model, passes):
    ctx = PassContext(model)
    PassPipeline([cls() for cls in passes]).run(ctx)
    return ctx


def test_trace_units_and_activation_regions_passes():
    model = nn.Sequential(Residual(Gated()), Residual(PlainMLP(nn.GELU())))
    ctx = _ctx_after(model, [TraceUnits, ActivationRegions])
    assert [u.path for u in ctx.units] == [""]  # the whole Sequential traces
    regions = ctx.contracted[""].regions
    assert sorted(r.activation for r in regions.values()) == ["gelu", "silu"]


def test_match_and_choose_rewrite_unit_passes():
    model = nn.Sequential(Residual(Gated()), Residual(PlainMLP(nn.GELU())))
    ctx = _ctx_after(model, [TraceUnits, ActivationRegions, MatchMLPs, ChooseRewriteUnit])
    assert [len(v) for v in ctx.matches.values()] == [2]
    # found in the root graph, rewritten in the module that holds the linears (it traces alone)
    assert [(f.path, f.rewrite_unit, f.index) for f in ctx.mlps] == [("0.mlp", "0.mlp", 0), ("1.mlp", "1.mlp", 1)]


def test_check_coverage_names_unmatched_mlp_like_linears():
    class TwoExits(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(D, FF)
            self.fc2 = nn.Linear(FF, D)
            self.fc3 = nn.Linear(FF, D)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(F.gelu(h)) + self.fc3(F.relu(h))

    disc = discover_mlps(TwoExits())
    assert not disc.mlps
    assert any("linears fc1, fc2 look like an MLP but match no supported pattern" in p for p in disc.problems)
    assert "check-coverage" in disc.explain()


def test_discover_explain_lists_every_pass():
    disc = discover_mlps(DecoderLayer())
    text = disc.explain()
    for name in ("trace-units", "activation-regions", "match-mlps", "choose-rewrite-unit", "check-coverage"):
        assert f"] {name}:" in text
    assert "opaque: attn" in text and "specialised extra=None" in text
    assert "plain MLP, activation relu" in text
    assert [log.name for log in disc.log] == ["trace-units", "activation-regions", "match-mlps",
                                               "choose-rewrite-unit", "check-coverage"]


def test_compile_result_carries_the_pass_log():
    from upcycle.compiler.pipeline import upcycle_model

    torch.manual_seed(0)
    model = nn.Sequential(PreNormBlock()).eval()
    spec = {"experts": {"expansion": 2, "granularity": 1, "top_k": 1}, "router": {"type": "topk_then_softmax"},
            "verify": {"probe_tokens": 8}, "runtime": {"backend": "reference"}}
    result = upcycle_model(model, spec, example_inputs=(torch.randn(3, D),))
    names = [log.name for log in result.pass_log]
    assert names[-1] == "rewrite-mlps" and names[0] == "trace-units"
    text = explain(result.pass_log)
    assert "[transform] rewrite-mlps" in text and "0: rewrite_graph" in text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unscaled_error_column_equals_the_layer_built_without_scaling(arch):
    """The report's `rel err (no scaling)` is derived from the scaled output (the factor sits on the
    down projection): it must equal the error of the layer actually built with weight_scaling none."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from upcycle import compile_upcycle

    def model():
        torch.manual_seed(0)
        if arch == "llama":
            return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=96)).eval()
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)).eval()

    base = {"experts": {"expansion": 8, "granularity": 2, "top_k": 2}}
    _, scaled = compile_upcycle(model(), base, return_report=True)
    _, plain = compile_upcycle(model(), {**base, "weight_scaling": "none"}, return_report=True)
    assert scaled.layers and len(scaled.layers) == len(plain.layers)
    for s, p in zip(scaled.layers, plain.layers):
        assert s["rel_error_unscaled"] == pytest.approx(p["rel_error"], rel=1e-5, abs=1e-7)
        assert s["rel_error_unscaled"] != pytest.approx(s["rel_error"], rel=1e-3)
