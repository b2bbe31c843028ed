"""The `grouped` backend: routed experts on token slots sorted by expert.

Every (token, k) pair is a *slot*; S = tokens · K slots. Sorting the slots by expert id makes each
expert's rows one contiguous segment, so each projection is one grouped GEMM over segments
(no [tokens, num_experts, ...] dispatch tensor, no per-expert `torch.where`):

    plan = plan_routing(indices, N)           # order [S], token [S], offsets [N] (segment ends)
    g, u = x[token] @ Wg_eᵀ, x[token] @ Wu_eᵀ   # [S, H] per segment e
    h    = act(g) ⊙ u                          # [S, H]
    y    = h @ Wd_eᵀ                           # [S, D]
    out  = Σ_k w · y   (scatter-add over token)  # [T, D], accumulated in fp32

Three interchangeable strategies compute this (all tested against `reference_forward`):
  - `loop`:       one fused pass per expert segment with per-expert temporaries. Fastest on CPU,
                  where the whole-S [S, D] intermediates of the other two cost more in first-touch
                  page faults (a fresh 75 MB tensor costs ~30 ms to fault in) than the GEMMs gain.
  - `grouped_mm`: `torch._grouped_mm`, one call per projection, whole-S intermediates. Needs
                  16-byte aligned strides; used on CUDA where it is supported.
  - `padded`:     segments padded to a common capacity and `torch.bmm` (one host sync for the
                  capacity); the portable fallback where `_grouped_mm` does not apply.

Gate and up stay two GEMMs: concatenating their weights into one [2H, D] GEMM (once per step, or
per expert into a reused buffer) measured no faster on CPU (MKL, 1 and 2 threads) and costs a
weight copy every step, since the parameters are separate tensors.

The forward and backward are explicit (one custom op each, registered with `torch.library`), so
torch.compile sees one opaque node with static output shapes whatever the routing: no graph break,
no data-dependent shapes, any dtype (the compile-time meta kernel of `_grouped_mm` accepts only
bf16; ours does not care). Backward saves only the gate/up pre-activations [S, H] besides its
inputs; the router-weight gradient uses ⟨dout, y⟩ = ⟨dout @ Wd_e, h⟩ + ⟨dout, b_e⟩, so y is never
stored nor recomputed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .activations import activation_backward, get_activation
from .experts import GroupedExperts

STRATEGIES = ("loop", "grouped_mm", "padded")


class RoutingPlan(NamedTuple):
    order: Tensor  # [S] int64: sorted position -> flat slot t·K + k (slots sorted by expert, stable)
    token: Tensor  # [S] int64: sorted position -> token id
    offsets: Tensor  # [N] int64: end of each expert's segment in sorted order (cumulative counts)


def plan_routing(indices: Tensor, num_experts: int) -> RoutingPlan:
    """indices [T, K] expert ids -> the sorted-slot plan. Shapes depend only on T, K, N (no
    data-dependent sizes), so the plan traces under torch.compile with dynamic T."""
    k = indices.shape[-1]
    flat = indices.reshape(-1)  # [S]
    order = torch.argsort(flat, stable=True)  # [S]
    experts = torch.arange(num_experts, device=indices.device, dtype=flat.dtype)  # [N]
    offsets = torch.searchsorted(flat[order], experts, right=True)  # [N]
    return RoutingPlan(order, torch.div(order, k, rounding_mode="floor"), offsets)


# --- activations: value and backward, by name --------------------------------------------------

# --- strategy: one fused pass per expert segment ---------------------------------------------

def _per_expert(t: Optional[Tensor], transpose: bool = False) -> list:
    """[N, ...] -> N views (one op, instead of a select and a transpose per expert and call)."""
    if t is None:
        return [None] * 0
    return list((t.transpose(1, 2) if transpose else t).unbind(0))


def _mm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """a @ b (+ bias), written into the contiguous `out` when given."""
    if bias is None:
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    return torch.addmm(bias, a, b) if out is None else torch.addmm(bias, a, b, out=out)


def _segments(offsets: Tensor) -> tuple[list[int], list[int]]:
    """Segment sizes and the non-empty experts (one host read of the offsets)."""
    ends = offsets.tolist()
    sizes = [t - s for s, t in zip([0] + ends[:-1], ends)]
    return sizes, [e for e, n in enumerate(sizes) if n]


def add_rows(out: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """out[index[i]] += rows[i], in place. scatter_add_ with the index broadcast along the row rather
    than index_add_: on CPU index_add_ adds row by row (~10x slower at [1024, 576]); the sums are the
    same, in the same order."""
    return out.scatter_add_(0, index[:, None].expand_as(rows), rows)


# CPU: the experts' GEMMs are small ([~S/N, D] x [D, H]) and a BLAS splitting each of them over
# the cores loses to one core per run of experts: at E8G8T8 d576 1024 tokens, 64 products
# [128, 576] x [576, 192] took 16.1 ms on 2 threads, 21.7 ms on 1, 11.4 ms as two runs of 32 on
# two threads of one core each (one [1024, 576] x [576, 1536] product: 9.9 ms). The glue between
# them (gathers, activation, scaling, scatter) is split with them.
PARALLEL_MIN_EXPERTS_PER_THREAD = 2
PARALLEL_MIN_MACS = 1 << 24  # rows x D x H below this (~0.3 ms of GEMM): the hand-off costs more than it saves
_WORKERS: dict[int, "ThreadPoolExecutor"] = {}


def _workers(n: int):
    from concurrent.futures import ThreadPoolExecutor

    if n not in _WORKERS:
        _WORKERS[n] = ThreadPoolExecutor(n, thread_name_prefix="upcycle-experts",
                                         initializer=torch.set_num_threads, initargs=(1,))
    return _WORKERS[n]


def expert_runs(sizes: list[int], experts: list[int], parts: int) -> list[list[int]]:
    """`experts` (in order) cut into at most `parts` contiguous runs of about equal token counts:
    each expert goes to the run its middle token falls in."""
    total = max(sum(sizes[e] for e in experts), 1)
    runs: list[list[int]] = [[] for _ in range(parts)]
    done = 0
    for e in experts:
        runs[min(parts - 1, int(parts * (done + sizes[e] / 2) / total))].append(e)
        done += sizes[e]
    return [r for r in runs if r]


def _no_grad_run(body, run_experts, acc) -> None:
    with torch.no_grad():  # autograd mode is per thread; the op's own thread runs below autograd
        body(run_experts, acc)


def over_experts(body, experts: list[int], sizes: list[int], acc: Tensor, macs_per_row: int = 0) -> None:
    """body(run, acc) over all `experts`: on CPU with several threads, one run of experts per
    thread, each on one core, each adding rows into its own [T, D] accumulator (`acc` for the first,
    summed into it after), so no two threads write the same memory; elsewhere one call. Sums are
    then in a different order than one run's, the same for a given thread count. macs_per_row: D x H,
    so that small problems (the hand-off is tens of microseconds) stay on one thread."""
    n = torch.get_num_threads()
    if acc.device.type != "cpu" or n < 2 or len(experts) < PARALLEL_MIN_EXPERTS_PER_THREAD * n \
            or sum(sizes) * macs_per_row < PARALLEL_MIN_MACS:
        body(experts, acc)
        return
    runs = expert_runs(sizes, experts, n)
    accs = [acc] + [torch.zeros_like(acc) for _ in runs[1:]]
    pool = _workers(n - 1)
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(_no_grad_run, body, r, a) for r, a in zip(runs[1:], accs[1:])]
        try:
            body(runs[0], accs[0])
        finally:
            errors = [f.exception() for f in futures]  # every run has ended before anything is read
    finally:
        torch.set_num_threads(n)
    for err in errors:
        if err is not None:
            raise err
    for a in accs[1:]:
        acc.add_(a)


def _loop_forward(x, w_slot, token, offsets, gw, uw, dw, gb, ub, db, activation, save):
    act = get_activation(activation)
    s_total, h_dim = token.shape[0], uw.shape[1]
    gated = gw is not None
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
    g_all = x.new_empty(s_total if save and gated else 0, h_dim)  # [S, H]
    u_all = x.new_empty(s_total if save else 0, h_dim)  # [S, H]
    sizes, experts = _segments(offsets)
    tok, ws = token.split(sizes), w_slot.split(sizes)  # per-expert views
    g_out = g_all.split(sizes) if save and gated else [None] * len(sizes)
    u_out = u_all.split(sizes) if save else [None] * len(sizes)
    gwT, uwT, dwT = _per_expert(gw, True), _per_expert(uw, True), _per_expert(dw, True)  # [D, H], [H, D]
    gbs, ubs, dbs = (list(b.unbind(0)) if b is not None else [None] * len(sizes) for b in (gb, ub, db))

    def run(run_experts: list[int], acc: Tensor) -> None:
        for e in run_experts:
            te = tok[e]
            xe = x.index_select(0, te)  # [n, D]
            u = _mm(xe, uwT[e], ubs[e], u_out[e])  # [n, H]
            if gated:
                h = act(_mm(xe, gwT[e], gbs[e], g_out[e])).mul_(u)  # [n, H]
            else:
                h = act(u)
            if db is None and h.dtype == torch.float32:  # scale the narrower h rather than y
                y = torch.mm(h.mul_(ws[e][:, None]), dwT[e])  # [n, D]
            else:
                y = _mm(h, dwT[e], dbs[e]).float().mul_(ws[e][:, None])
            add_rows(acc, te, y)

    over_experts(run, experts, sizes, out, x.shape[1] * h_dim)
    return out, g_all, u_all


def _loop_backward(dout, x, w_slot, token, offsets, g_all, u_all, gw, uw, dw, gb, ub, db, activation):
    act = get_activation(activation)
    dtype = x.dtype
    gated = gw is not None
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
    dw_slot = torch.empty(token.shape[0], dtype=torch.float32, device=x.device)  # [S]
    # every expert's slice is written below; only empty experts are zero-filled (a zeros_like
    # of all [N, H, D] grads costs ~20 ms of page faults per step on CPU)
    d_gw = None if gw is None else torch.empty_like(gw)
    d_uw, d_dw = torch.empty_like(uw), torch.empty_like(dw)
    d_gb = None if gb is None else torch.empty_like(gb)
    d_ub = None if ub is None else torch.empty_like(ub)
    d_db = None if db is None else torch.empty_like(db)
    sizes, experts = _segments(offsets)
    empty = [e for e, n in enumerate(sizes) if n == 0]
    for t in (d_gw, d_uw, d_dw, d_gb, d_ub, d_db):
        if t is not None and empty:
            t[empty] = 0
    tok, ws, dws = token.split(sizes), w_slot.split(sizes), dw_slot.split(sizes)
    gs = g_all.split(sizes) if gated else None
    us = u_all.split(sizes)
    gwl, uwl, dwl = _per_expert(gw), _per_expert(uw), _per_expert(dw)  # [H, D], [H, D], [D, H]
    d_gwl, d_uwl, d_dwl = _per_expert(d_gw), _per_expert(d_uw), _per_expert(d_dw)
    fp32 = dtype == torch.float32

    def run(run_experts: list[int], acc: Tensor) -> None:
        """The backward of a run of experts: their weight gradients into their own slices, their
        input gradient added into `acc`."""
        for e in run_experts:
            te = tok[e]
            we = ws[e][:, None]  # [n, 1] fp32
            dye = dout.index_select(0, te)  # [n, D]
            u = us[e]
            if gated:
                g = gs[e]
                a = act(g)
                h = a * u  # [n, H]
            else:
                h = act(u)
            dhu = torch.mm(dye, dwl[e])  # [n, H]: dout @ Wd_e, before the combine weight
            torch.linalg.vecdot(dhu.float(), h.float(), out=dws[e])  # <dout, h @ Wd_eᵀ>
            if db is not None:
                dws[e].add_(dye.float() @ db[e].float())
                d_db[e] = (we * dye.float()).sum(0).to(db.dtype)
            # below, in-place where the dtype allows: h, dhu and dh are not needed afterwards
            torch.mm(dye.t(), h.mul_(we) if fp32 else (h * we).to(dtype), out=d_dwl[e])  # [D, H]
            dh = dhu.mul_(we) if fp32 else (dhu * we).to(dtype)  # [n, H]
            if gated:
                dg = activation_backward(activation, dh * u, g)
                du = dh.mul_(a)
            else:
                du = activation_backward(activation, dh, u)
            xe = x.index_select(0, te)  # [n, D]
            dxe = torch.mm(du, uwl[e])  # [n, D]
            torch.mm(du.t(), xe, out=d_uwl[e])
            if ub is not None:
                d_ub[e] = du.sum(0)
            if gated:
                dxe.addmm_(dg, gwl[e])
                torch.mm(dg.t(), xe, out=d_gwl[e])
                if gb is not None:
                    d_gb[e] = dg.sum(0)
            add_rows(acc, te, dxe if dxe.dtype == torch.float32 else dxe.float())

    over_experts(run, experts, sizes, dx, x.shape[1] * uw.shape[1])
    return dx.to(dtype), dw_slot, d_gw, d_uw, d_dw, d_gb, d_ub, d_db


# --- strategies on whole-S tensors: grouped GEMM primitives -----------------------------------

def _aligned(t: Tensor) -> bool:
    """`_grouped_mm` operand rule: 16-byte aligned base and leading stride."""
    align = 16 // t.element_size()
    if t.data_ptr() % 16:
        return False
    st = t.stride()
    lead = st[-2] if st[-1] == 1 else st[-1]
    return (st[-1] == 1 or st[-2] == 1) and lead % align == 0


_GMM_SUPPORT: dict[tuple[str, int, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs for this device and dtype: probed once per (device, dtype),
    success and failure alike, so no forward after the first builds probe tensors (a host sync,
    and illegal under CUDA-graph capture)."""
    key = (device.type, device.index or 0, dtype)
    if key in _GMM_SUPPORT:
        return _GMM_SUPPORT[key]
    ok = hasattr(torch, "_grouped_mm") and device.type in ("cpu", "cuda")
    if ok:
        try:
            a = torch.zeros(16, 8, device=device, dtype=dtype)
            b = torch.zeros(2, 8, 8, device=device, dtype=dtype)
            torch._grouped_mm(a, b, torch.tensor([8, 16], device=device, dtype=torch.int32))
            torch._grouped_mm(a.t(), a, torch.tensor([8, 16], device=device, dtype=torch.int32))
        except (RuntimeError, NotImplementedError):
            ok = False
    _GMM_SUPPORT[key] = ok
    return ok


