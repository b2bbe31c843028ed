"""Plain data (from YAML or a dict) -> a validated `UpcycleSpec`, or one precise `SpecError`.

Why a hand-written checker rather than a schema library: every message must name the dotted
field, its YAML line, what was expected and, for typos, the closest valid spelling. The rules are
strict on purpose: a bool is not an integer (YAML turns `yes`/`on` into True), a string is not a
number, and unknown keys are errors (a misspelt `top_k` silently falling back to the default would
build the wrong model without a word).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import get_args

from .errors import SpecError, show_value
from .schema import (
    Backend,
    Balancing,
    ExpertsSpec,
    LayerSelection,
    RouterInit,
    RouterSpec,
    RouterSelection,
    RouterType,
    RuntimeSpec,
    ScalingPlacement,
    UpcycleSpec,
    VerifySpec,
)

__all__ = ["build_spec", "TOP_KEYS", "SECTION_KEYS", "line_of"]

TOP_KEYS = ("experts", "router", "weight_scaling", "scaling_placement", "layers", "runtime", "verify", "seed")
SECTION_KEYS = {
    "experts": ("expansion", "granularity", "top_k", "shared_experts", "drop_upcycling", "shuffle"),
    "router": ("type", "selection", "init", "init_std", "aux_loss_coef", "z_loss_coef", "balancing", "bias_update_rate"),
    "runtime": ("backend", "capacity_factor"),
    "verify": ("enabled", "probe_tokens", "tolerance"),
}
LAYER_MODES = ("every", "first", "last", "match")
LAYER_KEYS = LAYER_MODES + ("offset",)
LAYERS_FORMS = "'all', a list of layer indices, or one of {every: n, offset: k}, {first: n}, {last: n}, {match: regex}"
# Keys people plausibly write that the schema derives instead: say how to express them.
_DERIVED = "the number of experts is derived (expansion x granularity); set those instead"
_HINTS = {"num_experts": _DERIVED, "n_experts": _DERIVED, "num_local_experts": _DERIVED, "num_experts_per_tok": "that is top_k"}


def line_of(lines: Mapping, path: str) -> int | None:
    """Line of `path`, else of its nearest recorded ancestor (a default value has no line of its
    own, but its section usually does)."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            return None
        path = path[:cut]
    return None


