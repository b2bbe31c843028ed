"""Output folder: weights (safetensors), resolved spec, report, manifest; written atomically.

The structure of an upcycled model is not pickled: it is the deterministic rewrite of the dense
architecture under the saved spec. `load` rebuilds the dense skeleton (from config.json, or the
dense export program kept beside the weights), replays the rewrite without initialising weights,
and loads the checkpoint strictly, so every tensor must be accounted for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.nn as nn
from safetensors.torch import save_model as st_save_model

from upcycle.specs import dump_spec, load_spec

from .atomic import atomic_output  # noqa: F401  (re-exported: streaming and export_hf import it from here)
from .errors import ModelError, brief
from .integrity import plain_name, sha256_file, verify_folder
from .jsonfiles import read_json
from .loading import LoadedModel, build_transformers_skeleton, load_export, source_files, tied_groups
from .pretrained import load_base_config, mark_upcycled, patch_config
from .resources import FILES_OVERHEAD_BYTES

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "upcycle.json"
SPEC = "upcycle_spec.yaml"


def tensor_accounting(input_names, records, output_names, aliases: dict[str, str] | None = None,
                      dropped: dict[str, str] | None = None, where: str = "the input") -> dict:
    """Where every input tensor went: copied (same name), transformed (into which output tensors), or
    dropped with a reason. A tensor with none of these fates raises: nothing is lost silently.

    aliases: {input name: output name it is tied to (same parameter)}; dropped: {name: reason}."""
    aliases, dropped = dict(aliases or {}), dict(dropped or {})
    outputs = set(output_names)
    transformed = {}
    for rec in records:
        made = sorted(o for o in outputs if rec.moe_path == "" or o.startswith(rec.moe_path + "."))
        made = [o for o in made if o not in input_names or o in rec.consumed]
        for name in rec.consumed:
            transformed[name] = made
    copied, lost = [], []
    for name in input_names:
        if name in transformed:
            continue
        if name in outputs:
            copied.append(name)
        elif name in aliases:
            dropped[name] = f"tied to {aliases[name]} (the same parameter; stored once)"
        elif name not in dropped:
            lost.append(name)
    if lost:
        raise ModelError(f"{where}: tensor {lost[0]!r} would be lost by the conversion (it is neither copied, "
                         f"transformed nor tied to a kept tensor){f' and {len(lost) - 1} more' if len(lost) > 1 else ''}; "
                         "refusing to write an incomplete model")
    return {"copied": copied, "transformed": transformed, "dropped": {k: dropped[k] for k in sorted(dropped) if k in set(input_names)}}


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{state-dict name: the first name of the same tensor} for tensors stored under several names."""
    return {name: group[0] for group in tied_groups(model.state_dict(keep_vars=True)) for name in group[1:]}


def write_metadata(tmp: Path, *, spec, kind: str, model_class: str, source, report=None, tensors: dict | None = None,
                   weight_files: dict[str, dict] | None = None, extra_files: dict | None = None, streaming: bool = False,
                   verification: str | None = None) -> dict:
    """Spec, report, carried files and the manifest (sha256 per file; weight hashes may be precomputed)."""
    (tmp / SPEC).write_text(dump_spec(spec))
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    if report is not None:
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "report.txt").write_text(report.to_text() + "\n")
    known = dict(weight_files or {})
    files = {}
    for p in sorted(tmp.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = known.get(p.name) or {"bytes": p.stat().st_size, "sha256": sha256_file(p)[1]}
    manifest = {
        "format_version": FORMAT_VERSION,
        "source_kind": kind,
        "model_class": model_class,
        "source": str(source) if source is not None else None,
        "streaming": streaming,
        "verification": verification,
        "rewrites": report.rewrites if report is not None else [],
        "tensors": tensors,
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


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
    if gen is not None and "generation_config.json" not in {**skip, **carried}:
        gen.save_pretrained(str(tmp))
    return carried


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as saved (tied tensors once)."""
    seen, n = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.nbytes) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            n += t.nbytes
    return n


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
            model.config.save_pretrained(str(tmp))
            patch_config(tmp / "config.json")
            kind = "transformers"
        extra = dict(source.extra_files) if source is not None and source.extra_files else {}
        extra.update(_carried_files(model, tokenizer, tmp, skip=extra))
        if kind == "export":
            shutil.copyfile(source.path, tmp / "dense_program.pt2")
        write_metadata(tmp, spec=spec, kind=kind, model_class=type(model).__name__,
                       source=source.path if source is not None else None, report=report, tensors=tensors,
                       extra_files=extra,
                       verification="per-layer and whole-model probes" if report is not None else None)
    return out


def read_manifest(path: Path) -> dict:
    """upcycle.json of an output folder (one ModelError if absent or damaged)."""
    if not (path / MANIFEST).is_file():
        raise ModelError(f"{path}: no {MANIFEST}; not an upcycle output folder")
    return read_json(path / MANIFEST, what="upcycle manifest")


def needed_files(path: Path, kind) -> list[str]:
    """What loading `path` reads: spec, config or dense program, index and weight shards."""
    names = [SPEC] + (["config.json"] if kind == "transformers" else ["dense_program.pt2"] if kind == "export" else [])
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
            check_load_memory(path, (path / "dense_program.pt2").stat().st_size)
        skeleton = load_export(path / "dense_program.pt2").model
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


INDEX = "model.safetensors.index.json"


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
