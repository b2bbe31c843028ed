"""The compiler: `compile_upcycle` (Python), `upcycle-compile` (CLI), loading and saving.

Names are imported on first use, so the CLIs start (and can report a Ctrl-C) before torch loads.
"""

from .errors import ModelError, SpecError, UpcycleError, VerificationError

_PIPELINE = ("compile_upcycle", "plan_upcycle", "upcycle_model")


def __getattr__(name):
    import importlib

    if name in _PIPELINE:
        return getattr(importlib.import_module(".pipeline", __name__), name)
    if name in ("load", "load_into"):
        return getattr(importlib.import_module(".reload", __name__), name)
    if name == "save":
        return getattr(importlib.import_module(".saving", __name__), name)
    if name.isidentifier() and not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)  # a submodule, e.g. upcycle.compiler.loading
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(name)


__all__ = ["compile_upcycle", "plan_upcycle", "upcycle_model", "load", "load_into", "save", "UpcycleError", "SpecError",
           "ModelError", "VerificationError"]
