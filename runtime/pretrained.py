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

The subclass is held by every upcycled transformers model, so it lives in the runtime (training,
pickling and deepcopying a model need nothing else); writing the folder is the output layer's
work, imported when `save_pretrained` is called (compiler/output_folder.py, atomic.py,
resources.py).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn


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
        # looked up at each save (output_folder.finish_folder: tests interrupt it)
        from upcycle.compiler import output_folder

        if not is_main_process or kwargs.get("push_to_hub"):  # the hub upload names the repo after the folder
            result = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
            if is_main_process:
                output_folder.finish_folder(Path(save_directory), self._upcycle_spec, self._upcycle_base.__name__,
                                            self._upcycle_rewrites)
            return result
        from upcycle.compiler.atomic import staged_into

        if not force_resources:  # a full disk is refused before the first byte, not half-way
            from upcycle.compiler.resources import FILES_OVERHEAD_BYTES, check_disk

            check_disk(output_folder.state_bytes(self) + FILES_OVERHEAD_BYTES, save_directory)
        with staged_into(save_directory) as tmp:
            result = super().save_pretrained(str(tmp), *args, is_main_process=True, **kwargs)
            output_folder.finish_folder(tmp, self._upcycle_spec, self._upcycle_base.__name__, self._upcycle_rewrites)
        return result


__all__ = ["is_transformers_model", "mark_upcycled"]
