"""Entry points for specs: load (path, preset name, dict), dump, list presets, check against a model.

Everything that reaches the compiler goes through `load_spec`, so a bad spec fails here, before
any model is touched, with one located message (`spec.yaml:4: experts.top_k: ...`).
"""

from __future__ import annotations

import difflib
import operator
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import yaml

from .errors import SpecError, SpecWarning, UpcycleError, show_value
from .schema import UpcycleSpec
from .validate import build_spec, line_of
from .yaml_lines import parse_yaml

__all__ = [
    "SpecError",
    "SpecWarning",
    "UpcycleError",
    "PRESETS_DIR",
    "load_spec",
    "dump_spec",
    "list_presets",
    "validate_against_model",
]

PRESETS_DIR = Path(__file__).resolve().with_name("presets")
_YAML_SUFFIXES = (".yaml", ".yml")


def list_presets() -> list[str]:
    """Names accepted by `load_spec` in place of a path (files in specs/presets/, sorted)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _preset_help(name: str) -> str:
    names = list_presets()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}presets: {', '.join(names)}"


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or os.sep in text
        or text.lower().endswith(_YAML_SUFFIXES)
        or text.startswith(("~", "."))
    )


def _resolve(source) -> Path:
    """A path, or a preset name. A bare word is a preset unless a file of that name exists."""
    if isinstance(source, str):
        if not source.strip():
            raise SpecError(f"empty spec name; give a path to a .yaml file or a preset ({_preset_help('')})")
        if not _looks_like_path(source) and not Path(source).is_file():
            preset = PRESETS_DIR / f"{source}.yaml"
            if preset.is_file():
                return preset
            raise SpecError(f"unknown preset {source!r} and no such file; {_preset_help(source)}")
    path = Path(os.fspath(source))
    try:
        path = path.expanduser()
    except RuntimeError:  # "~nobody/spec.yaml": no such user; report the path as given
        pass
    if path.is_file():
        return path
    if path.is_dir():
        raise SpecError("is a directory, not a spec file", file=str(path))
    if path.exists():
        raise SpecError("is not a regular file (a device, pipe or socket?); a spec is a YAML file", file=str(path))
    hint = ""
    if path.parent == Path(".") and path.stem in list_presets():  # "e8g8t8.yaml" meant as a preset
        hint = f"; the preset is spelled {path.stem!r}"
    raise SpecError(f"no such spec file{hint}", file=str(path))


MAX_SPEC_BYTES = 1 << 20  # specs are a few hundred bytes; anything near this is the wrong file


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError(f"is over {MAX_SPEC_BYTES} bytes; a spec is a short YAML file (wrong file?)", file=str(path))
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read spec file: {exc.strerror or exc}", file=str(path)) from None


def load_spec(source, *, name: str | None = None) -> UpcycleSpec:
    """Build a validated `UpcycleSpec`.

    source: an `UpcycleSpec` (returned as is), a path to a YAML file (str or PathLike), a preset
    name from `list_presets()` (e.g. "e8g8t8"), or a mapping with the YAML schema's structure.
    name: what messages call the source (default: the file path, or "<dict>").
    Raises SpecError (a ValueError and an UpcycleError) on anything invalid; emits SpecWarning for
    settings that work but probably do not do what was meant.
    """
    if isinstance(source, UpcycleSpec):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = _resolve(source)
        file = name or str(path)
        data, lines = parse_yaml(_read(path), file)
    elif isinstance(source, Mapping):
        file = name or "<dict>"
        data, lines = source, {}
    else:
        raise SpecError(
            "expected a spec: a path to a .yaml file, a preset name, a mapping or an UpcycleSpec, "
            f"got {show_value(source)} ({type(source).__name__})",
            file=name,
        )
    spec, messages = build_spec(data, file=file, lines=lines)
    for message in messages:
        warnings.warn(message, SpecWarning, stacklevel=2)
    return spec


def dump_spec(spec: UpcycleSpec) -> str:
    """The resolved spec (every default filled in) as YAML that `load_spec` reads back equal."""
    header = f"# resolved upcycle spec (from {spec.source})\n"
    return header + yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=False)


def _divisors(n: int, limit: int = 64) -> list[int]:
    return [g for g in range(1, min(n, limit) + 1) if n % g == 0]


def validate_against_model(spec: UpcycleSpec, d_ffn: int, where: str) -> None:
    """Check the spec fits one dense MLP of hidden width `d_ffn` (module path `where`).

    Fine-grained experts are 1/G slices of the dense hidden dimension, so G must divide d_ffn;
    the error points at the spec's `experts.granularity` line and lists the granularities that work.
    """
    d_ffn = operator.index(d_ffn)
    if d_ffn < 1:
        raise ValueError(f"d_ffn must be >= 1, got {d_ffn} (for {where})")
    g = spec.experts.granularity
    if d_ffn % g == 0:
        return
    raise SpecError(
        f"{g} does not divide d_ffn={d_ffn} of {where}, so experts cannot be equal 1/{g} slices of "
        f"the dense MLP; valid granularities for d_ffn={d_ffn} (up to 64): "
        f"{', '.join(map(str, _divisors(d_ffn)))}",
        file=spec.source,
        field="experts.granularity",
        line=line_of(spec.lines, "experts.granularity"),
    )
