"""Every export target (compiler/targets/), each on a tiny seeded model of its source family built
from a config: in-memory and streamed exports byte-identical, AutoModelForCausalLM loading with no
custom code and no missing tensor, logits equal to ours (fp32, <= 1e-4) in the router modes the
format holds (and to the dense model's where the spec is exact), generate() running, the
router-loss coefficient mapped. Refusals are one line naming what the format lacks."""

import json
import warnings

import pytest
import torch

from upcycle.compiler.export_hf import TARGETS, ExportError, export_hf, hf_export_plan
from upcycle.compiler.loading import load_model
from upcycle.compiler.pipeline import upcycle_model
from upcycle.compiler.streaming import stream_upcycle

VOCAB = 96


def _perturb_norms(model):
    """Norm weights away from 1 (and seeded), so a norm the export drops or misplaces shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def source(family: str, layers: int = 4):
    """A tiny seeded dense causal LM of `family`."""
    import transformers as tf

    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              max_position_embeddings=64)
    if family == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**kw))
    elif family == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**kw))
    elif family == "qwen3":  # head_dim 16, not 32 / 4: the export must carry it
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(**kw, head_dim=16))
    elif family == "olmo2":
        m = tf.Olmo2ForCausalLM(tf.Olmo2Config(**kw))
    elif family == "granite":  # every multiplier away from 1
        m = tf.GraniteForCausalLM(tf.GraniteConfig(**kw, embedding_multiplier=6.0, logits_scaling=4.0,
                                                   residual_multiplier=0.5, attention_multiplier=0.2))
    elif family == "ernie4_5":
        m = tf.Ernie4_5ForCausalLM(tf.Ernie4_5Config(**kw, head_dim=16, tie_word_embeddings=True))
    elif family == "cohere2":  # sliding windows on 3 of every 4 layers, logit scale away from 1
        m = tf.Cohere2ForCausalLM(tf.Cohere2Config(**kw, sliding_window=4, logit_scale=0.5))
    else:
        raise KeyError(family)
    _perturb_norms(m)
    return m.eval()


def spec(e, g, t, rtype, **kw):
    return {"experts": {"expansion": e, "granularity": g, "top_k": t, **kw.pop("experts", {})},
            "router": {"type": rtype, **kw.pop("router", {})}, "runtime": {"backend": "reference"}, **kw}


# target -> [(case id, source family, spec, exact at init)]: every router mode the format holds,
# fine-grained experts, dense layers and shared experts where the format has them
CASES = {
    "mixtral": [("coarse", "llama", spec(4, 1, 2, "topk_then_softmax"), True)],
    "qwen2_moe": [("fine-softmax", "llama", spec(4, 2, 2, "softmax_then_topk"), False),
                  ("qwen2-shared", "qwen2", spec(2, 4, 3, "topk_then_softmax", experts={"shared_experts": 1}), True)],
    "qwen3_moe": [("softmax", "qwen3", spec(4, 2, 2, "softmax_then_topk"), False),
                  ("topk-exact", "qwen3", spec(2, 2, 2, "topk_then_softmax"), True),
                  ("dense-layers", "qwen3", spec(4, 1, 2, "topk_then_softmax", layers={"every": 2}), True)],
    "flex_olmo": [("softmax", "olmo2", spec(4, 2, 2, "softmax_then_topk"), False),
                  ("topk-exact", "olmo2", spec(2, 2, 2, "topk_then_softmax"), True)],
    "granitemoe": [("coarse", "granite", spec(4, 1, 2, "topk_then_softmax"), True),
                   ("fine-exact", "granite", spec(2, 2, 2, "topk_then_softmax"), True)],
    "granitemoeshared": [("shared", "granite", spec(2, 4, 3, "topk_then_softmax", experts={"shared_experts": 1}), True)],
    "ernie4_5_moe": [("coarse", "ernie4_5", spec(4, 1, 2, "topk_then_softmax"), True),
                     ("shared", "ernie4_5", spec(2, 4, 2, "topk_then_softmax", experts={"shared_experts": 2}), True),
                     ("every-other", "ernie4_5", spec(4, 2, 2, "topk_then_softmax", layers={"every": 2, "offset": 1}), True)],
    "cohere2_moe": [("coarse", "cohere2", spec(4, 1, 2, "topk_then_softmax"), True),
                    ("shared", "cohere2", spec(2, 4, 2, "topk_then_softmax", experts={"shared_experts": 2}), True)],
}
PARAMS = [(target, *case) for target, cases in CASES.items() for case in cases]


def test_every_registered_target_has_cases():
    """A new target module without a case here fails: each format is tested, not just listed."""
    assert set(CASES) == set(TARGETS)


def _ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("target,case,family,sp,exact", PARAMS, ids=[f"{p[0]}-{p[1]}" for p in PARAMS])
def test_target_round_trip(tmp_path, target, case, family, sp, exact):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "dense"
    dense = source(family)
    dense.save_pretrained(src)
    ids = _ids()
    with torch.no_grad():
        dense_logits = dense(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = upcycle_model(load_model(src).model, sp)
        plan = hf_export_plan(res.model, sp)
        assert plan.target.name == target  # the default for this source and spec
        export_hf(res.model, tmp_path / "mem", spec=sp, max_shard_bytes=60_000)
        streamed = stream_upcycle(sp, src, tmp_path / "stream", fmt="hf", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "mem").iterdir() if p.name.startswith("model"))
    assert len(files) > 2 and files == sorted(p.name for p in (tmp_path / "stream").iterdir() if p.name.startswith("model"))
    for f in files + ["config.json"]:
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "stream" / f).read_bytes(), f
    record = json.loads((tmp_path / "stream" / "upcycle_export.json").read_text())
    assert record["target"] == target and record["exactness"] == TARGETS[target].exactness
    acc = streamed.manifest["tensors"]  # every dense MLP tensor went into the target's block
    i = plan.moe_layers[0]
    made = acc["transformed"][f"model.layers.{i}.mlp.up_proj.weight"]
    assert made and all(n.startswith(TARGETS[target].moe_prefix(i)) for n in made)

    hf, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "stream"), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(hf).__name__ == TARGETS[target].architecture
    cfg = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert cfg["output_router_logits"] is True
    n_moe = len(plan.moe_layers)
    assert cfg["router_aux_loss_coef"] == pytest.approx(0.01 * n_moe / sp["experts"]["top_k"])
    hf.eval()
    with torch.no_grad():
        ours = res.model.eval()(input_ids=ids).logits
        theirs = hf(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    if exact:
        assert (theirs - dense_logits).abs().max() <= 1e-4
    assert hf.generate(ids[:1, :5], max_new_tokens=4, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize("family,target", [("qwen3", "qwen3_moe"), ("olmo2", "flex_olmo"), ("granite", "granitemoe"),
                                           ("granite", "granitemoeshared"), ("ernie4_5", "ernie4_5_moe")])
def test_router_pressure_matches_ours(tmp_path, family, target):
    """One MoE layer: a training step's router gradient is the same in the export as in ours, and
    without the coefficient it is not (the balancing part is really there)."""
    from transformers import AutoModelForCausalLM

    from upcycle import compile_upcycle

    sp = spec(4, 2, 2, "topk_then_softmax", router={"selection": "topk"})  # the router is trained away below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = compile_upcycle(source(family, layers=1), sp)
    layer = moe.model.layers[0].mlp
    with torch.no_grad():  # an uneven router, so the balancing gradient is not ~0
        layer.router.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    out = export_hf(moe, tmp_path / "hf", spec=sp, target=target)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).train()
    ids = _ids()
    moe.train()
    moe(input_ids=ids, labels=ids).loss.backward()
    hf(input_ids=ids, labels=ids).loss.backward()
    block = getattr(hf.model.layers[0], TARGETS[target].block)
    router = block.router if target.startswith("granite") else block.gate
    torch.testing.assert_close(router.weight.grad, layer.router.weight.grad, rtol=1e-4, atol=1e-6)
    hf.zero_grad()
    hf.router_aux_loss_coef = 0.0
    hf(input_ids=ids, labels=ids).loss.backward()
    assert (router.weight.grad - layer.router.weight.grad).abs().max() > 1e-5


def test_router_pressure_is_covered_for_every_target_that_has_a_router_loss():
    covered = {"mixtral", "qwen2_moe"}  # tests/test_export_hf.py
    covered |= {t for _, t in test_router_pressure_matches_ours.pytestmark[0].args[1]}
    assert covered | {n for n, t in TARGETS.items() if not t.router_loss} == set(TARGETS)


def test_cohere2_moe_computes_no_router_loss(tmp_path):
    """Cohere2-MoE's forward adds no balancing loss: its training loss is the plain LM loss (said in
    its exactness line and the export record), while ours carries the router loss."""
    from transformers import AutoModelForCausalLM

    from upcycle import compile_upcycle

    sp = spec(4, 1, 2, "topk_then_softmax")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = compile_upcycle(source("cohere2", layers=1), sp)
    out = export_hf(moe, tmp_path / "hf", spec=sp)
    assert json.loads((out / "upcycle_export.json").read_text())["router_loss"] is False
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).train()
    ids = _ids()
    res = hf(input_ids=ids, labels=ids)
    lm = torch.nn.functional.cross_entropy(res.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(res.loss, lm)


def test_ernie_holds_a_trained_routing_bias(tmp_path):
    """Ernie 4.5-MoE chooses on probabilities + e_score_correction_bias, as our aux-loss-free bias
    does: a trained bias exports and the logits still agree (a bias big enough to change choices)."""
    from transformers import AutoModelForCausalLM

    from upcycle import compile_upcycle

    # distinct experts (Drop-Upcycling), so choosing another expert changes the output
    sp = spec(4, 1, 2, "topk_then_softmax", router={"balancing": "bias"}, experts={"drop_upcycling": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = compile_upcycle(source("ernie4_5", layers=2), sp)
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.router.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
            layer.mlp.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    out = export_hf(moe, tmp_path / "hf", spec=sp)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        want = moe.eval()(input_ids=ids).logits
        assert (hf(input_ids=ids).logits - want).abs().max() <= 1e-4
        hf.model.layers[0].mlp.gate.moe_statics.e_score_correction_bias.zero_()  # the bias matters
        assert (hf(input_ids=ids).logits - want).abs().max() > 1e-4
    with warnings.catch_warnings():  # a Llama cannot: one line naming the format that could
        warnings.simplefilter("ignore")
        llama = compile_upcycle(source("llama", layers=2), sp)
    with torch.no_grad():
        llama.model.layers[1].mlp.router.expert_bias[0] = 0.01
    with pytest.raises(ExportError, match="model.layers.1.mlp routes with a trained aux-loss-free bias.*Ernie 4.5-MoE"):
        hf_export_plan(llama)


def _compiled(family, sp, layers=2, **cfg):
    from upcycle import compile_upcycle

    model = source(family, layers=layers)
    for k, v in cfg.items():
        setattr(model.config, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_upcycle(model, sp)


@pytest.mark.parametrize("family,sp,target,needle", [
    ("granite", spec(4, 2, 2, "softmax_then_topk"), None, "granitemoe: GraniteMoe's router is topk_then_softmax only"),
    ("olmo2", spec(4, 1, 2, "topk_then_softmax", layers=[0]), None, "FlexOlmo has no dense MLP layers"),
    ("qwen3", spec(2, 4, 3, "topk_then_softmax", experts={"shared_experts": 1}), None, "Qwen3-MoE has no shared expert"),
    ("ernie4_5", spec(4, 1, 2, "topk_then_softmax", layers=[0, 1, 3]), None, "not such a pattern"),
    ("llama", spec(4, 2, 2, "topk_then_softmax"), "qwen3_moe", "Qwen3-MoE holds qwen3 models, not llama; qwen2_moe holds it"),
    ("llama", spec(4, 2, 2, "softmax_then_topk"), "granitemoe", "GraniteMoe holds granite models"),
    ("llama", spec(4, 1, 2, "topk_then_softmax"), "nope", "unknown export target 'nope'; choose one of mixtral"),
])
def test_refusals_are_one_line(family, sp, target, needle):
    moe = _compiled(family, sp, layers=4 if family == "ernie4_5" else 2)
    with pytest.raises(ExportError) as info:
        hf_export_plan(moe, sp, target)
    msg = str(info.value)
    assert "\n" not in msg and needle in msg, msg


def test_target_chooses_among_those_that_fit(tmp_path):
    """Llama topk_then_softmax G = 1: Mixtral by default, Qwen2-MoE on request (both exact)."""
    sp = spec(4, 1, 2, "topk_then_softmax")
    moe = _compiled("llama", sp)
    assert hf_export_plan(moe, sp).target.name == "mixtral"
    assert hf_export_plan(moe, sp, "qwen2_moe").target.name == "qwen2_moe"
    granite = _compiled("granite", spec(2, 4, 3, "topk_then_softmax", experts={"shared_experts": 1}))
    with pytest.raises(ExportError, match="--target granitemoe: GraniteMoe has no shared expert; granitemoeshared holds it"):
        hf_export_plan(granite, None, "granitemoe")


def test_partial_sliding_window_qwen3_is_refused():
    moe = _compiled("qwen3", spec(4, 1, 2, "topk_then_softmax"), layers=2)
    moe.config.use_sliding_window, moe.config.sliding_window = True, 8
    moe.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ExportError, match="Qwen3-MoE applies one sliding window to every layer; this Qwen3 slides on 1 of 2"):
        hf_export_plan(moe)


@pytest.mark.parametrize("model_type,needle", [("olmo3", "the nearest, FlexOlmo, lacks OLMo 3's sliding-window"),
                                               ("phi3", "the nearest, PhiMoE, lacks"),
                                               ("made_up", "formats: mixtral (llama, mistral)")])
def test_no_format_names_the_nearest(model_type, needle):
    moe = _compiled("llama", spec(4, 1, 2, "topk_then_softmax"))
    moe.config.model_type = model_type
    with pytest.raises(ExportError) as info:
        hf_export_plan(moe)
    msg = str(info.value)
    assert "\n" not in msg and "no transformers MoE format" in msg and needle in msg, msg


def test_cli_target(tmp_path, capsys):
    """--target NAME picks among the formats that fit (implies --format hf; streamed by default);
    one that does not fit is one line, and the work is kept in the native format."""
    import yaml

    from upcycle.compiler.cli import run

    src = tmp_path / "dense"
    source("llama", layers=2).save_pretrained(src)
    sp = tmp_path / "spec.yaml"
    sp.write_text(yaml.safe_dump(spec(4, 1, 2, "topk_then_softmax")))
    assert run([str(sp), str(src), "-o", str(tmp_path / "q"), "--target", "qwen2_moe", "--no-progress"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert run([str(sp), str(src), "-o", str(tmp_path / "m"), "--format", "hf", "--no-progress", "--no-stream"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "mixtral"  # the default
    capsys.readouterr()
    assert run([str(sp), str(src), "-o", str(tmp_path / "g"), "--target", "granitemoe", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "GraniteMoe holds granite models, not llama" in err[0] and "native format" in err[0]
    assert (tmp_path / "g" / "upcycle.json").is_file()
    assert run([str(sp), str(src), "-o", str(tmp_path / "n"), "--target", "mixtral", "--format", "native"]) == 2
    assert "drop --format native" in capsys.readouterr().err
