"""Spec loading: presets, defaults, one located message per kind of mistake, round trip, fuzzing.

Every error test checks the three things a user needs to fix a spec without reading our code:
the file:line, the dotted field, and what would have been valid.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upcycle.specs import (
    ExpertsSpec,
    LayerSelection,
    RouterSpec,
    SpecError,
    SpecWarning,
    UpcycleError,
    UpcycleSpec,
    VerifySpec,
    dump_spec,
    list_presets,
    load_spec,
    validate_against_model,
)
from upcycle.specs.validate import SECTION_KEYS, TOP_KEYS

PRESETS = ["e8g8t8", "paper-e8g8t8", "e8g1t2", "paper-e8g1t2", "e8g1t2-topk-then-softmax", "e8g8t8-every-other", "sparse-upcycling-e8g1t2"]


def load_text(tmp_path, text: str, name: str = "spec.yaml") -> UpcycleSpec:
    path = tmp_path / name
    path.write_text(text)
    return load_spec(path)


def error_of(tmp_path, text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_text(tmp_path, text)
    return info.value


def assert_one_line(err: SpecError, *fragments: str) -> str:
    msg = str(err)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------- presets


def test_list_presets_has_the_shipped_ones():
    assert set(PRESETS) <= set(list_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_without_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)
        spec = load_spec(name)
    assert isinstance(spec, UpcycleSpec)
    assert spec.source.endswith(f"{name}.yaml")


def test_preset_contents():
    e8g8t8 = load_spec("e8g8t8")
    assert (e8g8t8.experts.expansion, e8g8t8.experts.granularity, e8g8t8.experts.top_k) == (8, 8, 8)
    assert e8g8t8.experts.num_experts == 64
    assert e8g8t8.router.type == "topk_then_softmax" and e8g8t8.router.init == "virtual_group"
    assert e8g8t8.router.selection == "per_slice" and e8g8t8.weight_scaling == "auto"
    # the paper's recipes, kept for comparison
    paper = load_spec("paper-e8g8t8")
    assert (paper.router.type, paper.router.selection) == ("softmax_then_topk", "topk")
    paper_coarse = load_spec("paper-e8g1t2")
    assert paper_coarse.router.type == "softmax_then_topk" and paper_coarse.experts.num_experts == 8
    assert load_spec("e8g1t2").router.type == "topk_then_softmax"

    mixtral = load_spec("e8g1t2-topk-then-softmax")
    assert mixtral.router.type == "topk_then_softmax" and mixtral.experts.num_experts == 8
    assert mixtral.to_dict() == load_spec("e8g1t2").to_dict()  # kept as a name for the default e8g1t2

    mixed = load_spec("e8g8t8-every-other")
    assert mixed.layers == LayerSelection(mode="every", every=2, offset=0)
    assert [i for i in range(6) if mixed.layers.selects(i, 6, f"layers.{i}.mlp")] == [0, 2, 4]

    sparse = load_spec("sparse-upcycling-e8g1t2")
    assert sparse.router.init == "random" and sparse.weight_scaling == "none"
    assert sparse.router.type == "topk_then_softmax"


def test_runtime_router_default_is_the_spec_default():
    """runtime/ does not import specs/ (a trained model needs no compiler), so MoEConfig repeats the
    spec's router-type default: the two must not drift apart."""
    import dataclasses

    from upcycle.runtime.config import MoEConfig
    from upcycle.specs.schema import RouterSpec

    runtime_default = {f.name: f.default for f in dataclasses.fields(MoEConfig)}["router_type"]
    assert runtime_default == RouterSpec().type == load_spec("e8g1t2").router.type


def test_preset_by_path_and_pathlike(tmp_path):
    from upcycle.specs import PRESETS_DIR

    assert load_spec(PRESETS_DIR / "e8g1t2.yaml") == load_spec("e8g1t2")
    assert load_spec(str(PRESETS_DIR / "e8g1t2.yaml")) == load_spec("e8g1t2")


def test_unknown_preset_suggests():
    with pytest.raises(SpecError) as info:
        load_spec("e8g8t9")
    assert_one_line(info.value, "'e8g8t9'", "did you mean 'e8g8t8'?", "e8g1t2")


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.file == str(path)
    assert_one_line(info.value, str(path), "no such spec file")


# --------------------------------------------------------------------------------------- defaults


