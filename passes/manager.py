"""Pass infrastructure: small passes over a shared context, run by a pipeline that logs each one.

An analysis pass reads the model (or what earlier passes found) and annotates the context; a
transform pass changes the model. Every pass returns its decisions as (block, decision) pairs,
and the pipeline records them with timings in a `PassLog`, so `explain()` can say what was
decided where and by whom:

    trace-units → activation-regions → match-mlps → choose-rewrite-unit → check-coverage
    (analysis, `discover_mlps`)                   then rewrite-mlps (transform, `rewrite_mlps`)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch.nn as nn


@dataclass
class PassLog:
    """What one pass did: its name and kind, one decision per block, and how long it took."""

    name: str
    kind: str  # "analysis" or "transform"
    decisions: list[tuple[str, str]] = field(default_factory=list)  # (block path, decision)
    seconds: float = 0.0
    summary: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "seconds": self.seconds, "summary": self.summary,
                "decisions": [list(d) for d in self.decisions]}


@dataclass
class PassContext:
    """Everything the passes share. Analysis passes fill the annotation fields."""

    model: nn.Module
    units: list = field(default_factory=list)  # trace.TracedUnit
    untraced: list = field(default_factory=list)  # trace.UntracedBlock
    contracted: dict[str, Any] = field(default_factory=dict)  # unit path -> find_mlps.Contracted
    matches: dict[str, list] = field(default_factory=dict)  # unit path -> [MLPMatch]
    mlps: list = field(default_factory=list)  # discover.FoundMLP, model order
    problems: list[str] = field(default_factory=list)  # blocks the passes could not handle, and why
    records: list = field(default_factory=list)  # rewrite.RewriteRecord
    options: dict[str, Any] = field(default_factory=dict)  # per-run inputs (targets, make_moe)


class Pass:
    """A unit of work. Subclasses set `name`, `kind`, `description` and implement `run`."""

    name = "pass"
    kind = "analysis"
    description = ""

    def run(self, ctx: PassContext) -> Iterable[tuple[str, str]]:  # pragma: no cover - interface
        raise NotImplementedError

    def summary(self, ctx: PassContext) -> str:
        return ""


class FunctionPass(Pass):
    """A pass made from a function `ctx -> decisions` (handy in tests and for one-off steps)."""

    def __init__(self, name: str, fn: Callable[[PassContext], Iterable[tuple[str, str]]], kind: str = "analysis",
                 description: str = ""):
        self.name, self.kind, self.description, self._fn = name, kind, description, fn

    def run(self, ctx: PassContext) -> Iterable[tuple[str, str]]:
        return self._fn(ctx)


class PassPipeline:
    """Runs passes in order over one context, logging each (decisions and seconds)."""

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)
        self.logs: list[PassLog] = []

    def run(self, ctx: PassContext) -> PassContext:
        for p in self.passes:
            t0 = time.perf_counter()
            decisions = [(block or "<root>", str(decision)) for block, decision in (p.run(ctx) or [])]
            log = PassLog(p.name, p.kind, decisions, time.perf_counter() - t0, p.summary(ctx))
            self.logs.append(log)
        return ctx

    def describe(self) -> str:
        return " -> ".join(f"{p.name} ({p.kind})" for p in self.passes)


def explain(logs: list[PassLog], passes: list[Pass] | None = None) -> str:
    """Text: the pipeline, then each pass with its timing and its decisions per block."""
    lines = ["pipeline: " + " -> ".join(f"{log.name} ({log.kind})" for log in logs)]
    described = {p.name: p.description for p in passes or []}
    for log in logs:
        lines.append("")
        head = f"[{log.kind}] {log.name}: {log.seconds * 1000:.1f} ms"
        if log.summary:
            head += f", {log.summary}"
        lines.append(head)
        if described.get(log.name):
            lines.append(f"  ({described[log.name]})")
        if not log.decisions:
            lines.append("  (nothing to decide)")
        for block, decision in log.decisions:
            lines.append(f"  {block}: {decision}")
    return "\n".join(lines) + "\n"
