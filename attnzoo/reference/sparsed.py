"""SparseD's oracle (METHODS.md, sparsed): block importance, the per-region top-k and the schedule.

Importance of (query block i, key block j) = the mean of softmax(scale q k^T) over the tile (a ragged
tile's missing entries count as 0, so the mean is the sum over block_q * block_k: the ranking is the
sum's). A row keeps the top min(n, floor(n * select) + 1) of its n key blocks. With `gen_len`, the
key blocks from the first one starting inside the last gen_len keys (or the last block) form the
generation region: it keeps its own top-k by probabilities renormalised over its keys only, and the
prompt region before it keeps its top min(n_prompt, floor(nKB * select) + 1) by the all-key ones.
Schedule: t* = floor(total_steps * skip) + 1; steps <= t* are dense, later steps reuse step t*'s
pattern. Non-causal.
"""

from __future__ import annotations

import math

import torch

from .blocks import num_blocks


def keep_count(n_blocks: int, select: float) -> int:
    return math.floor(n_blocks * select) + 1


def pattern_step(total_steps: int, skip: float) -> int:
    """t*: the last dense step, whose q, k make the pattern."""
    return math.floor(total_steps * skip) + 1


def generation_start(m: int, block_k: int, gen_len: int) -> int:
    """The first key block of the generation region."""
    for j in range(num_blocks(m, block_k)):
        if j * block_k >= m - gen_len:
            return j
    return num_blocks(m, block_k) - 1


def block_mean_probs(q, k, *, block_q: int, block_k: int, scale=None):
    """float64 (B, Hq, nQB, nKB)."""
    Hq, D = q.shape[1], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    group = Hq // k.shape[1]
    k = torch.stack([k[:, h // group] for h in range(Hq)], dim=1).double()
    probs = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q.double(), k) * scale, dim=-1)
    N, M = probs.shape[-2:]
    out = torch.zeros(*probs.shape[:2], num_blocks(N, block_q), num_blocks(M, block_k), dtype=torch.float64)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            tile = probs[..., i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
            out[..., i, j] = tile.sum((-1, -2)) / (block_q * block_k)
    return out


def regions(q, k, *, select: float, block_q: int, block_k: int, gen_len=None, scale=None):
    """[(first key block, importance (B, Hq, nQB, n_region), keep count)] of each region, in key order."""
    n_kb = num_blocks(k.shape[2], block_k)
    everything = block_mean_probs(q, k, block_q=block_q, block_k=block_k, scale=scale)
    if gen_len is None:
        return [(0, everything, min(n_kb, keep_count(n_kb, select)))]
    start = generation_start(k.shape[2], block_k, gen_len)
    generation = block_mean_probs(q, k[:, :, start * block_k:], block_q=block_q, block_k=block_k, scale=scale)
    out = []
    if start > 0:
        out.append((0, everything[..., :start], min(start, keep_count(n_kb, select))))
    n_gen = n_kb - start
    out.append((start, generation, min(n_gen, keep_count(n_gen, select))))
    return out


def is_top_k(scores, kept, count: int, tol: float = 1e-7) -> bool:
    """kept (..., n) holds exactly `count` blocks per row and none scores below a dropped one by more
    than `tol` (near ties may go either way)."""
    lowest_kept = scores.masked_fill(~kept, math.inf).amin(-1)
    highest_dropped = scores.masked_fill(kept, -math.inf).amax(-1)
    return bool((kept.sum(-1) == count).all() and (lowest_kept >= highest_dropped - tol).all())


def select_blocks(q, k, *, select: float, block_q: int, block_k: int, gen_len=None, scale=None):
    """One valid SparseD pattern (B, Hq, nQB, nKB) from the float64 importance (ties: lower index)."""
    parts = []
    for _, scores, count in regions(q, k, select=select, block_q=block_q, block_k=block_k, gen_len=gen_len,
                                    scale=scale):
        order = torch.sort(-scores, dim=-1, stable=True).indices[..., :count]
        parts.append(torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, True))
    return torch.cat(parts, dim=-1)
