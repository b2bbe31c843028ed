"""Upcycling across architectures: MLP modules, MLPs inline in a decoder layer, MLPs spread over
sibling modules, fused GLU projections, encoder-decoder models, and user-written blocks.

For each tiny random model (seeded, fp32, eval): the number of MoE layers equals the number of
MLPs, and with topk_then_softmax at G=1 (and G=T=4 for gated MLPs) the upcycled model's outputs
equal the dense model's (max abs <= 1e-5).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

import upcycle
from upcycle.compiler.errors import ModelError
from upcycle.passes.discover import discover_mlps
from upcycle.runtime.moe import MoELayer

EXACT_G1 = {"experts": {"expansion": 4, "granularity": 1, "top_k": 2}, "router": {"type": "topk_then_softmax"},
            "verify": {"probe_tokens": 16}, "runtime": {"backend": "reference"}}
EXACT_G4 = {"experts": {"expansion": 4, "granularity": 4, "top_k": 4}, "router": {"type": "topk_then_softmax"},
            "verify": {"probe_tokens": 16}, "runtime": {"backend": "reference"}}

D, FF, V = 32, 64, 96
_common = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _t5(**kw):
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=D, d_ff=FF, d_kv=8, num_layers=2,
                                                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                                   pad_token_id=0, eos_token_id=1, **kw))


# name: (builder, number of MLPs, gated?, input kind)
HF_MODELS = {
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**_common, num_key_value_heads=2)), 2, True, "lm"),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_common, num_key_value_heads=2)), 2, True, "lm"),
    "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**_common, num_key_value_heads=2)), 2, True, "lm"),
    "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(**_common, num_key_value_heads=2)), 2, True, "lm"),
    "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**_common, num_key_value_heads=2, head_dim=8)), 2, True, "lm"),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=64,
                                                    bos_token_id=1, eos_token_id=2)), 2, False, "lm"),
    "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_common)), 2, False, "lm"),
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=D, ffn_dim=FF, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=64,
                                                 word_embed_proj_dim=D, bos_token_id=1, eos_token_id=2,
                                                 pad_token_id=0)), 2, False, "lm"),
    "bert": (lambda: T.BertModel(T.BertConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=64)), 2, False, "lm"),
    "t5": (lambda: _t5(), 4, False, "seq2seq"),
    "t5_gated_gelu": (lambda: _t5(feed_forward_proj="gated-gelu"), 4, True, "seq2seq"),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster, and immune to OpenMP stalls on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 7), generator=g)
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, V, (2, 5), generator=g)}
    return {"input_ids": ids}


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _n_moe(model) -> int:
    return sum(isinstance(m, MoELayer) for m in model.modules())


def _build(builder):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder().eval()


def _check(dense, inputs, spec, n_mlps, example_inputs=None):
    ref = _out(dense, inputs)
    model = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moe = upcycle.compile_upcycle(model, spec, example_inputs=example_inputs)
    assert _n_moe(moe) == n_mlps
    err = (_out(moe.eval(), inputs) - ref).abs().max().item()
    assert err <= 1e-5, err
    return moe


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_transformers_models_exact(name):
    builder, n_mlps, gated, kind = HF_MODELS[name]
    dense = _build(builder)
    inputs = _inputs(kind)
    assert len(discover_mlps(dense).mlps) == n_mlps
    _check(dense, inputs, EXACT_G1, n_mlps)
    if gated:
        _check(dense, inputs, EXACT_G4, n_mlps)


def test_opt_inline_mlp_keeps_layer_class_and_readable_names():
    """fc1/fc2 are inline in OPTDecoderLayer.forward: the layer's graph is rewritten and installed
    as that instance's forward, so the layer stays an OPTDecoderLayer (transformers records hidden
    states by hooks on that class) and only fc1/fc2 leave the state dict."""
    dense = _build(HF_MODELS["opt"][0])
    inputs = _inputs("lm")
    moe = _check(dense, inputs, EXACT_G1, 2)
    layer = moe.model.decoder.layers[0]
    assert type(layer).__name__ == "OPTDecoderLayer" and isinstance(layer.moe, MoELayer)
    keys = set(moe.state_dict())
    assert "model.decoder.layers.0.moe.router.weight" in keys
    assert "model.decoder.layers.0.self_attn.q_proj.weight" in keys
    assert not any(".fc1." in k or ".fc2." in k for k in keys)
    # (before output_hidden_states: transformers then leaves unpicklable hooks on the model)
    # pickling keeps the rewritten forward (a bound method would fall back to the dense class forward)
    buf = io.BytesIO()
    torch.save(moe, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert (_out(again, inputs) - _out(moe, inputs)).abs().max().item() == 0
    with torch.no_grad():
        a = dense(**inputs, output_hidden_states=True)
        b = moe(**inputs, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states)
    assert max((x - y).abs().max().item() for x, y in zip(a.hidden_states, b.hidden_states)) <= 1e-5
    # cached generation goes through the same rewritten forward
    ids = inputs["input_ids"][:1]
    with torch.no_grad():
        ga = dense.generate(ids, max_new_tokens=4, do_sample=False)
        gb = moe.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(ga, gb)


def test_bert_mlp_across_sibling_modules():
    """BertIntermediate.dense → act → BertOutput.dense (then dropout, residual, LayerNorm inside
    BertOutput): the MLP is found in BertLayer's graph; the residual and LayerNorm stay."""
    dense = _build(HF_MODELS["bert"][0])
    moe = _check(dense, _inputs("lm"), EXACT_G1, 2)
    keys = set(moe.state_dict())
    assert "encoder.layer.0.moe.router.weight" in keys and "encoder.layer.0.output.LayerNorm.weight" in keys
    assert not any("intermediate.dense" in k or "output.dense" in k for k in keys if "attention" not in k)
    assert type(moe.encoder.layer[0]).__name__ == "BertLayer"


