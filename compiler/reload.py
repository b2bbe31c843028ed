"""Reading an output folder back: `upcycle.load(folder)` and `upcycle.load_into(model, folder)`.

The structure of an upcycled model is not pickled: it is the deterministic rewrite of the dense
architecture under the saved spec. `load` rebuilds the dense skeleton (from config.json, or the
dense export program kept beside the weights), replays the rewrite without initialising weights
(pipeline.upcycle_model, structure_only) and loads the weights strictly, so every tensor must be
accounted for. Every file is first checked against the manifest's size and sha256 (integrity.py).
The folder's format is output_folder.py's; the writers are saving.py, streaming.py, export_hf.py
and runtime/pretrained.py (save_pretrained).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from upcycle.specs import load_spec

from .errors import ModelError, brief
from .integrity import plain_name, verify_folder
from .jsonfiles import read_json
from .loading import build_transformers_skeleton, load_export, tied_aliases
from .output_folder import CONFIG, DENSE_PROGRAM, INDEX, MANIFEST, SPEC, WEIGHTS, base_config_dict
from upcycle.runtime.pretrained import mark_upcycled


def read_manifest(path: Path) -> dict:
    """upcycle.json of an output folder (one ModelError if absent or damaged)."""
    if not (path / MANIFEST).is_file():
        raise ModelError(f"{path}: no {MANIFEST}; not an upcycle output folder")
    return read_json(path / MANIFEST, what="upcycle manifest")


def needed_files(path: Path, kind) -> list[str]:
    """What loading `path` reads: spec, config or dense program, index and weight shards."""
    names = [SPEC] + ([CONFIG] if kind == "transformers" else [DENSE_PROGRAM] if kind == "export" else [])
    if (path / INDEX).is_file():
        names.append(INDEX)
    return names + [f.name for f in weight_files(path)]


def load(path, *, trust_pickle: bool = False, verify: bool = True, force_resources: bool = False) -> nn.Module:
    """The upcycled model saved in `path` by `save` / `upcycle-compile -o` (like from_pretrained).

    verify (default): every file is checked against the manifest's size and sha256 first, and a
    mismatch refused with the file's name. The memory the load needs (skeleton, model, one weight
    file) is checked against what is available (force_resources=True skips)."""
    path = Path(path)
    manifest = read_manifest(path)
    kind = manifest.get("source_kind")
    if verify:
        verify_folder(path, manifest, needed=needed_files(path, kind))
    spec = load_spec(path / SPEC)
    if kind == "transformers":
        config = load_base_config(path)
        dtype = _config_dtype(config)
        if not force_resources:
            check_load_memory(path, _dense_bytes(config, dtype))
        skeleton = build_transformers_skeleton(config, dtype=dtype)
    elif kind == "export":
        if not force_resources:
            check_load_memory(path, (path / DENSE_PROGRAM).stat().st_size)
        skeleton = load_export(path / DENSE_PROGRAM).model
    else:
        raise ModelError(
            f"{path}: the model was a plain nn.Module ({manifest.get('model_class')}); rebuild it in Python "
            "and call upcycle.load_into(model, path)"
        )
    return load_into(skeleton, path, spec=spec, verify=False)


def _dense_bytes(config, dtype) -> int:
    """Bytes of the dense model `config` describes (counted on the meta device)."""
    from .loading import meta_skeleton

    model = meta_skeleton(config, dtype)
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n


def check_load_memory(path: Path, dense_bytes: int) -> None:
    from .resources import check_memory, loading

    sizes = [f.stat().st_size for f in weight_files(path)]
    check_memory(loading(dense_bytes, sum(sizes), max(sizes)))


def _config_dtype(config):
    """The dtype the weights were written in (config.dtype), so loading does not upcast them."""
    import torch

    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else None



def weight_files(path: Path) -> list[Path]:
    """The weight files of an output folder: model.safetensors, or the shards its index names
    (plain names inside the folder only)."""
    index = path / INDEX
    if index.is_file():
        weight_map = read_json(index, what="safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: needs a `weight_map` of tensor name -> shard file")
        return [path / plain_name(f, index) for f in sorted(set(map(str, weight_map.values())))]
    return [path / WEIGHTS]


def load_into(dense_model: nn.Module, path, *, spec=None, verify: bool = True) -> nn.Module:
    """Replay the saved rewrite on a freshly built dense model and load the saved weights into it
    (verify: the folder's files against its manifest first, as `load` does)."""
    from safetensors.torch import load_file

    from .checkpoint import read_header
    from .pipeline import upcycle_model

    path = Path(path)
    if verify:
        manifest = read_manifest(path)
        verify_folder(path, manifest, needed=needed_files(path, None) if spec is None else
                      [n for n in needed_files(path, None) if n != SPEC])
    spec = load_spec(spec or path / SPEC)
    model = upcycle_model(dense_model, spec, structure_only=True).model
    aliases = tied_aliases(model)
    expected = set(model.state_dict().keys())
    loaded, unexpected = set(), []
    for f in weight_files(path):
        read_header(f)  # a truncated or corrupt file: one line naming it
        try:
            sd = load_file(str(f))
        except Exception as exc:  # safetensors' own checks (overlapping offsets, ...)
            raise ModelError(f"{f}: cannot read safetensors ({brief(exc)})") from None
        unexpected += [k for k in sd if k not in expected]
        try:
            model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
        except RuntimeError as exc:
            raise ModelError(f"{f}: checkpoint does not match the rebuilt model ({str(exc).splitlines()[-1].strip()})") from None
        loaded.update(k for k in sd if k in expected)
        del sd
    missing = [k for k in expected - loaded if not (k in aliases and aliases[k] in loaded)
               and not any(a == k and o in loaded for o, a in aliases.items())]
    if missing or unexpected:
        raise ModelError(
            f"{path}: checkpoint does not match the rebuilt model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    mark_upcycled(model, spec)
    try:
        model.eval()
    except NotImplementedError:  # modules of torch.export programs keep the mode they were exported in
        pass
    return model


def load_base_config(folder: Path):
    """The dense model's transformers config of an upcycle folder (either config.json flavour)."""
    from .loading import _transformers

    tf = _transformers()
    d = base_config_dict(folder / CONFIG)
    model_type = d.pop("model_type", None)
    d.pop("auto_map", None)  # never remote code
    try:
        return tf.AutoConfig.for_model(model_type, **d)
    except Exception as exc:
        raise ModelError(f"{folder / CONFIG}: cannot read as a transformers config (model_type "
                         f"{model_type!r}: {brief(exc)})") from None


__all__ = ["load", "load_into", "read_manifest", "needed_files", "weight_files", "load_base_config", "check_load_memory"]
