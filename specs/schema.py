"""Typed upcycling spec. Plain data, no I/O. `specs.loader` builds it from YAML and validates it;
everything downstream reads only these objects.

The router types and backends are not listed here: their names come from the runtime's
registries (runtime/routers/, runtime/backends/: one module per entry), so a new entry is a valid
spec value, a JSON Schema enum member and a CLI choice without an edit here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Union

from upcycle.runtime.backends import backend_names
from upcycle.runtime.routers import ROUTER_TYPES

RouterType = Literal[tuple(ROUTER_TYPES)]  # runtime/routers/
RouterInit = Literal["virtual_group", "random", "kmeans"]
# topk: the K best experts overall; per_slice: for each of the G shard positions the T/G best copies,
# so every token always gets complete MLPs (runtime/router.py: per_slice_topk); auto: per_slice where
# it applies (G - S > 1 and top_k a multiple of it), else topk (docs/algorithm.md §4)
RouterSelection = Literal["auto", "topk", "per_slice"]
# auto: exact where the activation allows (split for ReLU-like, else down_proj); output: the
# factor as a fixed multiplier on the layer's routed output, the expert weights left at dense scale
ScalingPlacement = Literal["auto", "balanced", "down_proj", "output"]
Backend = Literal[backend_names()]  # runtime/backends/: auto + the declared backends
Balancing = Literal["aux_loss", "bias", "both", "none"]


@dataclass(frozen=True)
class ExpertsSpec:
    expansion: int = 8  # E: the MoE holds E times the dense MLP's parameters
    granularity: int = 1  # G: each expert is 1/G of the dense MLP width
    top_k: int = 2  # T
    shared_experts: int = 0  # S < G: one always-on expert of width S·F/G, the first S shards of the dense MLP
    drop_upcycling: float = 0.0  # fraction r of each copy's hidden units re-initialised
    shuffle: bool = False  # each copy's hidden units permuted before sharding (Qwen2's upcycling)

    @property
    def routed_granularity(self) -> int:
        """Shards per virtual group of routed experts: G − S (the shared expert holds the other S)."""
        return self.granularity - self.shared_experts

    @property
    def num_experts(self) -> int:
        """Routed experts: E copies of the G − S shards not held by the shared expert."""
        return self.expansion * self.routed_granularity


@dataclass(frozen=True)
class RouterSpec:
    type: RouterType = "softmax_then_topk"
    selection: RouterSelection = "auto"
    init: RouterInit = "virtual_group"
    # 0.02, not 1e-3, though 1e-3 starts closer to dense (SmolLM2 E8G8T8: 1.00x the dense perplexity,
    # 0.02: 1.10x): with 1e-3 the groups' logits are so close that the first optimizer step reorders
    # them, tokens stop seeing whole copies of the dense MLP, and SmolLM2 E8G8T8 trained far worse
    # (docs/reproduction.md; experiments/results/REPORT.md, part B)
    init_std: float = 0.02
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    # aux_loss: load-balancing loss through autograd (the paper's, coef 1e-2); bias: DeepSeek-V3's
    # aux-loss-free routing bias, moved by bias_update_rate per optimizer step; both; none
    balancing: Balancing = "aux_loss"
    bias_update_rate: float = 1e-3


@dataclass(frozen=True)
class LayerSelection:
    """Which MLPs (in model order, 0-based) become MoE. Exactly one mode is set.

    all: every MLP found; indices: explicit list; every: every n-th starting at `offset`;
    first / last: the first or last n; match: a regex searched in the MLP's module path.
    """

    mode: Literal["all", "indices", "every", "first", "last", "match"] = "all"
    indices: tuple[int, ...] = ()
    every: int = 0
    offset: int = 0
    count: int = 0
    pattern: str = ""

    def selects(self, index: int, total: int, module_path: str) -> bool:
        import re

        if self.mode == "all":
            return True
        if self.mode == "indices":
            return index in self.indices or (index - total) in self.indices
        if self.mode == "every":
            return index >= self.offset and (index - self.offset) % self.every == 0
        if self.mode == "first":
            return index < self.count
        if self.mode == "last":
            return index >= total - self.count
        return re.search(self.pattern, module_path) is not None


@dataclass(frozen=True)
class RuntimeSpec:
    backend: Backend = "auto"
    capacity_factor: Optional[float] = None  # None: dropless (default)


@dataclass(frozen=True)
class VerifySpec:
    enabled: bool = True
    probe_tokens: int = 256  # tokens in the probe batch run through dense and MoE
    tolerance: float = 1e-5  # max abs error asserted where the rewrite must be exact


@dataclass(frozen=True)
class UpcycleSpec:
    experts: ExpertsSpec = field(default_factory=ExpertsSpec)
    router: RouterSpec = field(default_factory=RouterSpec)
    weight_scaling: Union[Literal["auto", "none"], float] = "auto"
    scaling_placement: ScalingPlacement = "auto"
    layers: LayerSelection = field(default_factory=LayerSelection)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    verify: VerifySpec = field(default_factory=VerifySpec)
    seed: int = 0
    # Provenance, not content: two specs with the same settings are equal wherever they came from
    # (so a dumped-and-reloaded spec compares equal to the original).
    source: str = field(default="<dict>", compare=False)  # file the spec came from, for messages
    # Dotted field path -> 1-based YAML line, filled by `specs.loader` so later checks against the
    # model (e.g. granularity vs d_ffn) can point at the spec line. Not part of the spec's value.
    lines: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def selection(self) -> str:
        """The router selection this spec gets: `auto` resolved. per_slice wherever virtual groups
        can be complete MLPs (G − S > 1 shards and top_k a multiple of them): with plain top-K the
        G router rows of a group part in training and tokens stop getting whole copies (SmolLM2
        E8G8T8: val loss up while dense went down; experiments/results/REPORT.md, issue 20)."""
        if self.router.selection != "auto":
            return self.router.selection
        g = self.experts.routed_granularity
        return "per_slice" if g > 1 and self.experts.top_k % g == 0 else "topk"

    def to_dict(self) -> dict:
        """The resolved spec as plain YAML-able data (what gets written next to the output)."""
        data = asdict(self)
        data.pop("source")
        data.pop("lines")
        sel = data.pop("layers")
        data["layers"] = layers_to_yaml(self.layers)
        del sel
        return data


def layers_to_yaml(sel: LayerSelection):
    if sel.mode == "all":
        return "all"
    if sel.mode == "indices":
        return list(sel.indices)
    if sel.mode == "every":
        return {"every": sel.every, "offset": sel.offset} if sel.offset else {"every": sel.every}
    if sel.mode in ("first", "last"):
        return {sel.mode: sel.count}
    return {"match": sel.pattern}
