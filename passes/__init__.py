"""Compiler passes: analysis passes that annotate (trace-units, activation-regions, match-mlps,
choose-rewrite-unit, check-coverage) and the transform pass that rewrites (rewrite-mlps), run by
`manager.PassPipeline`, which records a `PassLog` per pass; `explain(logs)` renders them."""

from .manager import Pass, PassContext, PassLog, PassPipeline, explain

__all__ = ["Pass", "PassContext", "PassLog", "PassPipeline", "explain"]
