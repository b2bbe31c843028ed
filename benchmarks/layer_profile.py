"""Where one MoE layer step's time goes: torch.profiler events sorted into the parts of the layer.

Why from the profiler's op names and not from markers in the layer: the hot path stays free of
profiling code, and any path (ours, transformers', torchtitan's) is broken down the same way.
Each op's *self* time (its own time, children excluded) is charged to one part, decided by the
op's name and the ops around it (its ancestors):

    router           the router's linear, softmax/sigmoid, and their backward
    top-k            topk (and the per-slice view around it)
    sort/permutation argsort, searchsorted, the slot -> token division, the routing plan
    gather           index_select / index / gather of token rows (forward and backward)
    gemm fwd         matrix products in the forward
    gemm dX          matrix products of the backward that contract over d_model or the expert
                     width (the data gradients)
    gemm dW          matrix products of the backward that contract over tokens (weight gradients)
    activation       the activation, its product with the up projection, and their backward
    combine          scatter-add / index-add of expert rows into tokens, the combine-weight scaling
    glue             allocations, zero fills, copies, casts, views, the autograd engine's own work
    host syncs       the number of ops that read a device value on the host (item, tolist: on
                     CUDA each is a synchronisation; on CPU they cost nothing but are counted)

On CUDA the times are the kernels' device time charged to the op that launched them; on CPU,
the ops' host time.
"""

from __future__ import annotations

import torch

PARTS = ("router", "top-k", "sort/permutation", "gather", "gemm fwd", "gemm dX", "gemm dW", "activation",
         "combine", "glue")

_GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::matmul",
         "aten::linear", "aten::addmm_", "aten::mm.out", "aten::_grouped_mm_out"}
_GATHER = {"aten::index_select", "aten::index", "aten::gather", "aten::take_along_dim", "aten::embedding"}
_COMBINE = {"aten::scatter_add_", "aten::scatter_add", "aten::index_add_", "aten::index_add", "aten::scatter_",
            "aten::scatter", "aten::index_put_", "aten::_index_put_impl_", "aten::scatter_reduce"}
_SORT = {"aten::argsort", "aten::sort", "aten::searchsorted", "aten::div", "aten::floor_divide",
         "aten::bincount", "aten::histc", "aten::cumsum", "aten::arange"}
_ROUTER = {"aten::softmax", "aten::_softmax", "aten::sigmoid", "aten::log_softmax", "aten::_log_softmax",
           "aten::_softmax_backward_data", "aten::sigmoid_backward"}
_ACT = {"aten::silu", "aten::silu_", "aten::gelu", "aten::relu", "aten::mul", "aten::mul_", "aten::silu_backward",
        "aten::gelu_backward", "aten::threshold_backward", "aten::relu_", "aten::pow",
        "aten::tanh", "aten::tanh_backward", "aten::linalg_vecdot", "aten::sum", "aten::add", "aten::add_"}
_SYNC = {"aten::item", "aten::_local_scalar_dense", "aten::tolist", "aten::nonzero", "aten::unique",
         "aten::_unique2", "aten::repeat_interleave"}
EXPERT_OPS = ("upcycle::grouped_experts", "upcycle::grouped_experts_backward")


def _ancestors(ev):
    out, p = [], ev.cpu_parent
    while p is not None:
        out.append(p.name)
        p = p.cpu_parent
    return out


def _in_backward(names) -> bool:
    return any(n.startswith("autograd::engine::evaluate_function") or n == EXPERT_OPS[1] for n in names)


def _contraction_is_tokens(ev, widths: set[int]) -> bool:
    """A backward product [a, b] @ [b, c] (or bmm / grouped) whose contracted b is not a model or
    expert width is a weight gradient (it sums over tokens)."""
    shapes = [s for s in (ev.input_shapes or []) if s]
    if ev.name in ("aten::addmm", "aten::addmm_", "aten::baddbmm"):
        shapes = shapes[1:]  # the bias / accumulator comes first
    if len(shapes) < 2 or len(shapes[0]) < 2:
        return False
    return shapes[0][-1] not in widths


def _router_gemm(ev, num_experts: int) -> bool:
    """The router's linear (and its backward): plain 2-D operands, one of them num_experts wide
    (the experts' operands are [rows, width] and [width, width'] or 3-D stacks)."""
    shapes = [s for s in (ev.input_shapes or []) if s]
    return bool(shapes) and all(len(s) <= 2 for s in shapes) and any(num_experts in s for s in shapes if len(s) == 2)


def part_of(ev, widths: set[int], num_experts: int) -> str:
    """The part an event's self time belongs to (wrappers have little self time of their own)."""
    name, up = ev.name, _ancestors(ev)
    backward = _in_backward([name] + up)
    if name in EXPERT_OPS or name.startswith("autograd::engine::evaluate_function") or name.startswith("ProfilerStep"):
        return "glue"
    in_experts = any(n in EXPERT_OPS for n in up)
    if name in _GEMM:
        if not in_experts and _router_gemm(ev, num_experts):
            return "router"
        if backward:
            return "gemm dW" if _contraction_is_tokens(ev, widths) else "gemm dX"
        return "gemm fwd"
    if name in ("aten::topk",):
        return "top-k"
    if name in _SORT:
        return "sort/permutation"
    if name in _GATHER:
        return "gather"
    if name in _COMBINE:
        return "combine"
    if name in _ROUTER:
        return "router"
    if name in _ACT:
        return "activation"
    return "glue"


def breakdown(module, x, grad, device, *, widths: set[int], num_experts: int, rounds: int = 3) -> dict:
    """Per-part milliseconds per step (mean of `rounds` profiled steps) and host syncs per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def one_step():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        module(x).backward(grad)

    one_step()  # warm
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(rounds):
            one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    totals = {p: 0.0 for p in PARTS}
    syncs = 0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        if ev.name in _SYNC:
            syncs += 1
        part = part_of(ev, widths, num_experts)
        us = ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total
        totals[part] += us
    ms = {p: totals[p] / rounds / 1e3 for p in PARTS}
    return {"ms": ms, "total_ms": sum(ms.values()), "host_syncs_per_step": syncs / rounds,
            "time": "device" if device.type == "cuda" else "host"}


def format_breakdown(name: str, b: dict) -> str:
    parts = "  ".join(f"{p} {b['ms'][p]:.1f}" for p in PARTS if b["ms"][p] >= 0.05)
    return f"  {name:<16} {b['total_ms']:7.1f} ms ({b['time']})  syncs/step {b['host_syncs_per_step']:.0f}  | {parts}"


__all__ = ["PARTS", "breakdown", "format_breakdown", "part_of"]
