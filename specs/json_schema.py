"""The spec's JSON Schema, generated from the typed schema (schema.py), for editors.

    upcycle-compile --print-schema > upcycle-spec.schema.json

Types, enums and defaults come from the dataclasses' annotations, so a field added to schema.py
appears here without a second edit (tests/test_specs.py checks the two stay in step, and that
every preset validates). Numeric bounds and cross-field rules (top_k ≤ experts, ...) stay with the
validator, which gives the precise messages.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Literal, Union, get_args, get_origin

from .schema import ExpertsSpec, RouterSpec, RuntimeSpec, UpcycleSpec, VerifySpec

SECTIONS = {"experts": ExpertsSpec, "router": RouterSpec, "runtime": RuntimeSpec, "verify": VerifySpec}


def _type_schema(tp) -> dict:
    origin = get_origin(tp)
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin is Union:
        options = [_type_schema(a) for a in get_args(tp)]
        return {"anyOf": options}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    raise TypeError(f"no JSON Schema for {tp!r}")


def _registry_descriptions() -> dict:
    """(section, field) -> description, from the registries' own summaries (runtime/routers/,
    runtime/backends/): an editor shows what each choice means."""
    from upcycle.runtime.backends import BACKENDS
    from upcycle.runtime.routers import ROUTER_TYPES

    return {
        (RouterSpec, "type"): "; ".join(f"{n}: {r.summary}" for n, r in ROUTER_TYPES.items()),
        (RuntimeSpec, "backend"): "auto: the first runnable of grouped, reference; "
                                  + "; ".join(f"{n}: {b.summary}" for n, b in BACKENDS.items()),
    }


def _section(cls) -> dict:
    hints = typing.get_type_hints(cls, include_extras=False)
    described = _registry_descriptions()
    props = {}
    for f in dataclasses.fields(cls):
        entry = _type_schema(hints[f.name])
        if f.default is not dataclasses.MISSING:
            entry["default"] = f.default
        if (cls, f.name) in described:
            entry["description"] = described[(cls, f.name)]
        props[f.name] = entry
    return {"type": "object", "properties": props, "additionalProperties": False}


LAYERS = {
    "description": "which MLPs become MoE (0-based, in model order)",
    "anyOf": [
        {"enum": ["all"]},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {"type": "object", "properties": {"every": {"type": "integer", "minimum": 1},
                                          "offset": {"type": "integer", "minimum": 0}},
         "required": ["every"], "additionalProperties": False},
        {"type": "object", "properties": {"first": {"type": "integer", "minimum": 1}}, "required": ["first"],
         "additionalProperties": False},
        {"type": "object", "properties": {"last": {"type": "integer", "minimum": 1}}, "required": ["last"],
         "additionalProperties": False},
        {"type": "object", "properties": {"match": {"type": "string", "minLength": 1}}, "required": ["match"],
         "additionalProperties": False},
    ],
    "default": "all",
}


def spec_json_schema() -> dict:
    hints = typing.get_type_hints(UpcycleSpec)
    props: dict = {name: _section(cls) for name, cls in SECTIONS.items()}
    for name in ("weight_scaling", "scaling_placement", "seed"):
        entry = _type_schema(hints[name])
        default = UpcycleSpec.__dataclass_fields__[name].default
        if default is not dataclasses.MISSING:
            entry["default"] = default
        props[name] = entry
    props["seed"]["minimum"] = 0
    props["layers"] = LAYERS
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "upcycle spec",
        "description": "A dense-to-MoE upcycling spec for upcycle-compile / compile_upcycle",
        "type": "object",
        "properties": props,
        "additionalProperties": False,
    }


def dumps() -> str:
    return json.dumps(spec_json_schema(), indent=2)


__all__ = ["spec_json_schema", "dumps"]