def _kind(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return " (a boolean)"
    if isinstance(value, int):
        return " (an integer)"
    if isinstance(value, float):
        return " (a number)"
    if isinstance(value, str):
        return " (a string)"
    if isinstance(value, (list, tuple)):
        return " (a list)"
    if isinstance(value, Mapping):
        return " (a mapping)"
    return f" (a {type(value).__name__})"


def _got(value) -> str:
    return f"got {show_value(value)}{_kind(value)}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _closest(word, choices) -> str | None:
    if not isinstance(word, str):
        return None
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:  # case slips ("SOFTMAX_THEN_TOPK") can fall below difflib's cutoff
        close = [c for c in choices if c.lower() == word.lower()]
    return close[0] if close else None


def _suggest(word, choices) -> str:
    """'did you mean 'x'? ' prefix for unknown-key messages, or ''."""
    close = _closest(word, choices)
    return f"did you mean {close!r}? " if close else ""


def _suggest_after(word, choices) -> str:
    """'; did you mean 'x'?' suffix for bad-value messages, or ''."""
    close = _closest(word, choices)
    return f"; did you mean {close!r}?" if close else ""


class _Checker:
    """Holds where the data came from so each check can raise a fully located error."""

    def __init__(self, file: str, lines: Mapping):
        self.file = file
        self.lines = lines
        self.errors: list[SpecError] = []  # every error of the file, reported together

    def error(self, path: str, message: str) -> SpecError:
        return SpecError(message, file=self.file, field=path, line=line_of(self.lines, path))

    def fail(self, path: str, message: str, default=None):
        """Record an error and go on with `default`, so one run reports every error of the file."""
        self.errors.append(self.error(path, message))
        return default

    def failed_under(self, prefix: str) -> bool:
        return any((e.field or "").startswith(prefix) for e in self.errors)

    def guarded(self, method, data: Mapping, default):
        """A check that stops at its first error (layer forms): record it and use the default."""
        try:
            return method(data)
        except SpecError as exc:
            self.errors.append(exc)
            return default

    # -- structure -------------------------------------------------------------------------
    def keys(self, data: Mapping, path: str, valid) -> None:
        for key in data:
            if key in valid:
                continue
            plain = isinstance(key, str) and key.isprintable() and key and key.strip() == key
            shown = key if plain else show_value(key)
            where = f"{path}.{shown}" if path else shown
            hint = _HINTS.get(key) if isinstance(key, str) else None
            hint = f"{hint}; " if hint else _suggest(key, valid)
            self.fail(where, f"unknown key; {hint}valid keys: {', '.join(valid)}")

    def section(self, data: Mapping, name: str) -> Mapping:
        value = data.get(name)
        if value is None:  # absent, or `router:` with everything under it commented out
            return {}
        if not isinstance(value, Mapping):
            keys = ", ".join(SECTION_KEYS[name])
            return self.fail(name, f"must be a mapping with keys {keys}, {_got(value)}", {})
        self.keys(value, name, SECTION_KEYS[name])
        return value

    # -- scalars ---------------------------------------------------------------------------
    def integer(self, data: Mapping, key: str, path: str, default: int, minimum: int, maximum: int | None = None) -> int:
        if key not in data:
            return default
        value = data[key]
        bound = f">= {minimum}"
        if maximum is not None:
            big = maximum >= 2**32 and (maximum + 1) & maximum == 0  # 2**k - 1: say so, not 20 digits
            bound += f" and <= {f'2**{maximum.bit_length()} - 1' if big else maximum}"
        if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
            return self.fail(path, f"must be an integer {bound}, {_got(value)}", default)
        return int(value)

    def number(self, data: Mapping, key: str, path: str, default: float, *, low: float, low_open: bool, high: float | None = None) -> float:
        """A finite float in (low, high) / [low, high); ints are accepted and widened."""
        if key not in data:
            return default
        value = data[key]
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        bound = lo if high is None else f"{lo} and < {high:g}"
        ok = _is_number(value) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
        if not ok:
            return self.fail(path, f"must be a number {bound}, {_got(value)}", default)
        return float(value)

    def choice(self, data: Mapping, key: str, path: str, default: str, choices) -> str:
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, str) or value not in choices:
            return self.fail(path, f"must be one of {', '.join(choices)}; {_got(value)}{_suggest_after(value, choices)}",
                             default)
        return value

    def boolean(self, data: Mapping, key: str, path: str, default: bool) -> bool:
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, bool):
            return self.fail(path, f"must be true or false, {_got(value)}", default)
        return value

    # -- sections --------------------------------------------------------------------------
    def experts(self, data: Mapping) -> ExpertsSpec:
        d, p, D = self.section(data, "experts"), "experts.", ExpertsSpec()
        spec = ExpertsSpec(
            expansion=self.integer(d, "expansion", p + "expansion", D.expansion, 1),
            granularity=self.integer(d, "granularity", p + "granularity", D.granularity, 1),
            top_k=self.integer(d, "top_k", p + "top_k", D.top_k, 1),
            shared_experts=self.integer(d, "shared_experts", p + "shared_experts", D.shared_experts, 0),
            drop_upcycling=self.number(d, "drop_upcycling", p + "drop_upcycling", D.drop_upcycling, low=0.0, low_open=False, high=1.0),
            shuffle=self.boolean(d, "shuffle", p + "shuffle", D.shuffle),
        )
        if self.failed_under(p):  # the checks below compare fields: only when each was valid
            return spec
        if spec.shared_experts and spec.shared_experts >= spec.granularity:
            return self.fail(
                p + "shared_experts",
                f"must be < granularity ({spec.granularity}): the shared expert takes {spec.shared_experts} of the "
                f"{spec.granularity} shards of the dense MLP and the routed experts are built from the rest",
                spec,
            )
        if spec.top_k > spec.num_experts:
            shared = f" - shared_experts {spec.shared_experts}" if spec.shared_experts else ""
            return self.fail(
                p + "top_k",
                f"must be <= the number of experts (expansion {spec.expansion} x (granularity "
                f"{spec.granularity}{shared}) = {spec.num_experts}), got {spec.top_k}"
                if shared else
                f"must be <= the number of experts (expansion {spec.expansion} x granularity "
                f"{spec.granularity} = {spec.num_experts}), got {spec.top_k}",
                spec,
            )
        return spec

    def router(self, data: Mapping) -> RouterSpec:
        d, p, D = self.section(data, "router"), "router.", RouterSpec()
        return RouterSpec(
            type=self.choice(d, "type", p + "type", D.type, get_args(RouterType)),
            selection=self.choice(d, "selection", p + "selection", D.selection, get_args(RouterSelection)),
            init=self.choice(d, "init", p + "init", D.init, get_args(RouterInit)),
            init_std=self.number(d, "init_std", p + "init_std", D.init_std, low=0.0, low_open=True),
            aux_loss_coef=self.number(d, "aux_loss_coef", p + "aux_loss_coef", D.aux_loss_coef, low=0.0, low_open=False),
            z_loss_coef=self.number(d, "z_loss_coef", p + "z_loss_coef", D.z_loss_coef, low=0.0, low_open=False),
            balancing=self.choice(d, "balancing", p + "balancing", D.balancing, get_args(Balancing)),
            bias_update_rate=self.number(d, "bias_update_rate", p + "bias_update_rate", D.bias_update_rate,
                                         low=0.0, low_open=True),
        )

    def runtime(self, data: Mapping) -> RuntimeSpec:
        d = self.section(data, "runtime")
        cf = d.get("capacity_factor")
        return RuntimeSpec(
            backend=self.choice(d, "backend", "runtime.backend", RuntimeSpec().backend, get_args(Backend)),
            # null (or absent) = dropless
            capacity_factor=None if cf is None else self.number(d, "capacity_factor", "runtime.capacity_factor",
                                                                 None, low=0.0, low_open=True),
        )

    def verify(self, data: Mapping) -> VerifySpec:
        d, p, D = self.section(data, "verify"), "verify.", VerifySpec()
        return VerifySpec(
            enabled=self.boolean(d, "enabled", p + "enabled", D.enabled),
            probe_tokens=self.integer(d, "probe_tokens", p + "probe_tokens", D.probe_tokens, 1),
            tolerance=self.number(d, "tolerance", p + "tolerance", D.tolerance, low=0.0, low_open=True),
        )

    def weight_scaling(self, data: Mapping):
        value = data.get("weight_scaling", "auto")
        if value in ("auto", "none") and isinstance(value, str):
            return value
        if _is_number(value) and math.isfinite(value) and value > 0:
            return float(value)
        return self.fail(
            "weight_scaling",
            f"must be one of auto, none or a positive number; {_got(value)}{_suggest_after(value, ('auto', 'none'))}",
            "auto",
        )

    def layers(self, data: Mapping) -> LayerSelection:
        value = data.get("layers")
        if value is None or value == "all":
            return LayerSelection()
        if isinstance(value, (list, tuple)):
            return self._layer_list(value)
        if isinstance(value, Mapping):
            return self._layer_mapping(value)
        raise self.error("layers", f"must be {LAYERS_FORMS}; {_got(value)}{_suggest_after(value, ('all',))}")

    def _layer_list(self, items) -> LayerSelection:
        if not items:
            raise self.error("layers", f"an empty list selects no layer; must be {LAYERS_FORMS}")
        seen: dict[int, int] = {}
        for i, item in enumerate(items):
            path = f"layers[{i}]"
            if not _is_int(item):
                raise self.error(path, f"must be an integer layer index (negative counts from the end), {_got(item)}")
            if item in seen:
                raise self.error(path, f"duplicate layer index {item} (also layers[{seen[item]}])")
            seen[item] = i
        return LayerSelection(mode="indices", indices=tuple(int(i) for i in items))

    def _layer_mapping(self, d: Mapping) -> LayerSelection:
        self.keys(d, "layers", LAYER_KEYS)
        if self.failed_under("layers."):  # an unknown key (a misspelt mode) says it all
            return LayerSelection()
        modes = [m for m in LAYER_MODES if m in d]
        if len(modes) != 1:
            what = "needs" if not modes else f"has {', '.join(modes)}; give only"
            raise self.error("layers", f"{what} one of {', '.join(LAYER_MODES)}")
        mode = modes[0]
        if "offset" in d and mode != "every":
            raise self.error("layers.offset", f"only applies with layers.every, not with layers.{mode}")
        if mode == "every":
            every = self.integer(d, "every", "layers.every", 1, 1)
            offset = self.integer(d, "offset", "layers.offset", 0, 0)
            return LayerSelection(mode="every", every=every, offset=offset)
        if mode in ("first", "last"):
            return LayerSelection(mode=mode, count=self.integer(d, mode, f"layers.{mode}", 1, 1))
        pattern = d["match"]
        if not isinstance(pattern, str) or not pattern:
            raise self.error("layers.match", f"must be a non-empty regular expression string, {_got(pattern)}")
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            raise self.error("layers.match", f"invalid regular expression {show_value(pattern)}: {exc}") from None
        return LayerSelection(mode="match", pattern=pattern)


