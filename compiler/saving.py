"""`upcycle.save`: an in-memory upcycled model as an output folder, written atomically.

The structure of an upcycled model is not pickled: it is the deterministic rewrite of the dense
architecture under the saved spec. `load` rebuilds the dense skeleton (from config.json, or the
dense export program kept beside the weights), replays the rewrite without initialising weights,
and loads the checkpoint strictly, so every tensor must be accounted for (reload.py; `load` and
`load_into` are re-exported here). The folder's format and the writer of its config, spec, report
and manifest are output_folder.py's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.nn as nn
from safetensors.torch import save_model as st_save_model

from upcycle.specs import load_spec

from .atomic import atomic_output
from .loading import LoadedModel, source_files, tied_aliases  # noqa: F401  (tied_aliases: re-exported)
from .output_folder import (DENSE_PROGRAM, FORMAT_VERSION, GENERATION_CONFIG, INDEX, MANIFEST, SPEC,  # noqa: F401
                            WEIGHTS, state_bytes, tensor_accounting, write_config, write_metadata)
from .reload import load, load_into, needed_files, read_manifest, weight_files  # noqa: F401  (re-exported)
from .resources import FILES_OVERHEAD_BYTES


def _carried_files(model: nn.Module, tokenizer, tmp: Path, skip: dict) -> dict:
    """Tokenizer and generation config for an in-memory save: the `tokenizer` given (saved into
    `tmp`), else the files beside the checkpoint the model was loaded from; then the model's
    generation_config if none was carried. Returns the files to copy."""
    carried = {}
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    else:
        carried = {k: v for k, v in source_files(model).items() if k not in skip}
    gen = getattr(model, "generation_config", None)
    if gen is not None and GENERATION_CONFIG not in {**skip, **carried}:
        gen.save_pretrained(str(tmp))
    return carried


def save(model: nn.Module, out_dir, *, spec, report=None, source: LoadedModel | None = None, force: bool = False,
         records=None, input_names=None, tokenizer=None, force_resources: bool = False) -> Path:
    """Write the upcycled model to `out_dir` atomically (temp folder renamed into place), with its
    tokenizer (`tokenizer`, or the files beside the source checkpoint) and generation config.

    With `records` (the rewrite's) and `input_names` (the dense model's tensor names), the manifest
    accounts for every input tensor (see `tensor_accounting`). The free space is checked first
    (resources.check_disk; force_resources=True skips); an OS failure is an OutputError."""
    out = Path(out_dir)
    spec = load_spec(spec)
    kind = source.kind if source is not None else ("transformers" if hasattr(model, "config") and hasattr(model.config, "to_json_string") else "module")
    if input_names is None and source is not None:
        input_names = source.tensor_names
    tensors = None
    if input_names is not None and records is not None:
        out_names = set(model.state_dict().keys())
        tensors = tensor_accounting(list(input_names), records, out_names, aliases=tied_aliases(model), where=str(source.path if source else out))
    need = state_bytes(model) + FILES_OVERHEAD_BYTES
    with atomic_output(out, force=force, need_bytes=need, force_resources=force_resources,
                       inputs=[source.path] if source is not None else ()) as tmp:
        st_save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "upcycle_format": str(FORMAT_VERSION)})
        if kind in ("transformers", "gguf"):
            write_config(tmp, model.config)
            kind = "transformers"
        extra = dict(source.extra_files) if source is not None and source.extra_files else {}
        extra.update(_carried_files(model, tokenizer, tmp, skip=extra))
        if kind == "export":
            shutil.copyfile(source.path, tmp / DENSE_PROGRAM)
        write_metadata(tmp, spec=spec, kind=kind, model_class=type(model).__name__,
                       source=source.path if source is not None else None, report=report, tensors=tensors,
                       extra_files=extra,
                       verification="per-layer and whole-model probes" if report is not None else None)
    return out
