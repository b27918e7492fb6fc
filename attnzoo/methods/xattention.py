"""xattention - XAttention: block-sparse attention with antidiagonal scoring (Xu et al., 2025).

Algorithm (prefill):
1. Estimate: for stride S, score every (query block, key block) by the strided antidiagonal
   estimator (attnzoo/kernels/scoring.py, or its PyTorch twin): per query group of S rows, a
   softmax over key groups of the averaged antidiagonal logits, summed inside each block.
2. Select, per (batch, query head, query block), by one of two rules (`selection`):
   - "attnzoo" (the paper's rule in every row): the forced blocks (key block 0, and for causal the
     diagonal block), then the other blocks in descending score until the selected mass reaches
     `threshold` times the row total (the block that crosses it is kept);
   - "official": the block choice of the reference code (mit-han-lab/x-attention,
     `xattn/src/Xattention.py` `xattn_estimate` and `xattn/src/utils.py` `find_blocks_chunked`),
     with its chunking, alignment, padding and walk (see `official_select`).
   threshold >= 1 keeps every block that attention touches.
3. Attend: block-sparse FlashAttention over the selected blocks (attnzoo/ops/flash.py).
GQA: query head h is scored against kv head h // (Hq // Hk); masks are per query head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..block_mask import BlockMask
from ..geometry import block_geometry, diagonal_key_block, num_blocks
from ..ops.flash import flash_attention, windowed_blocks
from ..ops.scoring import antidiagonal_block_scores
from ..validation import (check_block_size, check_bool, check_choice, check_int, check_optional,
                          check_power_of_two, check_real, check_softcap, check_window)

SELECTIONS = ("attnzoo", "official")


class XAttentionParams(NamedTuple):
    """XAttention's parameters, validated."""

    stride: int
    threshold: float
    block_q: int
    block_k: int
    selection: str
    chunk_size: int | None


def xattention_params(stride, threshold, block_size, selection="attnzoo", chunk_size=None) -> XAttentionParams:
    """Validate the parameters (numbers may be Python, numpy or 0-d tensor scalars)."""
    block_q, block_k = check_block_size(block_size)
    stride = check_power_of_two("stride", stride)
    if stride > min(block_q, block_k):
        raise ValueError(f"stride must divide the block size, got stride={stride} with block_size={block_size!r}")
    threshold = check_real("threshold", threshold, low=0.0)
    selection = check_choice("selection", selection, SELECTIONS)
    chunk_size = check_optional(check_int, "chunk_size", chunk_size, low=1)
    if selection == "attnzoo" and chunk_size is not None:
        raise ValueError(f"chunk_size is the reference code's query chunk and applies to selection='official' "
                         f"only, got chunk_size={chunk_size!r} with selection='attnzoo'")
    if selection == "official":
        if block_q != block_k:
            raise ValueError(f"selection='official' uses one block size for queries and keys, as the reference "
                             f"does, got block_size={block_size!r}")
        if chunk_size is not None and chunk_size % block_q:
            raise ValueError(f"chunk_size must be None (the reference's rule) or a positive multiple of the block "
                             f"size {block_q}, got {chunk_size}")
    return XAttentionParams(stride, threshold, block_q, block_k, selection, chunk_size)


# ---------------------------------------------------------------------------------------------------
# selection="attnzoo"
# ---------------------------------------------------------------------------------------------------


def forced_blocks(n: int, m: int, block_q: int, block_k: int, *, causal: bool, admissible: torch.Tensor) -> torch.Tensor:
    """Bool (nQB, nKB): key block 0, and for causal the diagonal key block, where attention sees them
    (`admissible`, the blocks holding a visible pair)."""
    device = admissible.device
    key = torch.arange(admissible.shape[1], device=device)[None, :]
    forced = key == 0
    if causal:
        forced = forced | (key == diagonal_key_block(n, m, block_q, block_k, device=device)[:, None])
    return forced & admissible


def threshold_select(scores: torch.Tensor, threshold: float, forced: torch.Tensor,
                     admissible: torch.Tensor) -> torch.Tensor:
    """scores (..., nQB, nKB) >= 0; forced, admissible bool (nQB, nKB) -> bool (..., nQB, nKB).

    Per row: the forced blocks, then the admissible others in descending score (ties: lower index
    first) while the mass kept before a block is < threshold * row total, so the crossing block is
    kept. threshold >= 1 keeps every admissible block."""
    if threshold >= 1:
        return admissible.expand_as(scores).clone()
    candidates = admissible & ~forced
    total = (scores * admissible).sum(-1, keepdim=True)
    forced_mass = (scores * forced).sum(-1, keepdim=True)
    ranked, order = scores.masked_fill(~candidates, -1.0).sort(dim=-1, descending=True, stable=True)
    kept_before = _mass_before(ranked)
    take = (ranked >= 0) & (forced_mass + kept_before < threshold * total)
    return torch.zeros_like(take).scatter(-1, order, take) | forced


