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
from ..geometry import Pack, block_geometry, diagonal_key_block, num_blocks
from ..ops.flash import flash_attention, ran_blocks
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


def forced_blocks(n, m, block_q: int, block_k: int, *, causal: bool, admissible: torch.Tensor) -> torch.Tensor:
    """Bool (nQB, nKB): key block 0, and for causal the diagonal key block, where attention sees them
    (`admissible`, the blocks holding a visible pair). For a pack (n, m per sequence): (S, 1, nQB, nKB)."""
    device = admissible.device
    key = torch.arange(admissible.shape[-1], device=device)[None, :]
    forced = key == 0
    if causal:
        forced = forced | (key == diagonal_key_block(n, m, block_q, block_k, device=device)[..., None])
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
                   causal: bool, backend: str, pack=None) -> torch.Tensor:
    """Bool (B|1, Hq|1, nQB, nKB): the paper's rule on the estimate of the real tokens. For a pack, every
    sequence's choice at once (one estimate launch), (S, Hq|1, nQB, nKB) over the pack's grid."""
    lengths = (q.shape[2], k.shape[2]) if pack is None else (pack.q_lengths, pack.k_lengths)
    admissible, _ = block_geometry(*lengths, block_q, block_k, causal=causal, device=q.device)
    admissible = admissible[(None,) * (4 - admissible.dim())]  # (B|S|1, 1, nQB, nKB)
    if threshold >= 1:  # every admissible block: no estimate needed
        return admissible
    forced = forced_blocks(*lengths, block_q, block_k, causal=causal, admissible=admissible)
    scores = antidiagonal_block_scores(q, k, stride=stride, block_q=block_q, block_k=block_k, scale=scale,
                                       causal=causal, backend=backend, pack=pack)
    return threshold_select(scores, threshold, forced, admissible)


# ---------------------------------------------------------------------------------------------------
# selection="official": the reference's xattn_estimate + find_blocks_chunked
# ---------------------------------------------------------------------------------------------------


