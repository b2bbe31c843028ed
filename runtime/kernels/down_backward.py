"""Backward of the down projection + combine, with the activation's backward fused (one kernel).

For sorted slot s of expert e (token t = token[s], router weight w[s]):
    q[s]   = dout[t] @ Wd[e]                      (dout rows gathered in the kernel)
    dw[s]  = ⟨q[s], h[s]⟩                         (router-weight grad; + ⟨dout[t], bd[e]⟩ outside)
    dh[s]  = w[s] · q[s]
    gated: dg[s] = dh ⊙ u ⊙ act'(g),  du[s] = dh ⊙ act(g);   plain: du[s] = dh ⊙ act'(u)
h = act(g) ⊙ u is recomputed from the saved pre-activations. dw is reduced per hidden tile:
the kernel writes partial sums [S, cdiv(H, BN)] that the caller adds up (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..activations import activation_backward, get_activation
from .activations import ACT_CODES, act_fwd, act_grad
from .gate_up import dot_precision
from .blocks import row_block
from .schedule import block_schedule


@triton.jit
def down_backward_kernel(
    dout_ptr, token_ptr, wd_ptr, g_ptr, u_ptr, scale_ptr,
    block_expert_ptr, block_row_ptr, offsets_ptr,
    dg_ptr, du_ptr, dw_ptr,
    D, H, num_experts, num_col_blocks,
    stride_ot, stride_od, stride_de, stride_dd, stride_dh,
    GATED: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(1)
    e, rows, rmask = row_block(block_expert_ptr, block_row_ptr, offsets_ptr, num_experts, BM)
    if e >= num_experts:  # idle block
        return
    rows64 = rows.to(tl.int64)
    tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)  # hidden units
    cmask = cols < H

    q = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        a = tl.load(dout_ptr + tok[:, None] * stride_ot + ks[None, :] * stride_od,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK] gathered dout
        b = tl.load(wd_ptr + e * stride_de + ks[:, None] * stride_dd + cols[None, :] * stride_dh,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)  # [BK, BN] = Wd[e] tile
        q = tl.dot(a, b, q, input_precision=PREC)

    tile = rows64[:, None] * H + cols[None, :]
    tmask = rmask[:, None] & cmask[None, :]
    u = tl.load(u_ptr + tile, mask=tmask, other=0.0).to(tl.float32)
    w = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    dh = q * w[:, None]
    if GATED:
        g = tl.load(g_ptr + tile, mask=tmask, other=0.0).to(tl.float32)
        a_g = act_fwd(g, ACT)
        h = a_g * u
        tl.store(dg_ptr + tile, (dh * u * act_grad(g, ACT)).to(dg_ptr.dtype.element_ty), mask=tmask)
        tl.store(du_ptr + tile, (dh * a_g).to(du_ptr.dtype.element_ty), mask=tmask)
    else:
        h = act_fwd(u, ACT)
        tl.store(du_ptr + tile, (dh * act_grad(u, ACT)).to(du_ptr.dtype.element_ty), mask=tmask)
    part = tl.sum(q * h, axis=1)  # [BM]
    tl.store(dw_ptr + rows64 * num_col_blocks + pid_n, part, mask=rmask)


def launch_down_backward(
    dout: Tensor, token: Tensor, offsets: Tensor, down_w: Tensor,
    g: Tensor, u: Tensor, scale: Tensor, gated: bool, activation: str,
    block_m: int, block_n: int, block_k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """dout [T, D], token [S], down_w [N, D, H], pre-activations g/u [S, H], scale [S] fp32 ->
    dg [S, H] (empty when plain), du [S, H], dw [S] fp32 (without the down-bias term)."""
    s, (n, d, h_dim) = token.shape[0], down_w.shape
    nb = triton.cdiv(h_dim, block_n)
    du = u.new_empty(s, h_dim)
    dg = u.new_empty(s if gated else 0, h_dim)
    parts = u.new_empty(s, nb, dtype=torch.float32)
    block_expert, block_row = block_schedule(offsets, s, block_m)
    grid = (block_expert.shape[0], nb)
    wrap_triton(down_backward_kernel)[grid](
        dout, token, down_w, g if gated else u, u, scale,
        block_expert, block_row, offsets,
        dg if gated else du, du, parts,
        d, h_dim, n, nb,
        dout.stride(0), dout.stride(1), down_w.stride(0), down_w.stride(1), down_w.stride(2),
        GATED=gated, ACT=ACT_CODES[activation], PREC=dot_precision(dout.dtype),
        BM=block_m, BN=block_n, BK=block_k,
    )
    return dg, du, parts.sum(1)


# The registered op, for callers outside our custom ops (torch.compile traces through it); the
# backend calls `launch_down_backward` directly from inside its own custom ops (no second dispatch).
triton_down_backward = triton_op("upcycle::triton_down_backward", mutates_args=())(launch_down_backward)


def reference_down_backward(dout, token, offsets, down_w, g, u, scale, gated, activation):
    """Plain PyTorch, per segment."""
    act = get_activation(activation)
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    s, h_dim = token.shape[0], down_w.shape[2]
    dg, du = (u.new_zeros(s if gated else 0, h_dim), u.new_zeros(s, h_dim))
    dw = u.new_zeros(s, dtype=torch.float32)
    for e, (lo, hi) in enumerate(zip(starts, ends)):
        q = dout[token[lo:hi]].float() @ down_w[e].float()  # [n, H]
        uf = u[lo:hi].float()
        dh = q * scale[lo:hi, None].float()
        if gated:
            gf = g[lo:hi].float()
            h = act(gf) * uf
            dg[lo:hi] = activation_backward(activation, dh * uf, gf)
            du[lo:hi] = dh * act(gf)
        else:
            h = act(uf)
            du[lo:hi] = activation_backward(activation, dh, uf)
        dw[lo:hi] = (q * h).sum(-1)
    return dg, du, dw
