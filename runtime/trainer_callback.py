"""transformers `Trainer` integration: router telemetry in Trainer's logs, the aux-loss scale set.

An upcycled model needs nothing to *train* under an unmodified Trainer: its router losses ride in
autograd. This callback adds what Trainer cannot know:

- at train start, the attached router loss's gradient scale is set to 1 / gradient_accumulation_steps
  (Trainer averages its loss over the accumulated micro-batches; see losses.py for the rule);
- after each optimizer step the layers' statistics are read (all micro-batches, all ranks) and the
  step's summary is added to the next `logs` (so `report_to` sends them to TensorBoard, CSV, W&B
  ...) and to `trainer.state.log_history`; optionally every step goes to a JSONL file for
  `upcycle-telemetry` heatmaps.

    trainer = Trainer(model=moe, args=args, train_dataset=ds)
    add_router_telemetry(trainer, jsonl="out/router.jsonl")   # first in line, before the reporters
    trainer.train()
"""

from __future__ import annotations

from typing import Optional

from transformers import TrainerCallback

from .losses import set_aux_loss_scale
from .telemetry import TelemetryWriter, read_router_stats, stats_summary


class RouterTelemetryCallback(TrainerCallback):
    def __init__(self, jsonl: Optional[str] = None, per_layer: bool = False):
        self.writer = TelemetryWriter(jsonl) if jsonl else None
        self.per_layer = per_layer
        self.pending: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_aux_loss_scale(model, 1.0 / max(args.gradient_accumulation_steps, 1))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        stats = read_router_stats(model)
        if not stats:
            return
        summary = stats_summary(stats)
        if not self.per_layer:
            summary = {k: v for k, v in summary.items() if k.count("/") == 1}
        self.pending = summary
        if self.writer is not None and state.is_world_process_zero:
            self.writer.write(state.global_step, stats)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.pending or "loss" not in logs:
            return
        logs.update(self.pending)  # callbacks after this one (the reporters) see them
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.pending)
        self.pending = {}


def add_router_telemetry(trainer, jsonl: Optional[str] = None, per_layer: bool = False) -> RouterTelemetryCallback:
    """Insert the callback first, so the reporting callbacks that `report_to` added see its values."""
    callback = RouterTelemetryCallback(jsonl, per_layer)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


__all__ = ["RouterTelemetryCallback", "add_router_telemetry"]