def test_dropout_in_rewritten_layer_follows_train_mode():
    """OPT applies F.dropout(training=self.training) around its attention: traced in eval mode that
    would freeze to False; the rewritten layer reads the flag at run time."""
    torch.manual_seed(0)
    cfg = T.OPTConfig(vocab_size=V, hidden_size=D, ffn_dim=FF, num_hidden_layers=1, num_attention_heads=4,
                      max_position_embeddings=64, word_embed_proj_dim=D, dropout=0.5)
    moe = upcycle.compile_upcycle(T.OPTForCausalLM(cfg).eval(), EXACT_G1)
    layer = moe.model.decoder.layers[0]
    x = torch.randn(2, 5, D)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
    layer.train()
    with torch.no_grad():
        assert not torch.equal(layer(x), layer(x))


# ------------------------------------------------------------------------------------------
# user-written blocks


class InlineBlock(nn.Module):
    """x + w_out(act(w_in(norm(x)))) written inline in the block."""

    def __init__(self, act):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.w_in = nn.Linear(D, FF)
        self.w_out = nn.Linear(FF, D)
        self.act = act

    def forward(self, x):
        return x + self.w_out(self.act(self.w_in(self.norm(x))))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(D, FF, bias=False)
        self.w2 = nn.Linear(FF, D, bias=False)
        self.w3 = nn.Linear(D, FF, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Relu2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, FF)
        self.down = nn.Linear(FF, D)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)) ** 2)


