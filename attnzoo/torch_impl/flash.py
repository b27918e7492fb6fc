"""FlashAttention-2 in PyTorch: the twin of attnzoo/kernels/flash.py (same signature, same index, same work).

The queries are cut into tiles: a dense call's tiles are `twin_tile()` rows, a sparse call's tiles
are the query blocks of its `SparseIndex`. Each tile visits exactly the keys the kernel visits:
- a dense call, the contiguous span of keys that the window/causal rule lets the tile see
  (`geometry.visible_span`): the middle that every row sees unmasked, the edges masked;
- a sparse call, the key blocks listed for the tile: *full* blocks unmasked, *partial* blocks masked
  element-wise (causal/window edge, ragged tail). Unlisted blocks are never read.
Keys arrive in chunks of at most `_CHUNK`; an online softmax (running max and sum) joins them and
the logsumexp is saved. The backward recomputes probabilities from it: dQ walks the same key lists
per query tile, dK/dV walks the transposed lists (per key block, its query blocks) per key tile.
So the cost follows the blocks computed, and every index path runs on both backends.

GQA stays folded: tiles are (B, Hk, G', R, D) with the query heads of a group as rows of their kv
head (G' = 1, R = G * rows) when the index is shared by the heads, or (G' = G) when each query head
has its own lists; k and v are never repeated, each query head gathers only its listed blocks.

Shapes: q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> o (B, Hq, N, Dv) in q's dtype,
lse (B, Hq, N) fp32 (-inf for rows that see no key).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import geometry
from .._env import poisoning

_CHUNK = 2048  # keys (or, in the dK/dV pass, query rows) per step


def twin_tile() -> int:
    """Query (and, backward, key) tile of a dense call: ATTNZOO_TWIN_TILE rows, default 64."""
    return int(os.environ.get("ATTNZOO_TWIN_TILE", "64"))


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _new_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer every element of which the twin writes (NaN-poisoned under ATTNZOO_POISON=1)."""
    if poisoning():
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------
# What a tile visits: chunks of keys (forward, dQ) or of query rows (dK/dV), each with its element
# mask (None = every pair visible)
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Lists:
    """One kind (full or partial) of a SparseIndex row set: counts (Bm, Hm, rows), lists (Bm, Hm, rows, cols)."""

    counts: torch.Tensor
    lists: torch.Tensor
    masked: bool


def _row_lists(index, transposed: bool) -> tuple[_Lists, _Lists]:
    if transposed:
        return (_Lists(index.q_count_full, index.q_index_full, False),
                _Lists(index.q_count_part, index.q_index_part, True))
    return (_Lists(index.kv_count_full, index.kv_index_full, False),
            _Lists(index.kv_count_part, index.kv_index_part, True))


def _per_group(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(Bm, Hm, ...) -> (Bm, Hk | 1, G | 1, ...): an index row set split into kv head and group member."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.unflatten(1, (n_kv_heads, -1))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(..., L, D) -> (..., ceil(L / block), block, D), zero-padded."""
    length = x.shape[-2]
    pad = geometry.num_blocks(length, block) * block - length
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).unflatten(-2, (-1, block))


