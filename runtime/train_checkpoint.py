"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, and reloadable on another
world size (2 ranks -> 1, 1 -> 2), continuing the run identically.

What one checkpoint holds (one folder per step, written to a temporary name and renamed when every
rank has finished, so a killed run never leaves a half checkpoint that looks complete):

    model       the model's state dict (FSDP2 DTensor shards as saved by each rank)
    optim       the optimizer's state, keyed by parameter name (DCP reshards it on load)
    progress    step, data position (sequences consumed), as tensors
    scheduler   the LR scheduler's numeric state, as tensors
    rng         each rank's torch RNG state under its own key (restored where the rank exists)

Everything is a tensor, so nothing but DCP's own metadata file is unpickled on load; a checkpoint
is only read when you ask for it (`--resume`, `load_training_checkpoint`).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _numbers_to_tensors(obj):
    """A scheduler-style state dict of numbers (and lists of numbers) -> tensors; other values dropped."""
    out = {}
    for key, value in obj.items():
        if isinstance(value, bool):
            out[key] = torch.tensor(int(value))
        elif isinstance(value, (int, float)):
            out[key] = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int64)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
            out[key] = torch.tensor(value, dtype=torch.float64)
    return out


def _tensors_to_numbers(template: dict, tensors: dict) -> dict:
    out = dict(template)
    for key, t in tensors.items():
        old = template.get(key)
        if isinstance(old, bool):
            out[key] = bool(t.item())
        elif isinstance(old, int):
            out[key] = int(t.item())
        elif isinstance(old, float):
            out[key] = float(t.item())
        elif isinstance(old, (list, tuple)):
            out[key] = type(old)(t.tolist())
    return out


def _state(model: nn.Module, optimizer, scheduler, step: int, data_position: int) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {
        "model": model_sd,
        "optim": optim_sd,
        "progress": {"step": torch.tensor(step), "data_position": torch.tensor(data_position)},
        "rng": {f"rank{_rank()}": torch.get_rng_state()},
    }
    if scheduler is not None:
        state["scheduler"] = _numbers_to_tensors(scheduler.state_dict())
    return state


def save_training_checkpoint(path, model: nn.Module, optimizer, *, step: int, data_position: int,
                             scheduler=None) -> Path:
    """Write the checkpoint folder `path` (all ranks call this)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(_state(model, optimizer, scheduler, step, data_position), checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    _barrier()
    return path


def load_training_checkpoint(path, model: nn.Module, optimizer, scheduler=None) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG (when saved) from `path`;
    returns {"step": int, "data_position": int}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no .metadata)")
    state = _state(model, optimizer, scheduler, 0, 0)
    saved_keys = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    rng_key = f"rng.rank{_rank()}"
    if rng_key not in saved_keys:  # more ranks now than when saved: this one keeps its own RNG
        state.pop("rng")
    if scheduler is not None and not any(k.startswith("scheduler.") for k in saved_keys):
        state.pop("scheduler")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if "rng" in state:
        torch.set_rng_state(state["rng"][f"rank{_rank()}"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(_tensors_to_numbers(scheduler.state_dict(), state["scheduler"]))
    return {"step": int(state["progress"]["step"]), "data_position": int(state["progress"]["data_position"])}


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The newest complete `step-NNNNNN` folder under run_dir/checkpoints, or None."""
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / ".metadata").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_model_weights(path, model: nn.Module) -> nn.Module:
    """Only the model's weights from a training checkpoint, into `model` (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    return model


__all__ = ["save_training_checkpoint", "load_training_checkpoint", "latest_checkpoint", "load_model_weights"]
