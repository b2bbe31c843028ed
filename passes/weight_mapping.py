"""Dense MLP weights → MoE weights (UPCYCLING.md §1, §2, §4).

Fine-grained shards along the hidden dimension (gate/up re-paired per shard), E copies, expert e
holding shard e mod G, virtual-group router rows repeated G times, and the weight-scaling factor
placed where the activation lets it be exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from upcycle.runtime.activations import HOMOGENEITY_DEGREE
from upcycle.specs.schema import UpcycleSpec

from .activation_regions import _split_glu
from .find_mlps import MLPMatch


@dataclass
class DenseMLPWeights:
    """One dense MLP in nn.Linear orientation: y = down · (act(gate·x) ⊙ up·x)  or  down · act(up·x)."""

    up: torch.Tensor  # [F, D]
    down: torch.Tensor  # [D, F]
    gate: torch.Tensor | None = None  # [F, D]
    up_bias: torch.Tensor | None = None  # [F]
    gate_bias: torch.Tensor | None = None  # [F]
    down_bias: torch.Tensor | None = None  # [D]

    @property
    def d_ffn(self) -> int:
        return self.up.shape[0]

    @property
    def d_model(self) -> int:
        return self.up.shape[1]


def extract_dense_weights(match: MLPMatch, unit: nn.Module) -> DenseMLPWeights:
    """Read the matched MLP's weights from the traced unit (detached views, no copies)."""
    up_w = match.up.weight(unit).detach()
    up_b = match.up.bias(unit)
    up_b = None if up_b is None else up_b.detach()
    gate_w = gate_b = None
    if match.glu_layout:  # one fused [gate | up] projection: split it by the identified layout
        gate_w, up_w = _split_glu(up_w.t(), match.glu_layout)
        gate_w, up_w = gate_w.t(), up_w.t()
        if up_b is not None:
            gate_b, up_b = _split_glu(up_b, match.glu_layout)
    elif match.gate is not None:
        gate_w = match.gate.weight(unit).detach()
        gb = match.gate.bias(unit)
        gate_b = None if gb is None else gb.detach()
    down_b = match.down.bias(unit)
    return DenseMLPWeights(
        up=up_w,
        down=match.down.weight(unit).detach(),
        gate=gate_w,
        up_bias=up_b,
        gate_bias=gate_b,
        down_bias=None if down_b is None else down_b.detach(),
    )


@dataclass(frozen=True)
class Scaling:
    """factor a: total multiplier on each expert's output; first/down: per-matrix factors."""

    factor: float
    first: float  # on gate and up (and their biases)
    down: float
    placement: str  # what was chosen: split / balanced / down_proj / none
    exact: bool  # whether first^d · (first) · down == factor holds exactly for this activation


def scaling_factor(spec: UpcycleSpec) -> float:
    """The paper's activation scale a (UPCYCLING.md §4)."""
    if spec.weight_scaling == "none":
        return 1.0
    if spec.weight_scaling != "auto":
        return float(spec.weight_scaling)
    e, g, t = spec.experts.expansion, spec.experts.granularity, spec.experts.top_k
    if spec.router.type == "softmax_then_topk":
        return e * g * g / t
    return float(g)


def plan_scaling(spec: UpcycleSpec, activation: str, gated: bool) -> Scaling:
    a = scaling_factor(spec)
    degree = HOMOGENEITY_DEGREE.get(activation)
    if a == 1.0:
        return Scaling(1.0, 1.0, 1.0, "none", True)
    placement = spec.scaling_placement
    if placement == "auto":
        placement = "split" if degree is not None else "down_proj"
    if placement == "down_proj":
        return Scaling(a, 1.0, a, "down_proj", True)
    if placement == "split":
        k = degree + (2 if gated else 1)  # act(s·g)·(s·u)·s = s^(d+2); act(s·u)·s = s^(d+1)
        s = a ** (1.0 / k)
        return Scaling(a, s, s, "split", True)
    # balanced: the paper's rule everywhere, exact only for homogeneous activations
    k = 3 if gated or activation == "relu2" else 2
    s = a ** (1.0 / k)
    exact = degree is not None and degree + (2 if gated else 1) == k
    return Scaling(a, s, s, "balanced", exact)


