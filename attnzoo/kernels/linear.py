"""Chunked (gated) linear attention in Triton, forward and backward.

The sequence is cut into chunks of BT tokens. Per (batch x head):

    state pass   h_n = diag(exp(Gam_last)) h_{n-1} + sum_i (k_i * exp(Gam_last - Gam_i))^T v_i
    output       o_j = scale * [(q_j * exp(Gam_j)) h_n + sum_{i <= j in chunk} A[j, i] v_i]
                 A[j, i] = sum_c q_j[c] k_i[c] exp(Gam_j[c] - Gam_i[c])

Gam is the cumulative log gate inside the chunk (tl.cumsum of g), so every exponent is a difference
Gam_j - Gam_i <= 0 taken in log space, never a ratio of products. With a gate the intra-chunk scores
are an element-wise (BT, BT, BK) tile in fp32; without one they are a tl.dot. Non-causal calls read
the final state for every chunk (PER_CHUNK off), skip the intra-chunk term and store no per-chunk states.

Kernels (constexpr switches GATED, CAUSAL, STORE_CHUNKS, HAS_INITIAL, HAS_DFINAL, VARLEN; one kernel per
role):
    _states_fwd   grid (K/BK, V/BV, B*Hk)  h_n for every chunk and the final state
    _output_fwd   grid (V/BV, NT, B*Hq)    o
    _states_bwd   grid (K/BK, V/BV, B*Hk)  dh_n (gradient of the state after chunk n) and dh0
    _dqk_bwd      grid (K/BK, NT, B*Hk)    dq, dk
    _dv_bwd       grid (V/BV, NT, B*Hk)    dv
A pack (VARLEN, fla's cu_seqlens; B = 1, the sequences end to end) runs the state passes over S*Hk
programs, one per (sequence, head), each starting from its sequence's own state, and the chunk passes
over every sequence's chunks (NT = their total), each program finding its (sequence, chunk) in a
chunk table (`_chunk_program`); every tile is addressed from its sequence's first row (`_sequence`).
GQA by index arithmetic: k, v, g and the states are per kv head, q, dout, o and dq per query head; the
G = Hq / Hk query heads of kv head `kv` are kv * G + member (flattened (B, H) rows), so query row bh
reads kv row bh // G. Programs of a kv head loop over its G query heads: no k or v is repeated and
the group's gradient sums need no atomics.

Causal isolation: inside a chunk o = A v with A lower triangular; a masked A[j, i] = 0 times a NaN or inf
v_i would still be NaN, so the intra-chunk product takes non-finite values as 0 and sets to NaN the
(row, column) entries at or after them (_intra_values): what the recurrence gives.

All tensors are contiguous (B, H, N, D) or (B, H, NT, K, V), final states (B | S, H, K, V); launchers make
them so.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._config import interpret_tile, new_output, next_pow2, triton_interpreting


@triton.jit
def _load_tile(ptr, first, rows, cols, N, D):
    """Tile (len(rows), len(cols)) of a contiguous (., D) tensor in its own dtype: rows first + rows of a
    sequence of N rows (starting at row `first`), zero outside [0, N) x [0, D)."""
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    return tl.load(ptr + (first + rows[:, None]) * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_tile_f32(ptr, first, rows, cols, N, D):
    """_load_tile upcast to fp32 (what the element-wise gate arithmetic works in)."""
    return _load_tile(ptr, first, rows, cols, N, D).to(tl.float32)


@triton.jit
def _load_operand(ptr, first, rows, cols, N, D, PRECISION: tl.constexpr):
    """A tile that only feeds tl.dot (_mm): kept in its 16-bit dtype for "native" products, else fp32."""
    tile = _load_tile(ptr, first, rows, cols, N, D)
    if PRECISION != "native":
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _mm(a, b, ELEM: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b, fp32 accumulation. "native": both operands in the 16-bit input dtype ELEM (fp32 gate
    factors and states are rounded to it first, as fla does), so the product runs on bf16 / fp16
    tensor cores (wgmma on sm_90); "ieee": exact fp32; "upcast" (the interpreter, whose bf16 tl.dot is
    wrong): fp32 operands with a tf32 hint, exactly what the kernels did before "native"."""
    if PRECISION == "native":
        out = tl.dot(a.to(ELEM), b.to(ELEM), out_dtype=tl.float32)
    elif PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return out


