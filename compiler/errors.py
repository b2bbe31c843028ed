"""Errors the compiler reports to its user (all UpcycleError: the CLI prints one line, exit 2)."""

from upcycle.specs.errors import SpecError, UpcycleError


class ModelError(UpcycleError):
    """The model (or model file) cannot be upcycled as given."""


class VerificationError(UpcycleError):
    """An upcycled layer that must equal its dense MLP does not: a bug, never the user's fault."""


__all__ = ["UpcycleError", "SpecError", "ModelError", "VerificationError"]
