"""Export targets: the transformers MoE formats `--format hf` writes, one module per format
(runtime/registry.py). A target module carries everything about its format: the dense families
it holds, the router modes it can express and how (config fields), what it lacks (each check one
clause of the error a user sees), its config, its tensor names and layout, and the line the export
table of docs/export.md gives its exactness. compiler/export_hf.py chooses among them; the CLI's --target
choices and the export record are read from here.

Adding a format is one new module here with a `Target` subclass as ENTRY, plus its tests.
"""

from __future__ import annotations

from upcycle.runtime.registry import collect

from .base import ExportError, ExportPlan, Interleaved, Target, hf_aux_loss_coef

TARGETS: dict[str, Target] = collect(__name__)


def targets_for(model_type: str | None) -> list[Target]:
    """The formats holding a source family, default first."""
    return [t for t in TARGETS.values() if model_type in t.sources]


__all__ = ["TARGETS", "targets_for", "Target", "ExportError", "ExportPlan", "Interleaved", "hf_aux_loss_coef"]