def test_defaults_from_empty_file_and_empty_dict(tmp_path):
    assert load_text(tmp_path, "# nothing but a comment\n") == UpcycleSpec()
    assert load_spec({}) == UpcycleSpec()
    spec = load_spec({})
    assert spec.experts == ExpertsSpec(expansion=8, granularity=1, top_k=2, shared_experts=0, drop_upcycling=0.0)
    assert spec.router == RouterSpec()
    assert spec.verify == VerifySpec(enabled=True, probe_tokens=256, tolerance=1e-5)
    assert spec.layers.mode == "all" and spec.seed == 0 and spec.runtime.backend == "auto"


def test_empty_sections_mean_defaults(tmp_path):
    spec = load_text(tmp_path, "experts:\nrouter:\n  # init: random\n")
    assert spec == UpcycleSpec()


def test_partial_sections_keep_other_defaults(tmp_path):
    spec = load_text(tmp_path, "experts:\n  top_k: 1\nrouter: {z_loss_coef: 0.001}\n")
    assert spec.experts.top_k == 1 and spec.experts.expansion == 8
    assert spec.router.z_loss_coef == 0.001 and spec.router.aux_loss_coef == 0.01


def test_yaml12_floats_without_dot(tmp_path):
    spec = load_text(tmp_path, "verify:\n  tolerance: 1e-5\nrouter:\n  init_std: 2E-3\n")
    assert spec.verify.tolerance == 1e-5 and spec.router.init_std == 0.002


def test_spec_passthrough_and_dict_input():
    spec = load_spec({"experts": {"expansion": 4, "granularity": 2, "top_k": 2}, "weight_scaling": 3})
    assert load_spec(spec) is spec
    assert spec.experts.num_experts == 8 and spec.weight_scaling == 3.0
    assert spec.source == "<dict>"
    assert load_spec({}, name="cfg").source == "cfg"


@pytest.mark.parametrize(
    "layers, expected",
    [
        ("all", LayerSelection()),
        ([0, 2, -1], LayerSelection(mode="indices", indices=(0, 2, -1))),
        ({"every": 2, "offset": 1}, LayerSelection(mode="every", every=2, offset=1)),
        ({"first": 4}, LayerSelection(mode="first", count=4)),
        ({"last": 4}, LayerSelection(mode="last", count=4)),
        ({"match": r"layers\.1\d\."}, LayerSelection(mode="match", pattern=r"layers\.1\d\.")),
    ],
)
def test_layer_forms(layers, expected):
    assert load_spec({"layers": layers}).layers == expected


def test_negative_layer_indices_count_from_end():
    sel = load_spec({"layers": [0, -1]}).layers
    assert [i for i in range(5) if sel.selects(i, 5, "")] == [0, 4]


# ----------------------------------------------------------------------------------------- errors


def test_error_classes():
    assert issubclass(SpecError, ValueError) and issubclass(SpecError, UpcycleError)
    err = SpecError("must be an integer >= 1, got 'eight'", file="spec.yaml", field="experts.top_k", line=4)
    assert str(err) == "spec.yaml:4: experts.top_k: must be an integer >= 1, got 'eight'"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.line == 4 and again.field == "experts.top_k"


def test_wrong_type_string_for_int(tmp_path):
    err = error_of(tmp_path, "experts:\n  expansion: 8\n  granularity: 8\n  top_k: eight\n")
    assert (err.field, err.line) == ("experts.top_k", 4)
    assert_one_line(err, "spec.yaml:4: experts.top_k: must be an integer >= 1, got 'eight'")


@pytest.mark.parametrize("literal", ["true", "yes", "on", "false"])
def test_bool_is_not_an_int(tmp_path, literal):
    err = error_of(tmp_path, f"seed: 1\nexperts:\n  top_k: {literal}\n")
    assert_one_line(err, "spec.yaml:3:", "experts.top_k", "integer", "boolean")


def test_float_for_int_and_string_for_number(tmp_path):
    assert_one_line(error_of(tmp_path, "experts: {expansion: 2.5}\n"), "spec.yaml:1:", "experts.expansion", "integer", "2.5")
    err = error_of(tmp_path, "verify:\n  tolerance: '1e-5'\n")
    assert_one_line(err, "spec.yaml:2:", "verify.tolerance", "must be a number > 0", "'1e-5' (a string)")


def test_bool_field_rejects_int(tmp_path):
    assert_one_line(error_of(tmp_path, "verify:\n  enabled: 1\n"), "spec.yaml:2:", "verify.enabled", "true or false")