class Residual(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.ffn = mlp

    def forward(self, x):
        return x + self.ffn(self.ln(x))


class Net(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.emb = nn.Linear(8, D)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(D, 8)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _sequential():
    return nn.Sequential(nn.Linear(D, FF), nn.GELU(), nn.Linear(FF, D))


USER_MODELS = {
    "inline_block_gelu": (lambda: Net([InlineBlock(nn.GELU()), InlineBlock(nn.GELU())]), False),
    "inline_block_relu": (lambda: Net([InlineBlock(nn.ReLU()), InlineBlock(nn.ReLU())]), False),
    "w1_w2_w3": (lambda: Net([Residual(SwiGLU()), Residual(SwiGLU())]), True),
    "sequential": (lambda: Net([Residual(_sequential()), Residual(_sequential())]), False),
    "relu2": (lambda: Net([Residual(Relu2MLP()), Residual(Relu2MLP())]), False),
}


@pytest.mark.parametrize("name", list(USER_MODELS))
def test_user_blocks_exact(name):
    builder, gated = USER_MODELS[name]
    dense = _build(builder)
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(2))
    assert len(discover_mlps(dense).mlps) == 2
    _check(dense, x, EXACT_G1, 2, example_inputs=(x,))
    _check(dense, x, EXACT_G4, 2, example_inputs=(x,))


def test_user_module_names_stay_readable():
    dense = _build(USER_MODELS["inline_block_gelu"][0])
    x = torch.randn(2, 6, 8)
    moe = _check(dense, x, EXACT_G1, 2, example_inputs=(x,))
    keys = set(moe.state_dict())
    assert {"blocks.0.moe.router.weight", "blocks.0.norm.weight", "blocks.1.moe.router.weight"} <= keys
    assert not any("w_in" in k or "w_out" in k for k in keys)
    assert isinstance(moe.blocks[0], InlineBlock)

    dense = _build(USER_MODELS["sequential"][0])
    moe = _check(dense, x, EXACT_G1, 2, example_inputs=(x,))
    assert isinstance(moe.blocks[0].ffn, MoELayer)  # the whole Sequential is the MLP: swapped
    assert "blocks.0.ffn.router.weight" in moe.state_dict()


class DataDependent(nn.Module):
    """Control flow on a tensor value: FX cannot trace this block's own code."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, FF)
        self.fc2 = nn.Linear(FF, D)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.fc2(F.gelu(self.fc1(x)))


def test_untraceable_block_is_named_with_reason():
    model = _build(lambda: Net([DataDependent()]))
    disc = discover_mlps(model)
    assert not disc.mlps
    msg = "\n".join(disc.problems)
    assert "blocks.0: linears fc1, fc2 look like an MLP but the block did not trace" in msg
    assert "control flow" in msg
    assert "blocks.0" in disc.explain()
    with pytest.raises(ModelError, match="blocks.0: linears fc1, fc2 look like an MLP"):
        upcycle.compile_upcycle(model, EXACT_G1, example_inputs=(torch.randn(2, 8),))


def _defined_in_passes(obj) -> bool:
    """Whether `obj` (a class, function, hook or instance) comes from the compiler's rooms."""
    mod = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "")
    return (mod or "").startswith(("upcycle.passes", "passes.", "upcycle.compiler", "compiler."))


@pytest.mark.parametrize("family", ["gpt2", "opt", "bert"])
def test_trained_model_holds_nothing_from_passes(family):
    """A trained MoE needs the runtime, never the tracer or the compiler: no module class (nor a
    class it derives from: the save_pretrained subclass), forward, hook or object the generated
    forwards reference is defined in upcycle.passes or upcycle.compiler (GPT-2/OPT/BERT get
    rewritten graphs)."""
    import pickle

    import upcycle
    from upcycle.runtime.rewritten_forward import UpcycledForward

    model = upcycle.compile_upcycle(_build(HF_MODELS[family][0]), {"experts": {"expansion": 2, "granularity": 1, "top_k": 1},
                                                    "verify": {"enabled": False}})
    rewritten = 0
    for name, m in model.named_modules():
        assert not [c for c in type(m).__mro__ if _defined_in_passes(c)], name
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, UpcycledForward):
            rewritten += 1
            assert not _defined_in_passes(fwd)
            assert not [k for k, v in fwd._globals.items() if _defined_in_passes(v)], name
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks):
            assert not [h for h in hooks.values() if _defined_in_passes(h)], name
    # a pickle of the model names nothing of passes/ or compiler/ either
    data = pickle.dumps(model)
    assert b"upcycle.passes" not in data and b"upcycle.compiler" not in data
    again = pickle.loads(data)
    assert type(again).save_pretrained is type(model).save_pretrained
    assert rewritten >= 1  # the families whose MLP is not one module get a rewritten forward