def _listed(row: int, kinds: tuple[_Lists, _Lists], n_kv_heads: int, block: int):
    """For `row` of the index: per kind, the slots (chunks of listed blocks) to visit, as
    (kind, ids (Bm, Hk|1, G|1, c), valid (Bm, Hk|1, G|1, c) bool). Slot chunks hold <= _CHUNK keys."""
    per_chunk = max(1, _CHUNK // block)
    for kind in kinds:
        counts = _per_group(kind.counts[:, :, row], n_kv_heads)  # (Bm, Hk|1, G|1)
        most = int(counts.max())
        lists = _per_group(kind.lists[:, :, row], n_kv_heads)  # (Bm, Hk|1, G|1, cols)
        for first in range(0, most, per_chunk):
            slots = torch.arange(first, min(first + per_chunk, most), device=counts.device)
            yield kind, lists[..., slots].long(), slots < counts[..., None]


def _gather(blocks: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """blocks (B, Hk, [G,] nBlocks, block, D), ids and valid (Bm, Hk|1, G|1, c) -> (B, Hk, G|1, c * block, D).
    Slots past a row's count (`valid` False) come out as zeros: like the kernel, whose loop stops at
    the count, the twin never uses an unlisted block (NaN there must not reach 0 * NaN)."""
    B, Hk = blocks.shape[:2]
    b = torch.arange(B, device=ids.device)[:, None, None, None]
    h = torch.arange(Hk, device=ids.device)[None, :, None, None]
    if blocks.dim() == 6:  # per-query-head rows: (B, Hk, G, nBlocks, block, D)
        g = torch.arange(blocks.shape[2], device=ids.device)[None, None, :, None]
        picked = blocks[b, h, g, ids]
    else:
        picked = blocks[b, h, ids]
    if not bool(valid.all()):
        picked = picked.masked_fill(~valid[..., None, None], 0.0)
    return picked.flatten(-3, -2)


def _slot_positions(ids: torch.Tensor, block: int) -> torch.Tensor:
    """ids (..., c) -> positions (..., c * block) of the elements of the listed blocks."""
    return (ids[..., None] * block + torch.arange(block, device=ids.device)).flatten(-2)


# ---------------------------------------------------------------------------------------------------
# Forward and dQ: per query tile, the key chunks it visits
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """The geometry of one call, shared by the passes."""

    n: int
    m: int
    n_kv_heads: int
    group: int
    window: tuple[int, int]
    scale: float
    softcap: float
    device: torch.device


def _query_tiles(call: _Call, index):
    """(first, stop) query rows of every tile, and its row in the index (None for dense)."""
    tile = index.block_q if index is not None else twin_tile()
    for row, first in enumerate(range(0, call.n, tile)):
        yield first, min(first + tile, call.n), (row if index is not None else None)


def _key_chunks(call: _Call, index, row, first: int, stop: int, k, v, k_blocks, v_blocks):
    """The keys query rows [first, stop) visit, as (k (B, Hk, G|1, C, D), v (.., C, Dv), keep or None),
    keep broadcastable to the scores (B, Hk, G|1, R, C) of rows in `_fold` layout."""
    if index is None:
        lo, full_lo, full_hi, hi = geometry.visible_span(first, stop - 1, call.n, call.m, call.window)
        yield from _span_chunks(call, first, stop, lo, full_lo, full_hi, hi, k, v)
        return
    for kind, ids, valid in _listed(row, _row_lists(index, False), call.n_kv_heads, index.block_k):
        keep = valid.repeat_interleave(index.block_k, dim=-1)[..., None, :]  # (Bm, Hk|1, G|1, 1, C)
        if kind.masked:
            cols = _slot_positions(ids, index.block_k)[..., None, :]
            keep = keep & geometry.visible(_row_positions(call, first, stop, ids.shape[2]), cols, call.n, call.m,
                                           call.window)
        yield _gather(k_blocks, ids, valid), _gather(v_blocks, ids, valid), (None if bool(keep.all()) else keep)


def _span_chunks(call: _Call, first, stop, lo, full_lo, full_hi, hi, k, v):
    """Dense: keys [lo, hi) in chunks, masked only on the edges [lo, full_lo) and [full_hi, hi)."""
    for start, end, masked in ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)):
        for c0 in range(start, end, _CHUNK):
            c1 = min(c0 + _CHUNK, end)
            keep = None
            if masked:
                cols = torch.arange(c0, c1, device=k.device)
                keep = geometry.visible(_row_positions(call, first, stop, 1), cols, call.n, call.m,
                                        call.window)
            yield k[:, :, None, c0:c1], v[:, :, None, c0:c1], keep