def _mass_before(ranked: torch.Tensor) -> torch.Tensor:
    """Exclusive running sum of the non-negative entries of `ranked` (..., K) along its last dim."""
    running = torch.cumsum(ranked.clamp(min=0), dim=-1)
    return torch.cat([torch.zeros_like(running[..., :1]), running[..., :-1]], dim=-1)


def attnzoo_select(q, k, *, stride: int, threshold: float, block_q: int, block_k: int, scale: float,
                   causal: bool, backend: str) -> torch.Tensor:
    """Bool (B|1, Hq|1, nQB, nKB): the paper's rule on the estimate of the real tokens."""
    n, m = q.shape[2], k.shape[2]
    admissible, _ = block_geometry(n, m, block_q, block_k, causal=causal, device=q.device)
    if threshold >= 1:  # every admissible block: no estimate needed
        return admissible[None, None]
    forced = forced_blocks(n, m, block_q, block_k, causal=causal, admissible=admissible)
    scores = antidiagonal_block_scores(q, k, stride=stride, block_q=block_q, block_k=block_k, scale=scale,
                                       causal=causal, backend=backend)
    return threshold_select(scores, threshold, forced, admissible)


# ---------------------------------------------------------------------------------------------------
# selection="official": the reference's xattn_estimate + find_blocks_chunked
# ---------------------------------------------------------------------------------------------------


