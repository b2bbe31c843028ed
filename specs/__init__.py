"""Upcycling specs: the typed schema, the YAML loader with located errors, and the presets.

    from upcycle.specs import load_spec
    spec = load_spec("e8g8t8")              # a preset, or a path to a .yaml, or a dict
"""

from .errors import SpecError, SpecWarning, UpcycleError
from .loader import PRESETS_DIR, dump_spec, list_presets, load_spec, validate_against_model
from .schema import ExpertsSpec, LayerSelection, RouterSpec, RuntimeSpec, UpcycleSpec, VerifySpec

__all__ = [
    "load_spec",
    "dump_spec",
    "list_presets",
    "validate_against_model",
    "PRESETS_DIR",
    "SpecError",
    "SpecWarning",
    "UpcycleError",
    "UpcycleSpec",
    "ExpertsSpec",
    "RouterSpec",
    "LayerSelection",
    "RuntimeSpec",
    "VerifySpec",
]
