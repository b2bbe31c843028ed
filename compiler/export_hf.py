"""Export an upcycled model as a transformers MoE checkpoint (`upcycle-compile … --format hf`).

The output folder loads with `transformers.AutoModelForCausalLM.from_pretrained(OUT)`, no custom
code. The formats are the registered targets (compiler/targets/: Mixtral, Qwen2-MoE, Qwen3-MoE,
FlexOlmo, GraniteMoe, GraniteMoeShared, Ernie 4.5-MoE, one module each); this module checks what
every format needs (a causal LM with model.layers, one expert shape, gated experts, no biases,
dropless top-K routing, the source's activation), then picks the target: the one named, if it
holds the model exactly, else the first that does (the target's `order`). A source no format holds
gets one line naming the nearest format and what it lacks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from upcycle.runtime.activations import REGISTRY
from upcycle.runtime.moe import MoELayer, moe_layers
from upcycle.specs import load_spec

from .atomic import atomic_output, check_output
from .checkpoint import OutTensor, ShardWriter
from .loading import source_files, tied_aliases
from .output_folder import GENERATION_CONFIG, copy_files, write_config, write_export_record, write_report, write_spec
from .targets import TARGETS, ExportError, ExportPlan, Interleaved, hf_aux_loss_coef, targets_for
from .targets._nearest import NEAREST

__all__ = ["ExportError", "ExportPlan", "export_hf", "hf_export_plan", "build_hf_model", "hf_aux_loss_coef",
           "Interleaved", "TARGETS"]

_ACT = {name: a.hf_names for name, a in REGISTRY.items()}  # our activation -> transformers' hidden_act names


def _layers(model: nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        raise ExportError(f"{type(model).__name__}: expected a causal LM with model.layers and lm_head")
    return layers


def _no_format(name: str, model_type: str | None) -> ExportError:
    known = "; ".join(f"{t.name} ({', '.join(t.sources)})" for t in TARGETS.values())
    if model_type in NEAREST:
        fmt, lacks = NEAREST[model_type]
        near = (f"the nearest, {fmt}, lacks {lacks}" if fmt != "none" else f"it would need {lacks}")
        return ExportError(f"{name} ({model_type}): no transformers MoE format for this architecture ({near}); "
                           "use --format native")
    return ExportError(f"{name} ({model_type or 'no transformers config'}): no transformers MoE format for this "
                       f"architecture (formats: {known}); use --format native")


def _layer_kinds(model: nn.Module, name: str) -> tuple[list[int], list[int]]:
    layers = _layers(model)
    moe_paths = set(moe_layers(model))
    moe_idx, dense_idx = [], []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, MoELayer):
            moe_idx.append(i)
            moe_paths.discard(f"model.layers.{i}.mlp")
        elif mlp is not None and all(isinstance(getattr(mlp, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            dense_idx.append(i)
        else:
            raise ExportError(f"{name}: model.layers.{i}.mlp is neither an MoE layer nor a gate/up/down MLP")
    if moe_paths:
        raise ExportError(f"{name}: MoE layers outside model.layers.N.mlp ({sorted(moe_paths)[0]}) have no place in the format")
    if not moe_idx:
        raise ExportError(f"{name}: no MoE layer to export")
    return moe_idx, dense_idx


def _common_checks(model: nn.Module, name: str, moe_idx: list[int], spec) -> int | None:
    """What every format needs; returns the first layer routing with a trained aux-loss-free bias."""
    layers = _layers(model)
    moes = [layers[i].mlp.config for i in moe_idx]
    c = moes[0]
    shape = lambda m: (m.num_experts, m.d_expert, m.top_k, m.router_type, m.shared_d_ffn, m.activation)  # noqa: E731
    if any(shape(m) != shape(c) for m in moes):
        raise ExportError(f"{name}: MoE layers differ in shape; the transformers formats need one expert shape for all layers")
    if not c.gated:
        raise ExportError(f"{name}: experts are not gated (GLU); the transformers MoE formats hold SwiGLU-style experts")
    if c.first_bias or c.output_bias or c.router_bias:
        raise ExportError(f"{name}: expert or router biases have no place in the transformers MoE formats' experts")
    if c.capacity_factor is not None:
        raise ExportError(f"{name}: runtime.capacity_factor {c.capacity_factor} drops tokens; the transformers MoE "
                          "formats are dropless (set runtime.capacity_factor: null, or use the native format)")
    per_slice = [i for i in moe_idx if layers[i].mlp.router.selection != "topk"
                 and not _selections_agree(layers[i].mlp, spec if spec is not None else getattr(model, "_upcycle_spec", None))]
    if per_slice:
        raise ExportError(f"{name}: model.layers.{per_slice[0]}.mlp routes per shard position (router.selection: "
                          "per_slice), which transformers' top-K routers cannot hold once trained; save it in the native format "
                          "(upcycle.load reads it), or switch it with upcycle.relax_routing(model) at a cost in quality "
                          "(docs/algorithm.md §7)")
    hidden_act = getattr(model.config, "hidden_act", None)
    if hidden_act not in _ACT.get(c.activation, ()):
        raise ExportError(f"{name}: expert activation {c.activation} differs from hidden_act {hidden_act}")
    trained = [i for i in moe_idx if layers[i].mlp.router.expert_bias is not None
               and not layers[i].mlp.router.expert_bias.is_meta  # planned on meta: nothing trained
               and bool(layers[i].mlp.router.expert_bias.abs().sum() > 0)]
    return trained[0] if trained else None


def hf_export_plan(model: nn.Module, spec=None, target: str | None = None) -> ExportPlan:
    """Decide the transformers format for an upcycled model, or raise ExportError saying why not."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    name = type(model).__name__
    if target is not None and target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    candidates = targets_for(model_type)
    if not candidates:
        raise _no_format(name, model_type)
    moe_idx, dense_idx = _layer_kinds(model, name)
    bias = _common_checks(model, name, moe_idx, spec)
    if bias is not None and not any(t.trained_bias for t in candidates):
        holders = ", ".join(f"{t.title} ({', '.join(t.sources)})" for t in TARGETS.values() if t.trained_bias)
        raise ExportError(f"{name}: model.layers.{bias}.mlp routes with a trained aux-loss-free bias (router.balancing: "
                          f"bias), which no transformers MoE format for {model_type} can hold (only {holders}); "
                          "use the native format")
    plan = ExportPlan(candidates[0], moe_idx, dense_idx, _layers(model)[moe_idx[0]].mlp.config, model_type,
                      expert_bias=bias is not None, candidates=[t.name for t in candidates])
    if target is not None:
        chosen = TARGETS[target]
        why = chosen.why_not(cfg, plan)
        if why:
            others = [t.name for t in candidates if t is not chosen and t.why_not(cfg, plan) is None]
            hint = f"; {' or '.join(others)} holds it" if others else "; use the native format"
            raise ExportError(f"{name}: --target {target}: {why}{hint}")
        plan.target = chosen
        return plan
    reasons = []
    for t in candidates:
        why = t.why_not(cfg, plan)
        if why is None:
            plan.target = t
            return plan
        reasons.append(f"{t.name}: {why}")
    raise ExportError(f"{name}: no transformers MoE format holds this model exactly ({'; '.join(reasons)}); "
                      "use --format native")


