"""The compiler: `compile_upcycle` (Python), `upcycle-compile` (CLI), loading and saving."""

from .errors import ModelError, SpecError, UpcycleError, VerificationError
from .pipeline import compile_upcycle, plan_upcycle, upcycle_model


def __getattr__(name):
    if name in ("load", "save"):
        from . import saving

        return getattr(saving, name)
    raise AttributeError(name)


__all__ = ["compile_upcycle", "plan_upcycle", "upcycle_model", "load", "save", "UpcycleError", "SpecError",
           "ModelError", "VerificationError"]
