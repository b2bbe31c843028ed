"""The `triton` backend: forward and backward of the routed experts in four Triton kernels.

    forward   gate_up        gather x rows + gate/up grouped GEMM + activation      -> h, g, u
              scatter_gemm   down grouped GEMM · router weight, scattered to slots  -> out
    backward  down_backward  gather dout rows @ Wd + router-weight grad + act'      -> dg, du, dw
              scatter_gemm   du @ Wu + dg @ Wg, scattered to slots                  -> dx
              expert_wgrad   per-expert Σ Aᵀ B (three calls)                         -> dWd, dWu, dWg
Bias gradients are segment sums in plain torch. Every kernel is a `torch.library.triton_op`,
so torch.compile traces through the launches. Routing metadata comes from `plan_routing`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..experts import GroupedExperts
from ..grouped import plan_routing
from .down_backward import triton_down_backward
from .expert_wgrad import triton_expert_wgrad
from .gate_up import triton_gate_up
from .scatter_gemm import triton_scatter_gemm


def block_sizes(device: torch.device) -> tuple[int, int, int]:
    """(BM, BN, BK): GPU tiles, or small tiles for the CPU interpreter (tests)."""
    return (64, 64, 32) if device.type == "cuda" else (16, 32, 16)


def _segment_ids(offsets: Tensor, s: int) -> Tensor:
    return torch.searchsorted(offsets, torch.arange(s, device=offsets.device), right=True)  # [S]


class _TritonExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, order, token, offsets, gate_w, up_w, down_w, gate_b, up_b, down_b, activation, save):
        bm, bn, bk = block_sizes(x.device)
        top_k = weights.shape[1]
        w_slot = weights.reshape(-1).float()[order]  # [S] router weight per sorted slot
        h, g, u = triton_gate_up(x, token, offsets, gate_w, up_w, gate_b, up_b, activation, save, bm, bn, bk)
        out = triton_scatter_gemm(
            h, down_w.transpose(1, 2), None, None, down_b, w_slot, order, offsets, top_k, bm, bn, bk
        )  # [T, D] fp32
        if save:
            ctx.save_for_backward(x, order, token, offsets, gate_w, up_w, down_w, gate_b, up_b, down_b, h, g, u, w_slot)
        ctx.activation, ctx.top_k, ctx.weights_shape, ctx.weights_dtype = activation, top_k, weights.shape, weights.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        x, order, token, offsets, gate_w, up_w, down_w, gate_b, up_b, down_b, h, g, u, w_slot = ctx.saved_tensors
        bm, bn, bk = block_sizes(x.device)
        gated = gate_w is not None
        s = order.shape[0]
        dout = dout.contiguous()
        dg, du, dw_slot = triton_down_backward(
            dout, token, offsets, down_w, g, u, w_slot, gated, ctx.activation, bm, bn, bk
        )
        expert = _segment_ids(offsets, s) if (down_b is not None or gate_b is not None or up_b is not None) else None
        d_down_b = d_gate_b = d_up_b = None
        if down_b is not None:
            dys = dout.index_select(0, token).float()  # [S, D]
            dw_slot = dw_slot + (dys * down_b.float()[expert]).sum(-1)
            d_down_b = torch.zeros(down_b.shape, dtype=torch.float32, device=x.device)
            d_down_b = d_down_b.index_add_(0, expert, dys * w_slot[:, None]).to(down_b.dtype)
        dweights = torch.zeros(s, dtype=torch.float32, device=x.device).scatter_(0, order, dw_slot)
        dweights = dweights.view(ctx.weights_shape).to(ctx.weights_dtype)
        dx = triton_scatter_gemm(
            du, up_w, dg if gated else None, gate_w, None, None, order, offsets, ctx.top_k, bm, bn, bk
        ).to(x.dtype)
        d_down = triton_expert_wgrad(dout, h, token, None, w_slot, offsets, down_w.dtype, bk, bn, bn)
        d_up = triton_expert_wgrad(du, x, None, token, None, offsets, up_w.dtype, bk, bn, bn)
        d_gate = triton_expert_wgrad(dg, x, None, token, None, offsets, gate_w.dtype, bk, bn, bn) if gated else None
        if up_b is not None:
            d_up_b = torch.zeros_like(up_b).index_add_(0, expert, du)
        if gate_b is not None:
            d_gate_b = torch.zeros_like(gate_b).index_add_(0, expert, dg)
        return dx, dweights, None, None, None, d_gate, d_up, d_down, d_gate_b, d_up_b, d_down_b, None, None


def triton_forward(experts: GroupedExperts, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """x [T, D], indices [T, K], weights [T, K] -> [T, D]; equals `reference_forward`."""
    plan = plan_routing(indices, experts.num_experts)
    params = (experts.gate_proj, experts.up_proj, experts.down_proj, experts.gate_bias, experts.up_bias, experts.down_bias)
    # the gate/up pre-activations are written and kept only when a backward can follow
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weights) + params)
    return _TritonExperts.apply(
        x.contiguous(), weights, plan.order, plan.token, plan.offsets, *params, experts.activation, save
    )
