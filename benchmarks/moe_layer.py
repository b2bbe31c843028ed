"""Throughput and memory of one MoE layer, forward + backward, against an eager dense MLP and transformers.

Paths, all in the same run on the same inputs:
  dense            the eager dense MLP: SwiGLU of width K·H, the same active FLOPs as the MoE, no
                   router (for T = G it is the upcycled dense MLP itself). A reference point, not an
                   upper bound: a grouped path can beat it (E8G1T2 on CPU).
  auto             upcycle MoELayer with its default backend (what users get), eval-mode step
  auto:train       the same in train mode: aux loss 1e-2 attached in autograd, telemetry on
  reference        upcycle MoELayer, backend `reference` (loop over experts, torch.where per expert)
  grouped:<s>      upcycle MoELayer, backend `grouped`, strategy s (loop, grouped_mm, padded)
  triton           upcycle MoELayer, backend `triton` (CUDA only)
  hf:<impl>        transformers' Qwen2MoeSparseMoeBlock (norm_topk_prob=True: softmax, top-k, weights
                   renormalised = our default topk_then_softmax; shared expert width 0), loaded with the same router and
                   expert weights; experts implementation `eager` (its default) or `grouped_mm`.
  torchtitan       torchtitan's MoE layer (benchmarks/anchors.py) with the same weights and routing
                   rule; its experts run torch._grouped_mm in bf16 whatever the input dtype. Where
                   it does not import, the table says why (JSON "unavailable").
MoE paths include their router. Timings: one warm-up step per path, then `--repeats` rounds that
visit the paths in turn (so background load hits all paths alike). Throughput and ratios use the
median step (`--stat median`, the default; `--stat min` for the fastest), and the table shows the
spread (min–max). The summary compares `auto` (not the best of our paths) with the faster of
transformers' two paths.
Memory, two measures:
  saved_mb  bytes of tensors saved for backward (torch.autograd.graph.saved_tensors_hooks), without
            parameters and the layer input: the activation memory a model pays per layer. Exact.
  peak_mb   peak growth of allocated bytes during one fwd+bwd step: transient buffers and parameter
            gradients included. CPU: the running "Total Allocated" of torch.profiler's memory events
            (profile_memory=True; counts allocator requests, not RSS, so it does not depend on what
            the C allocator caches). CUDA: torch.cuda.max_memory_allocated growth.

With --profile, each path's step is also broken down into router, top-k, sort/permutation,
gathers, the GEMMs (forward, dX, dW), activation, combine and glue, with the host syncs per step
(benchmarks/layer_profile.py), printed and kept in the JSON under "profile".

    python benchmarks/moe_layer.py --quick --json out.json
    python benchmarks/moe_layer.py --quick --profile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from upcycle.runtime import MoEConfig, available_backends, build_moe
from upcycle.runtime.grouped import STRATEGIES, grouped_forward


@dataclass(frozen=True)
class Setting:
    name: str  # E8G8T8
    expansion: int
    granularity: int
    top_k: int
    d_model: int
    d_ffn: int
    tokens: int

    @property
    def num_experts(self) -> int:
        return self.expansion * self.granularity

    @property
    def d_expert(self) -> int:
        return self.d_ffn // self.granularity


MOE_NAMES = {"E8G8T8": (8, 8, 8), "E8G1T2": (8, 1, 2)}
D_FFN = {576: 1536, 2048: 5632}


# --- the paths -----------------------------------------------------------------------------------

class DenseSwiGLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GroupedStrategy(nn.Module):
    """Our MoELayer's router with the grouped backend pinned to one strategy."""

    def __init__(self, layer, strategy: str):
        super().__init__()
        self.layer, self.strategy = layer, strategy

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        route = self.layer.router(tokens)
        out = grouped_forward(self.layer.experts, tokens, route.indices, route.weights, self.strategy)
        return out.reshape(x.shape)


def hf_block(layer, impl: str):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    c = layer.config
    cfg = Qwen2MoeConfig(
        hidden_size=c.d_model, moe_intermediate_size=c.d_expert, num_experts=c.num_experts,
        num_experts_per_tok=c.top_k, norm_topk_prob=True, shared_expert_intermediate_size=0,
        hidden_act="silu",
    )
    cfg._experts_implementation = impl
    block = Qwen2MoeSparseMoeBlock(cfg)
    ex = layer.experts
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ex.gate_proj, ex.up_proj], dim=1))  # [N, 2H, D]
        block.experts.down_proj.copy_(ex.down_proj)  # [N, D, H]
        block.shared_expert_gate.weight.zero_()
    return block.to(device=layer.router.weight.device, dtype=ex.up_proj.dtype)


