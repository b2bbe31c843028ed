"""MoE runtime: works without the compiler (a trained MoE needs no tracer)."""

from .activations import ACTIVATIONS, HOMOGENEITY_DEGREE, get_activation
from .config import MoEConfig
from .backends import available_backends, register_backend, resolve_backend
from .experts import GroupedExperts, reference_forward
from .grouped import grouped_forward
from .balancing import update_expert_bias
from .capacity import capacity_keep
from .losses import aux_loss, load_balancing_loss, set_aux_loss_scale, z_loss
from .moe import MoELayer, SharedExpert, build_moe, moe_layers, relax_routing
from .router import RouterOutput, TopKRouter
from .telemetry import RouterStats, TelemetryWriter, plot_load_heatmap, read_router_stats, stats_summary
from .token_mask import attach_token_mask

__all__ = [
    "ACTIVATIONS", "HOMOGENEITY_DEGREE", "get_activation", "MoEConfig",
    "available_backends", "register_backend", "resolve_backend", "GroupedExperts", "reference_forward",
    "aux_loss", "load_balancing_loss", "z_loss", "MoELayer", "SharedExpert", "build_moe", "moe_layers", "relax_routing",
    "RouterOutput", "TopKRouter", "grouped_forward", "update_expert_bias", "capacity_keep", "set_aux_loss_scale",
    "RouterStats", "TelemetryWriter", "plot_load_heatmap", "read_router_stats", "stats_summary", "attach_token_mask",
]
