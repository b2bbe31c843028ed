"""The pre-flight checks of a conversion: where they run and what they suggest instead.

`resources` measures (what is available) and estimates (what a workload needs); this module
applies that to the three ways a conversion runs, before any tensor is allocated:

- the CLI from a safetensors checkpoint, in memory: the plan is made on the meta device from the
  config (`plan_checkpoint`), so an impossible job is refused before the model is even loaded, and
  `--stream` is suggested when it would fit;
- streaming (`stream_upcycle`): right after its own plan on meta;
- `compile_upcycle` on a model already in memory: after the analysis, before the first MoE layer.

Each raises `ResourceError` (one line, exit 2) unless forced (`--force-resources`).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from . import resources
# the checks of the streaming and in-memory pipelines live in resources.py, so that those pipelines
# need not import this module, which plans through them (no import circle); re-exported here
from .resources import check_loaded, check_streaming, itemsize_of  # noqa: F401


@dataclass
class Preflight:
    """The plan of a safetensors checkpoint made on the meta device, and both modes' estimates."""

    plan: object
    discovery: object
    in_memory: resources.Estimate
    streaming: resources.Estimate


def plan_checkpoint(spec, model_path, config_path=None, out_dtype: torch.dtype | None = None) -> Preflight:
    """Analyse the checkpoint's model on the meta device (no memory, no weights read)."""
    from upcycle.specs import load_spec

    from .streaming import analyse_on_meta

    spec = load_spec(spec)
    _, _, model, discovery, _, plan = analyse_on_meta(spec, model_path, config_path)
    dtype = next(iter(model.parameters())).dtype
    w = resources.workload(plan, spec, model, itemsize=itemsize_of(dtype), out_itemsize=itemsize_of(out_dtype or dtype))
    return Preflight(plan, discovery, resources.in_memory(w), resources.streaming(w))


def check_in_memory(mp: Preflight, out, *, streamable: bool = True) -> None:
    """The CLI's in-memory conversion of a checkpoint on disk: memory and the output's disk space."""
    alternatives = []
    if streamable and mp.streaming.memory < resources.available_memory().bytes:
        alternatives.append(f"--stream (about {resources.fmt_bytes(mp.streaming.memory)})")
    resources.check_memory(mp.in_memory, alternatives=alternatives)
    if out is not None:
        resources.check_disk(mp.in_memory.output, out)


def check_rebuild(config, spec) -> resources.Estimate:
    """upcycle-export-run rebuilds a run's model from its run.json config (fp32), then DCP reads
    the weights into it: the dense skeleton, the upcycled model and DCP's read buffers (one more
    copy of the weights) must fit. Planned on meta: a config of 7B parameters is refused here."""
    from upcycle.specs import load_spec

    from .loading import meta_skeleton
    from .pipeline import analyse

    spec = load_spec(spec)
    model = meta_skeleton(config, torch.float32)
    plan = analyse(model, spec)[2]
    dense, after = plan.params_before * 4, plan.params_after * 4
    est = resources.Estimate("rebuild of the run's model", dense + 2 * after, 0,
                             (("dense skeleton", dense), ("upcycled model", after), ("checkpoint read buffers", after)))
    resources.check_memory(est)
    return est


__all__ = ["Preflight", "plan_checkpoint", "check_in_memory", "check_streaming", "check_loaded", "check_rebuild",
           "itemsize_of"]