def test_malformed_yaml_has_line_and_column(tmp_path):
    err = error_of(tmp_path, "experts:\n  top_k: 2\nrouter: [softmax\n")
    assert err.line is not None and err.column is not None
    assert_one_line(err, "spec.yaml:", "malformed YAML")
    err = error_of(tmp_path, "experts:\n  top_k: 2\n\texpansion: 8\n")
    assert err.line == 3
    assert_one_line(err, "spec.yaml:3:", "malformed YAML")


def test_bad_scalar_reports_its_line(tmp_path):
    err = error_of(tmp_path, "seed: 1\nrouter:\n  type: 2020-13-45\n")
    assert err.line == 3
    assert_one_line(err, "spec.yaml:3:", "malformed YAML")


def test_top_level_must_be_mapping(tmp_path):
    assert_one_line(error_of(tmp_path, "- experts\n- router\n"), "spec.yaml:1:", "top level must be a mapping", "experts, router")
    with pytest.raises(SpecError, match="mapping"):
        load_spec([1, 2])
    with pytest.raises(SpecError, match="expected a spec"):
        load_spec(None)


def test_unknown_top_level_key_did_you_mean(tmp_path):
    err = error_of(tmp_path, "seed: 1\nrouters:\n  type: softmax_then_topk\n")
    assert (err.field, err.line) == ("routers", 2)
    assert_one_line(err, "spec.yaml:2: routers: unknown key", "did you mean 'router'?", "valid keys: experts, router")


def test_unknown_nested_key_did_you_mean(tmp_path):
    err = error_of(tmp_path, "experts:\n  expansion: 8\n  topk: 2\n")
    assert (err.field, err.line) == ("experts.topk", 3)
    assert_one_line(err, "spec.yaml:3: experts.topk: unknown key", "did you mean 'top_k'?", "expansion, granularity, top_k")
    err = error_of(tmp_path, "verify:\n  probe_token: 12\n")
    assert_one_line(err, "spec.yaml:2: verify.probe_token", "did you mean 'probe_tokens'?")


def test_unknown_key_hint_for_derived_field(tmp_path):
    err = error_of(tmp_path, "experts:\n  num_experts: 64\n")
    assert_one_line(err, "spec.yaml:2: experts.num_experts", "expansion x granularity")


def test_duplicate_key(tmp_path):
    err = error_of(tmp_path, "experts:\n  top_k: 2\n  top_k: 4\n")
    assert_one_line(err, "spec.yaml:3: experts.top_k: duplicate key", "line 2")


@pytest.mark.parametrize(
    "text, field, line, valid, suggestion",
    [
        ("router:\n  type: softmax_topk\n", "router.type", 2, "softmax_then_topk, topk_then_softmax", "softmax_then_topk"),
        ("router:\n  init: virtual-group\n", "router.init", 2, "virtual_group, random, kmeans", "virtual_group"),
        ("seed: 0\nscaling_placement: ballanced\n", "scaling_placement", 2, "auto, balanced, down_proj", "balanced"),
        ("runtime:\n  backend: trition\n", "runtime.backend", 2, "auto, reference, grouped, triton", "triton"),
        ("weight_scaling: None\nseed: 0\n", "weight_scaling", 1, "auto, none or a positive number", "none"),
        ("router: {type: SOFTMAX_THEN_TOPK}\n", "router.type", 1, "softmax_then_topk, topk_then_softmax", "softmax_then_topk"),
    ],
)
def test_bad_enum_lists_values_and_suggests(tmp_path, text, field, line, valid, suggestion):
    err = error_of(tmp_path, text)
    assert (err.field, err.line) == (field, line)
    assert_one_line(err, f"spec.yaml:{line}: {field}", valid, f"did you mean {suggestion!r}?")


def test_top_k_larger_than_experts(tmp_path):
    err = error_of(tmp_path, "experts:\n  expansion: 2\n  granularity: 2\n  top_k: 5\n")
    assert (err.field, err.line) == ("experts.top_k", 4)
    assert_one_line(err, "number of experts", "= 4", "got 5")