class _Segments(NamedTuple):
    offsets32: Tensor  # [N] int32 segment ends (grouped_mm)
    expert: Tensor  # [S] expert of each sorted row
    pos: Optional[Tensor]  # [S] row within its expert's padded block (padded)
    capacity: int  # padded block rows (padded)


def _make_segments(offsets: Tensor, s_total: int, padded: bool) -> _Segments:
    rows = torch.arange(s_total, device=offsets.device)
    expert = torch.searchsorted(offsets, rows, right=True)  # [S]
    pos, capacity = None, 0
    if padded:
        starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])  # [N]
        pos = rows - starts[expert]
        counts = offsets - starts
        capacity = max(int(counts.max()), 1) if counts.numel() else 1  # one host sync
    return _Segments(offsets.to(torch.int32), expert, pos, capacity)


def _gmm(a: Tensor, b: Tensor, seg: _Segments, strategy: str) -> Tensor:
    """a [S, K], b [N, K, M] (any strides) -> [S, M]: row block e of `a` times b[e]."""
    if strategy == "grouped_mm" and _aligned(a) and _aligned(b):
        return torch._grouped_mm(a, b, seg.offsets32)
    if strategy == "grouped_mm":  # unaligned operands: same math, padded
        seg = seg if seg.pos is not None else _make_segments(seg.offsets32.long(), a.shape[0], True)
    n = b.shape[0]
    buf = a.new_zeros(n, seg.capacity, a.shape[1])  # [N, C, K]
    buf[seg.expert, seg.pos] = a
    return torch.bmm(buf, b)[seg.expert, seg.pos]  # [S, M]


