"""compile_upcycle end to end on tiny seeded models: exactness, selection, report, training."""

import pytest
import torch
import torch.nn as nn

from upcycle import aux_loss, compile_upcycle
from upcycle.compiler.errors import ModelError
from upcycle.compiler.pipeline import plan_upcycle, upcycle_model
from upcycle.runtime import MoELayer

EXACT = {"experts": {"expansion": 4, "granularity": 1, "top_k": 2}, "router": {"type": "topk_then_softmax"}}
EXACT_FINE = {"experts": {"expansion": 2, "granularity": 4, "top_k": 4}, "router": {"type": "topk_then_softmax"}}


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


class UserMLP(nn.Module):
    def __init__(self, d=16, f=48):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False), nn.Linear(d, f, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList([UserMLP(), nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))])
        self.head = nn.Linear(16, 50)

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


@pytest.mark.parametrize("spec", [EXACT, EXACT_FINE])
def test_llama_exact(tiny_llama, spec):
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = tiny_llama(input_ids=ids).logits
    model, report = compile_upcycle(tiny_llama, spec, return_report=True)
    assert len(moe_layers(model)) == 2
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - ref).abs().max() <= 1e-5
    assert all(c["exact_expected"] and c["passed"] and c["max_abs_error"] <= 1e-5 for c in report.layers)


@pytest.mark.parametrize("spec", [EXACT, EXACT_FINE])
def test_user_model_any_names_exact(spec):
    torch.manual_seed(0)
    model = UserModel().eval()
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        ref = model(ids)
    model = compile_upcycle(model, spec, example_inputs=(ids,))
    assert isinstance(model.blocks[0], MoELayer) and isinstance(model.blocks[1], MoELayer)
    with torch.no_grad():
        assert (model(ids) - ref).abs().max() <= 1e-5


def test_state_dict_names_and_stacked_layout(tiny_llama):
    model = compile_upcycle(tiny_llama, "e8g8t8")
    sd = model.state_dict()
    assert sd["model.layers.0.mlp.experts.gate_proj"].shape == (64, 8, 32)  # [N, F/G, D]
    assert sd["model.layers.0.mlp.experts.down_proj"].shape == (64, 32, 8)
    assert sd["model.layers.1.mlp.router.weight"].shape == (64, 32)
    assert not any("gate_proj.weight" in k for k in sd)


def test_report_shows_auto_scaling_beats_none(tiny_llama):
    _, report = compile_upcycle(tiny_llama, "e8g8t8", return_report=True)
    summary = report.summary()
    assert summary["mean_rel_error"] < summary["mean_rel_error_unscaled"]
    assert "scaling brings the MoE closer to the dense MLP" in report.to_text()
    assert report.loss_before is not None and report.loss_after is not None


def test_layer_selection_makes_mixed_model(tiny_llama):
    model = compile_upcycle(tiny_llama, {"layers": [1], "experts": {"expansion": 2, "granularity": 1, "top_k": 1}})
    assert not isinstance(model.model.layers[0].mlp, MoELayer)
    assert isinstance(model.model.layers[1].mlp, MoELayer)


def test_plan_counts_parameters(tiny_llama):
    plan = plan_upcycle(tiny_llama, "e8g8t8")
    assert [e.path for e in plan.entries] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    e = plan.entries[0]
    assert (e.kind, e.activation, e.d_model, e.d_ffn, e.num_experts, e.expert_width, e.top_k) == ("gated", "silu", 32, 64, 64, 8, 8)
    assert e.params == 3 * 32 * 64
    assert e.moe_params == 64 * 32 + 64 * 3 * 32 * 8  # router + experts
    assert e.moe_active_params == 64 * 32 + 8 * 3 * 32 * 8
    assert plan.params_after - plan.params_before == 2 * (e.moe_params - e.params)
    # nothing changed
    assert not moe_layers(tiny_llama)


def test_upcycled_model_trains_and_generates(tiny_llama):
    """A plain loop with only the model's loss: steps lower it, router and experts get gradients."""
    model = compile_upcycle(tiny_llama, "e8g1t2")
    model.train()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.item())
        if not losses[1:]:
            grads = [p.grad for n, p in model.named_parameters() if "experts" in n or "router" in n]
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses
    logged = aux_loss(model)
    assert float(logged) > 0 and not logged.requires_grad  # logging only
    model.eval()
    gen = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


def test_no_mlp_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ModelError, match="no MLP found in Sequential"):
        compile_upcycle(model, "e8g1t2")


def test_unsupported_activation_is_a_clear_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.b(torch.sin(self.a(x)))

    with pytest.raises(ModelError, match="unsupported activation"):
        compile_upcycle(Odd(), "e8g1t2")


def test_granularity_must_divide_dffn(tiny_llama):
    from upcycle.specs import SpecError

    with pytest.raises(SpecError, match="experts.granularity"):
        compile_upcycle(tiny_llama, {"experts": {"expansion": 2, "granularity": 3, "top_k": 3}})


def test_structure_only_replays_rewrite(tiny_llama):
    result = upcycle_model(tiny_llama, "e8g8t8", structure_only=True)
    assert len(moe_layers(result.model)) == 2 and result.report.layers == []


def test_probe_respects_short_position_tables():
    """OPT / BERT configs with 64 positions: the default probe must fit the position table."""
    from transformers import BertConfig, BertModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=96, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    bert = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=96, max_position_embeddings=64)).eval()
    for model in (opt, bert):
        moe, report = compile_upcycle(model, "e8g1t2", return_report=True)
        assert moe_layers(moe) and report.model_rel_error is not None  # the whole-model probe ran


def test_failing_probe_is_one_clear_error():
    class Broken(nn.Module):
        """8 learned positions and no config field saying so: random 128-token probes fail."""

        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"vocab_size": 50})()
            self.embed, self.pos = nn.Embedding(50, 16), nn.Embedding(8, 16)
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, input_ids):
            h = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
            return self.down(torch.relu(self.up(h)))

    with pytest.raises(ModelError, match=r"verification probe .* failed inside the model: IndexError.*example_inputs="):
        compile_upcycle(Broken(), "e8g1t2")
    moe = compile_upcycle(Broken(), "e8g1t2", example_inputs={"input_ids": torch.randint(0, 50, (2, 8))})
    assert moe_layers(moe)
