"""Errors the compiler reports to its user (all UpcycleError: the CLI prints one line, exit 2)."""

from upcycle.specs.errors import SpecError, UpcycleError


class ModelError(UpcycleError):
    """The model (or model file) cannot be upcycled as given."""


class VerificationError(UpcycleError):
    """An upcycled layer that must equal its dense MLP does not: a bug, never the user's fault."""


def brief(exc: BaseException, limit: int = 200) -> str:
    """`Type: first line` of someone else's exception, cut at `limit` characters: transformers, for
    one, lists all of its ~1000 model types when it does not know one."""
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    if len(text) > limit:
        text = text[:limit].rstrip() + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["UpcycleError", "SpecError", "ModelError", "VerificationError", "brief"]
