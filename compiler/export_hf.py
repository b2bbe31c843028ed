"""Export an upcycled model as a transformers MoE checkpoint (`upcycle-compile … --format hf`).

The output folder loads with `transformers.AutoModelForCausalLM.from_pretrained(OUT)`, no custom
code. Source family → format:

- Llama / Mistral (RMSNorm, rotary, SwiGLU, no biases):
  - Mixtral (MixtralForCausalLM) for topk_then_softmax with G = 1, every layer MoE, no shared
    expert: Mixtral's router is softmax → top-k → renormalise, the same as topk_then_softmax.
  - Qwen2-MoE (Qwen2MoeForCausalLM, `qkv_bias: false`) otherwise: softmax_then_topk is
    `norm_topk_prob: false`, topk_then_softmax is `norm_topk_prob: true`; fine-grained experts
    via `moe_intermediate_size = F/G`; dense layers among MoE ones via `mlp_only_layers`.
- Qwen2 (q/k/v biases): Qwen2-MoE with `qkv_bias: true`, both router modes.
- anything else (GPT-2, BERT, T5, Phi-3, Gemma, …): no transformers MoE counterpart; ExportError.

Layout in transformers 5.x: `mlp.gate.weight` [N, D] (router), `mlp.experts.gate_up_proj`
[N, 2·H, D] (gate rows first, then up rows: the forward chunks it in two) and
`mlp.experts.down_proj` [N, D, H], the same orientation as our GroupedExperts.

Shared expert (Qwen2-MoE only): transformers scales it by sigmoid(shared_expert_gate · x). The
gate weight is set to zero (sigmoid(0) = 1/2) and the shared expert's down projection doubled,
so the exported layer equals ours exactly at init, and the gate trains from there. Without a shared
expert of ours, Qwen2-MoE still builds one: it gets width 1 and all-zero weights (its output is
exactly 0, and its gradients are 0, so training keeps it at 0); width 0 would make transformers
warn about zero-element tensors on every load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from upcycle.runtime.activations import REGISTRY
from upcycle.runtime.moe import MoELayer
from upcycle.specs import dump_spec, load_spec

from .errors import UpcycleError
from .checkpoint import OutTensor, ShardWriter
from .loading import source_files
from .saving import atomic_output

__all__ = ["ExportError", "export_hf", "hf_export_plan"]

LLAMA_FAMILY = ("llama", "mistral")
QWEN2_FAMILY = ("qwen2",)
# our activation names -> transformers' ACT2FN names
_ACT = {name: a.hf_names for name, a in REGISTRY.items()}  # our activation -> transformers' hidden_act names


class ExportError(UpcycleError):
    """The upcycled model has no transformers MoE format (one line saying why)."""


def _layers(model: nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        raise ExportError(f"{type(model).__name__}: expected a causal LM with model.layers and lm_head")
    return layers


def hf_export_plan(model: nn.Module, spec=None, target: str | None = None) -> dict:
    """Decide the transformers format for an upcycled model, or raise ExportError saying why not.

    Returns {target, moe_layers, dense_layers, moe: MoEConfig}."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    name = type(model).__name__
    if model_type not in LLAMA_FAMILY + QWEN2_FAMILY:
        raise ExportError(
            f"{name} ({model_type or 'no transformers config'}): no transformers MoE format for this architecture "
            "(supported sources: Llama/Mistral -> Mixtral or Qwen2-MoE, Qwen2 -> Qwen2-MoE); use --format native")
    if model_type in LLAMA_FAMILY and (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)):
        raise ExportError(f"{name}: attention_bias/mlp_bias are set; Mixtral and Qwen2-MoE have no o_proj or MLP biases")
    layers = _layers(model)
    moe_paths = {n for n, m in model.named_modules() if isinstance(m, MoELayer)}
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
    moes = [layers[i].mlp.config for i in moe_idx]
    c = moes[0]
    shape = lambda m: (m.num_experts, m.d_expert, m.top_k, m.router_type, m.shared_d_ffn, m.activation)  # noqa: E731
    if any(shape(m) != shape(c) for m in moes):
        raise ExportError(f"{name}: MoE layers differ in shape; the transformers formats need one expert shape for all layers")
    if not c.gated:
        raise ExportError(f"{name}: experts are not gated (GLU); Mixtral and Qwen2-MoE experts are SwiGLU-style")
    if c.first_bias or c.output_bias or c.router_bias:
        raise ExportError(f"{name}: expert or router biases have no place in Mixtral / Qwen2-MoE experts")
    trained_bias = [i for i in moe_idx if layers[i].mlp.router.expert_bias is not None
                    and not layers[i].mlp.router.expert_bias.is_meta  # planned on meta: nothing trained
                    and bool(layers[i].mlp.router.expert_bias.abs().sum() > 0)]
    if trained_bias:
        raise ExportError(f"{name}: model.layers.{trained_bias[0]}.mlp routes with a trained aux-loss-free bias "
                          "(router.balancing: bias), which Mixtral / Qwen2-MoE routers cannot hold; use the native format")
    per_slice = [i for i in moe_idx if layers[i].mlp.router.selection != "topk"
                 and not _selections_agree(layers[i].mlp, spec if spec is not None else getattr(model, "_upcycle_spec", None))]
    if per_slice:
        raise ExportError(f"{name}: model.layers.{per_slice[0]}.mlp routes per shard position (router.selection: "
                          "per_slice), which transformers' top-K routers cannot hold; train the last steps with "
                          "upcycle.relax_routing(model) (examples/train.py relaxes by default) or use the native format")
    if cfg.hidden_act not in _ACT.get(c.activation, ()):
        raise ExportError(f"{name}: expert activation {c.activation} differs from hidden_act {cfg.hidden_act}")
    fine = c.d_expert != cfg.intermediate_size
    mixtral_ok = (model_type in LLAMA_FAMILY and c.router_type == "topk_then_softmax" and not fine
                  and not dense_idx and not c.shared_d_ffn)
    if target is None:
        target = "mixtral" if mixtral_ok else "qwen2_moe"
    if target == "mixtral" and not mixtral_ok:
        raise ExportError(f"{name}: Mixtral holds topk_then_softmax, full-width experts (G = 1) in every layer and no "
                          "shared expert from a Llama/Mistral model; use the qwen2_moe target")
    if target not in ("mixtral", "qwen2_moe"):
        raise ExportError(f"unknown export target {target!r}; choose mixtral or qwen2_moe")
    return {"target": target, "moe_layers": moe_idx, "dense_layers": dense_idx, "moe": c}