def _row_positions(call: _Call, first: int, stop: int, groups: int) -> torch.Tensor:
    """Query positions of the rows of a tile in `_fold` layout: (R, 1), R = (G // groups) * rows."""
    rows = torch.arange(first, stop, device=call.device)
    return rows.repeat(call.group // groups)[:, None]


def _fold(x: torch.Tensor, n_kv_heads: int, groups: int) -> torch.Tensor:
    """(B, Hq, L, ...) -> (B, Hk, groups, (G // groups) * L, ...): the query heads of a kv head's group
    as rows (groups = 1) or kept apart (groups = G, for per-query-head lists)."""
    B, Hq, L = x.shape[:3]
    group = Hq // n_kv_heads
    return x.reshape(B, n_kv_heads, groups, (group // groups) * L, *x.shape[3:])


def _unfold(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """Inverse of `_fold`: (B, Hk, groups, (G // groups) * L, ...) -> (B, Hq, L, ...)."""
    B, Hk, groups, rows = x.shape[:4]
    return x.reshape(B, n_q_heads, rows * groups * Hk // n_q_heads, *x.shape[4:])


def _index_groups(index, group: int) -> int:
    """How the query heads of a group are laid out: 1 (folded as rows) unless the lists are per head."""
    return group if index is not None and index.kv_count_full.shape[1] > 1 else 1


def _scores(q, k, call: _Call):
    """Scaled (and soft-capped) scores q k^T, and tanh(scores / softcap) for the backward (None without)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    if call.softcap > 0:
        t = torch.tanh(s / call.softcap)
        return call.softcap * t, t
    return s, None


def _tile_rows(x: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    """Rows [first, stop) of a (B, Hq, N, ...) tensor."""
    return x[:, :, first:stop]


def flash_fwd(q, k, v, *, scale: float, window=(-1, -1), softcap: float = 0.0, index=None):
    """o (B, Hq, N, Dv) in q's dtype and lse (B, Hq, N) fp32. `index`: a SparseIndex or None (dense)."""
    B, Hq, N, _ = q.shape
    Hk, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    call = _Call(N, M, Hk, Hq // Hk, tuple(window), scale, softcap, q.device)
    acc_dtype = _accum_dtype(q.dtype)
    kf, vf = k.to(acc_dtype), v.to(acc_dtype)
    k_blocks = v_blocks = None
    if index is not None:
        k_blocks, v_blocks = _blocks(kf, index.block_k), _blocks(vf, index.block_k)
    groups = _index_groups(index, call.group)
    o = _new_output((B, Hq, N, Dv), q.dtype, q.device)
    lse = _new_output((B, Hq, N), torch.float32, q.device)
    for first, stop, row in _query_tiles(call, index):
        q_tile = _fold(_tile_rows(q, first, stop), Hk, groups).to(acc_dtype)  # (B, Hk, groups, R, D)
        row_max = torch.full(q_tile.shape[:-1], -math.inf, dtype=acc_dtype, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(*q_tile.shape[:-1], Dv, dtype=acc_dtype, device=q.device)
        for kc, vc, keep in _key_chunks(call, index, row, first, stop, kf, vf, k_blocks, v_blocks):
            s, _ = _scores(q_tile, kc, call)
            if keep is not None:
                s = s.masked_fill(~keep, -math.inf)
            new_max = torch.maximum(row_max, s.amax(dim=-1))
            safe_max = new_max.masked_fill(new_max == -math.inf, 0.0)  # rows with nothing visible yet
            p = torch.exp(s - safe_max[..., None])
            alpha = torch.exp(row_max - safe_max)
            row_sum = row_sum * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + torch.matmul(p, vc)
            row_max = new_max
        empty = row_sum == 0
        out = acc / row_sum.masked_fill(empty, 1.0)[..., None]
        tile_lse = (row_max + torch.log(row_sum.masked_fill(empty, 1.0))).masked_fill(empty, -math.inf)
        o[:, :, first:stop] = _unfold(out, Hq).to(q.dtype)
        lse[:, :, first:stop] = _unfold(tile_lse, Hq).float()
    return o, lse


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------


def _probs(s, lse, keep):
    """exp(s - lse) with masked pairs at 0; `lse` broadcast to s, +inf for rows that saw nothing."""
    log_p = s - lse
    if keep is not None:
        log_p = log_p.masked_fill(~keep, -math.inf)
    return torch.exp(log_p)


def _row_stats(lse: torch.Tensor, delta: torch.Tensor, acc_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """lse with +inf for rows that saw no key (so their p is 0), and delta, in the accumulation dtype."""
    lse = lse.to(acc_dtype)
    return lse.masked_fill(lse == -math.inf, math.inf), delta.to(acc_dtype)


def _dq_pass(call: _Call, index, q, k, v, do, lse, delta, acc_dtype) -> torch.Tensor:
    """dq (B, Hq, N, D): per query tile, dS k over the keys the forward visited."""
    kf, vf = k.to(acc_dtype), v.to(acc_dtype)
    k_blocks = v_blocks = None
    if index is not None:
        k_blocks, v_blocks = _blocks(kf, index.block_k), _blocks(vf, index.block_k)
    Hq, Hk = q.shape[1], call.n_kv_heads
    groups = _index_groups(index, call.group)
    dq = _new_output(q.shape, q.dtype, q.device)
    for first, stop, row in _query_tiles(call, index):
        q_t, do_t, lse_t, delta_t = (_fold(_tile_rows(x, first, stop), Hk, groups).to(acc_dtype)
                                     for x in (q, do, lse, delta))
        dq_t = torch.zeros_like(q_t)
        for kc, vc, keep in _key_chunks(call, index, row, first, stop, kf, vf, k_blocks, v_blocks):
            s, tanh_s = _scores(q_t, kc, call)
            p = _probs(s, lse_t[..., None], keep)
            ds = p * (torch.matmul(do_t, vc.transpose(-1, -2)) - delta_t[..., None])
            if tanh_s is not None:
                ds = ds * (1 - tanh_s * tanh_s)
            dq_t += torch.matmul(ds, kc)
        dq[:, :, first:stop] = _unfold(dq_t * call.scale, Hq).to(q.dtype)
    return dq


def _key_tiles(call: _Call, index):
    """(first, stop) keys of every key tile, and its row in the transposed index (None for dense)."""
    tile = index.block_k if index is not None else twin_tile()
    for row, first in enumerate(range(0, call.m, tile)):
        yield first, min(first + tile, call.m), (row if index is not None else None)


def _query_chunks(call: _Call, index, row, first: int, stop: int, per_head_rows, row_blocks):
    """The query rows that see keys [first, stop), as (q, do, lse, delta rows (B, Hk, R, .)..., keep or
    None), keep broadcastable to the transposed scores (B, Hk, stop - first, R).
    `per_head_rows` are (q, do, lse, delta) in (B, Hk, G, N, .) layout, `row_blocks` the same cut into
    query blocks (sparse calls)."""
    key_pos = torch.arange(first, stop, device=call.device)[:, None]  # (T, 1)
    if index is None:
        lo, full_lo, full_hi, hi = geometry.query_span(first, stop - 1, call.n, call.m, call.window)
        for start, end, masked in ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)):
            rows_per_chunk = max(1, _CHUNK // call.group)
            for r0 in range(start, end, rows_per_chunk):
                r1 = min(r0 + rows_per_chunk, end)
                rows = [x[:, :, :, r0:r1].flatten(2, 3) for x in per_head_rows]  # (B, Hk, G * L, .)
                keep = None
                if masked:
                    query_pos = torch.arange(r0, r1, device=call.device).repeat(call.group)[None, :]
                    keep = geometry.visible(query_pos, key_pos, call.n, call.m, call.window)
                yield (*rows, keep)
        return
    for kind, ids, valid in _listed(row, _row_lists(index, True), call.n_kv_heads, index.block_q):
        ids = ids.expand(*ids.shape[:2], call.group, ids.shape[-1])  # (Bm, Hk|1, G, c)
        valid = valid.expand_as(ids)
        rows = [_gather(x, ids, valid).flatten(2, 3) for x in row_blocks]  # (B, Hk, G * c * block_q, .)
        keep = valid.repeat_interleave(index.block_q, dim=-1).flatten(-2)[..., None, :]  # (Bm, Hk|1, 1, R)
        if kind.masked:
            query_pos = _slot_positions(ids, index.block_q).flatten(-2)[..., None, :]
            keep = keep & geometry.visible(query_pos, key_pos, call.n, call.m, call.window)
        yield (*rows, None if bool(keep.all()) else keep)


def _dkdv_pass(call: _Call, index, q, k, v, do, lse, delta, acc_dtype):
    """dk, dv (B, Hk, M, D|Dv): per key tile, over the query rows that saw it (the transposed lists);
    the query heads of a group are rows of the same pass, so their gradients sum by construction."""
    Hk = call.n_kv_heads
    per_head = [_fold(x, Hk, call.group).to(acc_dtype) for x in (q, do, lse[..., None], delta[..., None])]
    row_blocks = None
    if index is not None:
        row_blocks = [_blocks(x, index.block_q) for x in per_head]  # (B, Hk, G, nQB, block_q, .)
    kf, vf = k.to(acc_dtype), v.to(acc_dtype)
    dk = _new_output(k.shape, k.dtype, k.device)
    dv = _new_output(v.shape, v.dtype, v.device)
    for first, stop, row in _key_tiles(call, index):
        k_t, v_t = kf[:, :, first:stop], vf[:, :, first:stop]  # (B, Hk, T, D|Dv)
        dk_t, dv_t = torch.zeros_like(k_t), torch.zeros_like(v_t)
        for q_r, do_r, lse_r, delta_r, keep in _query_chunks(call, index, row, first, stop, per_head, row_blocks):
            s_t, tanh_s = _scores(k_t, q_r, call)  # (B, Hk, T, R)
            p_t = _probs(s_t, lse_r[..., 0][..., None, :], keep)  # (B, Hk, T, R): per query row
            dv_t += torch.matmul(p_t, do_r)
            ds_t = p_t * (torch.matmul(v_t, do_r.transpose(-1, -2)) - delta_r[..., 0][..., None, :])
            if tanh_s is not None:
                ds_t = ds_t * (1 - tanh_s * tanh_s)
            dk_t += torch.matmul(ds_t, q_r)
        dk[:, :, first:stop] = (dk_t * call.scale).to(k.dtype)
        dv[:, :, first:stop] = dv_t.to(v.dtype)
    return dk, dv


def flash_bwd(do, q, k, v, o, lse, *, scale: float, window=(-1, -1), softcap: float = 0.0, index=None,
              dlse=None):
    """Gradients (dq, dk, dv) given do (and optionally dlse, the gradient of the returned lse),
    recomputing probabilities from the saved lse. d lse / d s = p, so dlse enters as delta - dlse."""
    Hq, Hk = q.shape[1], k.shape[1]
    call = _Call(q.shape[2], k.shape[2], Hk, Hq // Hk, tuple(window), scale, softcap, q.device)
    acc_dtype = _accum_dtype(q.dtype)
    delta = (do.to(acc_dtype) * o.to(acc_dtype)).sum(dim=-1)  # (B, Hq, N)
    if dlse is not None:
        delta = delta - dlse.to(acc_dtype)
    lse_rows, delta = _row_stats(lse, delta, acc_dtype)
    dq = _dq_pass(call, index, q, k, v, do, lse_rows, delta, acc_dtype)
    dk, dv = _dkdv_pass(call, index, q, k, v, do, lse_rows, delta, acc_dtype)
    return dq, dk, dv