def _virtual_group_warning(spec: UpcycleSpec, checker: _Checker) -> str | None:
    e = spec.experts
    g = e.routed_granularity  # shards per virtual group (G − S with S shared experts)
    if spec.router.init != "virtual_group" or e.top_k % g == 0:
        return None
    path = "router.init" if "router.init" in checker.lines else "experts.top_k"
    line = line_of(checker.lines, path)
    loc = f"{checker.file}:{line}" if line is not None else checker.file
    return (
        f"{loc}: router.init: 'virtual_group' with experts.top_k={e.top_k} not a multiple of "
        f"experts.granularity={e.granularity}{f' - shared_experts={e.shared_experts}' if e.shared_experts else ''}: "
        f"virtual groups cannot be whole, so at init a token "
        f"sees partial copies of the dense MLP (use top_k a multiple of {g} for an exact start)"
    )


def _check_selection(spec: UpcycleSpec, checker: _Checker) -> None:
    """per_slice takes top_k / G copies of every shard position: top_k must be a multiple of G."""
    e = spec.experts
    g = e.routed_granularity
    if spec.router.selection != "per_slice" or checker.failed_under("experts.") or e.top_k % g == 0:
        return
    shared = f" - shared_experts {e.shared_experts}" if e.shared_experts else ""
    checker.fail("router.selection", f"'per_slice' takes experts.top_k / granularity copies of each of the "
                 f"{g} shard positions, so experts.top_k={e.top_k} must be a multiple of granularity {e.granularity}"
                 f"{shared} = {g} (or use selection: topk)", None)