def _selections_agree(moe, spec) -> bool:
    """per_slice and plain top-K pick the same experts while every virtual group's router rows are
    equal (an untrained virtual-group or k-means init): then the top-K format holds the layer."""
    w = moe.router.weight
    if w.is_meta:  # planned, not yet mapped: the spec says how the rows will be initialised
        init = getattr(getattr(spec, "router", None), "init", None)
        return init in ("virtual_group", "kmeans") and moe.router.bias is None
    rows = w.detach().view(-1, moe.config.virtual_group_size, w.shape[-1])  # [groups, G, D]
    return moe.router.bias is None and bool((rows == rows[:, :1]).all())


def hf_aux_loss_coef(c, num_moe_layers: int) -> float:
    """transformers' coefficient giving our balancing pressure on each router.

    Ours: Σ over MoE layers of coef · N Σ_e f_e P_e, with f_e the share of the T·K slots.
    transformers (Mixtral, Qwen2-MoE `load_balancing_loss_func`): coef' · N Σ_e F_e P̄_e over the
    layers pooled, with F_e slots per token (K times our share) and P̄ the mean over layers·tokens.
    Its gradient on layer l's mean probability is coef' · N · K · f_e / L against our coef · N · f_e,
    so coef' = coef · L / K: equal gradients when the layers' loads agree (exactly for one MoE
    layer; with several, transformers balances the pooled load rather than each layer's)."""
    if not c.uses_aux_loss:
        return 0.0
    return c.aux_loss_coef * num_moe_layers / c.top_k


def _config(model: nn.Module, plan: dict, spec):
    import transformers

    src = model.config
    c = plan["moe"]
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    common = dict(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads, num_key_value_heads=src.num_key_value_heads,
        hidden_act=src.hidden_act, max_position_embeddings=src.max_position_embeddings,
        initializer_range=src.initializer_range, rms_norm_eps=src.rms_norm_eps,
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        rope_parameters=getattr(src, "rope_parameters", None), attention_dropout=getattr(src, "attention_dropout", 0.0),
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
        num_experts_per_tok=c.top_k, output_router_logits=True,
        router_aux_loss_coef=hf_aux_loss_coef(c, len(plan["moe_layers"])),
    )
    sliding = getattr(src, "sliding_window", None) if getattr(src, "use_sliding_window", True) else None
    if plan["target"] == "mixtral":
        cfg = transformers.MixtralConfig(**common, head_dim=head_dim, intermediate_size=c.d_expert,
                                         num_local_experts=c.num_experts, sliding_window=sliding)
    else:
        layer_types = getattr(src, "layer_types", None)
        if layer_types is None:
            layer_types = ["sliding_attention" if sliding else "full_attention"] * src.num_hidden_layers
        cfg = transformers.Qwen2MoeConfig(
            **common, intermediate_size=src.intermediate_size, moe_intermediate_size=c.d_expert,
            num_experts=c.num_experts, shared_expert_intermediate_size=c.shared_d_ffn or 1,
            norm_topk_prob=c.router_type == "topk_then_softmax", decoder_sparse_step=1,
            mlp_only_layers=list(plan["dense_layers"]), qkv_bias=src.model_type in QWEN2_FAMILY,
            use_sliding_window=sliding is not None, sliding_window=sliding,
            max_window_layers=getattr(src, "max_window_layers", 0), layer_types=list(layer_types),
        )
        cfg.head_dim = head_dim  # Qwen2MoeAttention reads getattr(config, "head_dim", hidden / heads)
    cfg.dtype = plan_dtype(model)
    cfg.architectures = ["MixtralForCausalLM" if plan["target"] == "mixtral" else "Qwen2MoeForCausalLM"]
    return cfg


