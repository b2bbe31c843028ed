"""Real text for the checks (`--calibration FILE`, `compile_upcycle(..., calibration=)`): tokenized
with the model's own tokenizer, it is the probe for per-layer verification and k-means and gives
the perplexity before/after, the same in memory and streaming."""

import math
import subprocess
import sys
import warnings

import pytest
import torch

from upcycle import compile_upcycle
from upcycle.compiler.calibration import calibration_batch
from upcycle.compiler.cli import run
from upcycle.compiler.loading import load_model
from upcycle.compiler.pipeline import upcycle_model
from upcycle.compiler.streaming import stream_upcycle

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
        "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
        "and God divided the light from the darkness. ") * 4
OTHER = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. " * 6


def tiny_tokenizer():
    """A character-level fast tokenizer of < 96 ids, built offline (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(TEXT + OTHER) - {" "})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) <= 96
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      max_position_embeddings=64, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("calib") / "dense"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    (path.parent / "text.txt").write_text(TEXT)
    return path


KMEANS = {"experts": {"expansion": 4, "granularity": 2, "top_k": 2}, "router": {"init": "kmeans"},
          "verify": {"probe_tokens": 128}}


def _dense_ppl(path, ids):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        logits = dense(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
    return math.exp(float(loss))


def test_batch_is_the_text_tokenized_in_rows():
    from transformers import LlamaConfig

    tok = tiny_tokenizer()
    b = calibration_batch(TEXT, tokenizer=tok, config=LlamaConfig(max_position_embeddings=48, vocab_size=96), tokens=100)
    assert b.input_ids.shape == (2, 48)  # rows no longer than the position table, at most `tokens` in all
    assert b.input_ids.flatten().tolist() == tok(TEXT)["input_ids"][:96]
    assert "96 tokens" in b.description


def test_in_memory_calibration_drives_probe_kmeans_and_perplexity(src):
    loaded = load_model(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = upcycle_model(loaded.model, KMEANS, calibration=TEXT)  # the tokenizer beside the checkpoint
    rep = res.report
    assert rep.probe.startswith("calibration text (128 tokens")
    ids = calibration_batch(TEXT, tokenizer=tiny_tokenizer(), config=res.model.config, tokens=128).input_ids
    assert rep.perplexity_before == pytest.approx(_dense_ppl(src, ids), rel=1e-5)
    assert rep.perplexity_after is not None and "perplexity on the calibration text" in rep.to_text()
    routers = {}
    for name, text in (("text", TEXT), ("other", OTHER), ("random", None)):
        model = load_model(src).model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            moe = compile_upcycle(model, KMEANS, calibration=text, tokenizer=tiny_tokenizer() if text else None)
        routers[name] = moe.model.layers[0].mlp.router.weight.detach().clone()
    torch.testing.assert_close(routers["text"], res.model.model.layers[0].mlp.router.weight)  # same text, same init
    assert not torch.equal(routers["text"], routers["other"]) and not torch.equal(routers["text"], routers["random"])


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_streaming_calibration_equals_in_memory(src, tmp_path, fmt):
    """Module-by-module forwards give the streamed conversion the same per-layer errors, k-means
    routers, whole-model error and perplexities as the in-memory one."""
    import upcycle
    from upcycle.compiler.export_hf import export_hf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mem = upcycle_model(load_model(src).model, KMEANS, calibration=TEXT)
        streamed = stream_upcycle(KMEANS, src, tmp_path / "s", calibration=TEXT, fmt=fmt)
    a, b = mem.report, streamed.report
    assert b.probe == a.probe
    assert b.perplexity_before == pytest.approx(a.perplexity_before, rel=1e-5)
    assert b.perplexity_after == pytest.approx(a.perplexity_after, rel=1e-5)
    assert b.model_rel_error == pytest.approx(a.model_rel_error, rel=1e-4, abs=1e-7)
    assert [c["rel_error"] for c in b.layers] == pytest.approx([c["rel_error"] for c in a.layers], rel=1e-5)
    if fmt == "native":
        got = upcycle.load(tmp_path / "s").state_dict()
        for k, v in mem.model.state_dict().items():
            assert torch.equal(got[k], v), k  # k-means on the same hidden states: the same routers
    else:
        export_hf(mem.model, tmp_path / "m", spec=KMEANS)
        for f in ("model.safetensors", "config.json"):
            assert (tmp_path / "m" / f).read_bytes() == (tmp_path / "s" / f).read_bytes(), f


def test_cli_calibration_in_memory_and_streaming(src, tmp_path, capsys):
    text = str(src.parent / "text.txt")
    for flags in ([], ["--no-stream"]):
        out = tmp_path / ("o" + "".join(flags))
        assert run(["e8g1t2", str(src), "-o", str(out), "--calibration", text, "--no-progress", *flags]) == 0
        printed = capsys.readouterr().out
        assert "perplexity on the calibration text: dense" in printed and "calibration text.txt" in printed


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "upcycle.compiler.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_calibration_errors_are_one_line(src, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((src / f).read_bytes())
    for args, needle in ([(str(src), "--calibration", str(tmp_path / "nope.txt")), "no such file"],
                         [(str(src), "--calibration", str(empty)), "is empty"],
                         [(str(no_tok), "--calibration", str(src.parent / "text.txt")), "needs the model's tokenizer"]):
        r = _cli("e8g1t2", *args, "-o", str(tmp_path / "out"))
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_streaming_calibration_through_a_rewritten_unit(tmp_path):
    """GPT-2's MLP is inline in its block: the rewrite turns the block into a GraphModule unit, which
    the module-by-module forward materialises whole (its MoE layer from the mapping)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    sp = {"experts": {"expansion": 2, "granularity": 1, "top_k": 1}, "router": {"type": "topk_then_softmax"},
          "verify": {"probe_tokens": 64}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mem = upcycle_model(load_model(path).model, sp, calibration=TEXT)
        streamed = stream_upcycle(sp, path, tmp_path / "s", calibration=TEXT)
    a, b = mem.report, streamed.report
    assert a.probe.startswith("calibration") and b.probe == a.probe
    assert b.perplexity_before == pytest.approx(a.perplexity_before, rel=1e-5)
    assert b.perplexity_after == pytest.approx(a.perplexity_after, rel=1e-5)
    assert a.perplexity_after == pytest.approx(a.perplexity_before, rel=1e-4)  # exact spec: the same model