def _selections_agree(moe, spec) -> bool:
    """per_slice and plain top-K pick the same experts while every virtual group's router rows are
    equal (an untrained virtual-group or k-means init): then the top-K format holds the layer."""
    w = moe.router.weight
    if w.is_meta:  # planned, not yet mapped: the spec says how the rows will be initialised
        init = getattr(getattr(spec, "router", None), "init", None)
        return init in ("virtual_group", "kmeans") and moe.router.bias is None
    rows = w.detach().view(-1, moe.config.virtual_group_size, w.shape[-1])  # [groups, G, D]
    return moe.router.bias is None and bool((rows == rows[:, :1]).all())


def hf_config(model: nn.Module, plan: ExportPlan):
    """The target's transformers config for the upcycled model."""
    return plan.target.config(model.config, plan, plan_dtype(model))


def hf_tensor_order(names: list[str], plan: ExportPlan) -> list[tuple[str, int | None]]:
    """Our state-dict names in order, each MoE layer's names collapsed into one (None, layer index)
    slot at its first name: the order in which both exports emit tensors."""
    moe_prefix = {f"model.layers.{i}.mlp.": i for i in plan.moe_layers}
    order, seen = [], set()
    for name in names:
        i = next((j for pre, j in moe_prefix.items() if name.startswith(pre)), None)
        if i is None:
            order.append((name, None))
        elif i not in seen:
            seen.add(i)
            order.append((None, i))
    return order


def hf_state_dict(model: nn.Module, plan: ExportPlan, concat: bool = True) -> dict[str, torch.Tensor]:
    """The transformers-format tensors, in write order: other weights keep their names (a tied
    duplicate such as lm_head.weight is stored once, as transformers does); each MoE layer mapped.
    concat=False: fused gate_up_proj tensors as `Interleaved` views (for writing: no copies)."""
    aliases = tied_aliases(model)
    own = model.state_dict()
    dtype = plan_dtype(model)
    layers = _layers(model)
    state = {}
    for name, i in hf_tensor_order([n for n in own if n not in aliases], plan):
        if i is None:
            state[plan.target.rename(name)] = own[name]
        else:
            moe: MoELayer = layers[i].mlp
            state.update(plan.target.layer_tensors(moe.state_dict(), moe.config, i, dtype, concat=concat))
    return state


