"""torch.compile over MoE layers: one graph (fullgraph=True), dynamic token counts without
recompiling, and the same numbers as eager (forward, aux loss, every gradient).

The grouped backend is one opaque custom op per direction with static output shapes, so routing
never makes a data-dependent shape in the graph; the aux-loss attribute write is a side effect
Dynamo replays after the graph.
"""

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from torch._dynamo.utils import counters

from upcycle.runtime import MoEConfig, aux_loss, build_moe


class TinyMoEModel(nn.Module):
    """Embedding -> a few residual MoE blocks -> head."""

    def __init__(self, cfg: MoEConfig, n_layers: int = 3, vocab: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.blocks = nn.ModuleList([build_moe(cfg) for _ in range(n_layers)])
        self.head = nn.Linear(cfg.d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # [B, T, D]
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _model(**overrides):
    torch.manual_seed(0)
    cfg = dict(d_model=24, d_expert=40, num_experts=6, top_k=2, gated=True, activation="silu",
               backend="grouped", first_bias=True, output_bias=True)
    cfg.update(overrides)
    model = TinyMoEModel(MoEConfig(**cfg))
    for p in model.parameters():  # larger than init, so the experts matter in the output
        nn.init.normal_(p, std=0.3)
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = logits.square().mean()  # router losses are attached in autograd by each layer
    loss.backward()
    return [logits.detach(), loss.detach()] + [p.grad.clone() for p in model.parameters()]


def _close(a, b, tol=1e-5):
    scale = b.abs().max().clamp_min(1e-12)
    return ((a - b).abs().max() / scale).item() <= tol


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "relu2")], ids=["swiglu", "relu2"])
def test_compiled_training_matches_eager_without_recompiles(gated, activation, fresh_dynamo):
    model = _model(gated=gated, activation=activation)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tokens in (16, 23, 37):
            ids = torch.randint(0, 64, (2, tokens), generator=g)
            torch._dynamo.mark_dynamic(ids, 1)
            got = _step(compiled, ids)
            want = _step(model, ids)
            for i, (a, b) in enumerate(zip(got, want)):
                assert _close(a, b), f"output {i} differs at {tokens} tokens"
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_compiled_eval_no_grad(fresh_dynamo):
    model = _model().eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for tokens in (8, 29):
            ids = torch.randint(0, 64, (1, tokens))
            torch._dynamo.mark_dynamic(ids, 1)
            assert _close(compiled(ids), model(ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a GPU")
def test_compiled_triton_backend_matches_eager(fresh_dynamo):
    """triton_op kernels: torch.compile traces through the launches (fullgraph, dynamic tokens)."""
    model = _model(backend="triton").cuda()
    compiled = torch.compile(model, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tokens in (16, 23, 37):
            ids = torch.randint(0, 64, (2, tokens), device="cuda")
            torch._dynamo.mark_dynamic(ids, 1)
            got, want = _step(compiled, ids), _step(model, ids)
            for i, (a, b) in enumerate(zip(got, want)):
                assert _close(a, b, 1e-4), f"output {i} differs at {tokens} tokens"
