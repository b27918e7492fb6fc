"""Block-level facts derived from the element mask by brute force: which (query block, key block)
tiles hold a visible pair, which are fully visible, which hold each query's diagonal key.

Shares nothing with attnzoo.geometry: every answer here is read off the (N, M) element mask or
off an explicit loop over queries.
"""

from __future__ import annotations

import torch

from .dense import visible_mask


def num_blocks(length: int, block: int) -> int:
    """ceil(length / block)."""
    return (length + block - 1) // block


def blocks_touched(keep: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Bool (..., nQB, nKB): the tiles of an element mask keep (..., N, M) holding at least one True."""
    n, m = keep.shape[-2:]
    n_qb, n_kb = num_blocks(n, block_q), num_blocks(m, block_k)
    out = torch.zeros(*keep.shape[:-2], n_qb, n_kb, dtype=torch.bool, device=keep.device)
    for i in range(n_qb):
        for j in range(n_kb):
            out[..., i, j] = keep[..., i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].flatten(-2).any(-1)
    return out


def admissible_blocks(n: int, m: int, block_q: int, block_k: int, *, causal: bool = False,
                      window_size=(-1, -1)) -> torch.Tensor:
    """Bool (nQB, nKB): tiles holding at least one pair that attention may see."""
    return blocks_touched(visible_mask(n, m, causal=causal, window_size=window_size), block_q, block_k)


def fully_visible_blocks(n: int, m: int, block_q: int, block_k: int, *, causal: bool = False,
                         window_size=(-1, -1)) -> torch.Tensor:
    """Bool (nQB, nKB): tiles where every real query sees block_k real keys (a tile reaching past the
    last key is never fully visible: its tail needs masking); ragged query tails do not count."""
    seen = visible_mask(n, m, causal=causal, window_size=window_size)
    n_qb, n_kb = num_blocks(n, block_q), num_blocks(m, block_k)
    out = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    for i in range(n_qb):
        for j in range(n_kb):
            tile = seen[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
            out[i, j] = tile.shape[1] == block_k and bool(tile.all())
    return out


def last_query_diagonal_blocks(n: int, m: int, block_q: int, block_k: int) -> torch.Tensor:
    """Bool (nQB, nKB): for each query block, the key block holding the diagonal key i + (M - N) of its
    LAST query i (none when that key is negative: the query sees no key under causal attention)."""
    n_qb, n_kb = num_blocks(n, block_q), num_blocks(m, block_k)
    out = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    for i in range(n_qb):
        last_query = min((i + 1) * block_q, n) - 1
        key = last_query + m - n
        if key >= 0:
            out[i, key // block_k] = True
    return out


def every_query_diagonal_blocks(n: int, m: int, block_q: int, block_k: int, *, causal: bool) -> torch.Tensor:
    """Bool (nQB, nKB): the key blocks holding the diagonal key i + (M - N) of ANY query i of the block;
    causal skips queries whose diagonal key is negative, non-causal clamps the key into [0, M)."""
    out = torch.zeros(num_blocks(n, block_q), num_blocks(m, block_k), dtype=torch.bool)
    for i in range(n):
        key = i + m - n
        if causal and key < 0:
            continue
        key = min(max(key, 0), m - 1)
        out[i // block_q, key // block_k] = True
    return out


def expand_kv_heads(blocks: torch.Tensor, q_heads: int) -> torch.Tensor:
    """(B, Hk, ...) per kv head -> (B, Hq, ...): query head h reads kv head h // (Hq // Hk)."""
    kv_heads = blocks.shape[1]
    return torch.stack([blocks[:, h // (q_heads // kv_heads)] for h in range(q_heads)], dim=1)
