"""The plan: what was found, what each MLP becomes, and the parameter counts before and after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from upcycle.passes.discover import Discovery
from upcycle.passes.weight_mapping import plan_scaling
from upcycle.runtime.config import MoEConfig
from upcycle.specs.schema import UpcycleSpec


@dataclass
class PlanEntry:
    index: int
    path: str
    kind: str  # plain / gated / gated (fused gate_up)
    activation: str
    d_model: int
    d_ffn: int
    params: int  # dense MLP parameters
    rewrite: bool
    reason: str = ""  # why not rewritten
    unit: str = ""  # module whose graph gets rewritten
    num_experts: int = 0
    expert_width: int = 0
    top_k: int = 0
    scale_factor: float = 1.0
    scale_placement: str = ""
    moe_params: int = 0
    moe_active_params: int = 0


@dataclass
class Plan:
    model_class: str
    entries: list[PlanEntry] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    active_after: int = 0
    untraced: list[tuple[str, str, list[str]]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def selected(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.rewrite]

    def to_dict(self) -> dict:
        return asdict(self)


def moe_config_for(entry_gated: bool, activation: str, d_model: int, d_ffn: int, has_first_bias: bool,
                   has_output_bias: bool, spec: UpcycleSpec) -> MoEConfig:
    g = spec.experts.granularity
    shared = spec.experts.shared_experts
    scale = plan_scaling(spec, activation, entry_gated)
    return MoEConfig(
        d_model=d_model,
        d_expert=d_ffn // g,
        num_experts=spec.experts.num_experts,
        top_k=spec.experts.top_k,
        gated=entry_gated,
        activation=activation,
        router_type=spec.router.type,
        first_bias=has_first_bias,
        output_bias=has_output_bias,
        aux_loss_coef=spec.router.aux_loss_coef,
        z_loss_coef=spec.router.z_loss_coef,
        backend=spec.runtime.backend,
        shared_d_ffn=shared * (d_ffn // g),
        balancing=spec.router.balancing,
        bias_update_rate=spec.router.bias_update_rate,
        capacity_factor=spec.runtime.capacity_factor,
        virtual_group_size=spec.experts.routed_granularity,
        selection=spec.selection,
        scale_factor=scale.factor,
        output_multiplier=scale.output,
    )


def moe_param_counts(cfg: MoEConfig) -> tuple[int, int]:
    """(total, active per token) parameters of one MoE layer, router included."""
    router = cfg.num_experts * cfg.d_model
    shared = 0
    if cfg.shared_d_ffn:
        shared = (3 if cfg.gated else 2) * cfg.d_model * cfg.shared_d_ffn
    per = cfg.params_per_expert
    return router + cfg.num_experts * per + shared, router + cfg.top_k * per + shared


def build_plan(model, discovery: Discovery, spec: UpcycleSpec, selected: dict[int, str], dense_params: dict[int, int],
               biases: dict[int, tuple[bool, bool]]) -> Plan:
    """selected: {mlp index: '' if rewritten else the reason it is not}."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    plan = Plan(type(model).__name__, params_before=total, untraced=discovery.untraced)
    after, active = total, total
    for found in discovery.mlps:
        m = found.match
        reason = selected[found.index]
        entry = PlanEntry(found.index, found.path, m.kind, m.activation or "?", m.d_model, m.d_ffn,
                          dense_params[found.index], rewrite=not reason, reason=reason, unit=found.rewrite_unit or "<root>")
        if entry.rewrite:
            first_bias, out_bias = biases[found.index]
            cfg = moe_config_for(m.gated, m.activation, m.d_model, m.d_ffn, first_bias, out_bias, spec)
            scale = plan_scaling(spec, m.activation, m.gated)
            entry.num_experts, entry.expert_width, entry.top_k = cfg.num_experts, cfg.d_expert, cfg.top_k
            entry.scale_factor, entry.scale_placement = scale.factor, scale.placement
            entry.moe_params, entry.moe_active_params = moe_param_counts(cfg)
            after += entry.moe_params - entry.params
            active += entry.moe_active_params - entry.params
        plan.entries.append(entry)
    plan.params_after, plan.active_after = after, active
    return plan


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render_plan(plan: Plan, spec: UpcycleSpec, explain: bool = False) -> str:
    ex = spec.experts
    lines = [
        f"upcycle plan for {plan.model_class}: E{ex.expansion}G{ex.granularity}T{ex.top_k}, "
        f"router {spec.router.type}, {spec.selection} selection ({spec.router.init} init, std {spec.router.init_std}), "
        f"weight_scaling {spec.weight_scaling}, placement {spec.scaling_placement}",
        "",
    ]
    header = f"{'#':>3}  {'MLP':<34} {'form':<22} {'act':<10} {'D':>6} {'F':>7} {'params':>8}  ->  {'experts':>7} {'width':>6} {'top_k':>5} {'scale':>8} {'placement':<10}"
    lines += [header, "-" * len(header)]
    for e in plan.entries:
        left = f"{e.index:>3}  {e.path:<34} {e.kind:<22} {e.activation:<10} {e.d_model:>6} {e.d_ffn:>7} {_fmt(e.params):>8}"
        if e.rewrite:
            right = f"  ->  {e.num_experts:>7} {e.expert_width:>6} {e.top_k:>5} {e.scale_factor:>8.4g} {e.scale_placement:<10}"
        else:
            right = f"  ->  stays dense: {e.reason}"
        lines.append(left + right)
    lines.append("")
    lines.append(f"MLPs found: {len(plan.entries)}, rewritten: {len(plan.selected)}")
    lines.append(
        f"parameters: {_fmt(plan.params_before)} -> {_fmt(plan.params_after)} "
        f"(x{plan.params_after / max(plan.params_before, 1):.2f}); active per token: {_fmt(plan.active_after)} "
        f"(dense: {_fmt(plan.params_before)})"
    )
    not_analysed = [(p, why, lin) for p, why, lin in plan.untraced if lin]
    if not_analysed:
        # normal (transformers' attention blocks rarely trace whole): one line unless asked
        lines.append(f"{len(not_analysed)} blocks were analysed through their children (they do not trace as a "
                     f"whole, e.g. {not_analysed[0][0] or '<root>'}; usual for attention)"
                     + ("" if explain else "; --explain lists them"))
        if explain:
            for path, why, _ in not_analysed:
                lines.append(f"  {path or '<root>'}: {why}")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