@pytest.mark.parametrize(
    "text, field, fragment",
    [
        ("experts:\n  expansion: 0\n", "experts.expansion", ">= 1"),
        ("experts:\n  granularity: -8\n", "experts.granularity", ">= 1"),
        ("experts:\n  shared_experts: -1\n", "experts.shared_experts", ">= 0"),
        ("experts:\n  drop_upcycling: 1.0\n", "experts.drop_upcycling", ">= 0 and < 1"),
        ("experts:\n  drop_upcycling: -0.1\n", "experts.drop_upcycling", ">= 0 and < 1"),
        ("router:\n  init_std: 0\n", "router.init_std", "> 0"),
        ("router:\n  aux_loss_coef: -0.01\n", "router.aux_loss_coef", ">= 0"),
        ("router:\n  z_loss_coef: .nan\n", "router.z_loss_coef", ">= 0"),
        ("verify:\n  probe_tokens: 0\n", "verify.probe_tokens", ">= 1"),
        ("verify:\n  tolerance: -1e-5\n", "verify.tolerance", "> 0"),
        ("weight_scaling: -2\nseed: 0\n", "weight_scaling", "positive number"),
        ("seed: -1\nexperts: {}\n", "seed", ">= 0"),
    ],
)
def test_out_of_range(tmp_path, text, field, fragment):
    err = error_of(tmp_path, text)
    line = 1 if "." not in field else 2
    assert (err.field, err.line) == (field, line)
    assert_one_line(err, f"spec.yaml:{line}: {field}", fragment)


def test_bad_regex(tmp_path):
    err = error_of(tmp_path, "seed: 0\nlayers:\n  match: 'mlp(['\n")
    assert (err.field, err.line) == ("layers.match", 3)
    assert_one_line(err, "spec.yaml:3: layers.match", "regular expression")


@pytest.mark.parametrize(
    "text, field, line, fragment",
    [
        ("layers: []\n", "layers", 1, "empty"),
        ("layers: some\n", "layers", 1, "'all', a list of layer indices"),
        ("layers: 3\n", "layers", 1, "{first: n}"),
        ("layers:\n  - 0\n  - two\n", "layers[1]", 3, "integer layer index"),
        ("layers:\n  - 0\n  - true\n", "layers[1]", 3, "boolean"),
        ("layers:\n  - 1\n  - 3\n  - 1\n", "layers[2]", 4, "duplicate layer index 1"),
        ("layers:\n  every: 0\n", "layers.every", 2, ">= 1"),
        ("layers:\n  every: 2\n  offset: -1\n", "layers.offset", 3, ">= 0"),
        ("layers:\n  first: 0\n", "layers.first", 2, ">= 1"),
        ("layers:\n  last: 2.0\n", "layers.last", 2, "integer"),
        ("layers:\n  first: 2\n  last: 2\n", "layers", 1, "only one of every, first, last, match"),
        ("layers:\n  offset: 2\n", "layers", 1, "one of every, first, last, match"),
        ("layers:\n  first: 2\n  offset: 1\n", "layers.offset", 3, "only applies with layers.every"),
        ("layers:\n  evry: 2\n", "layers.evry", 2, "did you mean 'every'?"),
        ("layers:\n  match: 3\n", "layers.match", 2, "regular expression string"),
    ],
)
def test_bad_layer_forms(tmp_path, text, field, line, fragment):
    err = error_of(tmp_path, text)
    assert (err.field, err.line) == (field, line)
    assert_one_line(err, f"spec.yaml:{line}: {field}", fragment)


def test_section_must_be_mapping(tmp_path):
    err = error_of(tmp_path, "seed: 0\nrouter: softmax_then_topk\n")
    assert (err.field, err.line) == ("router", 2)
    assert_one_line(err, "must be a mapping", "type, selection, init, init_std")


def test_dict_errors_have_field_but_no_line():
    with pytest.raises(SpecError) as info:
        load_spec({"experts": {"top_k": "2"}})
    assert info.value.line is None
    assert str(info.value).startswith("<dict>: experts.top_k: must be an integer")


# --------------------------------------------------------------------------------------- warnings


def test_virtual_group_warning_when_groups_cannot_be_whole(tmp_path):
    with pytest.warns(SpecWarning) as record:
        spec = load_text(tmp_path, "experts:\n  granularity: 8\n  top_k: 4\nrouter:\n  init: virtual_group\n")
    assert spec.experts.top_k == 4  # warned, not failed
    (w,) = record
    msg = str(w.message)
    assert "\n" not in msg and "spec.yaml:5: router.init" in msg and "virtual groups cannot be whole" in msg
    assert w.filename == __file__  # points at the caller of load_spec


