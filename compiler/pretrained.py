"""`save_pretrained` of an upcycled transformers model writes a folder that reloads as the MoE.

Why: transformers' own `save_pretrained` (and so every `Trainer` checkpoint) writes the dense
model's config beside the expert weights. `AutoModelForCausalLM.from_pretrained` would then build
the dense model, initialise fresh MLPs and report the experts as unexpected keys: hours of
training silently gone. So an upcycled model's class is swapped, once, for a subclass of the same
name whose `save_pretrained` finishes the folder as an upcycle output:

  - config.json: `model_type` becomes "upcycle" (the dense one is kept under `upcycle`), so plain
    transformers refuses the folder loudly instead of loading a dense model;
  - upcycle_spec.yaml and upcycle.json (the manifest `upcycle.load` needs, with each file's size
    and sha256, checked on load), tokenizer and generation config as transformers wrote them
    (Trainer writes the tokenizer it was given);
  - written in a temp folder beside it and moved in when complete (`atomic.staged_into`), so a full
    disk or Ctrl-C leaves the folder as it was, and an OS failure is one OutputError line.

`upcycle.load(folder)` then rebuilds the MoE and loads the weights strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from .errors import ModelError, brief
from .jsonfiles import read_json

MODEL_TYPE = "upcycle"


def is_transformers_model(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(getattr(model, "config", None), "to_json_string")


def mark_upcycled(model: nn.Module, spec, rewrites: list | None = None) -> nn.Module:
    """Give `model` (an upcycled transformers model) the save_pretrained that writes an upcycle
    folder; idempotent. Other modules are returned unchanged."""
    if not is_transformers_model(model):
        return model
    model._upcycle_spec = spec
    model._upcycle_rewrites = list(rewrites or [])
    if getattr(type(model), "_upcycle_marked", False):
        return model
    base = type(model)
    # same name as the dense class: config.json's `architectures` keeps naming the class to rebuild
    model.__class__ = type(base.__name__, (_UpcycledMixin, base), {"_upcycle_marked": True, "_upcycle_base": base,
                                                                    "__module__": base.__module__})
    return model


def _unpickle_upcycled(base: type, state: dict) -> nn.Module:
    model = base.__new__(base)
    model.__setstate__(state)
    return mark_upcycled(model, model._upcycle_spec, model._upcycle_rewrites)


class _UpcycledMixin:
    def __reduce_ex__(self, protocol):
        # the subclass is made at run time, so pickle (torch.save of a whole module, deepcopy)
        # stores the dense class and marks the model again when it is rebuilt
        return _unpickle_upcycled, (self._upcycle_base, self.__getstate__())

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, force_resources: bool = False,
                        **kwargs):
        if not is_main_process or kwargs.get("push_to_hub"):  # the hub upload names the repo after the folder
            result = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
            if is_main_process:
                finish_folder(Path(save_directory), self._upcycle_spec, self._upcycle_base.__name__,
                              self._upcycle_rewrites)
            return result
        from .atomic import staged_into

        if not force_resources:  # a full disk is refused before the first byte, not half-way
            from .resources import FILES_OVERHEAD_BYTES, check_disk
            from .saving import state_bytes

            check_disk(state_bytes(self) + FILES_OVERHEAD_BYTES, save_directory)
        with staged_into(save_directory) as tmp:
            result = super().save_pretrained(str(tmp), *args, is_main_process=True, **kwargs)
            finish_folder(tmp, self._upcycle_spec, self._upcycle_base.__name__, self._upcycle_rewrites)
        return result


def patch_config(config_path: Path) -> None:
    """config.json of an upcycled model: model_type "upcycle", the dense model_type kept."""
    d = read_json(config_path, what="config.json")
    if d.get("model_type") == MODEL_TYPE:
        return
    d["upcycle"] = {"base_model_type": d.get("model_type"), "load_with": "upcycle.load(folder)"}
    d["model_type"] = MODEL_TYPE
    config_path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def base_config_dict(config_path: Path) -> dict:
    """config.json as the dense model's config class expects it (model_type restored)."""
    d = read_json(config_path, what="config.json")
    if d.get("model_type") == MODEL_TYPE:
        d = dict(d)
        d["model_type"] = d.pop("upcycle", {}).get("base_model_type")
    return d


def load_base_config(folder: Path):
    """The dense model's transformers config of an upcycle folder (either config.json flavour)."""
    from .loading import _transformers

    tf = _transformers()
    d = base_config_dict(folder / "config.json")
    model_type = d.pop("model_type", None)
    d.pop("auto_map", None)  # never remote code
    try:
        return tf.AutoConfig.for_model(model_type, **d)
    except Exception as exc:
        raise ModelError(f"{folder / 'config.json'}: cannot read as a transformers config (model_type "
                         f"{model_type!r}: {brief(exc)})") from None


def finish_folder(folder: Path, spec, model_class: str, rewrites: list) -> None:
    from upcycle.specs import dump_spec

    from .integrity import file_entries
    from .saving import FORMAT_VERSION, MANIFEST, SPEC

    patch_config(folder / "config.json")
    (folder / SPEC).write_text(dump_spec(spec))
    files = file_entries(folder, skip=(MANIFEST,))  # sha256 at disk speed: ~2 s for a 2.8 GB model
    manifest = {
        "format_version": FORMAT_VERSION,
        "source_kind": "transformers",
        "model_class": model_class,
        "saved_by": "save_pretrained",
        "rewrites": rewrites,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
