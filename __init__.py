"""upcycle: turn a trained dense transformer into a sparse Mixture-of-Experts by graph rewriting.

    from upcycle import compile_upcycle
    moe_model = compile_upcycle(model, "specs/presets/e8g8t8.yaml")
"""

from .runtime import MoEConfig, MoELayer, aux_loss, read_router_stats, set_aux_loss_scale, update_expert_bias

__version__ = "0.1.0"


def __getattr__(name):
    # The compiler pulls in FX/networkx; keep `import upcycle.runtime` light for training jobs.
    if name in ("compile_upcycle", "load", "save", "UpcycleError", "plan_upcycle"):
        from . import compiler

        return getattr(compiler, name)
    raise AttributeError(f"module 'upcycle' has no attribute {name!r}")


__all__ = ["compile_upcycle", "load", "save", "plan_upcycle", "UpcycleError", "MoEConfig", "MoELayer", "aux_loss",
           "read_router_stats", "set_aux_loss_scale", "update_expert_bias", "__version__"]