def _gmm_wgrad(a: Tensor, b: Tensor, seg: _Segments, strategy: str) -> Tensor:
    """a [S, P], b [S, Q] -> [N, P, Q]: per expert a_eᵀ @ b_e (zero for empty experts)."""
    at = a.t()
    if strategy == "grouped_mm" and _aligned(at) and _aligned(b):
        out = torch._grouped_mm(at, b, seg.offsets32)  # [N, P, Q]
        # experts without rows: not every platform's kernel writes them, so zero them here
        counts = seg.offsets32 - torch.cat([seg.offsets32.new_zeros(1), seg.offsets32[:-1]])
        return out.masked_fill_((counts == 0)[:, None, None], 0)
    if strategy == "grouped_mm":
        seg = seg if seg.pos is not None else _make_segments(seg.offsets32.long(), a.shape[0], True)
    n = seg.offsets32.shape[0]
    pa = a.new_zeros(n, seg.capacity, a.shape[1])
    pa[seg.expert, seg.pos] = a
    pb = b.new_zeros(n, seg.capacity, b.shape[1])
    pb[seg.expert, seg.pos] = b
    return torch.bmm(pa.transpose(1, 2), pb)  # [N, P, Q]


def _segment_sum(bias: Tensor, expert: Tensor, rows: Tensor) -> Tensor:
    """Bias gradient: Σ over each expert's rows [S, H], accumulated in fp32 (bf16 sums of
    thousands of rows lose the small terms), returned in the bias dtype."""
    acc = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    return acc.index_add_(0, expert, rows.float()).to(bias.dtype)


