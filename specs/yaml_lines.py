"""YAML reading that keeps line numbers, so every spec error can point at the offending line.

`yaml.safe_load` throws positions away. We compose the node tree first (it has marks), record the
1-based line of every key we care about under its dotted path (`experts.top_k`, `layers[1]`), then
construct plain Python data from the same tree with PyYAML's safe constructor.

One deliberate difference from `safe_load`: floats follow YAML 1.2, so `1e-5` is the number
0.00001 rather than the string "1e-5" (PyYAML's YAML 1.1 resolver needs a dot: `1.0e-5`). Specs
are full of such values (`tolerance: 1e-5`), and a type error for them would be baffling.
"""

from __future__ import annotations

import re

import yaml

from .errors import SpecError

__all__ = ["parse_yaml"]

# Keys deeper than this are never read by the schema; not walking them keeps the walk cheap and
# immune to pathological nesting.
_MAX_DEPTH = 3
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader whose float resolver also accepts exponent forms without a dot (YAML 1.2), and
    whose constructors report their non-YAML failures with the node's position."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
            # e.g. `2020-99-99` is resolved as a timestamp and datetime raises ValueError
            raise yaml.constructor.ConstructorError(None, None, f"cannot read value: {exc}", node.start_mark) from None


_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)
    |[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# Copy the resolver table first: add_implicit_resolver on a subclass would otherwise share (and
# mutate) SafeLoader's lists for the same first characters.
_SpecLoader.yaml_implicit_resolvers = {
    ch: list(resolvers) for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _walk(node, prefix: str, depth: int, lines: dict, file: str) -> None:
    """Record the line of each mapping key / sequence item under its dotted path; reject
    duplicate keys (safe_load silently keeps the last one, hiding typos like two `top_k`s)."""
    if depth >= _MAX_DEPTH:
        return
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            path = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            ident = (key_node.tag, key)
            if ident in seen:
                raise SpecError(
                    f"duplicate key (first given on line {seen[ident]})", file=file, field=path, line=line
                )
            seen[ident] = line
            lines.setdefault(path, line)
            _walk(value_node, path, depth + 1, lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            lines.setdefault(path, item.start_mark.line + 1)
            _walk(item, path, depth + 1, lines, file)


def parse_yaml(text: str, file: str) -> tuple[object, dict]:
    """Parse one YAML document. Returns (data, lines) where lines maps dotted paths to 1-based
    lines. Any failure, including the odd non-YAML exceptions PyYAML's constructors leak
    (`2020-99-99` raises ValueError from datetime), becomes a SpecError with a position."""
    loader = None
    try:
        loader = _SpecLoader(text)  # the reader already rejects control characters here
        node = loader.get_single_node()
        lines: dict = {}
        if node is None:  # empty document or only comments: all defaults
            return None, lines
        lines[""] = node.start_mark.line + 1  # where the document starts, for top-level errors
        _walk(node, "", 0, lines, file)
        data = loader.construct_document(node)
        return data, lines
    except SpecError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(p for p in (exc.context, exc.problem) if p) or "cannot parse"
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        raise SpecError(f"malformed YAML: {what}", file=file, line=line, column=column) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise SpecError(f"malformed YAML: unacceptable character {char}: {exc.reason}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"malformed YAML: {exc}", file=file) from None
    except RecursionError:
        raise SpecError("malformed YAML: nested too deeply", file=file) from None
    except Exception as exc:  # noqa: BLE001 - constructor leaks (ValueError, OverflowError, ...)
        raise SpecError(f"malformed YAML: {exc}", file=file) from None
    finally:
        if loader is not None:
            loader.dispose()
