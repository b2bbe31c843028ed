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
from pathlib import Path

import torch

from . import resources


def itemsize_of(dtype: torch.dtype | None, default: int = 4) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype is not None else default


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


def check_streaming(plan, spec, model, *, itemsize: int, out_itemsize: int, out=None,
                    max_shard_bytes: int | None = None) -> resources.Estimate:
    """A streamed conversion (model: the rewritten meta model): memory in flight, disk space, and
    the largest shard against the file-size limit."""
    est = resources.streaming(resources.workload(plan, spec, model, itemsize=itemsize, out_itemsize=out_itemsize))
    resources.check_memory(est)
    if out is not None:
        largest = min(max_shard_bytes, est.output) if max_shard_bytes else est.output
        resources.check_disk(est.output, Path(out), largest_file=largest)
    return est


def check_loaded(plan, spec, model) -> resources.Estimate:
    """compile_upcycle on a model in memory: the new MoE layers and the temporaries must fit."""
    p = next(iter(model.parameters()), None)
    if p is None or p.device.type == "meta":
        return None
    est = resources.in_memory(resources.workload(plan, spec, model, itemsize=p.element_size()), loaded=True)
    resources.check_memory(est)
    return est


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
