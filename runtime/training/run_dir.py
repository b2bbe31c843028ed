"""The run folder a training run writes, and its run.json: the format, written and read here.

    RUN_DIR/
      run.json              the run's arguments, where the model came from and how it was upcycled:
                            enough to rebuild the model without weights (`upcycle-export-run`)
      summary_start.json    validation losses before training (dense, upcycled at step 0)
      metrics.jsonl         one record per optimizer step (loss, lr, grad_norm, tokens_per_s, ...)
      router.jsonl          router telemetry per step (runtime/telemetry.py)
      router_load.png       the telemetry's load heatmap
      checkpoints/step-NNNNNN/   DCP checkpoints (runtime/train_checkpoint.py)
      summary.json          the end: tokens/s, peak memory, validation losses

run.json keys (`write_run_info` writes them in this order):

    args                the trainer's arguments (a dict)
    source              {"kind": "tiny", "seed"} | {"kind": "dense", "path"} | {"kind": "upcycled", "path"}
    spec                the resolved upcycle spec (a dict; null when the source was already upcycled
                        or the run continues the dense model)
    dense_config        the dense model's transformers config (a dict with model_type; null if upcycled)
    tokenizer           the tokenizer's name ("bytes" for the tiny model's byte tokens)
    params              parameters of the trained model
    relax_routing_step  the step from which per_slice routers routed by plain top-K, or null

`read_run_info` checks what a rebuild reads (source, and dense_config + spec unless the source is an
upcycled folder; relax_routing_step an integer or null) and raises `RunInfoError` (a ValueError)
with one line naming run.json otherwise. The file is input like any other: read through
`read_json` when one is given (upcycle-export-run passes the compiler's defensive reader).
"""

from __future__ import annotations

import json
from pathlib import Path

RUN_JSON = "run.json"
SUMMARY_START = "summary_start.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
ROUTER = "router.jsonl"
ROUTER_PNG = "router_load.png"
CHECKPOINTS = "checkpoints"
RUN_KEYS = ("args", "source", "spec", "dense_config", "tokenizer", "params", "relax_routing_step")


class RunInfoError(ValueError):
    """run.json is missing, or does not say what rebuilding the run's model needs."""


class NoRunInfo(RunInfoError):
    """The folder has no run.json: not a run folder."""


def checkpoint_dir(run_dir, step: int) -> Path:
    """Where the checkpoint of `step` goes: checkpoints/step-NNNNNN."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def checkpoint_step(path) -> int:
    """The step of a checkpoint folder `step-NNNNNN`."""
    return int(Path(path).name.split("-")[-1])


def run_info(*, args: dict, source: dict, spec, dense_config, tokenizer: str, params: int,
             relax_routing_step) -> dict:
    """run.json's content, keys in the documented order."""
    return {"args": args, "source": source, "spec": spec, "dense_config": dense_config, "tokenizer": tokenizer,
            "params": params, "relax_routing_step": relax_routing_step}


def write_run_info(run_dir, **fields) -> Path:
    """Write run.json (fields: those of `run_info`); returns its path."""
    path = Path(run_dir) / RUN_JSON
    path.write_text(json.dumps(run_info(**fields), indent=2))
    return path


def validate_run_info(info, where) -> dict:
    """`info` (run.json's parsed content) if it holds what a rebuild reads; RunInfoError otherwise."""
    if not isinstance(info, dict):
        raise RunInfoError(f"{where}: the run.json holds a JSON {type(info).__name__}; expected an object")
    source = info.get("source", {})
    if not isinstance(source, dict) or (source.get("kind") == "upcycled" and not isinstance(source.get("path"), str)):
        raise RunInfoError(f"{where}: `source` must be an object (with a `path` string for kind 'upcycled')")
    if source.get("kind") != "upcycled":
        cfg, spec = info.get("dense_config"), info.get("spec")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str) or not isinstance(spec, dict):
            raise RunInfoError(f"{where}: needs 'dense_config' (an object with a model_type) and 'spec' (an object) "
                               "to rebuild the model")
    relax = info.get("relax_routing_step")
    if relax is not None and type(relax) is not int:
        raise RunInfoError(f"{where}: relax_routing_step must be an integer step or null, not {relax!r}")
    return info


def _plain_read(path: Path):
    try:
        return json.loads(path.read_text())
    except RecursionError:
        raise RunInfoError(f"{path}: the run.json is nested too deeply to be valid") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RunInfoError(f"{path}: cannot read the run.json ({exc})") from None


def read_run_info(run_dir, *, read_json=None) -> dict:
    """run.json of a run folder, checked for the keys the rebuild reads (`validate_run_info`).
    read_json(path): the reader to use (default: json, errors as RunInfoError)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_JSON
    if not path.is_file():
        raise NoRunInfo(f"{run_dir}: no run.json; not a run folder written by examples/train.py")
    info = (read_json or _plain_read)(path)
    return validate_run_info(info, path)


__all__ = ["RUN_JSON", "SUMMARY_START", "SUMMARY", "METRICS", "ROUTER", "ROUTER_PNG", "CHECKPOINTS", "RUN_KEYS",
           "RunInfoError", "NoRunInfo", "checkpoint_dir", "checkpoint_step", "run_info", "write_run_info",
           "validate_run_info", "read_run_info"]
