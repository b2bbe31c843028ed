"""The output folder's format: its file names, and the one writer of its config, spec, report and manifest.

Every output mode writes through here: `upcycle.save` / `upcycle-compile -o` (saving.py), the
streaming conversion (streaming.py, native and --format hf), the transformers export (export_hf.py)
and an upcycled model's `save_pretrained` (runtime/pretrained.py). The weights are each mode's own (one
safetensors file, or shards through checkpoint.ShardWriter); what surrounds them is written here,
so the modes cannot drift apart. Whether an output may be written where it is asked for (it must not
exist, or be an earlier output replaced with --force, and must not overlap the input) is one rule
too: `atomic.check_output`. Reading a folder back is reload.py.

    native folder      model.safetensors (or shards + index), config.json (model_type "upcycle"),
                       upcycle_spec.yaml, report.json/txt, tokenizer files, upcycle.json (manifest:
                       sha256 per file; the folder is complete once it is there)
    transformers       shards + index, config.json (the target's), upcycle_spec.yaml, report.json/txt,
    export (hf)        tokenizer files, upcycle_export.json (what was exported and how)

This module imports nothing of the compiler but its leaf modules (errors, jsonfiles, integrity), so
every writer can use it without an import circle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SPEC = "upcycle_spec.yaml"
MANIFEST = "upcycle.json"  # native folder: written last
EXPORT_RECORD = "upcycle_export.json"  # transformers export: written last
REPORT_JSON = "report.json"
REPORT_TXT = "report.txt"
DENSE_PROGRAM = "dense_program.pt2"  # beside the weights of a model converted from a torch.export program
OUTPUT_MARKERS = (MANIFEST, EXPORT_RECORD)  # what an earlier output of ours holds (atomic.check_replaceable)
MODEL_TYPE = "upcycle"  # config.json's model_type in a native folder: plain transformers refuses it

# --- config.json ---------------------------------------------------------------------------------


def write_config(folder: Path, config, *, upcycled: bool = True) -> None:
    """config.json (transformers' save_pretrained of `config`); upcycled: patched so that plain
    transformers refuses the folder instead of loading a dense model (`patch_config`)."""
    config.save_pretrained(str(folder))
    if upcycled:
        patch_config(Path(folder) / CONFIG)


def patch_config(config_path: Path) -> None:
    """config.json of an upcycled model: model_type "upcycle", the dense model_type kept."""
    from .jsonfiles import read_json

    d = read_json(config_path, what="config.json")
    if d.get("model_type") == MODEL_TYPE:
        return
    d["upcycle"] = {"base_model_type": d.get("model_type"), "load_with": "upcycle.load(folder)"}
    d["model_type"] = MODEL_TYPE
    Path(config_path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def base_config_dict(config_path: Path) -> dict:
    """config.json as the dense model's config class expects it (model_type restored)."""
    from .jsonfiles import read_json

    d = read_json(config_path, what="config.json")
    if d.get("model_type") == MODEL_TYPE:
        d = dict(d)
        d["model_type"] = d.pop("upcycle", {}).get("base_model_type")
    return d


# --- spec, report, carried files -----------------------------------------------------------------


def write_spec(folder: Path, spec) -> None:
    """upcycle_spec.yaml: the resolved spec (what `load` replays)."""
    from upcycle.specs import dump_spec

    (Path(folder) / SPEC).write_text(dump_spec(spec))


def write_report(folder: Path, report) -> None:
    """report.json and report.txt (compiler/report.py's Report)."""
    (Path(folder) / REPORT_JSON).write_text(report.to_json())
    (Path(folder) / REPORT_TXT).write_text(report.to_text() + "\n")


def copy_files(folder: Path, files: dict | None) -> None:
    """{name: path} copied into `folder` as they are (tokenizer files, generation_config.json)."""
    for name, src in (files or {}).items():
        shutil.copyfile(src, Path(folder) / name)


# --- the manifest (native) and the export record (transformers) ----------------------------------


def write_manifest(folder: Path, **fields) -> dict:
    """upcycle.json: {"format_version", **fields} (the caller's fields in its order); returned."""
    manifest = {"format_version": FORMAT_VERSION, **fields}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def write_export_record(folder: Path, info: dict) -> dict:
    """upcycle_export.json of a transformers export."""
    (Path(folder) / EXPORT_RECORD).write_text(json.dumps(info, indent=2))
    return info


def file_hashes(folder: Path, known: dict | None = None) -> dict:
    """{name: {"bytes", "sha256"}} of the files in `folder` but the manifest (`known`: entries
    already computed, e.g. by the shard writer while writing)."""
    from .integrity import sha256_file

    known = dict(known or {})
    files = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = known.get(p.name) or {"bytes": p.stat().st_size, "sha256": sha256_file(p)[1]}
    return files


def write_metadata(tmp: Path, *, spec, kind: str, model_class: str, source, report=None, tensors: dict | None = None,
                   weight_files: dict[str, dict] | None = None, extra_files: dict | None = None, streaming: bool = False,
                   verification: str | None = None) -> dict:
    """A native folder's spec, report, carried files and manifest (sha256 per file; weight hashes
    may be precomputed): what `upcycle.save` and the streaming conversion write beside the weights."""
    write_spec(tmp, spec)
    copy_files(tmp, extra_files)
    if report is not None:
        write_report(tmp, report)
    return write_manifest(tmp, source_kind=kind, model_class=model_class,
                          source=str(source) if source is not None else None, streaming=streaming,
                          verification=verification, rewrites=report.rewrites if report is not None else [],
                          tensors=tensors, files=file_hashes(tmp, weight_files))


def finish_folder(folder: Path, spec, model_class: str, rewrites: list) -> None:
    """Make what transformers' save_pretrained wrote into a native folder: config patched, spec,
    manifest (runtime/pretrained.py)."""
    from .integrity import file_entries

    patch_config(Path(folder) / CONFIG)
    write_spec(folder, spec)
    files = file_entries(folder, skip=(MANIFEST,))  # sha256 at disk speed: ~2 s for a 2.8 GB model
    write_manifest(folder, source_kind="transformers", model_class=model_class, saved_by="save_pretrained",
                   rewrites=rewrites, files=files)


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
        from .errors import ModelError

        raise ModelError(f"{where}: tensor {lost[0]!r} would be lost by the conversion (it is neither copied, "
                         f"transformed nor tied to a kept tensor){f' and {len(lost) - 1} more' if len(lost) > 1 else ''}; "
                         "refusing to write an incomplete model")
    return {"copied": copied, "transformed": transformed, "dropped": {k: dropped[k] for k in sorted(dropped) if k in set(input_names)}}


def state_bytes(model) -> int:
    """Bytes of the model's tensors as saved (tied tensors once)."""
    seen, n = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.nbytes) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            n += t.nbytes
    return n


__all__ = ["FORMAT_VERSION", "WEIGHTS", "INDEX", "CONFIG", "GENERATION_CONFIG", "SPEC", "MANIFEST", "EXPORT_RECORD",
           "REPORT_JSON", "REPORT_TXT", "DENSE_PROGRAM", "OUTPUT_MARKERS", "MODEL_TYPE", "write_config", "patch_config",
           "base_config_dict", "write_spec", "write_report", "copy_files", "write_manifest", "write_export_record",
           "file_hashes", "write_metadata", "finish_folder", "tensor_accounting", "state_bytes"]