class Interleaved:
    """cat([a, b], dim=1) of two [N, H, ...] stacks without the copy (the fused gate_up_proj):
    the shard writer streams a[0], b[0], a[1], b[1], ..., the same bytes as the concatenation, and
    a layer's peak memory keeps one stack less."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b

    @property
    def shape(self) -> tuple:
        return (self.a.shape[0], self.a.shape[1] + self.b.shape[1], *self.a.shape[2:])

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    def to(self, dtype) -> "Interleaved":
        return Interleaved(self.a.to(dtype), self.b.to(dtype))

    def detach(self) -> "Interleaved":
        return Interleaved(self.a.detach(), self.b.detach())

    def parts(self):
        for a, b in zip(self.a, self.b):
            yield a
            yield b


def hf_layer_tensors(state: dict[str, torch.Tensor], c, target: str, prefix: str,
                     dtype: torch.dtype, concat: bool = True) -> dict[str, torch.Tensor]:
    """One MoE layer in the target's names and layout, from the layer's own state dict (local
    names). The same function serves the in-memory export (a module's state) and the streaming one
    (tensors mapped from the checkpoint, or meta tensors to plan the shapes). Everything is written
    in the model's dtype, the router included (transformers keeps one dtype). concat=False: the
    fused gate_up_proj as an `Interleaved` (for the shard writer, no copy)."""
    w = state["router.weight"]
    gate, up = state["experts.gate_proj"], state["experts.up_proj"]
    out = {
        prefix + "gate.weight": w,  # [N, D]
        prefix + "experts.gate_up_proj": torch.cat([gate, up], dim=1) if concat else Interleaved(gate, up),  # [N, 2H, D]
        # scaling_placement "output": the fixed multiplier folds into the down projections
        prefix + "experts.down_proj": state["experts.down_proj"] * c.output_multiplier
        if c.output_multiplier != 1.0 else state["experts.down_proj"],  # [N, D, H]
    }
    if target == "qwen2_moe":
        d = c.d_model
        if c.shared_d_ffn:
            out[prefix + "shared_expert.gate_proj.weight"] = state["shared_expert.gate_proj.weight"]
            out[prefix + "shared_expert.up_proj.weight"] = state["shared_expert.up_proj.weight"]
            # sigmoid(0) = 1/2 gates it in transformers: double W2 so the product is shared_scale · W2
            out[prefix + "shared_expert.down_proj.weight"] = state["shared_expert.down_proj.weight"] * (2.0 * c.shared_scale)
        else:  # no shared expert: width 1, all zeros (output exactly 0, gradients 0: it stays 0)
            out[prefix + "shared_expert.gate_proj.weight"] = w.new_zeros(1, d)
            out[prefix + "shared_expert.up_proj.weight"] = w.new_zeros(1, d)
            out[prefix + "shared_expert.down_proj.weight"] = w.new_zeros(d, 1)
        out[prefix + "shared_expert_gate.weight"] = w.new_zeros(1, d)
    return {k: v.detach().to(dtype) for k, v in out.items()}


def hf_tensor_order(names: list[str], plan: dict) -> list[tuple[str, int | None]]:
    """Our state-dict names in order, each MoE layer's names collapsed into one (None, layer index)
    slot at its first name: the order in which both exports emit tensors."""
    moe_prefix = {f"model.layers.{i}.mlp.": i for i in plan["moe_layers"]}
    order, seen = [], set()
    for name in names:
        i = next((j for pre, j in moe_prefix.items() if name.startswith(pre)), None)
        if i is None:
            order.append((name, None))
        elif i not in seen:
            seen.add(i)
            order.append((None, i))
    return order


def hf_state_dict(model: nn.Module, plan: dict, concat: bool = True) -> dict[str, torch.Tensor]:
    """The transformers-format tensors, in write order: other weights keep their names (a tied
    duplicate such as lm_head.weight is stored once, as transformers does); each MoE layer mapped.
    concat=False: fused gate_up_proj tensors as `Interleaved` views (for writing: no copies)."""
    from .saving import tied_aliases

    aliases = tied_aliases(model)
    own = model.state_dict()
    dtype = plan_dtype(model)
    layers = _layers(model)
    state = {}
    for name, i in hf_tensor_order([n for n in own if n not in aliases], plan):
        if i is None:
            state[name] = own[name]
        else:
            moe: MoELayer = layers[i].mlp
            state.update(hf_layer_tensors(moe.state_dict(), moe.config, plan["target"], f"model.layers.{i}.mlp.", dtype,
                                          concat=concat))
    return state


def plan_dtype(model: nn.Module) -> torch.dtype:
    """The model's dtype: that of its embedding (routers are fp32 whatever the model dtype)."""
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    return emb.weight.dtype if emb is not None else next(model.parameters()).dtype


def build_hf_model(model: nn.Module, spec=None, target: str | None = None) -> nn.Module:
    """The transformers MoE model holding the upcycled weights (shared where no copy is needed)."""
    import transformers

    plan = hf_export_plan(model, spec, target)
    cfg = _config(model, plan, spec)
    cls = transformers.MixtralForCausalLM if plan["target"] == "mixtral" else transformers.Qwen2MoeForCausalLM
    hf = cls(cfg).to(cfg.dtype)
    state = hf_state_dict(model, plan)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"{plan['target']} export: tensors do not match (missing {missing[:4]}, unexpected {unexpected[:4]})")
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    if hasattr(model, "generation_config") and model.generation_config is not None:
        hf.generation_config = model.generation_config
    return hf.eval()


