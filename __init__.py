"""upcycle: turn a trained dense transformer into a sparse Mixture-of-Experts by graph rewriting.

    from upcycle import compile_upcycle
    moe_model = compile_upcycle(model, "specs/presets/e8g8t8.yaml")
"""

if __name__ != "upcycle":
    # The repository root is the `upcycle` package. Imported under another name (pytest collects
    # the root folder as a package named after the folder), running this file again would import
    # runtime/ a second time and re-register its torch custom ops under the same names, which frees
    # the first registration while the first import's op objects still point at it: the process
    # then crashes in later op calls. Alias the real package instead.
    import importlib as _importlib
    import sys as _sys

    _sys.modules[__name__] = _importlib.import_module("upcycle")
else:
    __version__ = "0.1.0"

    _RUNTIME = ("MoEConfig", "MoELayer", "aux_loss", "read_router_stats", "relax_routing", "set_aux_loss_scale",
                "update_expert_bias")

    def __getattr__(name):
        # Everything is imported on first use: the compiler pulls in FX/networkx (keep `import
        # upcycle.runtime` light for training jobs), and the runtime torch, which the CLIs import
        # only once they can report a Ctrl-C in one line (compiler/failures.py).
        import importlib

        if name in ("compile_upcycle", "load", "load_into", "save", "UpcycleError", "plan_upcycle"):
            return getattr(importlib.import_module(".compiler", __name__), name)
        if name in _RUNTIME:
            return getattr(importlib.import_module(".runtime", __name__), name)
        if name in ("runtime", "compiler", "passes", "specs"):
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'upcycle' has no attribute {name!r}")

    __all__ = ["compile_upcycle", "load", "load_into", "save", "plan_upcycle", "UpcycleError", "MoEConfig", "MoELayer",
               "aux_loss", "read_router_stats", "relax_routing", "set_aux_loss_scale", "update_expert_bias", "__version__"]