def router_init(spec: UpcycleSpec, d_model: int, generator: torch.Generator) -> torch.Tensor:
    """[N, D] router weight: virtual_group repeats E random rows G times (consecutively)."""
    e, g = spec.experts.expansion, spec.experts.granularity
    std = spec.router.init_std
    if spec.router.init == "virtual_group":
        rows = torch.randn(e, d_model, generator=generator) * std  # [E, D]
        return rows.repeat_interleave(g, dim=0)  # [E·G, D]: row r serves experts r·G … r·G+G-1
    return torch.randn(e * g, d_model, generator=generator) * std


def shard_rows(t: torch.Tensor | None, g: int) -> torch.Tensor | None:
    """[F, ...] -> [G, F/G, ...]: shard s holds rows [s·F/G, (s+1)·F/G)."""
    if t is None:
        return None
    return t.reshape(g, t.shape[0] // g, *t.shape[1:])


def expert_weights(dense: DenseMLPWeights, spec: UpcycleSpec, scale: Scaling, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The routed experts' stacked tensors, keyed as in runtime.GroupedExperts."""
    e, g = spec.experts.expansion, spec.experts.granularity
    d = dense.d_model
    dtype = dense.up.dtype

    def experts_from_rows(t: torch.Tensor | None, factor: float) -> torch.Tensor | None:
        shards = shard_rows(None if t is None else t.float() * factor, g)  # [G, H, ...]
        return None if shards is None else shards.repeat(e, *([1] * (shards.dim() - 1)))  # [E·G, H, ...]

    out = {
        "up_proj": experts_from_rows(dense.up, scale.first),  # [N, H, D]
        "gate_proj": experts_from_rows(dense.gate, scale.first),
        "up_bias": experts_from_rows(dense.up_bias, scale.first),  # [N, H]
        "gate_bias": experts_from_rows(dense.gate_bias, scale.first),
    }
    down = dense.down.float().t() * scale.down  # [F, D]
    out["down_proj"] = shard_rows(down, g).transpose(1, 2).repeat(e, 1, 1)  # [N, D, H]
    if dense.down_bias is not None:
        # every expert carries a/G of the bias, so a whole virtual group (G shards) adds it once
        out["down_bias"] = (dense.down_bias.float() * scale.factor / g).expand(e * g, d).clone()  # [N, D]

    r = spec.experts.drop_upcycling
    if r > 0:
        _drop_upcycle(out, dense, r, scale, generator)
    return {k: v.to(dtype).contiguous() for k, v in out.items() if v is not None}


def _drop_upcycle(out: dict, dense: DenseMLPWeights, r: float, scale: Scaling, generator: torch.Generator) -> None:
    """Drop-Upcycling (Nakamura et al. 2025): in every expert re-draw a fraction r of hidden units
    (their up/gate rows and down columns) from N(0, std of the dense matrix), so copies diverge."""
    n, h, _ = out["up_proj"].shape
    k = int(round(r * h))
    if k == 0:
        return
    stds = {
        "up_proj": float(dense.up.float().std()) * scale.first,
        "gate_proj": float(dense.gate.float().std()) * scale.first if dense.gate is not None else 0.0,
        "down_proj": float(dense.down.float().std()) * scale.down,
    }
    for expert in range(n):
        units = torch.randperm(h, generator=generator)[:k]
        for name in ("up_proj", "gate_proj"):
            if out.get(name) is not None:
                rows = out[name][expert, units]
                out[name][expert, units] = torch.randn(rows.shape, generator=generator) * stds[name]
                bias = out.get(name.replace("proj", "bias"))
                if bias is not None:
                    bias[expert, units] = 0.0
        cols = out["down_proj"][expert][:, units]
        out["down_proj"][expert][:, units] = torch.randn(cols.shape, generator=generator) * stds["down_proj"]


def virtual_group_ok(spec: UpcycleSpec) -> bool:
    return spec.router.init == "virtual_group" and spec.experts.top_k % spec.experts.granularity == 0


def expected_exact(spec: UpcycleSpec, scale: Scaling) -> bool:
    """Cases where the upcycled layer must equal the dense MLP (UPCYCLING.md §4)."""
    ex = spec.experts
    if spec.router.type != "topk_then_softmax" or ex.drop_upcycling > 0 or ex.shared_experts > 0:
        return False
    if ex.granularity == 1:
        return scale.factor == 1.0  # every expert is the whole MLP and kept weights sum to 1
    return ex.top_k == ex.granularity and spec.router.init == "virtual_group" and scale.exact and scale.factor == ex.granularity
