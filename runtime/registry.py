"""One registry per axis (router types, expert backends, export targets): a package whose every
module defines one entry, so adding an entry is adding one file.

Why files, not a list edited by hand: the spec schema, the JSON Schema, the CLI choices, the report
and the docs' tables (docs/export.md) are all derived from the entries, so a list kept elsewhere would be one more
place to forget. `collect` imports every module of the package (in name order) and gathers the
object each one names `ENTRY`; entries sort by their `order` (then name), which fixes the order
shown in messages and help texts.
"""

from __future__ import annotations

import importlib
import pkgutil


def collect(package: str) -> dict:
    """{entry.name: entry} of every module of `package` that defines ENTRY."""
    pkg = importlib.import_module(package)
    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        entry = getattr(module, "ENTRY", None)
        if entry is not None:
            found.append(entry)
    names = [e.name for e in found]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"{package}: two entries named {sorted(dup)[0]!r}")
    found.sort(key=lambda e: (getattr(e, "order", 100), e.name))
    return {e.name: e for e in found}


__all__ = ["collect"]
