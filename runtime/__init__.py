"""MoE runtime: works without the compiler (a trained MoE needs no tracer)."""

from .activations import ACTIVATIONS, HOMOGENEITY_DEGREE, get_activation, identify_activation
from .config import MoEConfig
from .dispatch import available_backends, register_backend, resolve_backend
from .experts import GroupedExperts, reference_forward
from .grouped import grouped_forward
from .kernels import triton_available, triton_backend
from .losses import aux_loss, load_balancing_loss, z_loss
from .moe import MoELayer, SharedExpert, build_moe
from .router import RouterOutput, TopKRouter

register_backend("grouped", grouped_forward)
if triton_available():
    register_backend("triton", triton_backend)

__all__ = [
    "ACTIVATIONS", "HOMOGENEITY_DEGREE", "get_activation", "identify_activation", "MoEConfig",
    "available_backends", "register_backend", "resolve_backend", "GroupedExperts", "reference_forward",
    "aux_loss", "load_balancing_loss", "z_loss", "MoELayer", "SharedExpert", "build_moe",
    "RouterOutput", "TopKRouter", "grouped_forward",
]