def build_spec(data, *, file: str, lines: Mapping) -> tuple[UpcycleSpec, list[str]]:
    """Validate `data` (None means all defaults). Returns the spec and warning messages; the
    caller emits the warnings so they point at the user's call site."""
    checker = _Checker(file, lines)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError(
            f"the top level must be a mapping with keys {', '.join(TOP_KEYS)}, {_got(data)}",
            file=file,
            line=lines.get(""),  # parse_yaml records the document's first line under ""
        )
    checker.keys(data, "", TOP_KEYS)
    spec = UpcycleSpec(
        experts=checker.experts(data),
        router=checker.router(data),
        weight_scaling=checker.weight_scaling(data),
        scaling_placement=checker.choice(data, "scaling_placement", "scaling_placement", "auto", get_args(ScalingPlacement)),
        layers=checker.guarded(checker.layers, data, LayerSelection()),
        runtime=checker.runtime(data),
        verify=checker.verify(data),
        seed=checker.integer(data, "seed", "seed", 0, 0, 2**64 - 1),
        source=file,
        lines=dict(lines),
    )
    _check_selection(spec, checker)
    if checker.errors:
        raise SpecError.all_of(checker.errors)
    warning = _virtual_group_warning(spec, checker)
    return spec, [warning] if warning else []
