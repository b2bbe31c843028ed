"""Tile schedules for grouped GEMMs over expert segments (plain torch, no host sync).

Sorted slots form one contiguous segment per expert (`offsets[e]` = end of segment e). A grouped
GEMM launches a fixed grid of `cdiv(S, BM) + N` row blocks, an upper bound on Σ_e cdiv(count_e, BM),
so the grid never depends on the routing; blocks past the last segment are idle (expert == N).
"""

from __future__ import annotations

import torch
from torch import Tensor


def segment_starts(offsets: Tensor) -> Tensor:
    """[N] segment ends -> [N] segment starts."""
    return torch.cat([offsets.new_zeros(1), offsets[:-1]])


def block_schedule(offsets: Tensor, num_rows: int, block_m: int) -> tuple[Tensor, Tensor]:
    """-> block_expert [B] int32 (N marks an idle block), block_row [B] int32 (first row of the
    block), with B = cdiv(num_rows, block_m) + N."""
    n = offsets.shape[0]
    starts = segment_starts(offsets)  # [N]
    blocks = torch.div(offsets - starts + block_m - 1, block_m, rounding_mode="floor")  # [N]
    block_end = torch.cumsum(blocks, 0)  # [N]
    num_blocks = (num_rows + block_m - 1) // block_m + n
    b = torch.arange(num_blocks, device=offsets.device, dtype=offsets.dtype)  # [B]
    expert = torch.searchsorted(block_end, b, right=True)  # [B] in [0, N]
    e = expert.clamp(max=n - 1)
    row = starts[e] + (b - (block_end[e] - blocks[e])) * block_m  # [B]
    return expert.to(torch.int32), row.to(torch.int32)


def reference_block_schedule(offsets: Tensor, num_rows: int, block_m: int) -> tuple[Tensor, Tensor]:
    """The same schedule by a Python loop (for tests)."""
    n = offsets.shape[0]
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    expert, row = [], []
    for e in range(n):
        for r in range(starts[e], ends[e], block_m):
            expert.append(e)
            row.append(r)
    total = (num_rows + block_m - 1) // block_m + n
    last = ends[-1] if n else 0
    expert += [n] * (total - len(expert))
    row += [last] * (total - len(row))
    return torch.tensor(expert, dtype=torch.int32), torch.tensor(row, dtype=torch.int32)
