"""Continued training of upcycled models: the library under examples/train.py and upcycle-export-run.

    run_dir.py    the run folder's files and run.json (written by the trainer, read by
                  upcycle-export-run): `write_run_info`, `read_run_info`, `RunInfoError`
    data.py       real English text (KJV Bible, Austen, GCIDE from Debian packages), packed into
                  sequences; `batch_for`, the trainer's batch order
    schedule.py   AdamW and the warmup + cosine LR schedule
    trainer.py    the loop: upcycle or load, FSDP2 (torchrun), train steps, validation, telemetry,
                  DCP checkpoints (runtime/train_checkpoint.py) and resume; `train(args)`

Importing this package imports torch but neither the compiler nor transformers; the trainer imports
them when it builds the model.
"""

from .run_dir import (CHECKPOINTS, METRICS, ROUTER, RUN_JSON, SUMMARY, NoRunInfo, RunInfoError, checkpoint_dir,
                      read_run_info, run_info, validate_run_info, write_run_info)
from .schedule import adamw, lr_factor, lr_lambda, param_groups
from .trainer import KILL_AT_STEP_ENV, Dist, relax_step, train, validate

__all__ = ["CHECKPOINTS", "METRICS", "ROUTER", "RUN_JSON", "SUMMARY", "NoRunInfo", "RunInfoError", "checkpoint_dir",
           "read_run_info", "run_info", "validate_run_info", "write_run_info", "adamw", "lr_factor", "lr_lambda",
           "param_groups", "KILL_AT_STEP_ENV", "Dist", "relax_step", "train", "validate"]
