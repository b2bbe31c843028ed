"""The calibration probe of a streaming conversion: the dense model's forward on the text before
anything is written (the MLP inputs it captures drive each layer's verification and k-means), and
the upcycled model's forward after, both module by module from the checkpoint (compiler/offload.py),
so a streamed conversion reports the same per-layer errors, whole-model error and perplexity as
the in-memory one, in bounded memory.

Cost: two extra passes over the input weights (reads, mostly from the page cache) and the MoE
mapping once more per layer for the second forward (without verification).
"""

from __future__ import annotations

import torch

from upcycle.passes.verify import ProbeCapture, compare

from .calibration import CalibrationBatch
from .errors import ModelError
from .loading import meta_skeleton, tied_groups
from .offload import fill_buffers, offloaded, real_buffers
from .pipeline import _lm_loss, _model_output

VERIFICATION = ("per-layer on the hidden states of the calibration text, and the whole model (dense vs upcycled "
                "logits, perplexity) by a module-by-module forward")


def _resolver(model: torch.nn.Module, infos: dict):
    """fetch(name) for every state-dict name of `model`: a tied duplicate reads the checkpoint
    tensor of its group."""
    where = {}
    for group in tied_groups(model.state_dict(keep_vars=True)):
        stored = next((n for n in group if n in infos), group[0])
        where.update({n: stored for n in group})
    return lambda reader: (lambda name: reader.get(where.get(name, name)))


def _forward(model, inputs, which: str):
    """The model's output on the probe; a failure of the module-by-module forward is one line."""
    try:
        return _model_output(model, inputs)
    except (RuntimeError, NotImplementedError, KeyError, TypeError) as exc:
        raise ModelError(f"{type(model).__name__}: the calibration probe's module-by-module {which} forward failed "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); use --no-stream for the "
                         "in-memory probe") from exc


class StreamProbe:
    def __init__(self, calib: CalibrationBatch, mp, dtype: torch.dtype):
        self.calib = calib
        self.mp = mp
        self.dtype = dtype
        self.buffers = real_buffers(mp.config, dtype)  # rotary tables, masks: not in checkpoints
        self.capture = ProbeCapture()
        self.dense_logits = None

    @property
    def description(self) -> str:
        return self.calib.description

    def _inputs(self):
        return (), {"input_ids": self.calib.input_ids}

    @torch.no_grad()
    def run_dense(self, reader) -> None:
        """The dense forward: logits kept, the input of every MLP to be rewritten captured."""
        dense = meta_skeleton(self.mp.config, self.dtype)
        fill_buffers(dense, self.buffers)
        for match, _unit, _names in self.mp.seen.values():
            if match.up.kind == "module":
                from upcycle.passes.rewrite import linear_paths

                first = dense.get_submodule(".".join(p for p in (match.unit_path, match.up.module_path) if p))
                self.capture.watch(linear_paths(match), first)
        try:
            with offloaded(dense, _resolver(dense, self.mp.infos)(reader)):
                self.dense_logits = _forward(dense, self._inputs(), "dense")
        finally:
            self.capture.remove()

    @torch.no_grad()
    def run_upcycled(self, reader, moe_state) -> tuple[float | None, float | None, float | None]:
        """The upcycled forward (MoE layers mapped again, unverified): (whole-model relative error,
        loss before, loss after)."""
        model = self.mp.model
        fill_buffers(model, self.buffers)
        mlp_of = {rec.moe_path: rec.mlp_path for rec in self.mp.records}
        with offloaded(model, _resolver(model, self.mp.infos)(reader), lambda path: moe_state(mlp_of[path], verify=False)):
            logits = _forward(model, self._inputs(), "upcycled")
        self.capture.inputs.clear()
        if logits is None or self.dense_logits is None or logits.shape != self.dense_logits.shape:
            return None, None, None
        probe = self._inputs()
        return compare(self.dense_logits, logits)[1], _lm_loss(self.dense_logits, probe), _lm_loss(logits, probe)


__all__ = ["StreamProbe", "VERIFICATION"]
