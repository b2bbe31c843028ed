"""The typed description of one MoE layer: everything needed to rebuild it without the compiler."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from typing import Optional

from .backends import backend_names
from .routers import ROUTER_TYPES as _ROUTER_TYPES

ROUTER_TYPES = tuple(_ROUTER_TYPES)  # runtime/routers/: one module per type
# which experts a token gets: the K best overall, or the T/G best copies of each shard position
SELECTIONS = ("topk", "per_slice")
BACKENDS = backend_names()  # runtime/backends/: auto + one module per backend
# aux_loss: the load-balancing loss reaches the router through autograd; bias: DeepSeek-V3's
# aux-loss-free per-expert routing bias, updated once per optimizer step; both; none
BALANCING = ("aux_loss", "bias", "both", "none")


@dataclass(frozen=True)
class MoEConfig:
    d_model: int  # D
    d_expert: int  # hidden width of one routed expert, F / G
    num_experts: int  # N = E · G routed experts
    top_k: int  # T
    gated: bool  # GLU form: down(act(gate(x)) ⊙ up(x))
    activation: str  # a name from runtime.activations.ACTIVATIONS
    router_type: str = "topk_then_softmax"  # the spec default (specs/schema.py RouterSpec.type)
    first_bias: bool = False  # bias on gate/up projections
    output_bias: bool = False  # bias on the down projection
    router_bias: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    backend: str = "auto"
    # always-on shared expert beside the routed ones (0 = none), hidden width and output scale
    shared_d_ffn: int = 0
    shared_scale: float = 1.0
    balancing: str = "aux_loss"
    bias_update_rate: float = 1e-3  # step of the routing bias per optimizer step (bias balancing)
    # None: dropless. Else each expert takes at most ceil(cf · slots / N) slots per forward; the
    # overflow slots with the lowest router probability are dropped (their weight set to 0)
    capacity_factor: Optional[float] = None
    # experts per virtual group (G − S: consecutive experts that start as shards of one dense copy);
    # telemetry reports how many tokens still pick whole groups
    virtual_group_size: int = 1
    selection: str = "topk"
    # the weight-scaling factor a of the upcycling: what a whole group's shards are multiplied by,
    # held in the expert weights or in output_multiplier (telemetry's combine mass divides by it)
    scale_factor: float = 1.0
    # fixed (non-trainable) multiplier on the routed output; 1.0 unless scaling_placement is "output"
    output_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection == "per_slice" and self.top_k % self.virtual_group_size:
            raise ValueError(f"per_slice selection needs top_k={self.top_k} to be a multiple of "
                             f"virtual_group_size={self.virtual_group_size}")
        if self.balancing not in BALANCING:
            raise ValueError(f"balancing must be one of {BALANCING}, got {self.balancing!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor!r}")
        if self.virtual_group_size < 1 or self.num_experts % self.virtual_group_size:
            raise ValueError(f"virtual_group_size={self.virtual_group_size} must divide num_experts={self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def uses_aux_loss(self) -> bool:
        return self.balancing in ("aux_loss", "both")

    @property
    def uses_bias(self) -> bool:
        return self.balancing in ("bias", "both")

    @classmethod
    def from_dict(cls, data: dict) -> "MoEConfig":
        return cls(**data)  # fields added later take their defaults in older files

    @property
    def params_per_expert(self) -> int:
        n = (3 if self.gated else 2) * self.d_model * self.d_expert
        n += (2 if self.gated else 1) * self.d_expert * self.first_bias
        n += self.d_model * self.output_bias
        return n
