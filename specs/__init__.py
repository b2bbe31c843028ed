"""Upcycling specs: the typed schema, the YAML loader with located errors, and the presets.

    from upcycle.specs import load_spec
    spec = load_spec("e8g8t8")              # a preset, or a path to a .yaml, or a dict

Only the errors are imported eagerly: the schema takes its backend names from the runtime's
registry (which loads torch), and the CLIs must be able to report a Ctrl-C before torch loads.
"""

from .errors import SpecError, SpecWarning, UpcycleError

_LOADER = ("PRESETS_DIR", "dump_spec", "list_presets", "load_spec", "validate_against_model")
_SCHEMA = ("ExpertsSpec", "LayerSelection", "RouterSpec", "RuntimeSpec", "UpcycleSpec", "VerifySpec")


def __getattr__(name):
    import importlib

    if name in _LOADER:
        return getattr(importlib.import_module(".loader", __name__), name)
    if name in _SCHEMA:
        return getattr(importlib.import_module(".schema", __name__), name)
    if name.isidentifier() and not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)  # a submodule, e.g. upcycle.specs.loader
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LOADER, "SpecError", "SpecWarning", "UpcycleError", *_SCHEMA]