@triton.jit
def _store_tile(ptr, value, first, rows, cols, N, D):
    """Store tile (rows, cols) of a sequence of N rows starting at row `first` (see _load_tile), inside
    [0, N) x [0, D) only."""
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    tl.store(ptr + (first + rows[:, None]) * D + cols[None, :], value, mask=mask)


@triton.jit
def _state_offsets(state, rows, cols, K, V):
    """Offsets and mask of tile (rows, cols) of state number `state` in a (., K, V) tensor."""
    return state * K * V + rows[:, None] * V + cols[None, :], (rows[:, None] < K) & (cols[None, :] < V)


@triton.jit
def _load_state(states, state, rows, cols, K, V):
    """Tile (rows, cols) of state number `state` (see _state_offsets), zero outside (K, V)."""
    offs, mask = _state_offsets(state, rows, cols, K, V)
    return tl.load(states + offs, mask=mask, other=0.0)


@triton.jit
def _store_state(states, value, state, rows, cols, K, V):
    """Store tile (rows, cols) of state number `state` (see _state_offsets), inside (K, V) only."""
    offs, mask = _state_offsets(state, rows, cols, K, V)
    tl.store(states + offs, value, mask=mask)


@triton.jit
def _sequence(seq, CU, CHUNK_STARTS, N, NT, VARLEN: tl.constexpr):
    """(first row, rows, first chunk, chunks) of sequence `seq` inside every head. A batch holds one
    sequence per head: (0, N, 0, NT). A pack (VARLEN) reads its offsets: CU (S + 1,) int32 the token
    offsets, CHUNK_STARTS (S + 1,) int32 where each sequence's chunks start (N, NT: the pack's totals)."""
    if VARLEN:
        first_row = tl.load(CU + seq)
        rows = tl.load(CU + seq + 1) - first_row
        first_chunk = tl.load(CHUNK_STARTS + seq)
        chunks = tl.load(CHUNK_STARTS + seq + 1) - first_chunk
        first_row, first_chunk = first_row.to(tl.int64), first_chunk.to(tl.int64)
    else:
        first_row, rows, first_chunk, chunks = 0, N, 0, NT
    return first_row, rows, first_chunk, chunks


@triton.jit
def _sequence_head(pid, H, VARLEN: tl.constexpr):
    """The state passes' grid axis 2 -> (sequence, head): a pack runs S * H programs (pid // H, pid % H),
    a batch B * H programs, each its own sequence (0, pid: the flattened (batch, head) row)."""
    if VARLEN:
        seq, head = pid // H, pid % H
    else:
        seq, head = 0, pid
    return seq, head


