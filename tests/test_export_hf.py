"""Export to transformers MoE formats: Mixtral and Qwen2-MoE checkpoints that
AutoModelForCausalLM.from_pretrained loads with no custom code, equal to the compiled model."""

import json
import warnings

import pytest
import torch
import yaml

from upcycle import compile_upcycle
from upcycle.compiler.cli import run
from upcycle.compiler.export_hf import ExportError, export_hf, hf_export_plan

VOCAB = 96
# transformers builds Qwen2-MoE's shared expert with width 0 when there is none, and warns about it


def _llama(layers=4, tie=False, model="llama"):
    import transformers

    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=tie)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model]
    if model == "mistral":
        kw["sliding_window"] = 8
    m = cls[1](cls[0](**kw)).eval()
    if model == "qwen2":  # non-zero q/k/v biases so a dropped bias would show
        with torch.no_grad():
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.1)
    return m


def _spec(e, g, t, router, **kw):
    # the reference expert loop: these tests are about the format, not the kernels; plain top-K
    # selection, because they export routers trained (or perturbed) away from the init, which only
    # top-K layers survive (per-slice export: tests/test_routing.py)
    return {"experts": {"expansion": e, "granularity": g, "top_k": t, **kw.pop("experts", {})},
            "router": {"type": router, "selection": "topk"}, "runtime": {"backend": "reference"}, **kw}


def _export_and_load(model, spec, tmp_path, name="hf"):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = compile_upcycle(model, spec)
    out = export_hf(moe, tmp_path / name, spec=spec)
    hf, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return moe, hf.eval(), out


