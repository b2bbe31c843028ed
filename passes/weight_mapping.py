"""Dense MLP weights → MoE weights (docs/algorithm.md §2, §3, §5).

Fine-grained shards along the hidden dimension (gate/up re-paired per shard), E copies, expert e
holding shard e mod G, virtual-group router rows repeated G times, and the weight-scaling factor
placed where the activation lets it be exact.

Shared experts (`experts.shared_experts: S`, S < G): the dense MLP's G shards are divided between
an always-on shared expert and the routed experts, so that together they hold every hidden unit
once, as the dense MLP does:
  - the shared expert is shards 0 … S−1 (hidden units [0, S·F/G)), copied exactly, scale 1, and it
    carries the whole second-layer bias (so the bias is added exactly once, whatever the router does);
  - the routed experts are E copies of the remaining G' = G − S shards (N = E·G' experts of width
    F/G, expert e holding remaining shard S + (e mod G')), with virtual groups of G' experts;
  - the routed scaling is computed for the remaining mass as if G' were the granularity:
    topk_then_softmax a = G', softmax_then_topk a = E·G'²/T.
Then shared(x) + Σ_routed = dense(x) exactly for topk_then_softmax with T = G' (one whole virtual
group, weight 1/G' each, times a = G'), and softmax_then_topk is approximate in the same way as
without shared experts, but only on the routed fraction G'/G of the output. (Copying S shards into
the shared expert while keeping full routed copies, the earlier scheme, adds those S shards twice.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from upcycle.runtime.activations import HOMOGENEITY_DEGREE
from upcycle.runtime.routers import router_type
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
    placement: str  # what was chosen: split / balanced / down_proj / output / none
    exact: bool  # whether first^d · (first) · down == factor holds exactly for this activation
    output: float = 1.0  # fixed multiplier on the layer's routed output (placement "output")


def scaling_factor(spec: UpcycleSpec) -> float:
    """The paper's activation scale a (docs/algorithm.md §5)."""
    if spec.weight_scaling == "none":
        return 1.0
    if spec.weight_scaling != "auto":
        return float(spec.weight_scaling)
    # with shared experts the routed experts rebuild only the G' = G − S shards the shared one lacks
    e, g, t = spec.experts.expansion, spec.experts.routed_granularity, spec.experts.top_k
    return float(router_type(spec.router.type).scaling(e, g, t))  # runtime/routers/: each type's rule


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
    if placement == "output":
        # the same function as down_proj, but the weights keep the dense model's scale, so Adam's
        # steps (about lr whatever a weight's size) move them as much, relative to their size, as in
        # the dense model; a is a constant of the layer, not a trainable weight
        return Scaling(a, 1.0, 1.0, "output", True, output=a)
    if placement == "split":
        k = degree + (2 if gated else 1)  # act(s·g)·(s·u)·s = s^(d+2); act(s·u)·s = s^(d+1)
        s = a ** (1.0 / k)
        return Scaling(a, s, s, "split", True)
    # balanced: the paper's rule everywhere, exact only for homogeneous activations
    k = 3 if gated or activation == "relu2" else 2
    s = a ** (1.0 / k)
    exact = degree is not None and degree + (2 if gated else 1) == k
    return Scaling(a, s, s, "balanced", exact)