@triton.jit
def _chunk_program(pid_chunk, kv, CU, CHUNK_STARTS, CHUNKS, N, NT, HK, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """A chunk pass's program (grid axis 1 = pid_chunk, kv head kv): (its chunk n within its sequence, the
    sequence's first row and rows, the state it reads: kv's state before chunk n when causal, else its
    sequence's final state). A batch's chunk is pid_chunk of its one sequence; a pack's comes from its
    chunk table CHUNKS (total chunks, 2) int32 of (sequence, chunk within it)."""
    if VARLEN:
        seq, n = tl.load(CHUNKS + 2 * pid_chunk), tl.load(CHUNKS + 2 * pid_chunk + 1)
    else:
        seq, n = 0, pid_chunk
    first_row, rows, first_chunk, _chunks = _sequence(seq, CU, CHUNK_STARTS, N, NT, VARLEN)
    if CAUSAL:
        state = kv * NT + first_chunk + n
    else:
        state = seq * HK + kv
    return n, first_row, rows, state


@triton.jit
def _chunk_log_decay(g, first, rows, cols, N, K, GATED: tl.constexpr):
    """(Gam (BT, BK) cumulative log gate within the chunk, Gam_last (BK,)); padded rows add 0.
    Without a gate, g is 0: Gam = 0."""
    if GATED:
        g_tile = _load_tile_f32(g, first, rows, cols, N, K)
    else:
        g_tile = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    return tl.cumsum(g_tile, axis=0), tl.sum(g_tile, axis=0)


@triton.jit
def _decay_tile(gam, causal_mask):
    """(BT, BT, BK): exp(Gam_j - Gam_i) for i <= j, else 0 (masked before exp: no overflow)."""
    diff = gam[:, None, :] - gam[None, :, :]
    return tl.exp(tl.where(causal_mask[:, :, None], diff, float("-inf")))


@triton.jit
def _intra_scores(q_tile, k_tile, gam, causal_mask, GATED: tl.constexpr, ELEM: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Partial A (BT, BT) over one key-channel block, unmasked in the ungated case."""
    if GATED:
        out = tl.sum(q_tile.to(tl.float32)[:, None, :] * k_tile.to(tl.float32)[None, :, :]
                     * _decay_tile(gam, causal_mask), axis=2)
    else:
        out = _mm(q_tile, tl.trans(k_tile), ELEM, PRECISION)
    return out


@triton.jit
def _intra_values(scores, v_tile, ELEM: tl.constexpr, PRECISION: tl.constexpr):
    """scores @ v_tile for the (BT, BT) causally masked intra-chunk scores and v (BT, BV), with v's
    NaN / inf kept out of the earlier rows: they enter the product as 0, and every entry (j, c) with a
    non-finite v[i, c] at i <= j is NaN (tl.cumsum along the chunk)."""
    v32 = v_tile.to(tl.float32)
    finite = (v32 == v32) & (tl.abs(v32) != float("inf"))
    out = _mm(scores, tl.where(finite, v_tile, 0.0).to(v_tile.dtype), ELEM, PRECISION)
    seen = tl.cumsum(tl.where(finite, 0.0, 1.0), axis=0)
    return tl.where(seen > 0, float("nan"), out)


@triton.jit
def _states_fwd(k, v, g, h0, chunk_states, final_state, CU, CHUNK_STARTS, N, K, V, NT, H,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                HAS_INITIAL: tl.constexpr, STORE_CHUNKS: tl.constexpr, VARLEN: tl.constexpr,
                PRECISION: tl.constexpr):
    # k (BH, N, K), v (BH, N, V), g (BH, N, K) | None, h0 (SH, K, V) fp32 | None
    # -> chunk_states (BH, NT, K, V) fp32: the state before chunk n (only with STORE_CHUNKS, i.e.
    #    causal); final_state (SH, K, V) fp32. SH: one state per (sequence, head): B * H, or S * H in a pack
    i_k, i_v, state = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    seq, head = _sequence_head(state, H, VARLEN)
    first_row, rows_in_seq, first_chunk, chunks = _sequence(seq, CU, CHUNK_STARTS, N, NT, VARLEN)
    first, chunk_base = head * N + first_row, head * NT + first_chunk
    keys, vals, t = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    ELEM: tl.constexpr = k.dtype.element_ty
    h = tl.zeros([BK, BV], dtype=tl.float32)  # (BK, BV)
    if HAS_INITIAL:
        h = _load_state(h0, state, keys, vals, K, V)
    for n in range(0, chunks):
        if STORE_CHUNKS:
            _store_state(chunk_states, h, chunk_base + n, keys, vals, K, V)
        rows = n * BT + t
        k_tile = _load_operand(k, first, rows, keys, rows_in_seq, K, PRECISION)
        if GATED:
            gam, last = _chunk_log_decay(g, first, rows, keys, rows_in_seq, K, GATED)
            k_tile = k_tile.to(tl.float32) * tl.exp(last[None, :] - gam)
            h = h * tl.exp(last)[:, None]
        h += _mm(tl.trans(k_tile), _load_operand(v, first, rows, vals, rows_in_seq, V, PRECISION), ELEM, PRECISION)
    _store_state(final_state, h, state, keys, vals, K, V)


@triton.jit
def _output_fwd(q, k, v, g, states, out, CU, CHUNK_STARTS, CHUNKS, scale, N, K, V, NT, G, HK,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    # q (BHq, N, K), k (BHk, N, K), v (BHk, N, V), g (BHk, N, K) | None,
    # states (BHk, NT, K, V) fp32 [causal] or (SHk, K, V) final states [non-causal] -> out (BHq, N, V) fp32
    i_v, pid_chunk, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    kv = bh // G
    n, first_row, rows_in_seq, state = _chunk_program(pid_chunk, kv, CU, CHUNK_STARTS, CHUNKS, N, NT, HK, CAUSAL,
                                                      VARLEN)
    q_first, kv_first = bh * N + first_row, kv * N + first_row
    vals, t = i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    ELEM: tl.constexpr = q.dtype.element_ty
    rows = n * BT + t
    causal_mask = t[:, None] >= t[None, :]
    inter = tl.zeros([BT, BV], dtype=tl.float32)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        keys = kb * BK + tl.arange(0, BK)
        q_tile = _load_operand(q, q_first, rows, keys, rows_in_seq, K, PRECISION)
        gam, _ = _chunk_log_decay(g, kv_first, rows, keys, rows_in_seq, K, GATED)
        if CAUSAL:
            scores += _intra_scores(q_tile, _load_operand(k, kv_first, rows, keys, rows_in_seq, K, PRECISION), gam,
                                    causal_mask, GATED, ELEM, PRECISION)
        if GATED:
            q_tile = q_tile.to(tl.float32) * tl.exp(gam)
        inter += _mm(q_tile, _load_state(states, state, keys, vals, K, V), ELEM, PRECISION)
    if CAUSAL:
        scores = tl.where(causal_mask, scores, 0.0)
        inter += _intra_values(scores, _load_operand(v, kv_first, rows, vals, rows_in_seq, V, PRECISION), ELEM,
                               PRECISION)
    _store_tile(out, scale * inter, q_first, rows, vals, rows_in_seq, V)


@triton.jit
def _states_bwd(q, g, dout, dfinal, dstates, dh0, CU, CHUNK_STARTS, scale, N, K, V, NT, G, H,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                HAS_DFINAL: tl.constexpr, STORE_CHUNKS: tl.constexpr, VARLEN: tl.constexpr,
                PRECISION: tl.constexpr):
    # q (BHq, N, K), g (BHk, N, K) | None, dout (BHq, N, V), dfinal (SHk, K, V) fp32 | None
    # -> dstates (BHk, NT, K, V) fp32: gradient of the state after chunk n (only with STORE_CHUNKS);
    #    dh0 (SHk, K, V) fp32: gradient of the initial state = of the total state when non-causal.
    # One program per (sequence, kv head): the G query heads that read its state add their terms.
    i_k, i_v, state = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    seq, kv = _sequence_head(state, H, VARLEN)
    first_row, rows_in_seq, first_chunk, chunks = _sequence(seq, CU, CHUNK_STARTS, N, NT, VARLEN)
    kv_first = kv * N + first_row
    keys, vals, t = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    ELEM: tl.constexpr = q.dtype.element_ty
    dh = tl.zeros([BK, BV], dtype=tl.float32)  # (BK, BV)
    if HAS_DFINAL:
        dh = _load_state(dfinal, state, keys, vals, K, V)
    for r in range(0, chunks):
        n = chunks - 1 - r
        if STORE_CHUNKS:
            _store_state(dstates, dh, kv * NT + first_chunk + n, keys, vals, K, V)
        rows = n * BT + t
        gam, last = _chunk_log_decay(g, kv_first, rows, keys, rows_in_seq, K, GATED)
        if GATED:
            dh = dh * tl.exp(last)[:, None]
        for member in range(0, G):
            q_first = (kv * G + member) * N + first_row
            q_tile = _load_operand(q, q_first, rows, keys, rows_in_seq, K, PRECISION)
            if GATED:
                q_tile = q_tile.to(tl.float32) * tl.exp(gam)
            dh += scale * _mm(tl.trans(q_tile), _load_operand(dout, q_first, rows, vals, rows_in_seq, V, PRECISION),
                              ELEM, PRECISION)
    _store_state(dh0, dh, state, keys, vals, K, V)


@triton.jit
def _dqk_bwd(q, k, v, g, states, dstates, dout, dq, dk, CU, CHUNK_STARTS, CHUNKS, scale, N, K, V, NT, G, HK,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
             CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    # q, dout (BHq, N, .), k (BHk, N, K), v (BHk, N, V), g (BHk, N, K) | None; states / dstates
    # (BHk, NT, K, V) fp32 [causal] or the final states / dh0 (SHk, K, V) [non-causal]
    # -> dq (BHq, N, K), dk (BHk, N, K) fp32. One program per kv head: dq of each of its G query heads,
    # and dk summed over them.
    i_k, pid_chunk, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n, first_row, rows_in_seq, state = _chunk_program(pid_chunk, kv, CU, CHUNK_STARTS, CHUNKS, N, NT, HK, CAUSAL,
                                                      VARLEN)
    kv_first = kv * N + first_row
    keys, t = i_k * BK + tl.arange(0, BK), tl.arange(0, BT)
    ELEM: tl.constexpr = q.dtype.element_ty
    rows = n * BT + t
    causal_mask = t[:, None] >= t[None, :]
    dk_inter = tl.zeros([BT, BK], dtype=tl.float32)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        v_tile = _load_operand(v, kv_first, rows, vals, rows_in_seq, V, PRECISION)
        dh_tile = _load_state(dstates, state, keys, vals, K, V)  # (BK, BV)
        dk_inter += _mm(v_tile, tl.trans(dh_tile), ELEM, PRECISION)
    k_tile = _load_operand(k, kv_first, rows, keys, rows_in_seq, K, PRECISION)
    gam, last = _chunk_log_decay(g, kv_first, rows, keys, rows_in_seq, K, GATED)
    if GATED:
        dk_inter = dk_inter * tl.exp(last[None, :] - gam)
    for member in range(0, G):
        q_first = (kv * G + member) * N + first_row
        d_scores = tl.zeros([BT, BT], dtype=tl.float32)
        dq_inter = tl.zeros([BT, BK], dtype=tl.float32)
        for vb in range(0, tl.cdiv(V, BV)):
            vals = vb * BV + tl.arange(0, BV)
            do_tile = _load_operand(dout, q_first, rows, vals, rows_in_seq, V, PRECISION)
            if CAUSAL:
                d_scores += _mm(do_tile, tl.trans(_load_operand(v, kv_first, rows, vals, rows_in_seq, V, PRECISION)),
                                ELEM, PRECISION)
            dq_inter += _mm(do_tile, tl.trans(_load_state(states, state, keys, vals, K, V)), ELEM, PRECISION)
        q_tile = _load_operand(q, q_first, rows, keys, rows_in_seq, K, PRECISION)
        if GATED:
            dq_inter = dq_inter * tl.exp(gam)
        if CAUSAL:
            d_scores = tl.where(causal_mask, d_scores, 0.0)
            if GATED:
                weighted = d_scores[:, :, None] * _decay_tile(gam, causal_mask)
                dq_inter += tl.sum(weighted * k_tile.to(tl.float32)[None, :, :], axis=1)
                dk_inter += scale * tl.sum(weighted * q_tile.to(tl.float32)[:, None, :], axis=0)
            else:
                dq_inter += _mm(d_scores, k_tile, ELEM, PRECISION)
                dk_inter += scale * _mm(tl.trans(d_scores), q_tile, ELEM, PRECISION)
        _store_tile(dq, scale * dq_inter, q_first, rows, keys, rows_in_seq, K)
    _store_tile(dk, dk_inter, kv_first, rows, keys, rows_in_seq, K)


@triton.jit
def _dv_bwd(q, k, g, dstates, dout, dv, CU, CHUNK_STARTS, CHUNKS, scale, N, K, V, NT, G, HK,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
            CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    # q, dout (BHq, N, .), k (BHk, N, K), g (BHk, N, K) | None; dstates (BHk, NT, K, V) fp32 [causal] or
    # dh0 (SHk, K, V) [non-causal] -> dv (BHk, N, V) fp32, summed over the kv head's G query heads
    i_v, pid_chunk, kv = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n, first_row, rows_in_seq, state = _chunk_program(pid_chunk, kv, CU, CHUNK_STARTS, CHUNKS, N, NT, HK, CAUSAL,
                                                      VARLEN)
    kv_first = kv * N + first_row
    vals, t = i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    ELEM: tl.constexpr = q.dtype.element_ty
    rows = n * BT + t
    causal_mask = t[:, None] >= t[None, :]
    dv_tile = tl.zeros([BT, BV], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        keys = kb * BK + tl.arange(0, BK)
        k_tile = _load_operand(k, kv_first, rows, keys, rows_in_seq, K, PRECISION)
        if GATED:
            gam, last = _chunk_log_decay(g, kv_first, rows, keys, rows_in_seq, K, GATED)
            k_tile = k_tile.to(tl.float32) * tl.exp(last[None, :] - gam)
        dv_tile += _mm(k_tile, _load_state(dstates, state, keys, vals, K, V), ELEM, PRECISION)
    if CAUSAL:
        for member in range(0, G):
            q_first = (kv * G + member) * N + first_row
            scores = tl.zeros([BT, BT], dtype=tl.float32)
            for kb in range(0, tl.cdiv(K, BK)):
                keys = kb * BK + tl.arange(0, BK)
                gam, _ = _chunk_log_decay(g, kv_first, rows, keys, rows_in_seq, K, GATED)
                scores += _intra_scores(_load_operand(q, q_first, rows, keys, rows_in_seq, K, PRECISION),
                                        _load_operand(k, kv_first, rows, keys, rows_in_seq, K, PRECISION), gam,
                                        causal_mask, GATED, ELEM, PRECISION)
            scores = tl.where(causal_mask, scores, 0.0)
            dv_tile += scale * _mm(tl.trans(scores), _load_operand(dout, q_first, rows, vals, rows_in_seq, V,
                                                                   PRECISION), ELEM, PRECISION)
    _store_tile(dv, dv_tile, kv_first, rows, vals, rows_in_seq, V)


def _tiles(K: int, V: int, gated: bool) -> tuple[int, int]:
    """(BK, BV): one small tile under the interpreter; on CUDA up to 64, 32 key channels when gated
    (the decay tile is BT x BT x BK)."""
    if triton_interpreting():
        tile = interpret_tile()
        return tile, tile
    return min(next_pow2(K), 32 if gated else 64), min(next_pow2(V), 64)


def _dot_precision(dtype: torch.dtype) -> str:
    """The PRECISION of the kernels' products (_mm): exact fp32 ("ieee") for fp32 inputs; for 16-bit
    inputs "native" on a GPU (bf16 / fp16 operands, fp32 accumulation: the tensor cores' 16-bit
    rate, wgmma on sm_90), and "upcast" under the interpreter (fp32 operands; its bf16 tl.dot is
    wrong). ATTNZOO_LINEAR_DOT=native|upcast overrides the 16-bit choice (tests)."""
    if dtype == torch.float32:
        return "ieee"
    forced = os.environ.get("ATTNZOO_LINEAR_DOT", "")
    if forced in ("native", "upcast"):
        return forced
    return "upcast" if triton_interpreting() else "native"


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


class _Chunks(NamedTuple):
    """Where the chunks of a batch or a pack lie: the kernels' CU, CHUNK_STARTS and CHUNKS arguments
    (None for a batch), the chunks per head, and how many sequences (states) per head."""

    cu: torch.Tensor | None  # (S + 1,) int32 token offsets
    starts: torch.Tensor | None  # (S + 1,) int32: where each sequence's chunks start
    table: torch.Tensor | None  # (chunks, 2) int32: (sequence, chunk within it) of every chunk
    count: int
    sequences: int

    def args(self) -> tuple:
        return self.cu, self.starts, self.table


def _chunks(n: int, batch: int, chunk_size: int, seqlens, device) -> _Chunks:
    """A batch's chunks (every (batch, head) row one sequence of n tokens), or a pack's: sequence s holds
    tokens seqlens[s]:seqlens[s + 1] and chunks of its own, built on the host, one copy."""
    if seqlens is None:
        return _Chunks(None, None, None, triton.cdiv(n, chunk_size), batch)
    cu = torch.tensor(seqlens, dtype=torch.int64)
    per_sequence = (cu[1:] - cu[:-1] + chunk_size - 1) // chunk_size
    starts = torch.cat([per_sequence.new_zeros(1), torch.cumsum(per_sequence, 0)])
    sequence = torch.repeat_interleave(torch.arange(len(per_sequence)), per_sequence)
    table = torch.stack([sequence, torch.arange(len(sequence)) - starts[sequence]], dim=1)
    host = torch.cat([cu, starts, table.flatten()]).to(torch.int32)
    cu_d, starts_d, table_d = host.to(device).split([len(cu), len(starts), table.numel()])
    return _Chunks(cu_d, starts_d, table_d, len(sequence), len(per_sequence))


def chunk_linear_fwd(q, k, v, g, initial_state, *, scale: float, causal: bool, chunk_size: int, seqlens=None):
    """q (B, Hq, N, K); k (B, Hk, N, K); v (B, Hk, N, V); g (B, Hk, N, K) | None; initial_state
    (B, Hk, K, V) | None; Hq a multiple of Hk (GQA). Returns out (B, Hq, N, V) fp32, chunk_states
    (B, Hk, NT, K, V) fp32 (None when non-causal: every chunk reads the final state) and the final state
    (B, Hk, K, V) fp32. `seqlens`: None, or a pack's S + 1 token offsets (B = 1, python ints): every
    sequence starts from its own state, initial_state and the final state are (S, Hk, K, V), one
    launch per pass for the whole pack (NT: every sequence's chunks)."""
    B, Hq, N, K = q.shape
    Hk, V = k.shape[1], v.shape[-1]
    q, k, v, g = _flat(q), _flat(k), _flat(v), _flat(g)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    chunks = _chunks(N, B, chunk_size, seqlens, q.device)
    BK, BV = _tiles(K, V, g is not None)
    chunk_states = new_output((B, Hk, chunks.count, K, V), torch.float32, q.device) if causal else None
    final = new_output((chunks.sequences, Hk, K, V), torch.float32, q.device)
    out = new_output((B, Hq, N, V), torch.float32, q.device)
    if chunks.count == 0:  # a pack of empty sequences: every state is its initial one
        final.copy_(torch.zeros_like(final) if h0 is None else h0)
        return out, chunk_states, final
    common = dict(BT=chunk_size, BK=BK, BV=BV, GATED=g is not None, VARLEN=seqlens is not None,
                  PRECISION=_dot_precision(q.dtype))
    _states_fwd[(triton.cdiv(K, BK), triton.cdiv(V, BV), chunks.sequences * Hk)](
        k, v, g, h0, chunk_states, final, chunks.cu, chunks.starts, N, K, V, chunks.count, Hk,
        HAS_INITIAL=h0 is not None, STORE_CHUNKS=causal, **common)
    _output_fwd[(triton.cdiv(V, BV), chunks.count, B * Hq)](
        q, k, v, g, chunk_states if causal else final, out, *chunks.args(), scale, N, K, V, chunks.count, Hq // Hk,
        Hk, CAUSAL=causal, **common)
    return out, chunk_states, final


def chunk_linear_bwd(q, k, v, g, chunk_states, final_state, do, dfinal, *, scale: float, causal: bool,
                     chunk_size: int, seqlens=None):
    """Gradients (dq (B, Hq, N, K), dk, dv, dh0 (per kv head)), all fp32, of `chunk_linear_fwd` for do
    (B, Hq, N, V) and dfinal (B, Hk, K, V) | None; `seqlens` as chunk_linear_fwd's (dfinal and dh0 are
    then (S, Hk, K, V))."""
    B, Hq, N, K = q.shape
    Hk, V = k.shape[1], v.shape[-1]
    q, k, v, g, do = _flat(q), _flat(k), _flat(v), _flat(g), _flat(do)
    dfinal = None if dfinal is None else dfinal.float().contiguous()
    chunks = _chunks(N, B, chunk_size, seqlens, q.device)
    BK, BV = _tiles(K, V, g is not None)
    dstates = new_output((B, Hk, chunks.count, K, V), torch.float32, q.device) if causal else None
    dh0 = new_output((chunks.sequences, Hk, K, V), torch.float32, q.device)
    dq = new_output((B, Hq, N, K), torch.float32, q.device)
    dk = new_output((B, Hk, N, K), torch.float32, q.device)
    dv = new_output((B, Hk, N, V), torch.float32, q.device)
    if chunks.count == 0:  # a pack of empty sequences: the final states are the initial ones
        dh0.copy_(torch.zeros_like(dh0) if dfinal is None else dfinal)
        return dq, dk, dv, dh0
    common = dict(BT=chunk_size, BK=BK, BV=BV, GATED=g is not None, VARLEN=seqlens is not None,
                  PRECISION=_dot_precision(q.dtype))
    group = Hq // Hk
    _states_bwd[(triton.cdiv(K, BK), triton.cdiv(V, BV), chunks.sequences * Hk)](
        q, g, do, dfinal, dstates, dh0, chunks.cu, chunks.starts, scale, N, K, V, chunks.count, group, Hk,
        HAS_DFINAL=dfinal is not None, STORE_CHUNKS=causal, **common)
    states, dstates = (chunk_states, dstates) if causal else (final_state, dh0)
    _dqk_bwd[(triton.cdiv(K, BK), chunks.count, B * Hk)](
        q, k, v, g, states, dstates, do, dq, dk, *chunks.args(), scale, N, K, V, chunks.count, group, Hk,
        CAUSAL=causal, **common)
    _dv_bwd[(triton.cdiv(V, BV), chunks.count, B * Hk)](
        q, k, g, dstates, do, dv, *chunks.args(), scale, N, K, V, chunks.count, group, Hk, CAUSAL=causal, **common)
    return dq, dk, dv, dh0
