"""Grouped GEMM with a weighted scatter to the token slots (the down projection's combine).

For sorted slot s of expert e, with flat slot order[s] = t·K + k:
    buf[order[s]] = scale[s] · (a[s] @ B[e] + a2[s] @ B2[e] + bias[e])      buf: [T·K, M] fp32
then out[t] = Σ_k buf[t·K + k]. Forward: a = h, B[e] = Wd[e]ᵀ, scale = router weight (the combine).
Backward of the gate/up projections (dx): a = du, B = Wu[e], a2 = dg, B2 = Wg[e], no scale.
Each slot is written exactly once, so the combine is deterministic (no atomics).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .gate_up import dot_precision
from .blocks import row_block
from .schedule import block_schedule


@triton.jit
def scatter_gemm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, bias_ptr, scale_ptr, order_ptr,
    block_expert_ptr, block_row_ptr, offsets_ptr, out_ptr,
    K1, K2, M, num_experts,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn,
    stride_a2m, stride_a2k, stride_b2e, stride_b2k, stride_b2n,
    stride_biase,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(1)
    e, rows, rmask = row_block(block_expert_ptr, block_row_ptr, offsets_ptr, num_experts, BM)
    if e >= num_experts:  # idle block
        return
    rows64 = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < M

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K1, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K1
        a = tl.load(a_ptr + rows64[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_SECOND:
        for k0 in range(0, K2, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K2
            a = tl.load(a2_ptr + rows64[:, None] * stride_a2m + ks[None, :] * stride_a2k,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b2_ptr + e * stride_b2e + ks[:, None] * stride_b2k + cols[None, :] * stride_b2n,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * stride_biase + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    dest = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)  # flat slot t·K + k
    tl.store(out_ptr + dest[:, None] * M + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


def launch_scatter_gemm(
    a: Tensor, b: Tensor, a2: Optional[Tensor], b2: Optional[Tensor], bias: Optional[Tensor],
    scale: Optional[Tensor], order: Tensor, offsets: Tensor, top_k: int,
    block_m: int, block_n: int, block_k: int,
) -> Tensor:
    """a [S, K1] sorted rows, b [N, K1, M] (any strides), optional second pair a2 [S, K2] /
    b2 [N, K2, M], bias [N, M], scale [S] -> [T, M] fp32: Σ over each token's K slots."""
    s, m, n = a.shape[0], b.shape[2], b.shape[0]
    buf = a.new_empty(s, m, dtype=torch.float32)  # [T·K, M] in flat slot order
    block_expert, block_row = block_schedule(offsets, s, block_m)
    second = a2 is not None and b2 is not None
    a2_, b2_ = (a2, b2) if second else (a, b)
    bias_ = bias if bias is not None else b
    scale_ = scale if scale is not None else a
    grid = (block_expert.shape[0], triton.cdiv(m, block_n))
    wrap_triton(scatter_gemm_kernel)[grid](
        a, b, a2_, b2_, bias_, scale_, order, block_expert, block_row, offsets, buf,
        a.shape[1], a2_.shape[1], m, n,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        a2_.stride(0), a2_.stride(1), b2_.stride(0), b2_.stride(1), b2_.stride(2),
        bias_.stride(0),
        HAS_SECOND=second, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        PREC=dot_precision(a.dtype), BM=block_m, BN=block_n, BK=block_k,
    )
    return buf.view(s // top_k, top_k, m).sum(1)


# The registered op, for callers outside our custom ops (torch.compile traces through it); the
# backend calls `launch_scatter_gemm` directly from inside its own custom ops (no second dispatch).
triton_scatter_gemm = triton_op("upcycle::triton_scatter_gemm", mutates_args=())(launch_scatter_gemm)


def reference_scatter_gemm(a, b, a2, b2, bias, scale, order, offsets, top_k):
    """Plain PyTorch, per segment."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    s, m = a.shape[0], b.shape[2]
    buf = a.new_zeros(s, m, dtype=torch.float32)
    for e, (lo, hi) in enumerate(zip(starts, ends)):
        y = a[lo:hi].float() @ b[e].float()
        if a2 is not None:
            y = y + a2[lo:hi].float() @ b2[e].float()
        if bias is not None:
            y = y + bias[e].float()
        if scale is not None:
            y = y * scale[lo:hi, None].float()
        buf[order[lo:hi]] = y
    return buf.view(s // top_k, top_k, m).sum(1)
