"""Output folder: weights (safetensors), resolved spec, report, manifest; written atomically.

The structure of an upcycled model is not pickled: it is the deterministic rewrite of the dense
architecture under the saved spec. `load` rebuilds the dense skeleton (from config.json, or the
dense export program kept beside the weights), replays the rewrite without initialising weights,
and loads the checkpoint strictly, so every tensor must be accounted for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch.nn as nn
from safetensors.torch import save_model as st_save_model

from upcycle.specs import dump_spec, load_spec

from .errors import ModelError, UpcycleError
from .loading import LoadedModel, build_transformers_skeleton, load_export, source_files, tied_groups
from .pretrained import load_base_config, mark_upcycled, patch_config

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "upcycle.json"
SPEC = "upcycle_spec.yaml"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output(out_dir, *, force: bool = False):
    """A temp folder beside `out_dir`, renamed onto it when the block finishes; removed on any error
    or interruption, so `out_dir` is either absent, the previous output, or complete."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise UpcycleError(f"{out}: output already exists; choose another path or pass --force (force=True) to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise UpcycleError(f"{out.parent}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        yield tmp
        for p in tmp.iterdir():  # mkdtemp and some writers use private modes; outputs are ordinary files
            if p.is_file():
                p.chmod(0o644)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
            files[p.name] = known.get(p.name) or {"bytes": p.stat().st_size, "sha256": _sha256(p)}
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


def save(model: nn.Module, out_dir, *, spec, report=None, source: LoadedModel | None = None, force: bool = False,
         records=None, input_names=None, tokenizer=None) -> Path:
    """Write the upcycled model to `out_dir` atomically (temp folder renamed into place), with its
    tokenizer (`tokenizer`, or the files beside the source checkpoint) and generation config.

    With `records` (the rewrite's) and `input_names` (the dense model's tensor names), the manifest
    accounts for every input tensor (see `tensor_accounting`)."""
    out = Path(out_dir)
    spec = load_spec(spec)
    kind = source.kind if source is not None else ("transformers" if hasattr(model, "config") and hasattr(model.config, "to_json_string") else "module")
    if input_names is None and source is not None:
        input_names = source.tensor_names
    tensors = None
    if input_names is not None and records is not None:
        out_names = set(model.state_dict().keys())
        tensors = tensor_accounting(list(input_names), records, out_names, aliases=tied_aliases(model), where=str(source.path if source else out))
    with atomic_output(out, force=force) as tmp:
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


def load(path, *, trust_pickle: bool = False) -> nn.Module:
    """The upcycled model saved in `path` by `save` / `upcycle-compile -o` (like from_pretrained)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"{path}: no {MANIFEST}; not an upcycle output folder")
    manifest = json.loads(manifest_path.read_text())
    spec = load_spec(path / SPEC)
    kind = manifest.get("source_kind")
    if kind == "transformers":
        config = load_base_config(path)
        skeleton = build_transformers_skeleton(config, dtype=_config_dtype(config))
    elif kind == "export":
        skeleton = load_export(path / "dense_program.pt2").model
    else:
        raise ModelError(
            f"{path}: the model was a plain nn.Module ({manifest.get('model_class')}); rebuild it in Python "
            "and call upcycle.load_into(model, path)"
        )
    return load_into(skeleton, path, spec=spec)


def _config_dtype(config):
    """The dtype the weights were written in (config.dtype), so loading does not upcast them."""
    import torch

    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else None


def weight_files(path: Path) -> list[Path]:
    """The weight files of an output folder: model.safetensors, or the shards its index names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / WEIGHTS]


def load_into(dense_model: nn.Module, path, *, spec=None) -> nn.Module:
    """Replay the saved rewrite on a freshly built dense model and load the saved weights into it."""
    from safetensors.torch import load_file

    from .pipeline import upcycle_model

    path = Path(path)
    spec = load_spec(spec or path / SPEC)
    model = upcycle_model(dense_model, spec, structure_only=True).model
    aliases = tied_aliases(model)
    expected = set(model.state_dict().keys())
    loaded, unexpected = set(), []
    for f in weight_files(path):
        sd = load_file(str(f))
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