def official_chunk_size(m: int) -> int:
    """The reference's default query chunk (`Xattention_prefill`, chunk_size=None): from P, the next
    power of two >= M, clamp(min(max(2048, P), 2**28 / P), min=2048)."""
    p = 1 << max(m - 1, 0).bit_length()
    return max(min(max(2048, p), (1 << 28) // p), 2048)


def official_scores(q, k, *, stride: int, block: int, chunk: int, scale: float, causal: bool,
                    backend: str) -> torch.Tensor:
    """float64 (B, Hq, nQB, M_pad / block): the reference's block sums on its padded grid.

    The reference pads q and k with zeros, each to a multiple of `chunk` (N_pad, M_pad), and aligns
    query group a with key group a + (M_pad - N_pad) / S under causal masking (so within one chunk
    causal N < M is top-left aligned); zero-padded keys take part in the softmax, and padded query
    groups (from ceil(N / S) on) add nothing. The same grid, scored by the antidiagonal op: queries
    padded to whole groups, keys padded to M_pad (causal: cut after the last group a kept query sees).
    The reference stores the sums in the input dtype, so they are rounded to it."""
    n, m = q.shape[2], k.shape[2]
    n_pad, m_pad = num_blocks(n, chunk) * chunk, num_blocks(m, chunk) * chunk
    query_rows = num_blocks(n, stride) * stride
    key_rows = m_pad - n_pad + query_rows if causal else m_pad
    q_rows = F.pad(q, (0, 0, 0, query_rows - n))
    k_rows = F.pad(k, (0, 0, 0, key_rows - m)) if key_rows >= m else k[:, :, :key_rows]
    scores = antidiagonal_block_scores(q_rows, k_rows, stride=stride, block_q=block, block_k=block, scale=scale,
                                       causal=causal, backend=backend)
    return F.pad(scores, (0, m_pad // block - scores.shape[-1])).to(q.dtype).double()


def official_forced(n_qb: int, n_kb_pad: int, shift: int, blocks_per_chunk: int, *, causal: bool,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """(forced bool (nQB, K), lagging bool (nQB,)) of the reference's causal walk; none when not causal.

    Query block i's diagonal is key block i + shift (shift = (M_pad - N_pad) / block); key block 0 is
    forced too, except in a chunk whose first diagonal is block 0: there the reference writes the
    diagonal over column 0, so rows hold one forced block, and their walk lags one block behind."""
    key = torch.arange(n_kb_pad, device=device)[None, :]
    rows = torch.arange(n_qb, device=device)
    if not causal:
        return torch.zeros(n_qb, n_kb_pad, dtype=torch.bool, device=device), torch.zeros_like(rows, dtype=torch.bool)
    chunk_first_diagonal = shift + rows // blocks_per_chunk * blocks_per_chunk  # the reference's current_index
    sink = chunk_first_diagonal > 0
    forced = (key == (rows + shift)[:, None]) | ((key == 0) & sink[:, None])
    return forced, ~sink


def official_walk(scores: torch.Tensor, threshold: float, forced: torch.Tensor, lagging: torch.Tensor) -> torch.Tensor:
    """scores float64 (..., nQB, K) >= 0; forced bool (nQB, K); lagging bool (nQB,) -> bool (..., nQB, K).

    The reference's walk: the forced blocks, then the others in descending score (ties: lower index
    first), each kept while the mass counted before it is < threshold * row total (over all K). The
    mass counted is the forced mass plus the others ranked before it; in lagging rows it leaves out
    the block just before, and the best other block is tested against 0. Every rejected block is
    redirected to key block 0, so key block 0 is always kept."""
    required = threshold * scores.sum(-1, keepdim=True)
    forced_mass = (scores * forced).sum(-1, keepdim=True)
    ranked, order = scores.masked_fill(forced, -1.0).sort(dim=-1, descending=True, stable=True)
    mass_before = _mass_before(ranked)
    mass_before_previous = torch.cat([torch.zeros_like(mass_before[..., :1]), mass_before[..., :-1]], dim=-1)
    counted = torch.where(lagging[:, None], mass_before_previous, mass_before) + forced_mass
    first = torch.arange(ranked.shape[-1], device=scores.device) == 0
    counted = counted.masked_fill(lagging[:, None] & first, 0.0)
    take = (ranked >= 0) & (counted < required)
    keep = torch.zeros_like(take).scatter(-1, order, take) | forced
    keep[..., 0] = True
    return keep


def official_select(q, k, *, stride: int, threshold: float, block: int, chunk_size, scale: float, causal: bool,
                    backend: str) -> torch.Tensor:
    """Bool (B|1, Hq|1, nQB, nKB): the reference's blocks, restricted to those attention touches.

    Causal keeps key blocks j <= i + shift on the padded grid (the reference's final clean-up), so
    a causal N < M within one chunk is scored and selected top-left aligned; blocks the attention's
    own (bottom-right) causal mask leaves empty are dropped from the returned mask: they compute
    nothing in either code."""
    n, m = q.shape[2], k.shape[2]
    chunk = official_chunk_size(m) if chunk_size is None else chunk_size
    n_chunks, m_chunks = num_blocks(n, chunk), num_blocks(m, chunk)
    if causal and n_chunks > m_chunks:
        raise ValueError(f"selection='official' with causal=True needs no more query chunks than key chunks "
                         f"(the reference asserts it): N={n}, M={m}, chunk_size={chunk}")
    admissible, _ = block_geometry(n, m, block, block, causal=causal, device=q.device)
    shift = (m_chunks - n_chunks) * chunk // block
    n_qb, n_kb, n_kb_pad = admissible.shape[0], admissible.shape[1], m_chunks * chunk // block
    reached = torch.arange(n_kb_pad, device=q.device)[None, :] <= torch.arange(n_qb, device=q.device)[:, None] + shift
    region = reached if causal else torch.ones_like(reached)
    if threshold >= 1:
        keep = region[None, None]
    else:
        scores = official_scores(q, k, stride=stride, block=block, chunk=chunk, scale=scale, causal=causal,
                                 backend=backend)
        forced, lagging = official_forced(n_qb, n_kb_pad, shift, chunk // block, causal=causal, device=q.device)
        keep = official_walk(scores, threshold, forced, lagging) & region
    return keep[..., :n_kb] & admissible


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------


def select_blocks(q, k, *, stride: int, threshold: float, block_q: int, block_k: int, scale: float, causal: bool,
                  backend: str, selection: str = "attnzoo", chunk_size=None) -> BlockMask:
    """XAttention's block mask (B|1, Hq|1, nQB, nKB) for q (B, Hq, N, D), k (B, Hk, M, D)."""
    if selection == "official":
        keep = official_select(q, k, stride=stride, threshold=threshold, block=block_q, chunk_size=chunk_size,
                               scale=scale, causal=causal, backend=backend)
    else:
        keep = attnzoo_select(q, k, stride=stride, threshold=threshold, block_q=block_q, block_k=block_k, scale=scale,
                              causal=causal, backend=backend)
    return BlockMask(keep, (block_q, block_k))


def xattention(q, k, v, *, causal: bool, scale: float, backend: str, stride: int = 8, threshold: float = 0.9,
               block_size=128, selection: str = "attnzoo", chunk_size=None, window_size=(-1, -1),
               softcap: float = 0.0, return_block_mask: bool = False):
    """XAttention prefill: q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> out (B, Hq, N, Dv),
    or (out, block_mask) with `return_block_mask`. `stride` (power of two dividing `block_size`) is the
    antidiagonal stride S; `threshold` the fraction of estimated mass each query-block row keeps;
    `selection` "attnzoo" or "official" (the reference code's block choice, which chunks the queries
    by `chunk_size`, None = the reference's rule from M)."""
    params = xattention_params(stride, threshold, block_size, selection, chunk_size)
    window, softcap = check_window(window_size), check_softcap(softcap)
    return_block_mask = check_bool("return_block_mask", return_block_mask)
    block_mask = select_blocks(q, k, stride=params.stride, threshold=params.threshold, block_q=params.block_q,
                               block_k=params.block_k, scale=scale, causal=causal, backend=backend,
                               selection=params.selection, chunk_size=params.chunk_size)
    out, _ = flash_attention(q, k, v, scale=scale, causal=causal, window_size=window, softcap=softcap,
                             block_mask=block_mask, backend=backend)
    if return_block_mask:
        return out, windowed_blocks(block_mask, q.shape[2], k.shape[2], causal=causal, window=window)
    return out


def example_kwargs(q, k, v, *, causal):
    """Blocks small enough that `attnzoo check`'s inputs span several, and a threshold that drops some."""
    return {"block_size": 32, "stride": 8, "threshold": 0.5}
