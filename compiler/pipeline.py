"""The pass pipeline: discover → select → plan → probe → rewrite (+ weight mapping) → verify.

`compile_upcycle` is the one public verb; it rewrites the model in place (like torchao's
`quantize_`) and returns it, so no second copy of a large model is ever held.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from upcycle.passes.discover import Discovery, FoundMLP, discover_mlps
from upcycle.passes.find_mlps import MLPMatch
from upcycle.passes.mlp_subgraph import mlp_function
from upcycle.passes.rewrite import RewriteRecord, linear_paths, rewrite_mlps
from upcycle.passes.verify import LayerCheck, ProbeCapture, check_layer, compare
from upcycle.passes.weight_mapping import (
    DenseMLPWeights,
    Scaling,
    expected_exact,
    expert_weights,
    extract_dense_weights,
    plan_scaling,
    router_init,
    shared_expert_weights,
    virtual_group_ok,
)
from upcycle.runtime.moe import MoELayer, materialize
from upcycle.runtime.token_mask import attach_token_mask
from upcycle.specs import load_spec, validate_against_model
from upcycle.specs.schema import UpcycleSpec

from .calibration import calibration_batch, tokenizer_of
from .errors import ModelError, VerificationError
from upcycle.runtime.pretrained import mark_upcycled
from .plan import Plan, build_plan, moe_config_for
from .report import Report


@dataclass
class UpcycleResult:
    model: nn.Module
    plan: Plan
    report: Report
    records: list[RewriteRecord] = field(default_factory=list)
    pass_log: list = field(default_factory=list)  # passes.manager.PassLog: analysis passes, then the rewrite


def _dense_param_count(match: MLPMatch, unit: nn.Module) -> int:
    n = 0
    for ref in match.linears:
        n += ref.weight(unit).numel()
        b = ref.bias(unit)
        n += 0 if b is None else b.numel()
    return n


def _select(discovery: Discovery, spec: UpcycleSpec) -> dict[int, str]:
    """{index: reason it stays dense, '' if it is rewritten}."""
    total = len(discovery.mlps)
    out = {}
    for found in discovery.mlps:
        m = found.match
        if not spec.layers.selects(found.index, total, found.path):
            out[found.index] = "not selected by `layers`"
        elif m.problems:
            out[found.index] = "; ".join(m.problems)
        else:
            out[found.index] = ""
    return out


def _unit_of(model: nn.Module, found: FoundMLP) -> nn.Module:
    return model.get_submodule(found.rewrite_unit) if found.rewrite_unit else model


def analyse(model: nn.Module, spec: UpcycleSpec) -> tuple[Discovery, dict[int, str], Plan]:
    """Discovery and plan, no changes to the model (what --dry-run prints)."""
    discovery = discover_mlps(model)
    if not discovery.mlps:
        blocks = ", ".join(p or "<root>" for p, _, _ in discovery.untraced[:4])
        extra = f"; blocks that did not trace: {blocks}" if blocks else ""
        if discovery.problems:  # blocks that look like MLPs, each with the reason it was not handled
            extra = "; " + "; ".join(discovery.problems[:3])
        raise ModelError(
            f"no MLP found in {type(model).__name__}: no linear -> activation -> linear (or gated) "
            f"dataflow in the traced graphs{extra}"
        )
    selection = _select(discovery, spec)
    unsupported = [f for f in discovery.mlps if selection[f.index] != "not selected by `layers`" and not f.match.activation]
    if unsupported:
        f = unsupported[0]
        raise ModelError(
            f"{f.path}: unsupported activation in MLP ({f.match.activation_desc}); supported: "
            "silu, gelu, gelu_tanh, quick_gelu, relu, relu2 (squared ReLU)"
        )
    for found in discovery.mlps:
        if selection[found.index] == "":
            validate_against_model(spec, found.match.d_ffn, found.path)
    dense_params, biases = {}, {}
    for found in discovery.mlps:
        unit = _unit_of(model, found)
        dense_params[found.index] = _dense_param_count(found.match, unit)
        m = found.match
        first_refs = [r for r in (m.gate, m.up) if r is not None]
        biases[found.index] = (any(r.bias(unit) is not None for r in first_refs), m.down.bias(unit) is not None)
    plan = build_plan(model, discovery, spec, selection, dense_params, biases)
    if not plan.selected:
        raise ModelError(
            f"{type(model).__name__}: {len(plan.entries)} MLP(s) found but none is rewritten "
            f"({plan.entries[0].path}: {plan.entries[0].reason}); check `layers` in {spec.source}"
        )
    if spec.router.init in ("virtual_group", "kmeans") and not virtual_group_ok(spec):
        shared = f" - shared_experts={spec.experts.shared_experts}" if spec.experts.shared_experts else ""
        plan.warnings.append(
            f"top_k={spec.experts.top_k} is not a multiple of granularity={spec.experts.granularity}{shared}: "
            "virtual groups cannot be whole, tokens see partial copies of the dense MLP"
        )
    skipped = [e for e in plan.entries if not e.rewrite and e.reason != "not selected by `layers`"]
    for e in skipped:
        plan.warnings.append(f"{e.path} looks like an MLP but stays dense: {e.reason}")
    plan.warnings.extend(discovery.problems)  # MLP-like linears no pass could handle, with why
    return discovery, selection, plan


def _probe_model(model: nn.Module, spec: UpcycleSpec, example_inputs) -> tuple[tuple, dict] | None:
    """Inputs for a whole-model probe: the caller's, or random token ids for an LM-style model."""
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            return (), example_inputs
        return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,), {}
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        g = torch.Generator().manual_seed(spec.seed)
        seq = max(spec.verify.probe_tokens // 2, 1)
        limits = [getattr(config, a, None) for a in ("max_position_embeddings", "n_positions", "max_seq_len")]
        limits = [v for v in limits if isinstance(v, int) and v > 0]
        seq = min([seq] + limits)  # learned position tables end somewhere: respect the model's limit
        batch = max(2, -(-spec.verify.probe_tokens // seq))  # about probe_tokens tokens in all
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        device = next(model.parameters()).device
        probe = {"input_ids": ids.to(device)}
        if getattr(model.config, "is_encoder_decoder", False):  # T5, BART: the decoder needs its own ids
            probe["decoder_input_ids"] = ids[:, : max(seq // 2, 1)].to(device)
        return (), probe
    return None


def _model_output(model: nn.Module, probe) -> torch.Tensor | None:
    args, kwargs = probe
    out = model(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return out.detach()
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits.detach()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].detach()
    hidden = getattr(out, "last_hidden_state", None)
    return hidden.detach() if isinstance(hidden, torch.Tensor) else None


def _lm_loss(logits: torch.Tensor, probe) -> float | None:
    ids = probe[1].get("decoder_input_ids", probe[1].get("input_ids")) if probe else None
    if ids is None or logits is None or logits.dim() != 3 or logits.shape[:2] != ids.shape[:2] \
            or logits.shape[-1] < int(ids.max()) + 1:
        return None
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return float(loss)


def moe_from_dense(dense: DenseMLPWeights, activation: str, spec: UpcycleSpec, scale: Scaling, index: int, *,
                   calib: torch.Tensor | None = None, where: str = "", structure_only: bool = False) -> MoELayer:
    """The MoE layer that replaces one dense MLP (the `index`-th MLP of the model): config from the
    MLP's shape and the spec, expert weights by virtual-group mapping and scaling, router rows,
    shared expert, all seeded by (spec.seed, index). `structure_only`: uninitialised weights."""
    cfg = moe_config_for(dense.gate is not None, activation, dense.d_model, dense.d_ffn,
                         dense.up_bias is not None, dense.down_bias is not None, spec)
    with torch.device("meta"):
        moe = MoELayer(cfg)
    if structure_only:
        return materialize(moe, dense.up.device, dense.up.dtype)
    g = torch.Generator().manual_seed(spec.seed * 100_003 + index)
    state = {f"experts.{k}": v for k, v in expert_weights(dense, spec, scale, g).items()}
    # the router stays fp32 whatever the model dtype (router.py: routing decisions in fp32)
    state["router.weight"] = router_init(spec, dense.d_model, g, inputs=calib, where=where).to(torch.float32)
    if cfg.uses_bias:
        state["router.expert_bias"] = torch.zeros(cfg.num_experts, dtype=torch.float32)
    if cfg.shared_d_ffn:
        state.update({f"shared_expert.{k}": v for k, v in shared_expert_weights(dense, spec).items()})
    return materialize(moe, dense.up.device, state=state)


class MoEBuilder:
    """The rewrite's callback: dense MLP (in its traced unit) → initialised MoE layer, verified."""

    def __init__(self, spec: UpcycleSpec, discovery: Discovery, capture: ProbeCapture | None, progress,
                 structure_only: bool = False):
        self.spec = spec
        self.structure_only = structure_only
        self.index_of = {f.key: f.index for f in discovery.mlps}
        self.path_of = {f.key: f.path for f in discovery.mlps}
        self.capture = capture
        self.checks: list[LayerCheck] = []
        self.progress = progress

    def moe_for(self, match: MLPMatch, unit: fx.GraphModule, scale: Scaling, index: int, structure_only: bool = False) -> MoELayer:
        dense = extract_dense_weights(match, unit)
        key = linear_paths(match)
        calib = self.capture.inputs.get(key) if self.capture is not None and self.spec.router.init == "kmeans" else None
        return moe_from_dense(dense, match.activation, self.spec, scale, index, calib=calib,
                              where=self.path_of.get(key, ""), structure_only=structure_only)

    def __call__(self, match: MLPMatch, unit: fx.GraphModule) -> MoELayer:
        key = linear_paths(match)
        index = self.index_of[key]
        scale = plan_scaling(self.spec, match.activation, match.gated)
        moe = self.moe_for(match, unit, scale, index, structure_only=self.structure_only)
        if self.spec.verify.enabled and not self.structure_only:
            self._verify(match, unit, moe, scale, index, key)
        self.progress.update(1)
        return moe

    @torch.no_grad()
    def _verify(self, match, unit, moe, scale, index, key) -> None:
        dense_fn = mlp_function(unit, match)
        x = self.capture.inputs.get(key) if self.capture else None
        if x is None:  # no model-level probe reached this MLP: synthetic unit-RMS hidden states
            g = torch.Generator().manual_seed(self.spec.seed + index)
            w = match.up.weight(unit)
            x = torch.randn(self.spec.verify.probe_tokens, match.d_model, generator=g).to(w.device, w.dtype)
        y = dense_fn(x)
        unscaled = None
        if scale.factor != 1.0 and scale.first == 1.0 and not self.spec.experts.shared_experts:
            # the factor sits on the down projection (and its bias) of every routed expert and the
            # router does not see it, so the unscaled layer's output is the scaled one over a
            unscaled = 1.0 / scale.factor
        elif scale.factor != 1.0:
            unscaled = self.moe_for(match, unit, Scaling(1.0, 1.0, 1.0, "none", True), index)
        was = moe.training
        moe.eval()
        check = check_layer(self.path_of[key], moe, x, y, exact_expected=expected_exact(self.spec, scale),
                            tolerance=self.spec.verify.tolerance, unscaled=unscaled)
        moe.train(was)
        self.checks.append(check)
        if not check.passed:
            raise VerificationError(
                f"{check.mlp_path}: the upcycled layer must equal the dense MLP here, but max abs error is "
                f"{check.max_abs_error:.3g} (> {self.spec.verify.tolerance:g} relative to output scale)"
            )


class _NullProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def upcycle_model(model: nn.Module, spec, *, example_inputs=None, calibration=None, tokenizer=None,
                  calibration_name: str = "text", progress: bool = False, structure_only: bool = False,
                  force_resources: bool = False) -> UpcycleResult:
    """Run the whole pipeline on `model` (rewritten in place) and return model, plan and report.

    calibration: text (a string or list of strings, tokenized with `tokenizer`, by default the one
    beside the folder the model came from) or token ids: the probe for verification, k-means and
    the perplexity before/after (compiler/calibration.py). structure_only: build MoE layers with
    uninitialised weights and skip verification (used when loading a saved upcycled model: the
    weights come from its checkpoint).
    Before the first MoE layer is built, the memory the new layers and the verification need is
    checked against what is available (preflight.check_loaded; force_resources=True skips).
    """
    t0 = time.perf_counter()
    spec = load_spec(spec)
    if structure_only:
        spec = dataclasses.replace(spec, verify=dataclasses.replace(spec.verify, enabled=False))
    calib = None
    if calibration is not None and not structure_only:
        if example_inputs is not None:
            raise ModelError("give example_inputs= or calibration=, not both (both are the probe)")
        calib = calibration_batch(calibration, tokenizer=tokenizer if tokenizer is not None else tokenizer_of(model),
                                  config=getattr(model, "config", None), tokens=spec.verify.probe_tokens,
                                  name=calibration_name)
        device = next(model.parameters()).device
        example_inputs = {"input_ids": calib.input_ids.to(device)}
    was_training = model.training
    _set_training(model, False)
    discovery, selection, plan = analyse(model, spec)
    if not structure_only and not force_resources:
        from .resources import check_loaded

        check_loaded(plan, spec, model)
    if not structure_only:
        for w in plan.warnings:
            warnings.warn(w, stacklevel=2)
    targets = {f.key: f.rewrite_unit for f in discovery.mlps if selection[f.index] == ""}

    capture, probe, dense_logits = None, None, None
    # the probe forward also gives kmeans router init its calibration batch (the MLP inputs)
    if spec.verify.enabled or (spec.router.init == "kmeans" and not structure_only):
        probe = _probe_model(model, spec, example_inputs)
        if probe is not None:
            capture = ProbeCapture()
            for f in discovery.mlps:
                if f.key in targets and f.match.up.kind == "module":
                    unit = _unit_of(model, f)
                    first = unit.get_submodule(f.match.up.module_path)
                    capture.watch(f.key, first)
            try:
                with torch.no_grad():
                    dense_logits = _model_output(model, probe)
            except Exception as exc:  # the model's own error, deep inside its forward
                if example_inputs is not None:
                    raise
                shape = tuple(probe[1]["input_ids"].shape) if "input_ids" in probe[1] else "?"
                raise ModelError(
                    f"{type(model).__name__}: the verification probe (random token ids of shape {shape}) failed "
                    f"inside the model: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; pass "
                    "example_inputs= to compile_upcycle, or set verify.enabled: false"
                ) from exc
            finally:
                capture.remove()

    bar = _progress_bar(len(targets), progress)
    builder = MoEBuilder(spec, discovery, capture, bar, structure_only=structure_only)
    try:
        pass_log = list(discovery.log)
        model, records = rewrite_mlps(model, targets, builder, logs=pass_log)
    finally:
        bar.close()
    _set_training(model, False)  # new MoE layers are built in training mode: the probe must not train
    if capture is not None:
        capture.inputs.clear()
    order = {f.path: f.index for f in discovery.mlps}
    builder.checks.sort(key=lambda c: order.get(c.mlp_path, 0))  # units are rewritten deepest-first

    model_error = loss_before = loss_after = None
    if probe is not None and dense_logits is not None:
        with torch.no_grad():
            moe_logits = _model_output(model, probe)
        if moe_logits is not None and moe_logits.shape == dense_logits.shape:
            model_error = compare(dense_logits, moe_logits)[1]
            loss_before, loss_after = _lm_loss(dense_logits, probe), _lm_loss(moe_logits, probe)
    _set_training(model, was_training)
    attach_token_mask(model)  # pad tokens out of the router losses and telemetry
    report = Report.build(spec, plan, builder.checks, records, model_error, loss_before, loss_after,
                          seconds=time.perf_counter() - t0,
                          probe=calib.description if calib and capture else "model forward" if capture else "synthetic")
    model = mark_upcycled(model, spec, report.rewrites)  # save_pretrained writes a folder that reloads as the MoE
    return UpcycleResult(model, plan, report, records, pass_log)


def _set_training(model: nn.Module, mode: bool) -> None:
    """model.train(mode); modules of torch.export programs refuse it (their mode is fixed at export)."""
    try:
        model.train(mode)
    except NotImplementedError:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NullProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="upcycling MLPs", unit="mlp")


def compile_upcycle(model: nn.Module, spec, *, example_inputs=None, calibration=None, tokenizer=None,
                    progress: bool = False, return_report: bool = False, force_resources: bool = False):
    """Upcycle `model` into an MoE model following `spec` (a path, preset name, dict or UpcycleSpec).

    calibration: real text (str or list of str; or token ids) for the checks: per-layer
    verification on its hidden states, k-means router init, perplexity before/after in the report;
    tokenized with `tokenizer` (default: the one in the folder the model was loaded from).
    The model is rewritten in place and returned (the root is a new object only when the whole
    model is one MLP). With return_report=True, returns (model, report). A conversion that would
    not fit the available memory raises ResourceError (an UpcycleError) before anything is built;
    force_resources=True goes ahead anyway.
    """
    result = upcycle_model(model, spec, example_inputs=example_inputs, calibration=calibration, tokenizer=tokenizer,
                           progress=progress, force_resources=force_resources)
    if return_report:
        return result.model, result.report
    return result.model


def plan_upcycle(model: nn.Module, spec) -> Plan:
    """What `compile_upcycle` would do, without changing the model."""
    spec = load_spec(spec)
    return analyse(model, spec)[2]


__all__ = ["compile_upcycle", "plan_upcycle", "upcycle_model", "UpcycleResult", "analyse"]
