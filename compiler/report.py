"""The conversion report: per-layer init error (auto scaling vs none), model-level change, timing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from upcycle.passes.rewrite import RewriteRecord
from upcycle.passes.verify import LayerCheck
from upcycle.runtime.routers import router_type
from upcycle.specs.schema import UpcycleSpec

from .plan import Plan, render_plan


def _ppl(loss: float | None) -> float | None:
    import math

    return None if loss is None else math.exp(min(loss, 700.0))


@dataclass
class Report:
    spec: dict
    plan: dict
    layers: list[dict] = field(default_factory=list)
    rewrites: list[dict] = field(default_factory=list)
    model_rel_error: float | None = None  # ||logits_moe - logits_dense|| / ||logits_dense|| on the probe
    loss_before: float | None = None  # LM loss on the probe batch (random tokens unless given)
    loss_after: float | None = None
    seconds: float = 0.0
    probe: str = ""
    plan_text: str = ""
    # exp(loss) on the calibration text (None when the probe is not real text)
    perplexity_before: float | None = None
    perplexity_after: float | None = None

    @classmethod
    def build(cls, spec: UpcycleSpec, plan: Plan, checks: list[LayerCheck], records: list[RewriteRecord],
              model_error, loss_before, loss_after, seconds: float, probe: str) -> "Report":
        return cls(
            spec=spec.to_dict(),
            plan=plan.to_dict(),
            layers=[c.to_dict() for c in checks],
            rewrites=[asdict(r) for r in records],
            model_rel_error=model_error,
            loss_before=loss_before,
            loss_after=loss_after,
            seconds=seconds,
            probe=probe,
            plan_text=render_plan(plan, spec),
            perplexity_before=_ppl(loss_before) if probe.startswith("calibration") else None,
            perplexity_after=_ppl(loss_after) if probe.startswith("calibration") else None,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> dict:
        """Means over layers, the numbers a user looks at first."""
        rel = [c["rel_error"] for c in self.layers]
        unscaled = [c["rel_error_unscaled"] for c in self.layers if c["rel_error_unscaled"] is not None]
        return {
            "layers": len(self.layers),
            "mean_rel_error": sum(rel) / len(rel) if rel else None,
            "mean_rel_error_unscaled": sum(unscaled) / len(unscaled) if unscaled else None,
            "exact_layers_passed": sum(1 for c in self.layers if c["exact_expected"] and c["passed"]),
        }

    def legend(self) -> list[str]:
        """What the columns mean, and which deviations the chosen spec expects (in words)."""
        spec = self.spec
        router, ex = spec["router"]["type"], spec["experts"]
        any_exact = any(c["exact_expected"] for c in self.layers)
        out = [
            "  how to read this:",
            "    rel err     ||MoE(x) - MLP(x)|| / ||MLP(x)|| over the probe tokens x (0 = identical outputs)",
            "    no scaling  the same layer built with weight_scaling none, to show what the scaling buys",
            "    max abs     the largest single difference, in the units of the layer's output; compare it",
            "                with out RMS (the dense output's root-mean-square), not with 1",
        ]
        if any_exact:
            out.append("    must be exact: this spec reproduces the dense MLP exactly at init (topk_then_softmax, "
                       "top_k = granularity, virtual-group router); 'FAILED' would be a bug")
        else:  # the router type's own words (runtime/routers/)
            out.append(f"    expected here: {router_type(router).expected.format(top_k=ex['top_k'])}")
        if self.probe.startswith("synthetic"):
            out.append("    probe: random unit-RMS vectors, not real hidden states, so errors read larger than on text")
        return out

    def to_text(self) -> str:
        lines = [self.plan_text, "", f"verification ({self.probe} probe):"]
        if self.layers:
            lines.append(f"  {'MLP':<34} {'rel err':>10} {'rel err (no scaling)':>21} {'max abs':>10} {'out RMS':>9}  must be exact?")
            for c in self.layers:
                un = "-" if c["rel_error_unscaled"] is None else f"{c['rel_error_unscaled']:.4g}"
                exact = ("yes: passed" if c["passed"] else "yes: FAILED") if c["exact_expected"] else "no (by design)"
                lines.append(f"  {c['mlp_path']:<34} {c['rel_error']:>10.4g} {un:>21} {c['max_abs_error']:>10.3g} "
                             f"{c.get('output_norm', float('nan')):>9.3g}  {exact}")
            s = self.summary()
            if s["mean_rel_error_unscaled"] is not None:
                better = "closer to" if s["mean_rel_error"] < s["mean_rel_error_unscaled"] else "NOT closer to"
                lines.append(
                    f"  mean relative error: {s['mean_rel_error']:.4g} with scaling vs "
                    f"{s['mean_rel_error_unscaled']:.4g} without: scaling brings the MoE {better} the dense MLP"
                )
            else:
                lines.append(f"  mean relative error: {s['mean_rel_error']:.4g}")
            lines += ["", *self.legend()]
        else:
            lines.append("  disabled")
        if self.model_rel_error is not None:
            lines.append(f"  whole model: relative output error {self.model_rel_error:.4g}")
        if self.perplexity_before is not None and self.perplexity_after is not None:
            lines.append(f"  perplexity on the calibration text: dense {self.perplexity_before:.4g} -> upcycled "
                         f"{self.perplexity_after:.4g} ({self.perplexity_after / self.perplexity_before:.3f}x)")
        elif self.loss_before is not None and self.loss_after is not None:
            lines.append(f"  probe loss: dense {self.loss_before:.4f} -> upcycled {self.loss_after:.4f} "
                         f"({self.loss_after - self.loss_before:+.4f})")
        lines.append(f"conversion time: {self.seconds:.2f} s")
        return "\n".join(lines)
