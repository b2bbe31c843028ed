"""Output folder: weights (safetensors), resolved spec, report, manifest; written atomically.

The structure of an upcycled model is not pickled: it is the deterministic rewrite of the dense
architecture under the saved spec. `load` rebuilds the dense skeleton (from config.json, or the
dense export program kept beside the weights), replays the rewrite without initialising weights,
and loads the checkpoint strictly, so every tensor must be accounted for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from upcycle.specs import dump_spec, load_spec

from .errors import ModelError, UpcycleError
from .loading import LoadedModel, build_transformers_skeleton, load_export

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


def save(model: nn.Module, out_dir, *, spec, report=None, source: LoadedModel | None = None, force: bool = False) -> Path:
    """Write the upcycled model to `out_dir` atomically (temp folder renamed into place)."""
    out = Path(out_dir)
    spec = load_spec(spec)
    if out.exists() and not force:
        raise UpcycleError(f"{out}: output already exists; choose another path or pass --force (force=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        st_save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "upcycle_format": str(FORMAT_VERSION)})
        (tmp / SPEC).write_text(dump_spec(spec))
        kind = source.kind if source is not None else ("transformers" if hasattr(model, "config") and hasattr(model.config, "to_json_string") else "module")
        if kind in ("transformers", "gguf"):
            model.config.save_pretrained(str(tmp))
            kind = "transformers"
        if kind == "export":
            shutil.copyfile(source.path, tmp / "dense_program.pt2")
        if source is not None:
            for name, src in source.extra_files.items():
                shutil.copyfile(src, tmp / name)
        if report is not None:
            (tmp / "report.json").write_text(report.to_json())
            (tmp / "report.txt").write_text(report.to_text() + "\n")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "source_kind": kind,
            "model_class": type(model).__name__,
            "source": str(source.path) if source is not None else None,
            "rewrites": report.rewrites if report is not None else [],
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for p in tmp.iterdir():  # mkdtemp and some writers use private modes; outputs are ordinary files
            p.chmod(0o644)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
        from .loading import _transformers

        config = _transformers().AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        skeleton = build_transformers_skeleton(config)
    elif kind == "export":
        skeleton = load_export(path / "dense_program.pt2").model
    else:
        raise ModelError(
            f"{path}: the model was a plain nn.Module ({manifest.get('model_class')}); rebuild it in Python "
            "and call upcycle.load_into(model, path)"
        )
    return load_into(skeleton, path, spec=spec)


def load_into(dense_model: nn.Module, path, *, spec=None) -> nn.Module:
    """Replay the saved rewrite on a freshly built dense model and load the saved weights into it."""
    from .pipeline import upcycle_model

    path = Path(path)
    spec = load_spec(spec or path / SPEC)
    model = upcycle_model(dense_model, spec, structure_only=True).model
    missing, unexpected = st_load_model(model, str(path / WEIGHTS), strict=False)
    if missing or unexpected:
        raise ModelError(
            f"{path / WEIGHTS}: checkpoint does not match the rebuilt model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return model