def plan_dtype(model: nn.Module) -> torch.dtype:
    """The model's dtype: that of its embedding (routers are fp32 whatever the model dtype)."""
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    return emb.weight.dtype if emb is not None else next(model.parameters()).dtype


def build_hf_model(model: nn.Module, spec=None, target: str | None = None) -> nn.Module:
    """The transformers MoE model holding the upcycled weights (shared where no copy is needed)."""
    import transformers

    plan = hf_export_plan(model, spec, target)
    cfg = hf_config(model, plan)
    hf = getattr(transformers, plan.target.architecture)(cfg).to(cfg.dtype)
    state = hf_state_dict(model, plan)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"{plan.target.name} export: tensors do not match (missing {missing[:4]}, unexpected {unexpected[:4]})")
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    if hasattr(model, "generation_config") and model.generation_config is not None:
        hf.generation_config = model.generation_config
    return hf.eval()


def export_hf(model: nn.Module, out_dir, *, spec=None, report=None, force: bool = False, target: str | None = None,
              max_shard_bytes: int = 2 * 10**9, tokenizer=None, files: dict | None = None,
              force_resources: bool = False) -> Path:
    """Write `model` (upcycled) as a transformers MoE checkpoint folder (the target's), atomically.

    Tensors go through the same shard writer, in the same order, as the streaming export
    (`streaming.stream_upcycle(..., fmt="hf")`), so both write identical bytes for the same model.
    The resolved spec and report are written beside it (upcycle_spec.yaml, report.json/txt);
    transformers ignores them. The tokenizer travels: `tokenizer` (saved), else `files` ({name:
    path}, e.g. a loaded source's), else the tokenizer files beside config._name_or_path.
    The free space is checked first (force_resources=True skips); OS failures are OutputErrors."""
    out = Path(out_dir)
    check_output(out, force)  # before the plan (atomic_output applies it again)
    spec = load_spec(spec) if spec is not None else None
    plan = hf_export_plan(model, spec, target)  # raises ExportError before anything is written
    cfg = hf_config(model, plan)
    state = hf_state_dict(model, plan, concat=False)  # views of the model's tensors: peak ~ the model + buffers
    generation = getattr(model, "generation_config", None)
    planned = [OutTensor(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    with atomic_output(out, force=force, need_bytes=sum(t.nbytes for t in planned), force_resources=force_resources) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        carried = {} if tokenizer is not None else (files if files is not None else source_files(model))
        write_hf_folder(tmp, cfg, state.items(), planned, max_shard_bytes, spec=spec, report=report,
                        generation_config=generation, source_class=type(model).__name__, carried=carried,
                        extra=export_record(plan))
    return out


def export_record(plan: ExportPlan) -> dict:
    """What upcycle_export.json says about the format chosen (from the target's entry)."""
    t = plan.target
    return {"target": t.name, "exactness": t.exactness, "router_type": plan.moe.router_type, "router_loss": t.router_loss,
            "moe_layers": plan.moe_layers, "dense_layers": plan.dense_layers, "targets_for_source": plan.candidates}


def write_hf_folder(tmp: Path, cfg, tensors, plan: list, max_shard_bytes: int, *, spec=None, report=None,
                    generation_config=None, source_class: str = "", extra: dict | None = None,
                    carried: dict | None = None, while_waiting=None, io_seconds=None) -> dict:
    """Shards + index, config (+ generation config), spec, report and upcycle_export.json into `tmp`;
    `carried` ({name: path}: tokenizer files, generation_config.json) copied as they are.
    `tensors` yields (name, tensor) in `plan`'s order. Returns the written weight files.
    `while_waiting`, `io_seconds`: see ShardWriter."""
    writer = ShardWriter(tmp, plan, max_shard_bytes, seconds=io_seconds)
    if while_waiting is not None:
        writer.while_waiting(while_waiting)
    try:
        for name, value in tensors:
            writer.write(name, value)
        files = writer.finish()
    except BaseException:
        writer.abort()
        raise
    write_config(tmp, cfg, upcycled=False)  # the target's own config: transformers loads the folder
    copy_files(tmp, carried)
    if generation_config is not None and not (tmp / GENERATION_CONFIG).exists():
        generation_config.save_pretrained(str(tmp))
    if spec is not None:
        write_spec(tmp, spec)
    if report is not None:
        write_report(tmp, report)
    write_export_record(tmp, {"format": cfg.model_type, "model_class": cfg.architectures[0] if cfg.architectures else None,
                              "source_class": source_class, "files": files, **(extra or {})})
    return files