def export_hf(model: nn.Module, out_dir, *, spec=None, report=None, force: bool = False, target: str | None = None,
              max_shard_bytes: int = 2 * 10**9, tokenizer=None, files: dict | None = None,
              force_resources: bool = False) -> Path:
    """Write `model` (upcycled) as a Mixtral / Qwen2-MoE checkpoint folder, atomically.

    Tensors go through the same shard writer, in the same order, as the streaming export
    (`streaming.stream_upcycle(..., fmt="hf")`), so both write identical bytes for the same model.
    The resolved spec and report are written beside it (upcycle_spec.yaml, report.json/txt);
    transformers ignores them. The tokenizer travels: `tokenizer` (saved), else `files` ({name:
    path}, e.g. a loaded source's), else the tokenizer files beside config._name_or_path.
    The free space is checked first (force_resources=True skips); OS failures are OutputErrors."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise UpcycleError(f"{out}: output already exists; choose another path or pass --force (force=True) to replace it")
    spec = load_spec(spec) if spec is not None else None
    plan = hf_export_plan(model, spec, target)  # raises ExportError before anything is written
    cfg = _config(model, plan, spec)
    state = hf_state_dict(model, plan, concat=False)  # views of the model's tensors: peak ~ the model + buffers
    generation = getattr(model, "generation_config", None)
    planned = [OutTensor(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    with atomic_output(out, force=force, need_bytes=sum(t.nbytes for t in planned), force_resources=force_resources) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        carried = {} if tokenizer is not None else (files if files is not None else source_files(model))
        write_hf_folder(tmp, cfg, state.items(), planned, max_shard_bytes, spec=spec, report=report, generation_config=generation,
                        source_class=type(model).__name__, carried=carried)
    return out


def write_hf_folder(tmp: Path, cfg, tensors, plan: list, max_shard_bytes: int, *, spec=None, report=None,
                    generation_config=None, source_class: str = "", extra: dict | None = None,
                    carried: dict | None = None) -> dict:
    """Shards + index, config (+ generation config), spec, report and upcycle_export.json into `tmp`;
    `carried` ({name: path}: tokenizer files, generation_config.json) copied as they are.
    `tensors` yields (name, tensor) in `plan`'s order. Returns the written weight files."""
    writer = ShardWriter(tmp, plan, max_shard_bytes)
    try:
        for name, value in tensors:
            writer.write(name, value)
        files = writer.finish()
    except BaseException:
        writer.abort()
        raise
    cfg.save_pretrained(str(tmp))
    for name, path in (carried or {}).items():
        shutil.copyfile(path, tmp / name)
    if generation_config is not None and not (tmp / "generation_config.json").exists():
        generation_config.save_pretrained(str(tmp))
    if spec is not None:
        (tmp / "upcycle_spec.yaml").write_text(dump_spec(spec))
    if report is not None:
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "report.txt").write_text(report.to_text() + "\n")
    info = {"format": cfg.model_type, "model_class": cfg.architectures[0] if cfg.architectures else None,
            "source_class": source_class, "files": files, **(extra or {})}
    (tmp / "upcycle_export.json").write_text(json.dumps(info, indent=2))
    return files