def _whole_forward(x, w_slot, token, offsets, gw, uw, dw, gb, ub, db, activation, save, strategy):
    act = get_activation(activation)
    seg = _make_segments(offsets, token.shape[0], strategy == "padded")
    xs = x.index_select(0, token)  # [S, D]: the one gather
    u = _gmm(xs, uw.transpose(1, 2), seg, strategy)  # [S, H]
    if ub is not None:
        u = u + ub[seg.expert]
    if gw is not None:
        g = _gmm(xs, gw.transpose(1, 2), seg, strategy)
        if gb is not None:
            g = g + gb[seg.expert]
        h = act(g) * u
    else:
        g = x.new_empty(0, uw.shape[1])
        h = act(u)
    y = _gmm(h, dw.transpose(1, 2), seg, strategy)  # [S, D]
    if db is not None:
        y = y + db[seg.expert]
    y = y.float() * w_slot[:, None]
    out = add_rows(torch.zeros(x.shape, dtype=torch.float32, device=x.device), token, y)
    if not save:
        g, u = x.new_empty(0, uw.shape[1]), x.new_empty(0, uw.shape[1])
    return out, g, u


def _whole_backward(dout, x, w_slot, token, offsets, g, u, gw, uw, dw, gb, ub, db, activation, strategy):
    act = get_activation(activation)
    dtype = x.dtype
    seg = _make_segments(offsets, token.shape[0], strategy == "padded")
    we = w_slot[:, None]  # [S, 1]
    dys = dout.index_select(0, token)  # [S, D]
    if gw is not None:
        a = act(g)
        h = a * u
    else:
        h = act(u)
    dhu = _gmm(dys, dw, seg, strategy)  # [S, H]
    dw_slot = (dhu.float() * h.float()).sum(-1)
    d_db = None
    if db is not None:
        dw_slot = dw_slot + (dys.float() * db.float()[seg.expert]).sum(-1)
        d_db = torch.zeros(db.shape, dtype=torch.float32, device=db.device)
        d_db = d_db.index_add_(0, seg.expert, we * dys.float()).to(db.dtype)
    d_dw = _gmm_wgrad(dys, (h * we).to(dtype), seg, strategy)  # [N, D, H]
    dh = (dhu * we).to(dtype)
    if gw is not None:
        dg = activation_backward(activation, dh * u, g)
        du = dh * a
    else:
        du = activation_backward(activation, dh, u)
    xs = x.index_select(0, token)
    dxs = _gmm(du, uw, seg, strategy)  # [S, D]
    d_uw = _gmm_wgrad(du, xs, seg, strategy)  # [N, H, D]
    d_ub = None if ub is None else _segment_sum(ub, seg.expert, du)
    d_gw = d_gb = None
    if gw is not None:
        dxs = dxs + _gmm(dg, gw, seg, strategy)
        d_gw = _gmm_wgrad(dg, xs, seg, strategy)
        d_gb = None if gb is None else _segment_sum(gb, seg.expert, dg)
    dx = add_rows(torch.zeros(x.shape, dtype=torch.float32, device=x.device), token, dxs.float())
    return dx.to(dtype), dw_slot, d_gw, d_uw, d_dw, d_gb, d_ub, d_db


