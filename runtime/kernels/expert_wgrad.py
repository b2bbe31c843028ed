"""Per-expert weight gradient: a grouped GEMM that reduces over each expert's rows.

    C[e] = Σ_{s in segment e} scale[s] · A[ia(s)]ᵀ ⊗ B[ib(s)]          C: [N, P, Q]
with ia / ib optional row gathers (ia(s) = token[s] reads rows of a [T, P] tensor in place).
    d Wd[e] [D, H]: A = dout (gathered by token, scaled by the router weight), B = h
    d Wu[e] [H, D]: A = du, B = x (gathered by token);  d Wg[e] likewise with dg
Experts with no rows get zeros. One program per (expert, P tile, Q tile).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .gate_up import dot_precision


@triton.jit
def expert_wgrad_kernel(
    a_ptr, b_ptr, a_idx_ptr, b_idx_ptr, scale_ptr, offsets_ptr, c_ptr,
    P, Q,
    stride_ar, stride_ac, stride_br, stride_bc, stride_ce, stride_cp, stride_cq,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offsets_ptr + e)
    ps = pid_p * BP + tl.arange(0, BP)
    qs = pid_q * BQ + tl.arange(0, BQ)
    pmask = ps < P
    qmask = qs < Q

    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < end
        if GATHER_A:
            ra = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            ra = rows.to(tl.int64)
        if GATHER_B:
            rb = tl.load(b_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            rb = rows.to(tl.int64)
        at = tl.load(a_ptr + ra[None, :] * stride_ar + ps[:, None] * stride_ac,
                     mask=pmask[:, None] & rmask[None, :], other=0.0)  # [BP, BM] = A rowsᵀ
        if HAS_SCALE:
            w = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            at = (at.to(tl.float32) * w[None, :]).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + rb[:, None] * stride_br + qs[None, :] * stride_bc,
                    mask=rmask[:, None] & qmask[None, :], other=0.0)  # [BM, BQ]
        acc = tl.dot(at, b, acc, input_precision=PREC)
    tl.store(c_ptr + e * stride_ce + ps[:, None] * stride_cp + qs[None, :] * stride_cq,
             acc.to(c_ptr.dtype.element_ty), mask=pmask[:, None] & qmask[None, :])


def launch_expert_wgrad(
    a: Tensor, b: Tensor, a_index: Optional[Tensor], b_index: Optional[Tensor],
    scale: Optional[Tensor], offsets: Tensor, out_dtype: torch.dtype,
    block_m: int, block_p: int, block_q: int,
) -> Tensor:
    """a [Ra, P], b [Rb, Q] (rows picked by a_index / b_index [S] when given, else the S sorted
    rows), scale [S] fp32, offsets [N] segment ends -> [N, P, Q] in `out_dtype`."""
    n, p, q = offsets.shape[0], a.shape[1], b.shape[1]
    c = a.new_empty(n, p, q, dtype=out_dtype)
    dummy = offsets
    grid = (n, triton.cdiv(p, block_p), triton.cdiv(q, block_q))
    wrap_triton(expert_wgrad_kernel)[grid](
        a, b, a_index if a_index is not None else dummy, b_index if b_index is not None else dummy,
        scale if scale is not None else a, offsets, c,
        p, q,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), c.stride(2),
        GATHER_A=a_index is not None, GATHER_B=b_index is not None, HAS_SCALE=scale is not None,
        PREC=dot_precision(a.dtype), BM=block_m, BP=block_p, BQ=block_q,
    )
    return c


# The registered op, for callers outside our custom ops (torch.compile traces through it); the
# backend calls `launch_expert_wgrad` directly from inside its own custom ops (no second dispatch).
triton_expert_wgrad = triton_op("upcycle::triton_expert_wgrad", mutates_args=())(launch_expert_wgrad)


def reference_expert_wgrad(a, b, a_index, b_index, scale, offsets, out_dtype):
    """Plain PyTorch, per segment."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    c = a.new_zeros(len(ends), a.shape[1], b.shape[1], dtype=torch.float32)
    for e, (lo, hi) in enumerate(zip(starts, ends)):
        ae = (a[a_index[lo:hi]] if a_index is not None else a[lo:hi]).float()
        be = (b[b_index[lo:hi]] if b_index is not None else b[lo:hi]).float()
        if scale is not None:
            ae = ae * scale[lo:hi, None].float()
        c[e] = ae.t() @ be
    return c.to(out_dtype)
