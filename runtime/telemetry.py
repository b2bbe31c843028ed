"""Router telemetry: what each MoE layer's router did since the last read.

Each layer accumulates, in no-grad buffers updated during training forwards (never during the
recompute of activation checkpointing, so nothing is counted twice), the slots routed to each
expert and a few sums. `read_router_stats(model)` turns them into per-layer `RouterStats` and
resets them: call it once per optimizer step and it describes that step, all its micro-batches
together. With a process group up the counts are summed over ranks first (one all-reduce).

    stats = read_router_stats(model)                    # {layer path: RouterStats}
    writer = TelemetryWriter("router.jsonl"); writer.write(step, stats)
    plot_load_heatmap("router.jsonl", "router_load.png")  # or: upcycle-telemetry router.jsonl -o router_load.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .layers import moe_layers

# layout of MoELayer.stat_scalars
TOKENS, ENTROPY, WHOLE_GROUP, AUX, ZLOSS, DROPPED, FORWARDS, MASS, MASS_SQ, COMPLETE = range(10)
NUM_SCALARS = 10


def recomputing() -> bool:
    """True while autograd's engine runs a backward: a forward seen then is the recompute of
    activation checkpointing (reentrant or not), whose statistics were counted the first time."""
    if torch.compiler.is_compiling():  # compiled graphs recompute inside their own backward graph
        return False
    return torch._C._current_graph_task_id() != -1


def combine_mass(weights: torch.Tensor, scale_factor: float, group_size: int) -> torch.Tensor:
    """[tokens, K] combine weights -> [tokens]: a · Σ_k w_k / G, the number of dense MLPs a token's
    output adds up to when its kept experts are whole groups (1.0 when the layer equals the dense MLP).

    The weight scaling a = E·G²/T (softmax_then_topk) is right only for a uniform router: as the
    router sharpens, the kept probabilities grow and the layer's output with them, up to E·G/T
    times the dense MLP's; this measures that drift."""
    return weights.float().sum(-1) * (scale_factor / group_size)