def official_chunk_size(m: int) -> int:
    """The reference's default query chunk (`Xattention_prefill`, chunk_size=None): from P, the next
    power of two >= M, clamp(min(max(2048, P), 2**28 / P), min=2048)."""
    p = 1 << max(m - 1, 0).bit_length()
    return max(min(max(2048, p), (1 << 28) // p), 2048)


class OfficialGrid(NamedTuple):
    """The reference's padded grid for one sequence of N queries and M keys: both padded with zeros to a
    multiple of `chunk` (N_pad, M_pad); query block i's diagonal is key block i + shift, shift =
    (M_pad - N_pad) / block; the estimate runs on `query_rows` queries (whole groups) and `key_rows`
    keys (M_pad, or under causal cut after the last group a kept query sees)."""

    n: int
    m: int
    chunk: int
    shift: int
    query_rows: int
    key_rows: int
    n_kb_pad: int  # M_pad / block


def official_grid(n: int, m: int, *, stride: int, block: int, chunk_size, causal: bool) -> OfficialGrid:
    chunk = official_chunk_size(m) if chunk_size is None else chunk_size
    n_chunks, m_chunks = num_blocks(n, chunk), num_blocks(m, chunk)
    if causal and n_chunks > m_chunks:
        raise ValueError(f"selection='official' with causal=True needs no more query chunks than key chunks "
                         f"(the reference asserts it): N={n}, M={m}, chunk_size={chunk}")
    n_pad, m_pad = n_chunks * chunk, m_chunks * chunk
    query_rows = num_blocks(n, stride) * stride
    key_rows = m_pad - n_pad + query_rows if causal else m_pad
    return OfficialGrid(n, m, chunk, (m_pad - n_pad) // block, query_rows, key_rows, m_pad // block)


def official_rows(q, k, grid: OfficialGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimate's inputs on the reference's grid: queries padded to whole groups, keys padded with
    zeros to `key_rows` (zero-padded keys take part in the softmax, as in the reference) or cut there."""
    q_rows = F.pad(q, (0, 0, 0, grid.query_rows - grid.n))
    k_rows = F.pad(k, (0, 0, 0, grid.key_rows - grid.m)) if grid.key_rows >= grid.m else k[:, :, :grid.key_rows]
    return q_rows, k_rows


def official_scores(scores: torch.Tensor, grid: OfficialGrid, dtype: torch.dtype) -> torch.Tensor:
    """float64 (B, Hq, nQB, M_pad / block): the estimate on the padded grid, rounded to the input dtype
    (the reference stores its sums in it)."""
    return F.pad(scores, (0, grid.n_kb_pad - scores.shape[-1])).to(dtype).double()


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
                    backend: str, pack=None):
    """Bool (B|1, Hq|1, nQB, nKB): the reference's blocks, restricted to those attention touches.

    Causal keeps key blocks j <= i + shift on the padded grid (the reference's final clean-up), so
    a causal N < M within one chunk is scored and selected top-left aligned; blocks the attention's
    own (bottom-right) causal mask leaves empty are dropped from the returned mask: they compute
    nothing in either code. For a pack: a list with each sequence's choice (None for one without
    queries or keys), the estimates of every sequence on its own padded grid in one launch."""
    lengths = [(q.shape[2], k.shape[2])] if pack is None else list(zip(pack.q_lengths, pack.k_lengths))
    grids = [official_grid(n, m, stride=stride, block=block, chunk_size=chunk_size, causal=causal) if n and m
             else None for n, m in lengths]
    estimates = [None] * len(grids)
    if threshold < 1 and pack is None:
        estimates = [antidiagonal_block_scores(*official_rows(q, k, grids[0]), stride=stride, block_q=block,
                                               block_k=block, scale=scale, causal=causal, backend=backend)]
    elif threshold < 1:  # every sequence's padded rows, end to end: one more pack
        rows = [official_rows(q[:, :, pack.q_span(s)], k[:, :, pack.k_span(s)], grid) if grid else None
                for s, grid in enumerate(grids)]
        q_rows, k_rows = ([rows_s[side] for rows_s in rows if rows_s is not None] for side in (0, 1))
        padded = Pack.of_lengths(*([0 if rows_s is None else rows_s[side].shape[2] for rows_s in rows]
                                   for side in (0, 1)))
        scores = antidiagonal_block_scores(torch.cat(q_rows, dim=2), torch.cat(k_rows, dim=2), stride=stride,
                                           block_q=block, block_k=block, scale=scale, causal=causal, backend=backend,
                                           pack=padded)
        estimates = [None if grid is None else scores[s:s + 1, :, :num_blocks(grid.query_rows, block),
                                                      :num_blocks(grid.key_rows, block)]
                     for s, grid in enumerate(grids)]
    keeps = [None if grid is None else _official_keep(estimate, grid, threshold=threshold, block=block,
                                                      causal=causal, dtype=q.dtype, device=q.device)
             for grid, estimate in zip(grids, estimates)]
    return keeps[0] if pack is None else keeps


def _official_keep(estimate, grid: OfficialGrid, *, threshold: float, block: int, causal: bool, dtype,
                   device) -> torch.Tensor:
    """One sequence's choice from its estimate on the padded grid (None when threshold >= 1)."""
    admissible, _ = block_geometry(grid.n, grid.m, block, block, causal=causal, device=device)
    n_qb, n_kb = admissible.shape
    reached = torch.arange(grid.n_kb_pad, device=device)[None, :] <= torch.arange(n_qb, device=device)[:, None] + \
        grid.shift
    region = reached if causal else torch.ones_like(reached)
    if threshold >= 1:
        keep = region[None, None]
    else:
        forced, lagging = official_forced(n_qb, grid.n_kb_pad, grid.shift, grid.chunk // block, causal=causal,
                                          device=device)
        keep = official_walk(official_scores(estimate, grid, dtype), threshold, forced, lagging) & region
    return keep[..., :n_kb] & admissible


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------


def select_blocks(q, k, *, stride: int, threshold: float, block_q: int, block_k: int, scale: float, causal: bool,
                  backend: str, selection: str = "attnzoo", chunk_size=None, pack=None) -> BlockMask:
    """XAttention's block mask (B|1, Hq|1, nQB, nKB) for q (B, Hq, N, D), k (B, Hk, M, D); for a pack,
    the pack's grid (S, Hq|1, ...), each sequence choosing the blocks it would choose alone."""
    if selection == "official" and pack is not None:  # its padded chunk grid is each sequence's own
        keeps = official_select(q, k, stride=stride, threshold=threshold, block=block_q, chunk_size=chunk_size,
                                scale=scale, causal=causal, backend=backend, pack=pack)
        return BlockMask.packed([None if keep is None else BlockMask(keep, block_q) for keep in keeps], pack,
                                q.shape[1])
    if selection == "official":
        keep = official_select(q, k, stride=stride, threshold=threshold, block=block_q, chunk_size=chunk_size,
                               scale=scale, causal=causal, backend=backend)
    else:
        keep = attnzoo_select(q, k, stride=stride, threshold=threshold, block_q=block_q, block_k=block_k, scale=scale,
                              causal=causal, backend=backend, pack=pack)
    return BlockMask(keep, (block_q, block_k))


def xattention(q, k, v, *, causal: bool, scale: float, backend: str, stride: int = 8, threshold: float = 0.9,
               block_size=128, selection: str = "attnzoo", chunk_size=None, window_size=(-1, -1),
               softcap: float = 0.0, return_block_mask: bool = False, pack=None):
    """XAttention prefill: q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> out (B, Hq, N, Dv),
    or (out, block_mask) with `return_block_mask`. `stride` (power of two dividing `block_size`) is the
    antidiagonal stride S; `threshold` the fraction of estimated mass each query-block row keeps;
    `selection` "attnzoo" or "official" (the reference code's block choice, which chunks the queries
    by `chunk_size`, None = the reference's rule from M). `pack`: the sequences of a packed call, each
    choosing its own blocks (one estimate launch for selection="attnzoo"; the official rule, whose padded
    grid is each sequence's own, selects sequence by sequence), then one attention launch."""
    params = xattention_params(stride, threshold, block_size, selection, chunk_size)
    window, softcap = check_window(window_size), check_softcap(softcap)
    return_block_mask = check_bool("return_block_mask", return_block_mask)
    block_mask = select_blocks(q, k, stride=params.stride, threshold=params.threshold, block_q=params.block_q,
                               block_k=params.block_k, scale=scale, causal=causal, backend=backend,
                               selection=params.selection, chunk_size=params.chunk_size, pack=pack)
    out, _ = flash_attention(q, k, v, scale=scale, causal=causal, window_size=window, softcap=softcap,
                             block_mask=block_mask, backend=backend, pack=pack)
    if return_block_mask:
        return out, ran_blocks(block_mask, q, k, causal=causal, window=window, pack=pack)
    return out


def example_kwargs(q, k, v, *, causal):
    """Blocks small enough that `attnzoo check`'s inputs span several, and a threshold that drops some."""
    return {"block_size": 32, "stride": 8, "threshold": 0.5}