# --- the custom ops ----------------------------------------------------------------------------

def _empty_like_opt(t: Optional[Tensor], ref: Tensor) -> Tensor:
    return ref.new_empty(0) if t is None else t


@torch.library.custom_op("upcycle::grouped_experts", mutates_args=())
def grouped_experts_op(
    x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor,
    gate_w: Optional[Tensor], up_w: Tensor, down_w: Tensor,
    gate_b: Optional[Tensor], up_b: Optional[Tensor], down_b: Optional[Tensor],
    activation: str, strategy: str, save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> out [T, D] (x.dtype), gate and up pre-activations [S, H] (empty unless `save`)."""
    k = weights.shape[-1]
    token = torch.div(order, k, rounding_mode="floor")
    w_slot = weights.reshape(-1).float()[order]  # [S]
    args = (x, w_slot, token, offsets, gate_w, up_w, down_w, gate_b, up_b, down_b, activation, save)
    strategy = avoid_wasteful_padding(resolve_strategy(strategy, x.device, x.dtype), offsets, order.shape[0])
    if strategy == "triton":
        from .kernels.backend import triton_experts_forward

        out, g, u = triton_experts_forward(
            x, w_slot, order, token, offsets, gate_w, up_w, down_w, gate_b, up_b, down_b, activation, save, k
        )
    elif strategy == "loop":
        out, g, u = _loop_forward(*args)
    else:
        out, g, u = _whole_forward(*args, strategy)
    return out.to(x.dtype), g, u


@grouped_experts_op.register_fake
def _(x, weights, order, offsets, gate_w, up_w, down_w, gate_b, up_b, down_b, activation, strategy, save):
    h = up_w.shape[1]
    s = order.shape[0] if save else 0
    return x.new_empty(x.shape), x.new_empty(s if gate_w is not None else 0, h), x.new_empty(s, h)


@torch.library.custom_op("upcycle::grouped_experts_backward", mutates_args=())
def grouped_experts_backward_op(
    dout: Tensor, x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor,
    gate_pre: Tensor, up_pre: Tensor,
    gate_w: Optional[Tensor], up_w: Tensor, down_w: Tensor,
    gate_b: Optional[Tensor], up_b: Optional[Tensor], down_b: Optional[Tensor],
    activation: str, strategy: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx, dweights [T, K], d gate_w, d up_w, d down_w, d gate_b, d up_b, d down_b
    (empty tensors stand for absent parameters)."""
    k = weights.shape[-1]
    token = torch.div(order, k, rounding_mode="floor")
    w_slot = weights.reshape(-1).float()[order]
    dout = dout.contiguous()
    args = (dout, x, w_slot, token, offsets, gate_pre, up_pre, gate_w, up_w, down_w, gate_b, up_b, down_b, activation)
    strategy = avoid_wasteful_padding(resolve_strategy(strategy, x.device, x.dtype), offsets, order.shape[0])
    if strategy == "triton":
        from .kernels.backend import triton_experts_backward

        grads = triton_experts_backward(
            dout, x, w_slot, order, token, offsets, gate_pre, up_pre, gate_w, up_w, down_w, gate_b, up_b, down_b,
            activation, k,
        )
    elif strategy == "loop":
        grads = _loop_backward(*args)
    else:
        grads = _whole_backward(*args, strategy)
    dx, dw_slot = grads[0], grads[1]
    dweights = torch.empty(order.shape[0], dtype=torch.float32, device=x.device).scatter_(0, order, dw_slot)
    dweights = dweights.view(weights.shape).to(weights.dtype)
    rest = [_empty_like_opt(t, x) for t in grads[2:]]
    return (dx, dweights, *rest)


@grouped_experts_backward_op.register_fake
def _(dout, x, weights, order, offsets, gate_pre, up_pre, gate_w, up_w, down_w, gate_b, up_b, down_b, activation, strategy):
    def like(t):
        return x.new_empty(0) if t is None else torch.empty_like(t)

    return (
        torch.empty_like(x), torch.empty_like(weights), like(gate_w), like(up_w), like(down_w),
        like(gate_b), like(up_b), like(down_b),
    )


def _setup_context(ctx, inputs, output):
    x, weights, order, offsets, gate_w, up_w, down_w, gate_b, up_b, down_b, activation, strategy, save = inputs
    _, g, u = output
    ctx.mark_non_differentiable(g, u)  # saved for backward only
    ctx.set_materialize_grads(False)  # no [S, H] zero grads filled in for them
    ctx.save_for_backward(x, weights, order, offsets, g, u, gate_w, up_w, down_w, gate_b, up_b, down_b)
    ctx.activation, ctx.strategy = activation, strategy


def _backward(ctx, dout, _dg, _du):
    x, weights, order, offsets, g, u, gate_w, up_w, down_w, gate_b, up_b, down_b = ctx.saved_tensors
    if dout is None:
        return (None,) * 13
    if (gate_w is not None and g.shape[0] != order.shape[0]) or u.shape[0] != order.shape[0]:
        raise RuntimeError("grouped_experts: backward needs the forward run with save=True")
    grads = grouped_experts_backward_op(
        dout, x, weights, order, offsets, g, u, gate_w, up_w, down_w, gate_b, up_b, down_b,
        ctx.activation, ctx.strategy,
    )
    dx, dweights, d_gw, d_uw, d_dw, d_gb, d_ub, d_db = grads
    absent = (gate_w is None, False, False, gate_b is None, up_b is None, down_b is None)
    params = [None if miss else d for miss, d in zip(absent, (d_gw, d_uw, d_dw, d_gb, d_ub, d_db))]
    return (dx, dweights, None, None, *params, None, None, None)


grouped_experts_op.register_autograd(_backward, setup_context=_setup_context)


# --- the backend -------------------------------------------------------------------------------

PADDED_MAX_WASTE = 4  # padded buffers may hold at most this many times the rows they carry


def avoid_wasteful_padding(strategy: str, offsets: Tensor, num_rows: int) -> str:
    """`padded` allocates N × (largest segment) rows: under skewed routing (one hot expert) that
    is up to N times the rows routed. Past PADDED_MAX_WASTE times, use `loop` instead (same result;
    the host read of the counts is the one `padded` makes anyway)."""
    if strategy != "padded" or num_rows == 0:
        return strategy
    counts = offsets - torch.cat([offsets.new_zeros(1), offsets[:-1]])
    return "loop" if int(counts.max()) * offsets.shape[0] > PADDED_MAX_WASTE * num_rows else strategy


def resolve_strategy(strategy: str, device: torch.device, dtype: torch.dtype) -> str:
    """`auto`: `loop` on CPU; elsewhere `grouped_mm` where it runs for the dtype, else `padded`.
    Resolved inside the ops (at run time), so the probe of `_grouped_mm` never enters a graph."""
    if strategy != "auto":
        return strategy
    if device.type == "cpu":
        return "loop"
    return "grouped_mm" if grouped_mm_supported(device, dtype) else "padded"


def grouped_forward(
    experts: GroupedExperts, x: Tensor, indices: Tensor, weights: Tensor, strategy: Optional[str] = None
) -> Tensor:
    """x [T, D], indices [T, K], weights [T, K] -> [T, D]; equals `reference_forward`.
    `strategy`: one of STRATEGIES, or None / "auto" for the device's default."""
    strategy = strategy or "auto"
    if strategy != "auto" and strategy not in STRATEGIES + ("triton",):
        raise ValueError(f"unknown grouped strategy {strategy!r}; known: {STRATEGIES}")
    plan = plan_routing(indices, experts.num_experts)
    params = (experts.gate_proj, experts.up_proj, experts.down_proj, experts.gate_bias, experts.up_bias, experts.down_bias)
    x, params = _autocast_inputs(x, params)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weights) + params
    )
    with torch.autocast(x.device.type, enabled=False):
        out, _, _ = grouped_experts_op(
            x.contiguous(), weights, plan.order, plan.offsets, *params, experts.activation, strategy, save
        )
    return out


def _autocast_inputs(x: Tensor, params: tuple) -> tuple[Tensor, tuple]:
    """Under torch.autocast, run the experts in the autocast dtype as F.linear would (the custom op
    is opaque to autocast): x and the expert weights cast, differentiably, to that dtype. The
    router's combine weights stay fp32 (the op reads them in fp32 anyway)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, params
    dtype = torch.get_autocast_dtype(device)
    cast = tuple(None if p is None else p.to(dtype) for p in params)
    return x.to(dtype), cast


__all__ = [
    "RoutingPlan", "plan_routing", "activation_backward", "grouped_mm_supported", "resolve_strategy",
    "grouped_forward", "STRATEGIES",
]