def complete_mlp(indices: torch.Tensor, group_size: int) -> torch.Tensor:
    """[tokens, K] expert ids -> [tokens] bool: every shard position (expert id mod G) is taken
    equally often, K/G times, so the token's shards add up to whole dense MLPs, whichever copies
    they come from (per_slice selection guarantees it; plain top-K does not)."""
    if group_size == 1:
        return torch.ones(indices.shape[0], dtype=torch.bool, device=indices.device)
    k = indices.shape[1]
    if k % group_size:
        return torch.zeros(indices.shape[0], dtype=torch.bool, device=indices.device)
    per_slot = torch.zeros(indices.shape[0], group_size, device=indices.device, dtype=torch.float32)
    per_slot.scatter_add_(1, indices % group_size, torch.ones_like(indices, dtype=torch.float32))  # [tokens, G]
    return (per_slot == k // group_size).all(-1)


@torch.no_grad()
def accumulate(layer, indices: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor, kept: Optional[torch.Tensor],
               mask: Optional[torch.Tensor], lb_loss: torch.Tensor, z: torch.Tensor) -> None:
    """Add one forward's routing to the layer's buffers. indices [tokens, K], probs [tokens, N],
    weights [tokens, K] combine weights (capacity applied), kept [tokens, K] bool (capacity; None =
    all kept), mask [tokens] (None = all real)."""
    n, k = probs.shape[1], indices.shape[1]
    m = probs.new_ones(probs.shape[0]) if mask is None else mask.to(torch.float32)  # [tokens]
    slot_w = m[:, None].expand(-1, k)
    if kept is not None:
        slot_w = slot_w * kept
    layer.stat_load.scatter_add_(0, indices.reshape(-1), slot_w.reshape(-1))  # [N] kept real slots
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [tokens]
    g = layer.config.virtual_group_size
    if g > 1:  # a token picks whole virtual groups when each group is taken fully or not at all
        per_group = torch.zeros(indices.shape[0], n // g, device=indices.device, dtype=torch.float32)
        per_group.scatter_add_(1, torch.div(indices, g, rounding_mode="floor"), torch.ones_like(indices, dtype=torch.float32))
        whole = ((per_group == 0) | (per_group == g)).all(-1).float()  # [tokens]
    else:
        whole = torch.ones_like(m)
    mass = combine_mass(weights, layer.config.scale_factor, g)  # [tokens]
    complete = complete_mlp(indices, g).float()  # [tokens]
    dropped = (m[:, None] * (~kept)).sum() if kept is not None else m.new_zeros(())
    update = torch.stack([m.sum(), (entropy * m).sum(), (whole * m).sum(), lb_loss.detach().float(),
                          z.detach().float(), dropped, m.new_ones(()), (mass * m).sum(), (mass * mass * m).sum(),
                          (complete * m).sum()])
    layer.stat_scalars.add_(update)
    if layer.config.uses_bias:
        layer.balance_counts.scatter_add_(0, indices.reshape(-1), slot_w.reshape(-1))


@dataclass
class RouterStats:
    """One layer over one read period (normally one optimizer step)."""

    tokens: int  # real (unmasked) tokens routed
    forwards: int  # training forwards seen (micro-batches, repeated calls)
    load: list  # fraction of kept slots per expert (sums to 1)
    max_over_mean_load: float  # 1.0 = perfectly balanced; N = everything on one expert
    min_load: float  # smallest expert share (0: a dead expert this step)
    entropy: float  # mean router entropy (nats); ln N = uniform
    whole_group_fraction: float  # tokens whose top-k is a union of whole virtual groups (1.0 at upcycling)
    complete_mlp_fraction: float  # tokens whose shards add up to whole dense MLPs, from any copies
    combine_mass: float  # mean a·Σ kept weights / G over tokens (1.0: the dense MLP's output scale)
    combine_mass_std: float  # its spread over tokens
    aux_loss: float  # mean unweighted load-balancing loss per forward (1.0 = balanced)
    z_loss: float  # mean unweighted z-loss per forward
    dropped_fraction: float  # slots dropped by the capacity factor
    expert_bias: Optional[list] = None  # the aux-loss-free routing bias, when used

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("load")
        d.pop("expert_bias")
        return d


def _all_reduce_(tensors: list) -> None:
    """Sum the tensors over the default process group, when one is up (one collective)."""
    import torch.distributed as dist

    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


@torch.no_grad()
def read_router_stats(model: nn.Module, reset: bool = True, all_reduce: bool = True) -> dict:
    """{layer path: RouterStats} since the last read; resets the accumulators unless reset=False."""
    layers = moe_layers(model)
    if all_reduce:
        _all_reduce_([t for m in layers.values() for t in (m.stat_load, m.stat_scalars)])
    out = {}
    for name, m in layers.items():
        s = m.stat_scalars.double().cpu().tolist()
        load = m.stat_load.double().cpu()
        total = float(load.sum())
        frac = (load / total) if total > 0 else torch.zeros_like(load)
        n = load.numel()
        tokens, fwd = s[TOKENS], max(s[FORWARDS], 1.0)
        mass = s[MASS] / tokens if tokens else 0.0
        slots = tokens * m.config.top_k
        bias = m.router.expert_bias
        out[name] = RouterStats(
            tokens=int(round(tokens)), forwards=int(round(s[FORWARDS])), load=[round(v, 6) for v in frac.tolist()],
            max_over_mean_load=float(frac.max() * n) if total > 0 else 0.0,
            min_load=float(frac.min()) if total > 0 else 0.0,
            entropy=s[ENTROPY] / tokens if tokens else 0.0,
            whole_group_fraction=s[WHOLE_GROUP] / tokens if tokens else 0.0,
            complete_mlp_fraction=s[COMPLETE] / tokens if tokens else 0.0,
            combine_mass=mass, combine_mass_std=math.sqrt(max(s[MASS_SQ] / tokens - mass * mass, 0.0)) if tokens else 0.0,
            aux_loss=s[AUX] / fwd, z_loss=s[ZLOSS] / fwd,
            dropped_fraction=s[DROPPED] / slots if slots else 0.0,
            expert_bias=None if bias is None else [round(v, 6) for v in bias.float().cpu().tolist()],
        )
        if reset:
            m.stat_load.zero_()
            m.stat_scalars.zero_()
    return out


def stats_summary(stats: dict, prefix: str = "router/") -> dict:
    """Flat scalars for a logger: per-layer max/mean load etc. plus means over layers."""
    flat: dict = {}
    if not stats:
        return flat
    keys = ("max_over_mean_load", "min_load", "entropy", "whole_group_fraction", "complete_mlp_fraction",
            "combine_mass", "aux_loss", "z_loss", "dropped_fraction")
    for key in keys:
        vals = [getattr(s, key) for s in stats.values()]
        flat[f"{prefix}{key}_mean"] = sum(vals) / len(vals)
    flat[f"{prefix}max_over_mean_load_max"] = max(s.max_over_mean_load for s in stats.values())
    for name, s in stats.items():
        flat[f"{prefix}{name}/max_over_mean_load"] = s.max_over_mean_load
    return flat


class TelemetryWriter:
    """Appends one JSON line per step: {"step": s, "layers": {path: RouterStats fields}}."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, stats: dict, **extra) -> None:
        record = {"step": int(step), **extra, "layers": {k: asdict(v) for k, v in stats.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list:
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
    return records


def plot_load_heatmap(jsonl_path, png_path, max_layers: int = 32, dpi: int = 110) -> Path:
    """PNG: one panel per layer, expert (rows) × step (columns), colour = share of slots / (1/N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(jsonl_path) if r.get("layers")]
    if not records:
        raise ValueError(f"{jsonl_path}: no telemetry records (lines with 'layers')")
    names = list(records[0]["layers"])[:max_layers]
    steps = [r["step"] for r in records]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, name in zip(axes.flat, names):
        loads = [r["layers"].get(name, {}).get("load") for r in records]
        n = max(len(v) for v in loads if v)
        grid = torch.tensor([[x * n for x in (v or [0.0] * n)] for v in loads]).T  # [N, steps]
        image = ax.imshow(grid.numpy(), aspect="auto", origin="lower", cmap="magma", vmin=0.0, vmax=2.0,
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, n - 0.5))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="load / uniform load")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=dpi)
    plt.close(fig)
    return png_path


def main(argv=None) -> int:
    """upcycle-telemetry router.jsonl -o router_load.png"""
    ap = argparse.ArgumentParser(prog="upcycle-telemetry", description="Heatmap of expert load per layer over steps")
    ap.add_argument("jsonl", help="telemetry written by TelemetryWriter / examples/train.py")
    ap.add_argument("-o", "--output", default=None, help="PNG path (default: beside the JSONL)")
    ap.add_argument("--max-layers", type=int, default=32)
    args = ap.parse_args(argv)
    out = args.output or str(Path(args.jsonl).with_suffix(".png"))
    try:
        path = plot_load_heatmap(args.jsonl, out, args.max_layers)
    except (OSError, ValueError, KeyError) as exc:
        print(f"upcycle-telemetry: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


__all__ = ["RouterStats", "read_router_stats", "combine_mass", "complete_mlp", "stats_summary", "TelemetryWriter", "read_jsonl",
           "plot_load_heatmap", "recomputing", "accumulate"]

if __name__ == "__main__":
    sys.exit(main())