def router_init(spec: UpcycleSpec, d_model: int, generator: torch.Generator,
                inputs: torch.Tensor | None = None, where: str = "") -> torch.Tensor:
    """[N, D] router weight.

    virtual_group: E random rows N(0, init_std²), each repeated G' times (consecutively).
    random: N independent random rows.
    kmeans: E rows from a k-means clustering of `inputs` ([tokens, D], the MLP's inputs on the
    calibration probe), each repeated G' times; see `kmeans_router_rows`. Without inputs it warns
    and falls back to virtual_group.
    """
    e, g = spec.experts.expansion, spec.experts.routed_granularity
    std = spec.router.init_std
    init = spec.router.init
    if init == "kmeans":
        if inputs is not None and inputs.shape[0] >= e:
            rows = kmeans_router_rows(inputs, e, std, generator)  # [E, D]
            return rows.repeat_interleave(g, dim=0)
        have = "no calibration inputs" if inputs is None else f"only {inputs.shape[0]} calibration tokens (< {e} clusters)"
        warnings.warn(f"{where or 'router'}: router.init kmeans needs the MLP's inputs from a probe forward, "
                      f"but there are {have}; using virtual_group instead", stacklevel=2)
        init = "virtual_group"
    if init == "virtual_group":
        rows = torch.randn(e, d_model, generator=generator) * std  # [E, D]
        return rows.repeat_interleave(g, dim=0)  # [E·G, D]: row r serves experts r·G … r·G+G-1
    return torch.randn(e * g, d_model, generator=generator) * std


def spherical_kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means on the rows of x [tokens, D]: (unit centroids [k, D], assignment [tokens]).

    Seeded k-means++ start (by cosine distance), then Lloyd steps: assign each token to the
    centroid of largest dot product, centroid = normalised mean of its tokens. An empty cluster is
    re-seeded with the token farthest from its centroid.
    """
    u = torch.nn.functional.normalize(x.float(), dim=-1)  # [t, D]
    t = u.shape[0]
    first = int(torch.randint(t, (1,), generator=generator))
    cent = [u[first]]
    dist = 1.0 - u @ u[first]  # [t]
    for _ in range(1, k):
        w = dist.clamp_min(0)
        idx = int(torch.multinomial(w / w.sum(), 1, generator=generator)) if float(w.sum()) > 0 else \
            int(torch.randint(t, (1,), generator=generator))
        cent.append(u[idx])
        dist = torch.minimum(dist, 1.0 - u @ u[idx])
    c = torch.stack(cent)  # [k, D]
    assign = torch.full((t,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = u @ c.T  # [t, k]
        new = sim.argmax(dim=-1)
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, u)
        counts = torch.bincount(assign, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():  # empty cluster: take the worst-fitted token
            far = int(sim.max(dim=-1).values.argmin())
            sums[j] = u[far]
            sim[far] = float("inf")
        c = torch.nn.functional.normalize(sums, dim=-1)
    return c, (u @ c.T).argmax(dim=-1)


def kmeans_router_rows(inputs: torch.Tensor, e: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """[E, D] router rows: unit centroids of a spherical k-means (k = E) on the MLP inputs, scaled to
    norm init_std·√D.

    Why spherical (cosine) k-means: router logits are dot products x·r. With unit-norm rows of equal
    length, argmax_r x·r is exactly the cosine k-means assignment, so every calibration token is
    routed to the virtual group of its own cluster. Why norm init_std·√D: it is the expected norm of
    a random N(0, init_std²) row, so logits keep the usual init scale (the router stays close to
    uniform at init, which is what the softmax_then_topk weight scaling assumes) and only their
    direction comes from the data.
    """
    centroids, _ = spherical_kmeans(inputs, e, generator)
    return centroids * (std * inputs.shape[-1] ** 0.5)


def shard_rows(t: torch.Tensor | None, g: int) -> torch.Tensor | None:
    """[F, ...] -> [G, F/G, ...]: shard s holds rows [s·F/G, (s+1)·F/G)."""
    if t is None:
        return None
    return t.reshape(g, t.shape[0] // g, *t.shape[1:])


def expert_weights(dense: DenseMLPWeights, spec: UpcycleSpec, scale: Scaling, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The routed experts' stacked tensors, keyed as in runtime.GroupedExperts.

    With S shared experts only shards S … G−1 are routed (the shared expert holds 0 … S−1, see
    `shared_expert_weights`): expert e holds shard S + (e mod G'), G' = G − S.
    """
    e, g, s = spec.experts.expansion, spec.experts.granularity, spec.experts.shared_experts
    d = dense.d_model
    dtype = dense.up.dtype
    # Qwen2's upcycling: each copy's hidden units in its own random order before sharding, so the
    # shards of different copies hold different units (a copy's G shards still partition them)
    perms = [torch.randperm(dense.d_ffn, generator=generator) for _ in range(e)] if spec.experts.shuffle else None

    def copies(t: torch.Tensor) -> torch.Tensor:
        """[F, ...] -> [E·G', H, ...]: the E copies' routed shards, copy-major."""
        if perms is None:
            shards = shard_rows(t, g)[s:]  # [G', H, ...]: the shards the shared expert does not hold
            return shards.repeat(e, *([1] * (shards.dim() - 1)))
        return torch.cat([shard_rows(t[p], g)[s:] for p in perms])

    def scaled(t: torch.Tensor, factor: float) -> torch.Tensor:  # fp32; no pass over memory for × 1
        return t.float() if factor == 1.0 else t.float() * factor

    def experts_from_rows(t: torch.Tensor | None, factor: float) -> torch.Tensor | None:
        return None if t is None else copies(scaled(t, factor))

    out = {
        "up_proj": experts_from_rows(dense.up, scale.first),  # [N, H, D]
        "gate_proj": experts_from_rows(dense.gate, scale.first),
        "up_bias": experts_from_rows(dense.up_bias, scale.first),  # [N, H]
        "gate_bias": experts_from_rows(dense.gate_bias, scale.first),
    }
    down = scaled(dense.down, scale.down).t()  # [F, D]
    if perms is None:  # transpose once, copy E times
        out["down_proj"] = shard_rows(down, g)[s:].transpose(1, 2).contiguous().repeat(e, 1, 1)  # [N, D, H]
    else:
        out["down_proj"] = copies(down).transpose(1, 2).contiguous()  # [N, D, H]
    n = out["down_proj"].shape[0]
    if dense.down_bias is not None and s:
        out["down_bias"] = dense.down_bias.new_zeros(n, d)  # the shared expert adds the whole bias, exactly
    elif dense.down_bias is not None:
        # every expert carries 1/G of the bias times the factor the weights carry (a, or 1 when the
        # factor is an output multiplier), so a whole virtual group (G shards) adds it once, scaled
        out["down_bias"] = (dense.down_bias.float() * (scale.factor / scale.output) / g).expand(n, d).clone()  # [N, D]

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