def build_paths(s: Setting, device, dtype, wanted):
    torch.manual_seed(0)
    # the default router type (top-K, then softmax over the kept logits); top-K selection for every
    # path, so the anchors route exactly as ours (per-slice selection costs one more topk view)
    cfg = MoEConfig(d_model=s.d_model, d_expert=s.d_expert, num_experts=s.num_experts, top_k=s.top_k,
                    gated=True, activation="silu", router_type="topk_then_softmax", aux_loss_coef=0.0)
    base = build_moe(cfg, device=device, dtype=dtype).eval()  # eval: no aux loss bookkeeping
    paths, unavailable = {}, {}

    def want(name):
        return any(name == w or name.startswith(w + ":") or w == "all" for w in wanted)

    if want("dense"):
        paths["dense"] = DenseSwiGLU(s.d_model, s.top_k * s.d_expert).to(device=device, dtype=dtype)
    if want("auto"):  # what a user gets: the layer with its default backend, inference-style step
        paths["auto"] = _layer_with_backend(base, "auto")
    if want("auto:train"):  # a training step: train mode, aux loss 1e-2 through autograd, telemetry on
        layer = _layer_with_backend(base, "auto", aux_loss_coef=0.01).train()
        paths["auto:train"] = layer
    if want("reference"):
        paths["reference"] = _layer_with_backend(base, "reference")
    for st in STRATEGIES:
        if want(f"grouped:{st}") and (st != "grouped_mm" or hasattr(torch, "_grouped_mm")):
            paths[f"grouped:{st}"] = GroupedStrategy(base, st)
    if want("triton") and device.type == "cuda" and "triton" in available_backends():
        paths["triton"] = _layer_with_backend(base, "triton")
    if want("torchtitan"):
        from anchors import AnchorUnavailable, torchtitan_moe

        try:
            paths["torchtitan"] = torchtitan_moe(base).eval()
        except AnchorUnavailable as exc:
            unavailable["torchtitan"] = str(exc)
    for impl in ("eager", "grouped_mm"):
        if want(f"hf:{impl}"):
            try:
                paths[f"hf:{impl}"] = hf_block(base, impl)
            except Exception as exc:  # transformers missing or changed
                unavailable[f"hf:{impl}"] = f"{type(exc).__name__}: {exc}"
    return base, paths, unavailable


def _layer_with_backend(base, backend, **overrides):
    layer = build_moe(MoEConfig(**{**base.config.to_dict(), "backend": backend, **overrides}))
    layer.load_state_dict(base.state_dict())
    return layer.to(device=base.router.weight.device, dtype=base.experts.up_proj.dtype).eval()


# --- measuring -----------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(module, x, grad):
    for p in module.parameters():
        p.grad = None
    x.grad = None
    out = module(x)
    out.backward(grad)
    return out


