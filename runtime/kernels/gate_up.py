"""Fused gather + grouped GEMM for the gate/up projections + activation (forward).

For sorted slot s of expert e (token t = token[s]):
    g[s] = x[t] @ Wg[e]ᵀ + bg[e],   u[s] = x[t] @ Wu[e]ᵀ + bu[e]
    h[s] = act(g[s]) ⊙ u[s]          (plain MLP: h[s] = act(u[s]))
The rows of x are gathered inside the kernel (no [S, D] copy of x); g and u are written only when
they are needed for the backward (`save`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..activations import get_activation
from .activations import ACT_CODES, act_fwd
from .blocks import row_block
from .schedule import block_schedule


@triton.jit
def gate_up_kernel(
    x_ptr, token_ptr, block_expert_ptr, block_row_ptr, offsets_ptr,
    wg_ptr, wu_ptr, bg_ptr, bu_ptr,
    h_ptr, g_ptr, u_ptr,
    D, H, num_experts,
    stride_xt, stride_xd,
    stride_ge, stride_gh, stride_gd,
    stride_ue, stride_uh, stride_ud,
    stride_bge, stride_bue,
    GATED: tl.constexpr, HAS_GB: tl.constexpr, HAS_UB: tl.constexpr, SAVE: tl.constexpr,
    ACT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(1)
    e, rows, rmask = row_block(block_expert_ptr, block_row_ptr, offsets_ptr, num_experts, BM)
    if e >= num_experts:  # idle block
        return
    tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)  # [BM] gathered token ids
    cols = pid_n * BN + tl.arange(0, BN)  # [BN] hidden units
    cmask = cols < H

    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        a = tl.load(x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
        bu = tl.load(wu_ptr + e * stride_ue + cols[None, :] * stride_uh + ks[:, None] * stride_ud,
                     mask=kmask[:, None] & cmask[None, :], other=0.0)  # [BK, BN] = Wu[e]ᵀ tile
        acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
        if GATED:
            bg = tl.load(wg_ptr + e * stride_ge + cols[None, :] * stride_gh + ks[:, None] * stride_gd,
                         mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)

    if HAS_UB:
        acc_u += tl.load(bu_ptr + e * stride_bue + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if HAS_GB:
            acc_g += tl.load(bg_ptr + e * stride_bge + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        h = act_fwd(acc_g, ACT) * acc_u
    else:
        h = act_fwd(acc_u, ACT)

    out = rows.to(tl.int64)[:, None] * H + cols[None, :]  # outputs are contiguous [S, H]
    omask = rmask[:, None] & cmask[None, :]
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=omask)
    if SAVE:
        tl.store(u_ptr + out, acc_u.to(u_ptr.dtype.element_ty), mask=omask)
        if GATED:
            tl.store(g_ptr + out, acc_g.to(g_ptr.dtype.element_ty), mask=omask)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: exact fp32 products unless the user allowed TF32 matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def launch_gate_up(
    x: Tensor, token: Tensor, offsets: Tensor,
    gate_w: Optional[Tensor], up_w: Tensor, gate_b: Optional[Tensor], up_b: Optional[Tensor],
    activation: str, save: bool, block_m: int, block_n: int, block_k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, D], token [S] (sorted slot -> token), offsets [N] segment ends ->
    h [S, H], g [S, H] and u [S, H] pre-activations (g, u empty unless `save`; g empty if plain)."""
    s, (n, h_dim, d) = token.shape[0], up_w.shape
    gated = gate_w is not None
    h = x.new_empty(s, h_dim)
    u = x.new_empty(s if save else 0, h_dim)
    g = x.new_empty(s if save and gated else 0, h_dim)
    block_expert, block_row = block_schedule(offsets, s, block_m)
    gw = gate_w if gated else up_w
    gb = gate_b if gate_b is not None else up_w
    ub = up_b if up_b is not None else up_w
    grid = (block_expert.shape[0], triton.cdiv(h_dim, block_n))
    wrap_triton(gate_up_kernel)[grid](
        x, token, block_expert, block_row, offsets,
        gw, up_w, gb, ub,
        h, g if save and gated else h, u if save else h,
        d, h_dim, n,
        x.stride(0), x.stride(1),
        gw.stride(0), gw.stride(1), gw.stride(2),
        up_w.stride(0), up_w.stride(1), up_w.stride(2),
        gb.stride(0), ub.stride(0),
        GATED=gated, HAS_GB=gate_b is not None, HAS_UB=up_b is not None, SAVE=save,
        ACT=ACT_CODES[activation], PREC=dot_precision(x.dtype),
        BM=block_m, BN=block_n, BK=block_k,
    )
    return h, g, u


# The registered op, for callers outside our custom ops (torch.compile traces through it); the
# backend calls `launch_gate_up` directly from inside its own custom ops (no second dispatch).
triton_gate_up = triton_op("upcycle::triton_gate_up", mutates_args=())(launch_gate_up)


def reference_gate_up(x, token, offsets, gate_w, up_w, gate_b, up_b, activation):
    """Plain PyTorch: the same three outputs (always saved), computed per segment."""
    act = get_activation(activation)
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    s, h_dim = token.shape[0], up_w.shape[1]
    h, g, u = (x.new_zeros(s, h_dim) for _ in range(3))
    for e, (a, b) in enumerate(zip(starts, ends)):
        xe = x[token[a:b]].float()
        u[a:b] = xe @ up_w[e].float().t() + (0 if up_b is None else up_b[e].float())
        if gate_w is not None:
            g[a:b] = xe @ gate_w[e].float().t() + (0 if gate_b is None else gate_b[e].float())
            h[a:b] = act(g[a:b].float()) * u[a:b].float()
        else:
            h[a:b] = act(u[a:b].float())
    return h, g, u