def shared_expert_weights(dense: DenseMLPWeights, spec: UpcycleSpec) -> dict[str, torch.Tensor]:
    """runtime.SharedExpert state: the first S shards of the dense MLP (hidden units [0, S·F/G)),
    unscaled, plus the whole second-layer bias (routed experts then carry none)."""
    width = spec.experts.shared_experts * (dense.d_ffn // spec.experts.granularity)
    state = {
        "up_proj.weight": dense.up[:width],
        "down_proj.weight": dense.down[:, :width],
        "gate_proj.weight": None if dense.gate is None else dense.gate[:width],
        "up_proj.bias": None if dense.up_bias is None else dense.up_bias[:width],
        "gate_proj.bias": None if dense.gate_bias is None else dense.gate_bias[:width],
        "down_proj.bias": dense.down_bias,
    }
    return {k: v.clone().contiguous() for k, v in state.items() if v is not None}


def virtual_group_ok(spec: UpcycleSpec) -> bool:
    return spec.router.init in ("virtual_group", "kmeans") and spec.experts.top_k % spec.experts.routed_granularity == 0


def expected_exact(spec: UpcycleSpec, scale: Scaling) -> bool:
    """Cases where the upcycled layer must equal the dense MLP (docs/algorithm.md §6)."""
    ex = spec.experts
    if not router_type(spec.router.type).exact_at_init or ex.drop_upcycling > 0:
        return False
    g = ex.routed_granularity  # shared experts: the routed part rebuilds the remaining G − S shards
    if g == 1:
        return scale.factor == 1.0  # every routed expert is the same (remaining) MLP, kept weights sum to 1
    return ex.top_k == g and spec.router.init in ("virtual_group", "kmeans") and scale.exact and scale.factor == g