def timed_step(module, x, grad, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step(module, x, grad)
    _sync(device)
    return time.perf_counter() - t0


def saved_bytes(module, x, grad) -> int:
    """Bytes saved for backward in one forward, without parameters and the input."""
    exclude = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude and st.device.type != "meta":
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    out.backward(grad)
    return sum(seen.values())


def peak_bytes(module, x, grad, device) -> int:
    """Peak growth of allocated bytes during one fwd+bwd step (transients and gradients included)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(module, x, grad)
        _sync(device)
        return torch.cuda.max_memory_allocated() - before
    # CPU: the profiler's allocator events carry a running total of bytes allocated since it started
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(module, x, grad)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0] + totals)


def check_agreement(paths, x) -> dict[str, float]:
    """Max |path - reference| / max |reference| of the forward, against the first MoE path."""
    with torch.no_grad():
        outs = {n: m(x).float() for n, m in paths.items() if n != "dense"}
    if not outs:
        return {}
    ref_name = "reference" if "reference" in outs else next(iter(outs))
    ref = outs[ref_name]
    return {n: ((o - ref).abs().max() / ref.abs().max()).item() for n, o in outs.items()}


def run_setting(s: Setting, args, device, dtype) -> dict:
    base, paths, unavailable = build_paths(s, device, dtype, args.paths)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, s.tokens, s.d_model, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(1, s.tokens, s.d_model, generator=g).to(device=device, dtype=dtype)
    agreement = check_agreement(paths, x[:, : min(s.tokens, 512)])
    times: dict[str, list[float]] = {n: [] for n in paths}
    for n, m in paths.items():  # warm-up
        timed_step(m, x, grad, device)
    for _ in range(args.repeats):
        for n, m in paths.items():
            times[n].append(timed_step(m, x, grad, device))
    rows = {}
    for n, m in paths.items():
        med, best = statistics.median(times[n]), min(times[n])
        rows[n] = {
            "median_s": med, "min_s": best, "times_s": times[n],
            "tokens_per_s": s.tokens / (best if args.stat == "min" else med),
            "saved_mb": saved_bytes(m, x, grad) / 2**20,
            "peak_mb": peak_bytes(m, x, grad, device) / 2**20,
            "max_rel_err_vs_reference": agreement.get(n),
        }
    if args.profile:
        from layer_profile import breakdown, format_breakdown

        print(f"  profile ({s.name}, ms per step by part)")
        for n, m in paths.items():
            b = breakdown(m, x, grad, device, widths={s.d_model, s.d_expert, s.top_k * s.d_expert},
                          num_experts=s.num_experts)
            rows[n]["profile"] = b
            print(format_breakdown(n, b))
    dense = rows.get("dense", {}).get("tokens_per_s")
    hf = [n for n in rows if n.startswith("hf:")]
    best = "auto" if "auto" in rows else None  # what users get, not the best of several of ours
    best_hf = max(hf, key=lambda n: rows[n]["tokens_per_s"]) if hf else None
    summary = {"best_path": best, "best_hf": best_hf}
    for n in rows:
        rows[n]["vs_dense"] = rows[n]["tokens_per_s"] / dense if dense else None
    if best and best_hf:
        summary["best_vs_hf_eager"] = rows[best]["tokens_per_s"] / rows["hf:eager"]["tokens_per_s"] if "hf:eager" in rows else None
        summary["best_vs_best_hf"] = rows[best]["tokens_per_s"] / rows[best_hf]["tokens_per_s"]
    tt = rows.get("torchtitan")
    if best and tt:
        summary["auto_vs_torchtitan"] = rows[best]["tokens_per_s"] / tt["tokens_per_s"]
    return {"setting": s.__dict__, "paths": rows, "unavailable": unavailable, "summary": summary}


def print_table(result: dict) -> None:
    s = result["setting"]
    print(f"\n{s['name']}  d_model {s['d_model']}  d_ffn {s['d_ffn']}  experts {s['expansion'] * s['granularity']}"
          f" x width {s['d_ffn'] // s['granularity']}  top-{s['top_k']}  tokens {s['tokens']}")
    print(f"{'path':<18}{'med ms':>8}{'min-max ms':>14}{'tokens/s':>10}{'vs eager dense':>16}{'saved MB':>10}"
          f"{'peak MB':>9}{'fwd err':>9}")
    for n, r in result["paths"].items():
        vd = "" if r["vs_dense"] is None else f"{r['vs_dense']:.2f}x"
        pk = f"{r['peak_mb']:.0f}"
        err = "" if r["max_rel_err_vs_reference"] is None else f"{r['max_rel_err_vs_reference']:.1e}"
        spread = f"{r['min_s'] * 1e3:.0f}-{max(r['times_s']) * 1e3:.0f}"
        print(f"{n:<18}{r['median_s'] * 1e3:>8.0f}{spread:>14}{r['tokens_per_s']:>10.0f}{vd:>16}"
              f"{r['saved_mb']:>10.0f}{pk:>9}{err:>9}")
    for n, why in result.get("unavailable", {}).items():
        print(f"{n:<18}unavailable: {why}")
    sm = result["summary"]
    if sm.get("best_path"):
        line = f"ours ({sm['best_path']} backend):"
        if sm.get("best_vs_hf_eager"):
            line += f"  {sm['best_vs_hf_eager']:.2f}x transformers (eager experts)"
        if sm.get("best_vs_best_hf"):
            line += f"  {sm['best_vs_best_hf']:.2f}x the faster transformers path ({sm['best_hf']})"
        if sm.get("auto_vs_torchtitan"):
            line += f"  {sm['auto_vs_torchtitan']:.2f}x torchtitan"
        print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized run: d_model 576, 4096 tokens, fp32")
    ap.add_argument("--configs", nargs="+", default=list(MOE_NAMES), choices=list(MOE_NAMES))
    ap.add_argument("--d-model", nargs="+", type=int, default=[576, 2048], choices=list(D_FFN))
    ap.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    ap.add_argument("--paths", nargs="+", default=["all"],
                    help="dense auto auto:train reference grouped:loop grouped:grouped_mm grouped:padded triton "
                         "torchtitan hf:eager hf:grouped_mm")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stat", default="median", choices=["min", "median"], help="step time used for throughput")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", default=None, help="write all results to this file")
    ap.add_argument("--profile", action="store_true", help="break each path's step down by part (layer_profile.py)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*empty tensor.*")  # transformers' zero-width shared expert
    device = torch.device(args.device)
    if args.quick:
        args.d_model, args.tokens, args.repeats = [576], [4096], min(args.repeats, 4)
        args.dtype = args.dtype or "float32"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "dtype": str(dtype), "torch": torch.__version__, "stat": args.stat,
        "loadavg_start": os.getloadavg(),
    }
    print(f"device {meta['device']} ({device.type}), {meta['threads']} threads, {dtype}, torch {torch.__version__}, "
          f"load average {meta['loadavg_start'][0]:.2f}")
    results = []
    for d in args.d_model:
        for name in args.configs:
            for tokens in args.tokens:
                e, gran, k = MOE_NAMES[name]
                s = Setting(name, e, gran, k, d, D_FFN[d], tokens)
                result = run_setting(s, args, device, dtype)
                print_table(result)
                results.append(result)
                if args.json:  # after every setting, so a run cut short keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"meta": meta, "results": results}, f, indent=2)
    meta["loadavg_end"] = os.getloadavg()
    print(f"\nload average at the end {meta['loadavg_end'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
