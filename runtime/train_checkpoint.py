"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, and reloadable on another
world size (2 ranks -> 1, 1 -> 2), continuing the run identically.

What one checkpoint holds (one folder per step, written to a temporary name and renamed when every
rank has finished, so a killed run never leaves a half checkpoint that looks complete):

    model       the model's state dict (FSDP2 DTensor shards as saved by each rank)
    optim       the optimizer's state, keyed by parameter name (DCP reshards it on load)
    progress    step, data position (sequences consumed), as tensors
    scheduler   the LR scheduler's numeric state, as tensors
    rng         each rank's torch RNG state under its own key (restored where the rank exists)

Everything is a tensor, so nothing but DCP's own metadata file is unpickled on load, and that one
through an unpickler that builds only DCP's metadata classes and torch sizes/dtypes (`SafeReader`):
a hostile `.metadata` that names anything else (os.system, ...) is refused, never run; the data
files it points to must be plain names inside the checkpoint folder. Rank 0 writes checksums.json
(each file's size and sha256) before the folder is renamed into place, and loading checks it, so a
damaged checkpoint is refused with the file's name (older checkpoints without it load unchecked).
A checkpoint is only read when you ask for it (`--resume`, `load_training_checkpoint`).
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .checksums import verify_checksums, write_checksums


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
        write_checksums(tmp)  # every rank's files are complete after the barrier
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    _barrier()
    return path


class CheckpointError(ValueError):
    """A training checkpoint that must not be read: damaged, or metadata naming code to run."""


_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)  # dataclasses and an Enum: nothing to run
_ALLOWED = {
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch.Size and torch dtypes/layouts/memory formats; refuses
    every other global a pickle names (which is how a hostile pickle runs code)."""

    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES or name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise CheckpointError(f"the checkpoint's .metadata names {module}.{name}, which DCP metadata never holds; "
                              "refusing to unpickle it (it could run code)")


def _reader_class():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        """DCP's FileSystemReader with the metadata read by `_MetadataUnpickler` and its data file
        names checked to be plain names inside the checkpoint folder."""

        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as exc:
                raise CheckpointError(f"{path}: damaged DCP metadata ({type(exc).__name__}: {exc})") from None
            for info in (getattr(metadata, "storage_data", None) or {}).values():
                rel = str(getattr(info, "relative_path", ""))
                if not rel or "/" in rel or "\\" in rel or rel in (".", "..") or os.path.isabs(rel):
                    raise CheckpointError(f"{path}: names the data file {rel!r}, which is not a plain file name in "
                                          "the checkpoint folder; refusing to read outside it")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def safe_reader(path):
    """A DCP storage reader for `path` that never runs code from it (see `_MetadataUnpickler`)."""
    return _reader_class()(str(path))


def check_checkpoint(path) -> None:
    """The checkpoint's files against its checksums.json (CheckpointError naming a bad file)."""
    from .checksums import ChecksumError

    try:
        verify_checksums(path)
    except ChecksumError as exc:
        raise CheckpointError(str(exc)) from None


def load_training_checkpoint(path, model: nn.Module, optimizer, scheduler=None) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG (when saved) from `path`;
    returns {"step": int, "data_position": int}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no .metadata)")
    check_checkpoint(path)
    state = _state(model, optimizer, scheduler, 0, 0)
    saved_keys = set(safe_reader(path).read_metadata().state_dict_metadata)
    rng_key = f"rng.rank{_rank()}"
    if rng_key not in saved_keys:  # more ranks now than when saved: this one keeps its own RNG
        state.pop("rng")
    if scheduler is not None and not any(k.startswith("scheduler.") for k in saved_keys):
        state.pop("scheduler")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, storage_reader=safe_reader(path))
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


def load_model_weights(path, model: nn.Module, *, verify: bool = True) -> nn.Module:
    """Only the model's weights from a training checkpoint, into `model` (any world size);
    verify: the files against the checkpoint's checksums.json first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if verify:
        check_checkpoint(path)
    reader = safe_reader(path)
    reader.read_metadata()  # here, so a refusal is ours (dcp.load would fold it into an AssertionError)
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, storage_reader=reader)
    set_model_state_dict(model, state["model"])
    return model


__all__ = ["save_training_checkpoint", "load_training_checkpoint", "latest_checkpoint", "load_model_weights",
           "safe_reader", "check_checkpoint", "CheckpointError"]
