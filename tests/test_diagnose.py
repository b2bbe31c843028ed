"""experiments/diagnose.py --quick: the fast diagnostic's pipeline end to end (tiny Llama on bytes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_diagnose_quick_runs_and_reports(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "diagnose.py"), "--quick", "--out", str(tmp_path),
           "--only", "dense", "recipe", "per_slice", "per_slice_relax50", "e8g1t2_output", "e8g1t2_tks_kmeans",
           "e8g2t1_shared1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    assert "| dense continued |" in table and "per-slice selection" in table
    per_slice = json.loads((tmp_path / "per_slice.json").read_text())
    # per_slice routing always hands tokens complete MLPs; the telemetry says so at every step
    assert all(r["complete_mlp_fraction"] == 1.0 for r in per_slice["rows"] if "complete_mlp_fraction" in r)
    relaxed = json.loads((tmp_path / "per_slice_relax50.json").read_text())
    (switch,) = [r for r in relaxed["rows"] if r.get("relaxed")]
    assert switch["step"] == 3 and "val_after_relax" in switch
    # k-means routers cluster training text (no fall-back to virtual groups); both start exactly at dense
    assert "kmeans needs the MLP's inputs" not in out.stderr
    start = {n: json.loads((tmp_path / f"{n}.json").read_text())["rows"][0]["val_loss"]
             for n in ("dense", "e8g1t2_tks_kmeans", "e8g2t1_shared1")}
    assert abs(start["e8g1t2_tks_kmeans"] - start["dense"]) < 1e-4 and abs(start["e8g2t1_shared1"] - start["dense"]) < 1e-4
    # a second call skips what is finished
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0 and "step 0 val" not in again.stdout


def _diagnose():
    sys.path.insert(0, str(ROOT / "experiments"))
    import diagnose

    return diagnose


def test_adam_step_size_is_one_for_a_steady_gradient_and_small_for_noise():
    import torch

    d = _diagnose()

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            block = torch.nn.Module()  # named like a transformers layer: layers.0.mlp.up_proj.weight
            block.mlp = torch.nn.Module()
            block.mlp.up_proj = torch.nn.Linear(64, 64, bias=False)
            self.layers = torch.nn.ModuleList([block])
            self.attn = torch.nn.Linear(64, 64, bias=False)  # not an MLP weight: left out

    def run(noise: bool) -> float:
        torch.manual_seed(0)
        m = Tiny()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=d.ADAM_BETAS, eps=d.ADAM_EPS)
        for _ in range(50):
            for p in m.parameters():
                p.grad = torch.randn_like(p) if noise else torch.full_like(p, 0.5)
            opt.step()
        return d.adam_step_size(m, opt, 50)["adam_step_mlp"]

    assert abs(run(noise=False) - 1.0) < 1e-3  # a gradient that never changes: full-size steps
    assert 0.1 < run(noise=True) < 0.35  # pure noise: ~0.23


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def test_expert_lr_multiplier_reaches_only_the_routed_experts():
    import upcycle

    d = _diagnose()
    dense = _tiny_llama()
    model = upcycle.compile_upcycle(dense, d._merge({"router": {"selection": "per_slice", "type": "topk_then_softmax"}}))
    v = next(v for v in d.VARIANTS if v.name == "per_slice_tks_elr2.8")
    opts = d.Options()
    opt = d.optimizer(model, v, opts)
    d.set_lr(opt, opts.warmup, v, opts)
    experts = {id(p) for n, p in model.named_parameters() if ".experts." in n}
    for g in opt.param_groups:
        is_experts = all(id(p) in experts for p in g["params"])
        assert g["lr"] == pytest.approx(opts.lr * (8 ** 0.5 if is_experts else 1.0))
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_lr_multiplier_scales_every_group_of_the_dense_twin_and_the_moe_alike():
    import upcycle

    d = _diagnose()
    opts = d.Options()
    for name in ("dense_lr2.5", "per_slice_tks_lr2.5"):
        v = next(v for v in d.VARIANTS if v.name == name)
        model = _tiny_llama() if v.spec is None else upcycle.compile_upcycle(_tiny_llama(), d._merge(v.spec))
        opt = d.optimizer(model, v, opts)
        if v.spec is not None:  # the MoE's router and routed experts have groups of their own: scaled too
            assert any(g.get("router") for g in opt.param_groups) and len(opt.param_groups) > 3
        assert d.set_lr(opt, opts.warmup, v, opts) == pytest.approx(2.5 * opts.lr)
        assert all(g["lr"] == pytest.approx(2.5 * opts.lr) for g in opt.param_groups)
        assert d.set_lr(opt, 0, v, opts) == pytest.approx(2.5 * opts.lr / opts.warmup)  # the warm-up scales too
