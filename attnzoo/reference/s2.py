"""S2-Attention's oracle (METHODS.md, s2): the per-kv-head pattern, by loops over blocks.

d(i) is query block i's diagonal key block: the block holding the diagonal key of its last query,
floor((min((i + 1) * block, N) - 1 + M - N) / block) (= i when N = M).
Causal, kv head h: key block j is kept iff j <= d(i) and (d(i) - j < local_blocks or
(j + h * step + head_sliding_offset) % vert_stride == 0), step = head_sliding_step; for a pattern of
its own (masks.local_strided) the default step is max(1, vert_stride // kv_heads), for the s2 method
dkernel's default max(1, int(vert_stride / Hq)) (dkernel's `num_heads` counts query heads).
Non-causal: kept iff the distance outside the local band, max(0, d - j - local + 1) +
max(0, j - d - local + 1), is a multiple of vert_stride (0 inside the band).
The last `num_dense_heads` kv heads keep every block (causal: every j <= d(i)); `homo_head` gives
every head head 0's pattern; query head h uses kv head h // (Hq // Hk).
"""

from __future__ import annotations

import torch

from .blocks import num_blocks


def diagonal_block(i: int, n: int, m: int, block: int) -> int:
    return (min((i + 1) * block, n) - 1 + m - n) // block


def kv_head_pattern(n: int, m: int, head: int, *, kv_heads: int, block_size: int, local_blocks: int, vert_stride: int,
                    homo_head: bool = False, num_dense_heads: int = 0, head_sliding_offset: int = 0,
                    head_sliding_step: int | None = None,
                    causal: bool = True) -> torch.Tensor:
    """Bool (nQB, nKB): kv head `head`'s pattern."""
    n_qb, n_kb = num_blocks(n, block_size), num_blocks(m, block_size)
    dense = head >= kv_heads - num_dense_heads
    phase_head = 0 if homo_head else head
    step = max(1, vert_stride // kv_heads) if head_sliding_step is None else head_sliding_step
    keep = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    for i in range(n_qb):
        d = diagonal_block(i, n, m, block_size)
        for j in range(n_kb):
            if causal:
                if dense:
                    keep[i, j] = j <= d
                else:
                    local = d - j < local_blocks
                    strided = (j + phase_head * step + head_sliding_offset) % vert_stride == 0
                    keep[i, j] = j <= d and (local or strided)
            else:
                outside = max(0, d - j - local_blocks + 1) + max(0, j - d - local_blocks + 1)
                keep[i, j] = dense or outside % vert_stride == 0
    return keep


def s2_pattern(n: int, m: int, q_heads: int, kv_heads: int, **params) -> torch.Tensor:
    """Bool (1, q_heads, nQB, nKB); params as the method's (block_size, local_blocks, vert_stride,
    homo_head, num_dense_heads, head_sliding_offset, head_sliding_step, causal); head_sliding_step None
    is dkernel's default for q_heads query heads."""
    step = params.pop("head_sliding_step", None)
    step = max(1, int(params["vert_stride"] / q_heads)) if step is None else step
    per_kv = [kv_head_pattern(n, m, h, kv_heads=kv_heads, head_sliding_step=step, **params) for h in range(kv_heads)]
    group = q_heads // kv_heads
    return torch.stack([per_kv[h // group] for h in range(q_heads)])[None]
