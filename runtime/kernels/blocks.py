"""The row-block prologue shared by the grouped-GEMM kernels (gate_up, scatter_gemm, down_backward).

Program `pid_m` of the grid handles one block of BM sorted slots of one expert, as planned by
`schedule.block_schedule`: the block's expert id (N marks an idle block), its first row, and the
end of the expert's segment, which masks the block's tail.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_block(block_expert_ptr, block_row_ptr, offsets_ptr, num_experts, BM: tl.constexpr):
    """-> (expert id, int64; >= num_experts for an idle block: the caller returns), rows [BM], row mask [BM]."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    row0 = tl.load(block_row_ptr + pid_m)
    end = tl.load(offsets_ptr + tl.minimum(e, num_experts - 1))  # idle blocks read a valid entry
    rows = row0 + tl.arange(0, BM)  # [BM] sorted slots
    rmask = rows < end
    return e, rows, rmask