def test_no_warning_for_whole_groups_or_other_inits():
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)
        load_spec({"experts": {"granularity": 4, "top_k": 8}})
        load_spec({"experts": {"granularity": 8, "top_k": 2}, "router": {"init": "random"}})


# ------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trip(tmp_path, name):
    spec = load_spec(name)
    assert load_text(tmp_path, dump_spec(spec)) == spec


@pytest.mark.parametrize(
    "data",
    [
        {"layers": [0, -2, 5], "weight_scaling": 2.5, "seed": 7},
        {"layers": {"every": 3, "offset": 1}, "scaling_placement": "down_proj"},
        {"layers": {"match": r"model\.layers\.(1|3)\."}, "verify": {"enabled": False, "tolerance": 1e-3}},
        {"layers": {"last": 2}, "experts": {"granularity": 4, "shared_experts": 1, "drop_upcycling": 0.5}, "runtime": {"backend": "grouped"}},
    ],
)
def test_custom_round_trip(tmp_path, data):
    spec = load_spec(data)
    text = dump_spec(spec)
    assert load_text(tmp_path, text) == spec
    assert yaml.safe_load(text) == spec.to_dict()


_valid_specs = st.fixed_dictionaries(
    {},
    optional={
        "experts": st.fixed_dictionaries(
            {"expansion": st.integers(1, 16), "granularity": st.integers(1, 16)},
            optional={"shared_experts": st.integers(0, 4), "drop_upcycling": st.floats(0, 0.99)},
        ),
        "router": st.fixed_dictionaries(
            {},
            optional={
                "type": st.sampled_from(["softmax_then_topk", "topk_then_softmax"]),
                "init": st.sampled_from(["virtual_group", "random", "kmeans"]),
                "init_std": st.floats(1e-6, 10),
                "aux_loss_coef": st.floats(0, 1),
            },
        ),
        "weight_scaling": st.one_of(st.sampled_from(["auto", "none"]), st.floats(1e-3, 1e3)),
        "layers": st.one_of(
            st.just("all"),
            st.lists(st.integers(-50, 50), min_size=1, max_size=6, unique=True),
            st.builds(lambda e, o: {"every": e, "offset": o}, st.integers(1, 4), st.integers(0, 3)),
            st.builds(lambda n: {"first": n}, st.integers(1, 9)),
        ),
        "verify": st.fixed_dictionaries({}, optional={"tolerance": st.floats(1e-9, 1.0), "probe_tokens": st.integers(1, 4096)}),
        "seed": st.integers(0, 2**63),
    },
)


@settings(max_examples=60, deadline=None)
@given(_valid_specs, st.data())
def test_valid_specs_round_trip(data, draw):
    if "experts" in data:  # top_k in range for the drawn shape
        ex = data["experts"]
        if "shared_experts" in ex:  # the shared expert holds S < G of the G shards
            ex["shared_experts"] = min(ex["shared_experts"], ex["granularity"] - 1)
        n = ex["expansion"] * (ex["granularity"] - ex.get("shared_experts", 0))
        data["experts"]["top_k"] = draw.draw(st.integers(1, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)
        spec = load_spec(data)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "spec.yaml")
            with open(path, "w") as f:
                f.write(dump_spec(spec))
            assert load_spec(path) == spec


# ------------------------------------------------------------------------------ against the model


def test_validate_against_model(tmp_path):
    spec = load_text(tmp_path, "experts:\n  expansion: 8\n  granularity: 7\n  top_k: 7\nrouter: {init: random}\n")
    validate_against_model(spec, 1536 * 7, "model.layers.0.mlp")  # divisible: fine
    with pytest.raises(SpecError) as info:
        validate_against_model(spec, 1536, "model.layers.3.mlp")
    err = info.value
    assert (err.field, err.line) == ("experts.granularity", 3)
    assert_one_line(
        err, "spec.yaml:3: experts.granularity", "1536", "model.layers.3.mlp", "1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64"
    )


def test_validate_against_model_default_granularity_line_falls_back():
    spec = load_spec({"experts": {"granularity": 3, "top_k": 3}})
    with pytest.raises(SpecError) as info:
        validate_against_model(spec, 64, "mlp")
    assert info.value.line is None and str(info.value).startswith("<dict>: experts.granularity: 3 does not divide")


