"""Nothing lost on the way out: save_pretrained / Trainer checkpoints reload as the MoE, plain
transformers refuses them loudly, tokenizers and generation configs travel into every output, MoE
inputs get one clear line, --dtype."""

import json

import pytest
import torch

import upcycle
from upcycle import compile_upcycle
from upcycle.compiler.cli import run
from upcycle.compiler.errors import ModelError

SPEC = {"experts": {"expansion": 4, "granularity": 2, "top_k": 2}}
TEXT = "In the beginning God created the heaven and the earth."


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _tokenizer():
    """A small real byte-level BPE tokenizer, trained here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False)
    tok.train_from_iterator([TEXT * 3, "and the earth was without form, and void"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture
def dense_dir(tmp_path):
    """A dense transformers checkpoint folder with its tokenizer and generation config."""
    model = _tiny_llama()
    model.generation_config.max_new_tokens = 7
    path = tmp_path / "dense"
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _ids(n=12):
    return torch.randint(3, 96, (2, n), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_pretrained_reloads_as_the_moe_and_plain_transformers_refuses_it(tmp_path):
    from transformers import AutoModelForCausalLM

    model = compile_upcycle(_tiny_llama(), SPEC)
    with torch.no_grad():  # move off the init so a dense reload could not match by accident
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = _ids()
    model.save_pretrained(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["model_type"] == "upcycle" and cfg["upcycle"]["base_model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    reloaded = upcycle.load(tmp_path / "saved")
    assert torch.equal(_logits(reloaded, ids), _logits(model.eval(), ids))
    with pytest.raises(Exception) as info:  # never a silent dense model
        AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert "upcycle" in str(info.value)
    # a reloaded model saves the same way (marking is idempotent) and reloads again
    reloaded.save_pretrained(tmp_path / "again")
    assert torch.equal(_logits(upcycle.load(tmp_path / "again"), ids), _logits(model, ids))


def test_trainer_checkpoint_reloads_as_the_trained_moe(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = compile_upcycle(_tiny_llama(), SPEC)
    ids = torch.randint(3, 96, (16, 12), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model=model, args=args, train_dataset=data).train()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "experts" in k)
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "upcycle"
    reloaded = upcycle.load(ckpt)
    probe = _ids()
    assert torch.equal(_logits(reloaded, probe), _logits(model.eval(), probe))
    # resuming from that checkpoint, as for any model: a fresh upcycled model continues from step 4
    fresh = compile_upcycle(_tiny_llama(), SPEC)
    more = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, save_steps=100, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True)
    trainer = Trainer(model=fresh, args=more, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 6


def _same_encoding(src, out):
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    assert a(TEXT)["input_ids"] and a(TEXT)["input_ids"] == b(TEXT)["input_ids"]


@pytest.mark.parametrize("flags", [[], ["--stream"], ["--format", "hf"], ["--stream", "--format", "hf"]])
def test_tokenizer_and_generation_config_travel_into_every_cli_output(dense_dir, tmp_path, flags):
    out = tmp_path / "out"
    assert run(["e8g1t2", str(dense_dir), "-o", str(out), "--no-progress", *flags]) == 0
    _same_encoding(dense_dir, out)
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7


def test_upcycle_save_from_python_carries_tokenizer_and_generation_config(dense_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense_dir)
    moe = compile_upcycle(model, SPEC)
    upcycle.save(moe, tmp_path / "native", spec=SPEC)
    _same_encoding(dense_dir, tmp_path / "native")
    assert json.loads((tmp_path / "native" / "generation_config.json").read_text())["max_new_tokens"] == 7
    upcycle.save(moe, tmp_path / "given", spec=SPEC, tokenizer=_tokenizer())  # an explicit tokenizer wins
    _same_encoding(dense_dir, tmp_path / "given")


def test_moe_inputs_get_one_clear_line(dense_dir, tmp_path, capsys):
    from transformers import MixtralConfig, MixtralForCausalLM

    native, hf = tmp_path / "native", tmp_path / "hf"
    assert run(["e8g1t2", str(dense_dir), "-o", str(native), "--no-progress"]) == 0
    assert run(["paper-e8g1t2", str(dense_dir), "-o", str(hf), "--no-progress", "--format", "hf"]) == 0
    mixtral = tmp_path / "mixtral"
    MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=96, num_local_experts=4)).save_pretrained(mixtral)
    capsys.readouterr()
    for path, words in ((native, "already an MoE (an upcycle output"), (hf, "already an MoE (qwen2_moe with 8 experts"),
                        (mixtral, "already an MoE (mixtral with 4 experts")):
        for stream in ([], ["--stream"]):
            assert run(["e8g1t2", str(path), "-o", str(tmp_path / "again"), *stream]) != 0
            err = capsys.readouterr().err.strip()
            assert words in err and len(err.splitlines()) == 1, err
    with pytest.raises(ModelError, match="already an MoE"):
        upcycle.compiler.loading.load_model(native)


@pytest.mark.parametrize("flags", [[], ["--stream"], ["--format", "hf"], ["--stream", "--format", "hf"]])
def test_output_dtype(dense_dir, tmp_path, flags):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    assert run(["e8g1t2", str(dense_dir), "-o", str(out), "--no-progress", "--dtype", "bf16", *flags]) == 0
    dtypes = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                dtypes[k] = st.get_slice(k).get_dtype()
    router = {k for k in dtypes if k.endswith("router.weight")}
    assert {dtypes[k] for k in dtypes if k not in router} == {"BF16"}
    if "--format" not in flags:  # native: the router stays fp32 (routing decisions in fp32)
        assert router and {dtypes[k] for k in router} == {"F32"}
        model = upcycle.load(out)
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_qwen2_moe_export_loads_without_warnings(dense_dir, tmp_path):
    import warnings

    from transformers import AutoModelForCausalLM

    # the paper's router (softmax_then_topk) goes to Qwen2-MoE; the default e8g1t2 to Mixtral
    assert run(["paper-e8g1t2", str(dense_dir), "-o", str(tmp_path / "hf"), "--no-progress", "--format", "hf"]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert not [w for w in caught if "zero-element" in str(w.message)]
    assert all(float(p.abs().max()) == 0 for n, p in hf.named_parameters() if ".shared_expert." in n)


def test_upcycled_model_pickles_and_deepcopies():
    import copy
    import io

    model = compile_upcycle(_tiny_llama(), SPEC)
    ids = _ids()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(model)
    for m in (again, twin):
        assert type(m).__name__ == "LlamaForCausalLM" and hasattr(type(m), "_upcycle_marked")
        assert torch.equal(_logits(m, ids), _logits(model, ids))
