"""The `triton` backend: forward and backward of the routed experts in four Triton kernels.

    forward   gate_up        gather x rows + gate/up grouped GEMM + activation      -> h, g, u
              scatter_gemm   down grouped GEMM · router weight, scattered to slots  -> out
    backward  down_backward  gather dout rows @ Wd + router-weight grad + act'      -> dg, du, dw
              scatter_gemm   du @ Wu + dg @ Wg, scattered to slots                  -> dx
              expert_wgrad   per-expert Σ Aᵀ B (three calls)                         -> dWd, dWu, dWg
Bias gradients are segment sums in plain torch, accumulated in fp32.

The two directions run inside the `grouped` backend's custom ops (strategy "triton"): one autograd
style for every fast path. A `torch.autograd.Function` around the kernels computed the right
forward but all-zero gradients under torch.compile on an H200 (torch 2.11, aot_eager and inductor
alike), while each kernel op compiled alone matched eager; the custom-op pair compiles correctly
(tested there). Inside the ops the kernels are launched directly (`launch_*`), not through their
registered ops. Only g and u are saved; h = act(g)·u is recomputed in the backward (elementwise,
cheaper than keeping a third [S, H] tensor).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..activations import get_activation
from ..experts import GroupedExperts
from .down_backward import launch_down_backward
from .expert_wgrad import launch_expert_wgrad
from .gate_up import launch_gate_up
from .scatter_gemm import launch_scatter_gemm


def block_sizes(device: torch.device) -> tuple[int, int, int]:
    """(BM, BN, BK): GPU tiles, or small tiles for the CPU interpreter (tests)."""
    return (64, 64, 32) if device.type == "cuda" else (16, 32, 16)


def _segment_ids(offsets: Tensor, s: int) -> Tensor:
    return torch.searchsorted(offsets, torch.arange(s, device=offsets.device), right=True)  # [S]


def _bias_grad(bias: Optional[Tensor], expert: Tensor, rows: Tensor) -> Optional[Tensor]:
    """Σ over each expert's slots of rows [S, H], in fp32 whatever the parameter dtype."""
    if bias is None:
        return None
    acc = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    return acc.index_add_(0, expert, rows.float()).to(bias.dtype)


try:  # launch kernels directly, as a triton_op does in eager mode (no higher-order-op dispatch)
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:  # older torch: wrap_triton dispatches through its higher-order op, same result
    from contextlib import nullcontext as set_wrap_triton_enabled  # type: ignore[assignment]


def triton_experts_forward(x, w_slot, order, token, offsets, gw, uw, dw, gb, ub, db, activation, save, top_k):
    """-> out [T, D] fp32, g [S, H] and u [S, H] pre-activations (empty unless `save`)."""
    with set_wrap_triton_enabled(False):
        return _forward(x, w_slot, order, token, offsets, gw, uw, dw, gb, ub, db, activation, save, top_k)


def triton_experts_backward(dout, x, w_slot, order, token, offsets, g, u, gw, uw, dw, gb, ub, db, activation, top_k):
    """-> dx [T, D], dw_slot [S] fp32, d gate_w, d up_w, d down_w, d gate_b, d up_b, d down_b
    (None for absent parameters)."""
    with set_wrap_triton_enabled(False):
        return _backward(dout, x, w_slot, order, token, offsets, g, u, gw, uw, dw, gb, ub, db, activation, top_k)


def _forward(x, w_slot, order, token, offsets, gw, uw, dw, gb, ub, db, activation, save, top_k):
    bm, bn, bk = block_sizes(x.device)
    h, g, u = launch_gate_up(x, token, offsets, gw, uw, gb, ub, activation, save, bm, bn, bk)
    out = launch_scatter_gemm(h, dw.transpose(1, 2), None, None, db, w_slot, order, offsets, top_k, bm, bn, bk)
    return out, g, u


def _backward(dout, x, w_slot, order, token, offsets, g, u, gw, uw, dw, gb, ub, db, activation, top_k):
    bm, bn, bk = block_sizes(x.device)
    gated = gw is not None
    s = order.shape[0]
    act = get_activation(activation)
    h = (act(g.float()) * u.float() if gated else act(u.float())).to(x.dtype)  # [S, H], as the forward made it
    dg, du, dw_slot = launch_down_backward(dout, token, offsets, dw, g if gated else u, u, w_slot, gated, activation,
                                           bm, bn, bk)
    needs_expert = db is not None or gb is not None or ub is not None
    expert = _segment_ids(offsets, s) if needs_expert else None
    d_db = None
    if db is not None:
        dys = dout.index_select(0, token).float()  # [S, D]
        dw_slot = dw_slot + (dys * db.float()[expert]).sum(-1)
        d_db = _bias_grad(db, expert, dys * w_slot[:, None])
    dx = launch_scatter_gemm(du, uw, dg if gated else None, gw, None, None, order, offsets, top_k, bm, bn, bk)
    d_dw = launch_expert_wgrad(dout, h, token, None, w_slot, offsets, dw.dtype, bk, bn, bn)
    d_uw = launch_expert_wgrad(du, x, None, token, None, offsets, uw.dtype, bk, bn, bn)
    d_gw = launch_expert_wgrad(dg, x, None, token, None, offsets, gw.dtype, bk, bn, bn) if gated else None
    d_ub = _bias_grad(ub, expert, du) if ub is not None else None
    d_gb = _bias_grad(gb, expert, dg) if gb is not None else None
    return dx.to(x.dtype), dw_slot, d_gw, d_uw, d_dw, d_gb, d_ub, d_db
