"""One registry per axis (runtime/registry.py): router types (runtime/routers/), expert backends
(runtime/backends/), export targets (compiler/targets/). Each entry is one module; the spec
schema, JSON Schema, MoEConfig, CLI choices and report are read from the registries, so they can
not drift apart. Every entry is exercised here (targets: tests/test_targets.py)."""

import sys
import textwrap
from typing import get_args

import pytest
import torch

from upcycle.runtime import MoEConfig, build_moe
from upcycle.runtime.backends import BACKENDS, available_backends, backend_names, resolve_backend
from upcycle.runtime.registry import collect
from upcycle.runtime.routers import ROUTER_TYPES, router_type
from upcycle.runtime.router import TopKRouter
from upcycle.specs import SpecError, load_spec
from upcycle.specs.json_schema import spec_json_schema
from upcycle.specs.schema import Backend, RouterType


def test_collect_gathers_one_entry_per_module_in_order(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_axis"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_private.py").write_text("ENTRY = 'never'\n")
    for name, order in (("b_entry", 0), ("a_entry", 1), ("no_entry", None)):
        body = "" if order is None else f"""
            class E:
                name = {name!r}
                order = {order}
            ENTRY = E()
        """
        (pkg / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert list(collect("fake_axis")) == ["b_entry", "a_entry"]  # by order, modules without ENTRY skipped
    (pkg / "dup.py").write_text("class E:\n    name = 'a_entry'\nENTRY = E()\n")
    sys.modules.pop("fake_axis", None)
    with pytest.raises(RuntimeError, match="two entries named 'a_entry'"):
        collect("fake_axis")


# ---------------------------------------------------------------------------------- router types

def test_router_type_choices_come_from_the_registry():
    names = tuple(ROUTER_TYPES)
    assert names == ("softmax_then_topk", "topk_then_softmax")
    assert get_args(RouterType) == names
    schema = spec_json_schema()["properties"]["router"]["properties"]["type"]
    assert schema["enum"] == list(names)
    assert all(ROUTER_TYPES[n].summary in schema["description"] for n in names)
    with pytest.raises(SpecError, match="must be one of softmax_then_topk, topk_then_softmax"):
        load_spec({"router": {"type": "sigmoid"}})
    with pytest.raises(ValueError, match="router_type must be one of"):
        MoEConfig(d_model=4, d_expert=4, num_experts=2, top_k=1, gated=True, activation="silu", router_type="nope")


@pytest.mark.parametrize("name", list(ROUTER_TYPES))
def test_each_router_type_weights_and_rules(name):
    rt = router_type(name)
    torch.manual_seed(0)
    r = TopKRouter(16, 8, 3, name)
    x = torch.randn(40, 16)
    out = r(x)
    assert r.kind is rt
    # the choice follows the entry's scores, the weights its rule
    torch.testing.assert_close(out.indices.sort(-1).values,
                               torch.topk(rt.scores(out.logits, out.probs), 3, -1).indices.sort(-1).values)
    torch.testing.assert_close(out.weights, rt.weights(out.logits, out.probs, out.indices))
    sums = out.weights.sum(-1)
    if rt.exact_at_init:  # kept weights sum to 1: the exact start needs that
        torch.testing.assert_close(sums, torch.ones(40))
        assert rt.scaling(8, 4, 4) == 4.0  # a = G'
    else:
        assert bool((sums < 1).all())
        assert rt.scaling(8, 4, 4) == 8 * 4 * 4 / 4  # a = E·G'²/T
    line = rt.expected.format(top_k=3)
    assert "{" not in line and line


def test_report_legend_is_the_router_types_line(tiny_llama):
    from upcycle import compile_upcycle

    import copy

    _, report = compile_upcycle(copy.deepcopy(tiny_llama), {"experts": {"expansion": 2, "granularity": 1, "top_k": 2}},
                                return_report=True)
    assert report.spec["router"]["type"] == "topk_then_softmax"  # the default: exact at init
    assert "must be exact: this spec reproduces the dense MLP exactly" in " ".join(report.legend())
    _, paper = compile_upcycle(tiny_llama, {"experts": {"expansion": 2, "granularity": 1, "top_k": 2},
                                            "router": {"type": "softmax_then_topk"}}, return_report=True)
    assert router_type("softmax_then_topk").expected.format(top_k=2) in " ".join(paper.legend())


# -------------------------------------------------------------------------------------- backends

def test_backend_choices_come_from_the_registry():
    assert backend_names() == ("auto", "reference", "grouped", "triton")
    assert get_args(Backend) == backend_names()
    schema = spec_json_schema()["properties"]["runtime"]["properties"]["backend"]
    assert schema["enum"] == list(backend_names())
    assert all(b.summary in schema["description"] for b in BACKENDS.values())


@pytest.mark.parametrize("name", list(BACKENDS))
def test_each_available_backend_equals_reference(name):
    if not BACKENDS[name].available():
        with pytest.raises(ValueError, match="not available here"):
            resolve_backend(name, torch.device("cpu"))
        return
    assert name in available_backends()
    cfg = MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2, gated=True, activation="silu")
    torch.manual_seed(0)
    layer = build_moe(cfg).eval()
    x = torch.randn(24, 16)
    route = layer.router(x)
    fn = resolve_backend(name, torch.device("cpu"))
    ref = resolve_backend("reference", torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(fn(layer.experts, x, route.indices, route.weights),
                                   ref(layer.experts, x, route.indices, route.weights), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- targets

def test_cli_target_choices_come_from_the_registry():
    from upcycle.compiler.cli import build_parser
    from upcycle.compiler.targets import TARGETS

    action = next(a for a in build_parser()._actions if a.dest == "target")
    assert list(action.choices) == list(TARGETS)
    assert all(t.name in action.help and t.sources[0] in action.help for t in TARGETS.values())
    for t in TARGETS.values():  # every entry complete
        assert t.title and t.architecture and t.config_class and t.sources and t.router_modes and t.exactness
        assert set(t.router_modes) <= set(ROUTER_TYPES)