# ------------------------------------------------------------------------------------------- fuzz

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["all", "auto", "none", "softmax_then_topk", "random", "every", "(", "[0]"]),
)
_keys = st.one_of(st.sampled_from(TOP_KEYS + tuple(k for ks in SECTION_KEYS.values() for k in ks) + ("every", "offset", "first", "last", "match")), st.text(max_size=8))
_trees = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=20,
)


def _load_or_spec_error(source):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)
        try:
            result = load_spec(source)
        except SpecError as err:
            for one in getattr(err, "errors", [err]):  # several errors: one line each
                assert "\n" not in str(one)
            return err
    assert isinstance(result, UpcycleSpec)
    return result


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.dictionaries(_keys, _trees, max_size=6), _trees))
def test_fuzz_structures(data):
    _load_or_spec_error(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.dictionaries(_keys, _trees, max_size=6), _trees), st.booleans())
def test_fuzz_yaml_files(data, flow):
    try:
        text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    except yaml.YAMLError:
        return
    _fuzz_text(text)


_yamlish = st.text(alphabet=st.sampled_from(list("experts:top_k- []{}'\"#&*!|>,.0123456789eE\n\t ~?%@`\\") + ["\x00", "é"]), max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=80), _yamlish))
def test_fuzz_text(text):
    _fuzz_text(text)


def _fuzz_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spec.yaml")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        result = _load_or_spec_error(path)
    if isinstance(result, SpecError) and result.line is not None:
        breaks = sum(text.count(c) for c in "\n\r\x85\u2028\u2029")  # YAML's line breaks
        assert 1 <= result.line <= breaks + 2


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_fuzz_source_strings(source):
    # Arbitrary strings are preset names or paths: never anything but a spec or a SpecError.
    _load_or_spec_error(source)


# ------------------------------------------------------------------------------------ odd inputs


def test_yaml_anchors_and_merge_keys(tmp_path):
    spec = load_text(tmp_path, "experts:\n  <<: {expansion: 4, top_k: 2}\n  granularity: 2\n")
    assert (spec.experts.expansion, spec.experts.granularity, spec.experts.top_k) == (4, 2, 2)
    err = error_of(tmp_path, "layers: &a [*a]\n")
    assert err.field == "layers[0]"


def test_not_utf8_and_directory(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"seed: \xff\xfe\n")
    with pytest.raises(SpecError, match="UTF-8"):
        load_spec(path)
    with pytest.raises(SpecError, match="directory"):
        load_spec(tmp_path)


def test_unsafe_tags_are_refused(tmp_path):
    err = error_of(tmp_path, "seed: !!python/object/apply:os.getcwd []\n")
    assert_one_line(err, "spec.yaml:1:", "malformed YAML", "constructor")


def test_json_schema_in_step_with_the_validator(tmp_path, capsys):
    """--print-schema: generated from schema.py; its keys are the validator's, presets validate."""
    import json
    from pathlib import Path

    import jsonschema
    import yaml

    from upcycle.compiler.cli import run
    from upcycle.specs.json_schema import spec_json_schema
    from upcycle.specs.validate import SECTION_KEYS, TOP_KEYS

    assert run(["--print-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == spec_json_schema()
    assert set(schema["properties"]) == set(TOP_KEYS)
    for section, keys in SECTION_KEYS.items():
        assert set(schema["properties"][section]["properties"]) == set(keys), section
    presets = sorted((Path(__file__).parents[1] / "specs" / "presets").glob("*.yaml"))
    assert presets
    for path in presets:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    for bad in ({"router": {"type": "softmax"}}, {"experts": {"top_k": "two"}}, {"runtime": {"capacity_factor": "x"}},
                {"layers": {"every": 2, "first": 1}}, {"unknown": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert run([]) == 2  # no spec, no model: one line


def test_every_error_of_a_file_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("experts:\n  expansion: 0\n  topk: 2\nrouter:\n  type: softmax_then_top\n"
                    "verify:\n  enabled: maybe\nlayers: [1, 1]\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = str(info.value).splitlines()
    assert lines[0] == "5 errors in the spec:"
    assert [ln.split(": ")[1] for ln in lines[1:]] == ["experts.expansion", "experts.topk", "router.type",
                                                       "verify.enabled", "layers[1]"]
    assert all(f"bad.yaml:{n}:" in ln for n, ln in zip([2, 3, 5, 7, 8], lines[1:]))
    assert info.value.field == "experts.expansion" and info.value.line == 2  # the first, for programs