def _same_logits(moe, hf, dense_ref=None, exact=False):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = moe(input_ids=ids).logits
        b = hf(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4
    if exact:
        assert (b - dense_ref(ids)).abs().max() <= 1e-4
    out = hf.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def _dense_ref(model):
    import copy

    dense = copy.deepcopy(model)

    def f(ids):
        with torch.no_grad():
            return dense(input_ids=ids).logits
    return f


@pytest.mark.parametrize("tie", [False, True])
def test_llama_topk_then_softmax_coarse_is_mixtral(tmp_path, tie):
    model = _llama(tie=tie)
    ref = _dense_ref(model)
    moe, hf, out = _export_and_load(model, _spec(4, 1, 2, "topk_then_softmax"), tmp_path)
    assert type(hf).__name__ == "MixtralForCausalLM"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    assert cfg["intermediate_size"] == 64
    _same_logits(moe, hf, ref, exact=True)


@pytest.mark.parametrize("router,e,g,t,exact", [
    ("softmax_then_topk", 2, 4, 4, False),
    ("softmax_then_topk", 4, 1, 2, False),
    ("topk_then_softmax", 2, 4, 4, True),  # fine-grained topk_then_softmax: Qwen2-MoE with norm_topk_prob
])
def test_llama_to_qwen2_moe(tmp_path, router, e, g, t, exact):
    model = _llama()
    ref = _dense_ref(model)
    moe, hf, out = _export_and_load(model, _spec(e, g, t, router), tmp_path)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    cfg = hf.config
    assert cfg.norm_topk_prob == (router == "topk_then_softmax")
    assert cfg.moe_intermediate_size == 64 // g and cfg.num_experts == e * g and cfg.num_experts_per_tok == t
    assert cfg.shared_expert_intermediate_size == 1 and cfg.qkv_bias is False and cfg.mlp_only_layers == []
    _same_logits(moe, hf, ref, exact=exact)


@pytest.mark.parametrize("router", ["softmax_then_topk", "topk_then_softmax"])
def test_mixed_dense_moe_layers(tmp_path, router):
    model = _llama()
    ref = _dense_ref(model)
    spec = _spec(4, 1, 2, router, layers={"every": 2})
    moe, hf, _ = _export_and_load(model, spec, tmp_path)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"  # Mixtral has no dense layers
    assert hf.config.mlp_only_layers == [1, 3]
    kinds = [type(layer.mlp).__name__ for layer in hf.model.layers]
    assert kinds == ["Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP"] * 2
    _same_logits(moe, hf, ref, exact=router == "topk_then_softmax")


def test_shared_expert_through_sigmoid_gate(tmp_path):
    model = _llama()
    ref = _dense_ref(model)
    spec = _spec(2, 4, 3, "topk_then_softmax", experts={"shared_experts": 1})
    moe, hf, _ = _export_and_load(model, spec, tmp_path)
    assert hf.config.shared_expert_intermediate_size == 16 and hf.config.num_experts == 6
    block = hf.model.layers[0].mlp
    assert torch.count_nonzero(block.shared_expert_gate.weight) == 0  # sigmoid(0) = 1/2, W2 doubled
    _same_logits(moe, hf, ref, exact=True)


def test_qwen2_source_keeps_qkv_bias(tmp_path):
    model = _llama(model="qwen2")
    ref = _dense_ref(model)
    moe, hf, _ = _export_and_load(model, _spec(2, 2, 2, "topk_then_softmax"), tmp_path)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM" and hf.config.qkv_bias is True
    torch.testing.assert_close(hf.model.layers[0].self_attn.q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)
    _same_logits(moe, hf, ref, exact=True)


def test_qwen2_source_coarse_topk_then_softmax_is_qwen2_moe(tmp_path):
    model = _llama(model="qwen2", layers=2)
    moe, hf, _ = _export_and_load(model, _spec(4, 1, 2, "softmax_then_topk"), tmp_path)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    _same_logits(moe, hf)


def test_mistral_sliding_window_to_mixtral(tmp_path):
    model = _llama(model="mistral", layers=2)
    ref = _dense_ref(model)
    moe, hf, _ = _export_and_load(model, _spec(2, 1, 1, "topk_then_softmax"), tmp_path)
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.sliding_window == 8
    _same_logits(moe, hf, ref, exact=True)


def test_architecture_without_moe_format_is_one_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = compile_upcycle(model, _spec(2, 1, 1, "topk_then_softmax", verify={"probe_tokens": 32}))
    with pytest.raises(ExportError) as info:
        hf_export_plan(moe)
    msg = str(info.value)
    assert "\n" not in msg and "GPT2LMHeadModel" in msg and "no transformers MoE format" in msg


def test_mixtral_target_refused_where_it_does_not_fit(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = compile_upcycle(_llama(layers=2), _spec(2, 2, 2, "softmax_then_topk"))
    with pytest.raises(ExportError, match="--target mixtral: Mixtral.s router is topk_then_softmax only"):
        export_hf(moe, tmp_path / "x", target="mixtral")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ CLI

def _write_spec(tmp_path, spec):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return str(p)


def test_cli_format_hf(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "dense"
    _llama(layers=2).save_pretrained(src)
    out = tmp_path / "out"
    rc = run([_write_spec(tmp_path, _spec(2, 4, 4, "softmax_then_topk")), str(src), "-o", str(out), "--format", "hf",
              "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert (out / "upcycle_spec.yaml").is_file() and (out / "report.json").is_file()


def test_cli_format_hf_unsupported_keeps_native(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from upcycle.compiler.saving import load

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)).save_pretrained(src)
    out = tmp_path / "out"
    rc = run([_write_spec(tmp_path, _spec(2, 1, 1, "topk_then_softmax", verify={"probe_tokens": 32})), str(src), "-o", str(out), "--format", "hf",
              "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 2 and len(err) == 1 and "no transformers MoE format" in err[0] and "native format" in err[0]
    assert (out / "upcycle.json").is_file()
    load(out)  # the native output is complete


@pytest.mark.parametrize("spec", [_spec(4, 1, 2, "topk_then_softmax"), _spec(4, 2, 2, "softmax_then_topk")],
                         ids=["mixtral", "qwen2_moe"])
def test_export_trains_with_the_same_router_pressure(spec, tmp_path):
    """output_router_logits is on and router_aux_loss_coef is converted (transformers averages the
    pooled load over layers and counts K slots per token; we sum per layer): with one MoE layer the
    router gradients of a training step agree exactly."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = compile_upcycle(_llama(layers=1), spec)
    layer = moe.model.layers[0].mlp
    with torch.no_grad():  # an uneven router, so the balancing gradient is not ~0
        layer.router.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    out = export_hf(moe, tmp_path / "hf", spec=spec)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["output_router_logits"] is True
    assert cfg["router_aux_loss_coef"] == pytest.approx(0.01 * 1 / 2)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).train()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    moe.train()
    moe(input_ids=ids, labels=ids).loss.backward()
    hf(input_ids=ids, labels=ids).loss.backward()
    ours, theirs = layer.router.weight.grad, hf.model.layers[0].mlp.gate.weight.grad
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-6)
    hf.zero_grad()  # and the balancing part is really there: without it the gradients differ
    hf.config.router_aux_loss_coef = 0.0
    hf.router_aux_loss_coef = 0.0
    hf(input_ids=ids, labels=ids).loss.backward()
    assert (hf.model.layers[0].mlp.gate.weight.grad - ours).abs().max() > 1e-5


def test_export_refuses_a_trained_routing_bias(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = _spec(4, 1, 2, "topk_then_softmax")
        spec["router"]["balancing"] = "bias"
        moe = compile_upcycle(_llama(layers=2), spec)
    assert hf_export_plan(moe).target.name == "mixtral"  # an untouched (zero) bias exports
    with torch.no_grad():
        moe.model.layers[1].mlp.router.expert_bias[0] = 0.01
    with pytest.raises(ExportError, match="model.layers.1.mlp routes with a trained aux-loss-free bias"):
        hf_export_plan(moe)


@pytest.mark.parametrize("spec", [_spec(4, 1, 2, "topk_then_softmax"), _spec(4, 2, 2, "softmax_then_topk"),
                                  _spec(4, 2, 2, "softmax_then_topk", layers=[1])],
                         ids=["mixtral", "qwen2_moe", "qwen2_moe_mixed"])
def test_export_and_native_save_keep_expert_and_router_order(spec, tmp_path):
    """Experts and router rows made distinct by index (tests/_perturb.py): an exporter or saver that
    reorders them changes the logits."""
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    import upcycle

    sys.path.insert(0, str(Path(__file__).parent))
    from _perturb import perturb_by_index

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = perturb_by_index(compile_upcycle(_llama(layers=2), spec)).eval()
    hf = AutoModelForCausalLM.from_pretrained(str(export_hf(moe, tmp_path / "hf", spec=spec)), dtype=torch.float32).eval()
    upcycle.save(moe, tmp_path / "native", spec=spec)
    native = upcycle.load(tmp_path / "native").eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = moe(input_ids=ids).logits
        torch.testing.assert_close(hf(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(native(input_ids=ids).logits, want, rtol=0, atol=0)
        # the perturbation is visible: swapping two experts changes the output
        layer = moe.model.layers[1].mlp
        layer.experts.up_proj[[0, 1]] = layer.experts.up_proj[[1, 0]].clone()
        assert (moe(input_ids=ids).logits - want).abs().max() > 1e-4


# --- streaming export: the same bytes as the in-memory export ---------------------------------------

STREAM_SPECS = {
    "mixtral": _spec(4, 1, 2, "topk_then_softmax"),
    "qwen2_moe_fine": _spec(4, 2, 2, "softmax_then_topk"),
    "qwen2_moe_mixed_layers": _spec(4, 2, 2, "softmax_then_topk", layers=[1, 2]),
    "qwen2_moe_shared": _spec(2, 4, 2, "softmax_then_topk", experts={"shared_experts": 1}),
    # every expert and router row distinct: a reordering would change the bytes
    "distinct": {**_spec(4, 2, 2, "softmax_then_topk", experts={"drop_upcycling": 0.5}),
                 "router": {"type": "softmax_then_topk", "init": "random", "selection": "topk"}},
}


@pytest.mark.parametrize("source", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(STREAM_SPECS))
def test_streamed_export_is_byte_identical_to_in_memory(tmp_path, name, source):
    from transformers import AutoModelForCausalLM

    from upcycle.compiler.loading import load_model
    from upcycle.compiler.pipeline import upcycle_model
    from upcycle.compiler.streaming import stream_upcycle

    if source == "qwen2" and name != "distinct":
        pytest.skip("one Qwen2 case (q/k/v biases travel) is enough")
    spec = STREAM_SPECS[name]
    src = tmp_path / "dense"
    _llama(layers=4, model=source).save_pretrained(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = upcycle_model(load_model(src).model, spec)
        export_hf(res.model, tmp_path / "mem", spec=spec, max_shard_bytes=60_000)
        streamed = stream_upcycle(spec, src, tmp_path / "stream", fmt="hf", max_shard_bytes=60_000)
    mem_files = sorted(p.name for p in (tmp_path / "mem").iterdir() if p.name.startswith("model"))
    assert len(mem_files) > 2  # several shards and an index
    assert mem_files == sorted(p.name for p in (tmp_path / "stream").iterdir() if p.name.startswith("model"))
    for f in mem_files + ["config.json"]:
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "stream" / f).read_bytes(), f
    acc = streamed.manifest["tensors"]  # every input tensor accounted for
    assert "model.layers.1.mlp.up_proj.weight" in acc["transformed"] and "model.embed_tokens.weight" in acc["copied"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "stream"), dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, res.model.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_cli_stream_format_hf(tmp_path, capsys):
    src = tmp_path / "dense"
    _llama(layers=2).save_pretrained(src)
    assert run(["e8g1t2", str(src), "-o", str(tmp_path / "out"), "--stream", "--format", "hf", "--no-progress"]) == 0
    assert "transformers format; streamed" in capsys.readouterr().out
    # the default e8g1t2 (topk_then_softmax) is Mixtral's routing; the paper's softmax_then_topk keeps
    # unnormalised top-K weights: Qwen2-MoE with norm_topk_prob off
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mixtral"
    assert run(["paper-e8g1t2", str(src), "-o", str(tmp_path / "paper"), "--stream", "--format", "hf",
                "--no-progress"]) == 0
    paper = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert paper["model_type"] == "qwen2_moe" and paper["norm_topk_prob"] is False
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB))
    gpt2.save_pretrained(tmp_path / "gpt2")
    code = run(["e8g1t2", str(tmp_path / "gpt2"), "-o", str(tmp_path / "g"), "--stream", "--format", "hf", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no transformers MoE format" in err and "wrote the native format" in err
    assert (tmp_path / "g" / "upcycle.json").is_file()
