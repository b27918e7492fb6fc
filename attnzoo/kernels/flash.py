"""FlashAttention-2 forward and backward in Triton, dense or block-sparse.

One kernel family serves every exact and block-sparse method:
- forward: grid (query tiles, B * Hq); online softmax in base 2 (exp2, scores pre-multiplied by
  log2 e); the logsumexp is saved for the backward;
- backward: delta = rowsum(dO * O); dQ per query tile (grid like the forward); dK/dV per key tile
  with grid (key tiles, B * Hk), looping over the query heads of its GQA group so that the group's
  gradient is reduced in registers (no atomics, no repeated k/v);
- masking: query i sees key j iff -left <= j - i - (M - N) <= right (bottom-right aligned; causal is
  right = 0). Dense calls visit a contiguous range of key tiles split into unmasked tiles and masked
  edge tiles (diagonal, window edge, ragged tail). Sparse calls visit the tiles of the key blocks
  listed in a `SparseIndex`, whose *full* blocks run unmasked and *partial* blocks masked; the dK/dV
  pass walks the transposed lists;
- rows that see no key produce 0 and lse = -inf, and get zero gradients;
- bias (HAS_BIAS): an additive (B|1, HQ|1, N|1, M|1) tensor, loaded tile by tile next to each score
  tile (broadcast dimensions have stride 0, so it is never expanded); its gradient dS is added by the
  dQ pass into an fp32 buffer of the bias's own shape (BIAS_GRAD, atomics: broadcast entries gather
  the sum of many pairs). Sinks need nothing here: ops/flash.py merges them by the logsumexp.

Every pass has three levels, like `_attn_fwd_inner` in Triton's fused-attention tutorial: a *tile*
helper (the loop body: one key tile, or one query tile for dK/dV), a *span* helper that owns the loop
over a contiguous range of tiles, and a *listed* helper that owns the loop over the blocks of one
sparse list (each block cut into tiles). A kernel reads: prologue (offsets, loads, accumulators);
two listed calls (sparse: full blocks unmasked, partial blocks masked) or three span calls (dense:
masked edge, unmasked middle, masked edge); epilogue (normalise, store).

    _flash_fwd_kernel    _fwd_listed | _fwd_span      over _fwd_tile
    _flash_dq_kernel     _dq_listed | _dq_span        over _dq_tile
    _flash_dkdv_kernel   _dkdv_listed | _dkdv_span    over _dkdv_tile   (inside the GQA group loop)

Helper arguments come in one order: the accumulators, where to go (tile range, or the list's count
and index pointers), MASKED, then the same context for every call of the pass.

Shapes at the boundary: q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv), any strides;
o (B, Hq, N, Dv) in q's dtype; lse and delta (B, Hq, N) fp32 contiguous. Offsets are 64-bit.

Packs (VARLEN; docs/varlen.md): B = 1 and the sequences lie end to end. Each program first finds its
sequence and tile in a precomputed tile table (`_tile_of`), moves its q / k / v / o / lse / bias
pointers to the sequence's first row and key, and from then on runs as a batch program on that
sequence's N_s x M_s (bottom-right alignment, windows and block grids per sequence); the sparse index
has one row of lists per sequence. One launch per pass serves every sequence.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import (LN2, LOG2E, _add_rows, _dot, _head, _load_row_stats, _load_rows, _masked_pv, _online_softmax,
                      _partner_tiles, _scores_log2, _softcap_grad, _store_rows, _tile_of, _visible)
from ._config import (dot_precision, fixed_tile, interpret_tile, new_output, next_pow2, pack_tiles, prune_for_device,
                      triton_interpreting)


@triton.jit
def _index_row(b, h, block, stride_cb, stride_ch, stride_cr, stride_ib, stride_ih, stride_ir):
    """Offsets of the sparse index row of (b, h, block): into a count tensor (B, H, n_blocks) and into
    an index tensor (B, H, n_blocks, max_count); broadcast dimensions have stride 0."""
    count = b * stride_cb + h * stride_ch + block * stride_cr
    lists = b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + block * stride_ir
    return count, lists


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_kv(X, start, rows, stride_row, n_rows, cols, stride_col, n_cols, TMA: tl.constexpr):
    """Rows [start, +len(rows)) of a key / value head: through its tensor descriptor (TMA: the copy
    engine loads the tile and zero-fills outside [0, n_rows) x [0, n_cols)), else as _load_rows."""
    if TMA:
        tile = X.load([start, 0])
    else:
        tile = _load_rows(X, rows, stride_row, n_rows, cols, stride_col, n_cols)
    return tile


@triton.jit
def _fwd_tile(acc, row_sum, row_max, start_n, MASKED: tl.constexpr,
              q, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
              diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
              BIAS_GRAD: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """One key tile of the online softmax: update (acc, row_sum, row_max) with keys [start_n, +BLOCK_N).
    acc (BLOCK_M, BLOCK_DV), row_sum and row_max (BLOCK_M,) fp32; q (BLOCK_M, BLOCK_D)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_kv(K, start_n, offs_n, stride_kn, M, offs_d, stride_kd, D, TMA)  # (BLOCK_N, BLOCK_D)
    s = _scores_log2(_dot(q, tl.trans(k), PRECISION), scale, softcap, HAS_SOFTCAP)  # (BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        s += _load_rows(BIAS, offs_m, stride_zn, N, offs_n, stride_zm, M).to(tl.float32) * LOG2E
    if MASKED:
        keep = _visible(offs_m[:, None], offs_n[None, :], M, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(keep, s, float("-inf"))
    p, alpha, row_max = _online_softmax(s, row_max, MASKED)  # only a masked tile can leave a row empty
    v = _load_kv(V, start_n, offs_n, stride_vn, M, offs_dv, stride_vd, DV, TMA)  # (BLOCK_N, BLOCK_DV)
    if MASKED:  # a masked key's NaN / inf value must not reach the rows that do not see it
        acc = _masked_pv(acc * alpha[:, None], p, v, keep, PRECISION)
    else:
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, row_sum * alpha + tl.sum(p, 1), row_max


@triton.jit
def _fwd_span(acc, row_sum, row_max, tile_lo, tile_hi, MASKED: tl.constexpr,
              q, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
              diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
              BIAS_GRAD: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """_fwd_tile over the key tiles [tile_lo, tile_hi), i.e. keys [tile_lo * BLOCK_N, tile_hi * BLOCK_N)."""
    for t in range(tile_lo, tile_hi):
        acc, row_sum, row_max = _fwd_tile(
            acc, row_sum, row_max, t * BLOCK_N, MASKED,
            q, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, BLOCK_N, PRECISION, TMA)
    return acc, row_sum, row_max


@triton.jit
def _fwd_listed(acc, row_sum, row_max, COUNT, INDEX, MASKED: tl.constexpr,
                q, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
                diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
                SPARSE_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """_fwd_tile over the *COUNT key blocks listed at INDEX, each SPARSE_K keys (SPARSE_K // BLOCK_N tiles)."""
    for i in range(tl.load(COUNT)):
        key_block = tl.load(INDEX + i)
        for t in tl.static_range(SPARSE_K // BLOCK_N):
            acc, row_sum, row_max = _fwd_tile(
                acc, row_sum, row_max, key_block * SPARSE_K + t * BLOCK_N, MASKED,
                q, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
                diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
                HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, BLOCK_N,
                PRECISION, TMA)
    return acc, row_sum, row_max


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    COUNT_FULL, INDEX_FULL, COUNT_PART, INDEX_PART,  # sparse index (unused when SPARSE_Q == 0)
    stride_cb, stride_ch, stride_cr, stride_ib, stride_ih, stride_ir,
    BIAS, DBIAS, stride_zb, stride_zh, stride_zn, stride_zm,  # additive bias (B|1, HQ|1, N|1, M|1) (HAS_BIAS)
    TILES, TILE_BASE, CU_Q, CU_K,  # a pack's query tile table and offsets (VARLEN, see _tile_of)
    HQ, N, M, D, DV, GROUP, scale, softcap, window_left, window_right, TUNE_N, TUNE_M,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, VARLEN: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    # q (B, HQ, N, D), k (B, HQ // GROUP, M, D), v (B, HQ // GROUP, M, DV) -> o (B, HQ, N, DV), lse (B, HQ, N)
    # (a pack: B = 1, N and M the packed lengths, sequence s its rows CU_Q[s]:CU_Q[s + 1] and keys by CU_K)
    # TMA (Hopper): q, k, v tiles come through device-side tensor descriptors of their (b, h) head
    # (unit last stride, 16-byte aligned rows; the launcher checks), pipelined by the copy engine.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    seq, start_m, q0, k0, n_q, n_k = _tile_of(pid_m, TILES, TILE_BASE, CU_Q, CU_K, N, M, VARLEN, BLOCK_M)
    LSE += pid_bh.to(tl.int64) * N + q0
    N, M = n_q, n_k  # from here on the lengths of this program's sequence
    Q = _head(Q, b, h, stride_qb, stride_qh) + q0 * stride_qn
    O = _head(O, b, h, stride_ob, stride_oh) + q0 * stride_on
    K = _head(K, b, h // GROUP, stride_kb, stride_kh) + k0 * stride_kn
    V = _head(V, b, h // GROUP, stride_vb, stride_vh) + k0 * stride_vn
    if HAS_BIAS:
        BIAS = _head(BIAS, b, h, stride_zb, stride_zh) + q0 * stride_zn + k0 * stride_zm
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if TMA:
        K = tl.make_tensor_descriptor(K, shape=[M, D], strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
        V = tl.make_tensor_descriptor(V, shape=[M, DV], strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_DV])
        q_desc = tl.make_tensor_descriptor(Q, shape=[N, D], strides=[stride_qn, 1], block_shape=[BLOCK_M, BLOCK_D])
        q = q_desc.load([start_m, 0])
    else:
        q = _load_rows(Q, offs_m, stride_qn, N, offs_d, stride_qd, D)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    diag = M - N

    if SPARSE_Q > 0:  # the listed key blocks: full ones unmasked, then partial ones masked
        count, lists = _index_row(b + seq, h, start_m // SPARSE_Q, stride_cb, stride_ch, stride_cr,
                                  stride_ib, stride_ih, stride_ir)
        acc, row_sum, row_max = _fwd_listed(
            acc, row_sum, row_max, COUNT_FULL + count, INDEX_FULL + lists, False,
            q, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, SPARSE_K, BLOCK_N,
            PRECISION, TMA)
        acc, row_sum, row_max = _fwd_listed(
            acc, row_sum, row_max, COUNT_PART + count, INDEX_PART + lists, True,
            q, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, SPARSE_K, BLOCK_N,
            PRECISION, TMA)
    else:  # the key tiles the window lets these rows see: masked edge, unmasked middle, masked edge
        t_lo, t_full_lo, t_full_hi, t_hi = _partner_tiles(
            start_m, tl.minimum(start_m + BLOCK_M, N) - 1, M, diag - window_left, diag + window_right,
            HAS_LEFT, HAS_RIGHT, BLOCK_N)
        acc, row_sum, row_max = _fwd_span(
            acc, row_sum, row_max, t_lo, t_full_lo, True,
            q, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, BLOCK_N, PRECISION, TMA)
        acc, row_sum, row_max = _fwd_span(
            acc, row_sum, row_max, t_full_lo, t_full_hi, False,
            q, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, BLOCK_N, PRECISION, TMA)
        acc, row_sum, row_max = _fwd_span(
            acc, row_sum, row_max, t_full_hi, t_hi, True,
            q, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, BLOCK_N, PRECISION, TMA)

    empty = row_sum == 0.0  # rows that saw no key: o = 0, lse = -inf
    out = acc / tl.where(empty, 1.0, row_sum)[:, None]
    lse = tl.where(empty, float("-inf"), (row_max + tl.log2(tl.where(empty, 1.0, row_sum))) * LN2)
    _store_rows(O, out, offs_m, stride_on, N, offs_dv, stride_od, DV)
    tl.store(LSE + offs_m, lse, mask=offs_m < N)


# ----------------------------------------------------------------------------------------------
# Backward: delta, then dQ (per query tile) and dK/dV (per key tile)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_od,
                  stride_dob, stride_doh, stride_don, stride_dod, HQ, N, DV,
                  BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    # o, do (B, HQ, N, DV) -> delta (B, HQ, N) = rowsum(do * o) in fp32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_rows(_head(O, b, h, stride_ob, stride_oh), offs_m, stride_on, N, offs_dv, stride_od, DV)
    do = _load_rows(_head(DO, b, h, stride_dob, stride_doh), offs_m, stride_don, N, offs_dv, stride_dod, DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _dq_tile(dq, start_n, MASKED: tl.constexpr,
             q, do, lse2, delta, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
             diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
             BIAS_GRAD: tl.constexpr,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS k for keys [start_n, +BLOCK_N), probabilities recomputed from the saved lse.
    dq (BLOCK_M, BLOCK_D) fp32; q (BLOCK_M, BLOCK_D), do (BLOCK_M, BLOCK_DV); lse2, delta (BLOCK_M,)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, offs_n, stride_kn, M, offs_d, stride_kd, D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V, offs_n, stride_vn, M, offs_dv, stride_vd, DV)  # (BLOCK_N, BLOCK_DV)
    qk = _dot(q, tl.trans(k), PRECISION)  # (BLOCK_M, BLOCK_N)
    s = _scores_log2(qk, scale, softcap, HAS_SOFTCAP)
    if HAS_BIAS:
        s += _load_rows(BIAS, offs_m, stride_zn, N, offs_n, stride_zm, M).to(tl.float32) * LOG2E
    if MASKED:
        keep = _visible(offs_m[:, None], offs_n[None, :], M, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(keep, s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    dp = _dot(do, tl.trans(v), PRECISION)
    ds = p * (dp - delta[:, None])
    if BIAS_GRAD:  # d loss / d bias = ds; programs of broadcast rows / heads / batches add to one entry
        _add_rows(DBIAS, ds, offs_m, stride_zn, N, offs_n, stride_zm, M)
    if HAS_SOFTCAP:
        ds = ds * _softcap_grad(qk, scale, softcap)
    return dq + _dot(ds.to(k.dtype), k, PRECISION)


@triton.jit
def _dq_span(dq, tile_lo, tile_hi, MASKED: tl.constexpr,
             q, do, lse2, delta, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
             diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
             BIAS_GRAD: tl.constexpr,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """_dq_tile over the key tiles [tile_lo, tile_hi)."""
    for t in range(tile_lo, tile_hi):
        dq = _dq_tile(
            dq, t * BLOCK_N, MASKED,
            q, do, lse2, delta, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, BLOCK_N, PRECISION)
    return dq


@triton.jit
def _dq_listed(dq, COUNT, INDEX, MASKED: tl.constexpr,
               q, do, lse2, delta, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M,
               D, DV,
               diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
               BIAS_GRAD: tl.constexpr,
               SPARSE_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """_dq_tile over the *COUNT key blocks listed at INDEX, each SPARSE_K // BLOCK_N tiles."""
    for i in range(tl.load(COUNT)):
        key_block = tl.load(INDEX + i)
        for t in tl.static_range(SPARSE_K // BLOCK_N):
            dq = _dq_tile(
                dq, key_block * SPARSE_K + t * BLOCK_N, MASKED,
                q, do, lse2, delta, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv,
                M, D, DV, diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD,
                BLOCK_N, PRECISION)
    return dq


@triton.jit
def _flash_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    COUNT_FULL, INDEX_FULL, COUNT_PART, INDEX_PART,
    stride_cb, stride_ch, stride_cr, stride_ib, stride_ih, stride_ir,
    BIAS, DBIAS, stride_zb, stride_zh, stride_zn, stride_zm,  # bias and its fp32 gradient (BIAS_GRAD), same strides
    TILES, TILE_BASE, CU_Q, CU_K,  # a pack's query tile table and offsets (VARLEN, see _tile_of)
    HQ, N, M, D, DV, GROUP, scale, softcap, window_left, window_right, TUNE_N, TUNE_M,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, VARLEN: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # q, do (B, HQ, N, D|DV), k, v (B, HQ // GROUP, M, D|DV), lse, delta (B, HQ, N) -> dq (B, HQ, N, D)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    seq, start_m, q0, k0, n_q, n_k = _tile_of(pid_m, TILES, TILE_BASE, CU_Q, CU_K, N, M, VARLEN, BLOCK_M)
    LSE += pid_bh.to(tl.int64) * N + q0
    DELTA += pid_bh.to(tl.int64) * N + q0
    N, M = n_q, n_k  # from here on the lengths of this program's sequence
    K = _head(K, b, h // GROUP, stride_kb, stride_kh) + k0 * stride_kn
    V = _head(V, b, h // GROUP, stride_vb, stride_vh) + k0 * stride_vn
    if HAS_BIAS:
        BIAS = _head(BIAS, b, h, stride_zb, stride_zh) + q0 * stride_zn + k0 * stride_zm
    if BIAS_GRAD:
        DBIAS = _head(DBIAS, b, h, stride_zb, stride_zh) + q0 * stride_zn + k0 * stride_zm
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(_head(Q, b, h, stride_qb, stride_qh) + q0 * stride_qn, offs_m, stride_qn, N, offs_d, stride_qd, D)
    do = _load_rows(_head(DO, b, h, stride_dob, stride_doh) + q0 * stride_don, offs_m, stride_don, N, offs_dv,
                    stride_dod, DV)
    lse2, delta = _load_row_stats(LSE, DELTA, offs_m, N)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    diag = M - N

    if SPARSE_Q > 0:  # the listed key blocks: full ones unmasked, then partial ones masked
        count, lists = _index_row(b + seq, h, start_m // SPARSE_Q, stride_cb, stride_ch, stride_cr,
                                  stride_ib, stride_ih, stride_ir)
        dq = _dq_listed(
            dq, COUNT_FULL + count, INDEX_FULL + lists, False,
            q, do, lse2, delta, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, SPARSE_K, BLOCK_N,
            PRECISION)
        dq = _dq_listed(
            dq, COUNT_PART + count, INDEX_PART + lists, True,
            q, do, lse2, delta, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, SPARSE_K, BLOCK_N,
            PRECISION)
    else:  # the key tiles the window lets these rows see: masked edge, unmasked middle, masked edge
        t_lo, t_full_lo, t_full_hi, t_hi = _partner_tiles(
            start_m, tl.minimum(start_m + BLOCK_M, N) - 1, M, diag - window_left, diag + window_right,
            HAS_LEFT, HAS_RIGHT, BLOCK_N)
        dq = _dq_span(
            dq, t_lo, t_full_lo, True,
            q, do, lse2, delta, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, BLOCK_N, PRECISION)
        dq = _dq_span(
            dq, t_full_lo, t_full_hi, False,
            q, do, lse2, delta, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, BLOCK_N, PRECISION)
        dq = _dq_span(
            dq, t_full_hi, t_hi, True,
            q, do, lse2, delta, offs_m, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_dv, M, D, DV,
            diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, N, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, BLOCK_N, PRECISION)

    _store_rows(_head(DQ, b, h, stride_dqb, stride_dqh) + q0 * stride_dqn, dq * scale, offs_m, stride_dqn, N, offs_d,
                stride_dqd, D)


@triton.jit
def _dkdv_tile(dk, dv, start_m, MASKED: tl.constexpr,
               k, v, offs_n, Q, DO, LSE, DELTA, stride_qn, stride_qd, stride_don, stride_dod, offs_d, offs_dv, N,
               D, DV,
               M, diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
               BIAS_GRAD: tl.constexpr,
               BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """dk += dS^T q, dv += P^T do for queries [start_m, +BLOCK_M), computed transposed (keys x queries).
    dk (BLOCK_N, BLOCK_D), dv (BLOCK_N, BLOCK_DV) fp32; k (BLOCK_N, BLOCK_D), v (BLOCK_N, BLOCK_DV);
    Q, DO, LSE, DELTA point at the query head being summed."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, offs_m, stride_qn, N, offs_d, stride_qd, D)  # (BLOCK_M, BLOCK_D)
    do = _load_rows(DO, offs_m, stride_don, N, offs_dv, stride_dod, DV)  # (BLOCK_M, BLOCK_DV)
    lse2, delta = _load_row_stats(LSE, DELTA, offs_m, N)  # (BLOCK_M,)
    qk_t = _dot(k, tl.trans(q), PRECISION)  # (BLOCK_N, BLOCK_M)
    s_t = _scores_log2(qk_t, scale, softcap, HAS_SOFTCAP)
    if HAS_BIAS:
        s_t += _load_rows(BIAS, offs_n, stride_zm, M, offs_m, stride_zn, N).to(tl.float32) * LOG2E
    if MASKED:
        keep = _visible(offs_m[None, :], offs_n[:, None], M, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s_t = tl.where(keep, s_t, float("-inf"))
    p_t = tl.exp2(s_t - lse2[None, :])
    dv += _dot(p_t.to(do.dtype), do, PRECISION)
    dp_t = _dot(v, tl.trans(do), PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:
        ds_t = ds_t * _softcap_grad(qk_t, scale, softcap)
    return dk + _dot(ds_t.to(q.dtype), q, PRECISION), dv


@triton.jit
def _dkdv_span(dk, dv, tile_lo, tile_hi, MASKED: tl.constexpr,
               k, v, offs_n, Q, DO, LSE, DELTA, stride_qn, stride_qd, stride_don, stride_dod, offs_d, offs_dv, N,
               D, DV,
               M, diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
               BIAS_GRAD: tl.constexpr,
               BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """_dkdv_tile over the query tiles [tile_lo, tile_hi)."""
    for t in range(tile_lo, tile_hi):
        dk, dv = _dkdv_tile(
            dk, dv, t * BLOCK_M, MASKED,
            k, v, offs_n, Q, DO, LSE, DELTA, stride_qn, stride_qd, stride_don, stride_dod, offs_d, offs_dv, N, D, DV,
            M, diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm, HAS_LEFT,
            HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD, BLOCK_M, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_listed(dk, dv, COUNT, INDEX, MASKED: tl.constexpr,
                 k, v, offs_n, Q, DO, LSE, DELTA, stride_qn, stride_qd, stride_don, stride_dod, offs_d, offs_dv,
                 N, D, DV, M, diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
                 SPARSE_Q: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """_dkdv_tile over the *COUNT query blocks listed at INDEX, each SPARSE_Q // BLOCK_M tiles."""
    for i in range(tl.load(COUNT)):
        query_block = tl.load(INDEX + i)
        for t in tl.static_range(SPARSE_Q // BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, query_block * SPARSE_Q + t * BLOCK_M, MASKED,
                k, v, offs_n, Q, DO, LSE, DELTA, stride_qn, stride_qd, stride_don, stride_dod, offs_d, offs_dv,
                N, D, DV, M, diag, window_left, window_right, scale, softcap, BIAS, DBIAS, stride_zn, stride_zm,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD,
                BLOCK_M, PRECISION)
    return dk, dv


@triton.jit
def _flash_dkdv_kernel(
    Q, K, V, DO, DK, DV_OUT, LSE, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    COUNT_FULL, INDEX_FULL, COUNT_PART, INDEX_PART,  # transposed sparse index: per key block, query blocks
    stride_cb, stride_ch, stride_cr, stride_ib, stride_ih, stride_ir,
    BIAS, DBIAS, stride_zb, stride_zh, stride_zn, stride_zm,  # bias (DBIAS unused: dQ's pass writes it)
    TILES, TILE_BASE, CU_Q, CU_K,  # a pack's key tile table and offsets (VARLEN, see _tile_of)
    HQ, HK, N, M, D, DV, GROUP, scale, softcap, window_left, window_right, TUNE_N, TUNE_M,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, VARLEN: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # q, do (B, HQ, N, D|DV), k, v (B, HK, M, D|DV) -> dk, dv (B, HK, M, D|DV), summed over the GQA group
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HK
    kvh = pid_bh % HK
    seq, start_n, k0, q0, n_k, n_q = _tile_of(pid_n, TILES, TILE_BASE, CU_K, CU_Q, M, N, VARLEN, BLOCK_N)
    stats_stride = N  # lse, delta (B, HQ, N): rows of the whole pack
    N, M = n_q, n_k  # from here on the lengths of this program's sequence
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(_head(K, b, kvh, stride_kb, stride_kh) + k0 * stride_kn, offs_n, stride_kn, M, offs_d, stride_kd, D)
    v = _load_rows(_head(V, b, kvh, stride_vb, stride_vh) + k0 * stride_vn, offs_n, stride_vn, M, offs_dv, stride_vd,
                   DV)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    diag = M - N

    for g in range(GROUP):  # the query heads that share this kv head
        h = kvh * GROUP + g
        Qh = _head(Q, b, h, stride_qb, stride_qh) + q0 * stride_qn
        DOh = _head(DO, b, h, stride_dob, stride_doh) + q0 * stride_don
        LSEh = LSE + (b * HQ + h).to(tl.int64) * stats_stride + q0
        DELTAh = DELTA + (b * HQ + h).to(tl.int64) * stats_stride + q0
        BIASh = BIAS
        if HAS_BIAS:
            BIASh = _head(BIAS, b, h, stride_zb, stride_zh) + q0 * stride_zn + k0 * stride_zm
        if SPARSE_Q > 0:  # the listed query blocks: full ones unmasked, then partial ones masked
            count, lists = _index_row(b + seq, h, start_n // SPARSE_K, stride_cb, stride_ch, stride_cr,
                                      stride_ib, stride_ih, stride_ir)
            dk, dv = _dkdv_listed(
                dk, dv, COUNT_FULL + count, INDEX_FULL + lists, False,
                k, v, offs_n, Qh, DOh, LSEh, DELTAh, stride_qn, stride_qd, stride_don, stride_dod, offs_d, offs_dv,
                N, D, DV, M, diag, window_left, window_right, scale, softcap, BIASh, DBIAS, stride_zn, stride_zm,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD,
                SPARSE_Q, BLOCK_M, PRECISION)
            dk, dv = _dkdv_listed(
                dk, dv, COUNT_PART + count, INDEX_PART + lists, True,
                k, v, offs_n, Qh, DOh, LSEh, DELTAh, stride_qn, stride_qd, stride_don, stride_dod, offs_d, offs_dv,
                N, D, DV, M, diag, window_left, window_right, scale, softcap, BIASh, DBIAS, stride_zn, stride_zm,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD,
                SPARSE_Q, BLOCK_M, PRECISION)
        else:  # the query tiles that see these keys (j - diag - right <= i <= j - diag + left)
            t_lo, t_full_lo, t_full_hi, t_hi = _partner_tiles(
                start_n, tl.minimum(start_n + BLOCK_N, M) - 1, N, -diag - window_right, -diag + window_left,
                HAS_RIGHT, HAS_LEFT, BLOCK_M)
            dk, dv = _dkdv_span(
                dk, dv, t_lo, t_full_lo, True,
                k, v, offs_n, Qh, DOh, LSEh, DELTAh, stride_qn, stride_qd, stride_don, stride_dod, offs_d, offs_dv,
                N, D, DV, M, diag, window_left, window_right, scale, softcap, BIASh, DBIAS, stride_zn, stride_zm,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD,
                BLOCK_M, PRECISION)
            dk, dv = _dkdv_span(
                dk, dv, t_full_lo, t_full_hi, False,
                k, v, offs_n, Qh, DOh, LSEh, DELTAh, stride_qn, stride_qd, stride_don, stride_dod, offs_d, offs_dv,
                N, D, DV, M, diag, window_left, window_right, scale, softcap, BIASh, DBIAS, stride_zn, stride_zm,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD,
                BLOCK_M, PRECISION)
            dk, dv = _dkdv_span(
                dk, dv, t_full_hi, t_hi, True,
                k, v, offs_n, Qh, DOh, LSEh, DELTAh, stride_qn, stride_qd, stride_don, stride_dod, offs_d, offs_dv,
                N, D, DV, M, diag, window_left, window_right, scale, softcap, BIASh, DBIAS, stride_zn, stride_zm,
                HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_BIAS, BIAS_GRAD,
                BLOCK_M, PRECISION)

    _store_rows(_head(DK, b, kvh, stride_dkb, stride_dkh) + k0 * stride_dkn, dk * scale, offs_n, stride_dkn, M, offs_d,
                stride_dkd, D)
    _store_rows(_head(DV_OUT, b, kvh, stride_dvb, stride_dvh) + k0 * stride_dvn, dv, offs_n, stride_dvn, M, offs_dv,
                stride_dvd, DV)


# ----------------------------------------------------------------------------------------------
# Autotuning (CUDA) and launchers
# ----------------------------------------------------------------------------------------------

_TUNE_KEY = ["TUNE_N", "TUNE_M", "BLOCK_D", "BLOCK_DV", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_BIAS",
             "BIAS_GRAD", "VARLEN", "SPARSE_Q", "SPARSE_K", "TMA"]


def _autotuned(kernel, kind, shapes):
    """`kernel` autotuned over (BLOCK_M, BLOCK_N, num_warps, num_stages) configs, pruned before any
    compile by prune_for_device: with a sparse index, only the configs whose tiles divide the sparse
    blocks (prune_for_sparse); then only those that fit the device's shared memory and do not spill
    on its architecture and head dim (the static table of scripts/kernel_report.py)."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]
    key = [name for name in _TUNE_KEY if name in kernel.arg_names]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune_for_device(kind)})(kernel)


# The candidate lists; which of them a device keeps is in benchmarks/results/static/kernels.md.
_flash_fwd_tuned = _autotuned(_flash_fwd_kernel, "fwd", [
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
    (32, 32, 4, 3), (16, 16, 2, 2)])
_flash_dq_tuned = _autotuned(_flash_dq_kernel, "dq", [
    (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 2, 2)])
_flash_dkdv_tuned = _autotuned(_flash_dkdv_kernel, "dkdv", [  # (32, 64, 8, 2), (16, 64, 4, 2): D128 without spills
    (64, 128, 8, 2), (64, 64, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 8, 2), (32, 64, 4, 3), (16, 64, 4, 2),
    (32, 32, 4, 2), (16, 16, 2, 2)])
TUNED = {"fwd": _flash_fwd_tuned, "dq": _flash_dq_tuned, "dkdv": _flash_dkdv_tuned}
TMA_CONFIGS = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
c.num_stages) for c in _flash_fwd_tuned.configs]


def _interpreted_tile(meta) -> int:
    """The one tile of every pass under the interpreter (see _config.py); it must divide the sparse blocks."""
    blocks = [meta.get(name, 0) for name in ("SPARSE_Q", "SPARSE_K")]
    return min([interpret_tile()] + [b for b in blocks if b])


def _launch(plain, tuned, programs, grid_cols, args, meta, tile_axis: str):
    """Autotuned launch on CUDA; under the interpreter one fixed small tile (see _config.py).
    `tile_axis` names the tile ("BLOCK_M" or "BLOCK_N") of a program; `programs(tile)` is how many
    programs cover the rows with tiles of that size."""
    if programs(min(_tile_sizes(tuned, tile_axis, meta))) == 0:  # no rows (a pack of empty sequences)
        return
    if triton_interpreting():
        tile = _interpreted_tile(meta)
        plain[(programs(tile), grid_cols)](*args, **meta, BLOCK_M=tile, BLOCK_N=tile)
    else:
        tuned[lambda cfg: (programs(cfg[tile_axis]), grid_cols)](*args, **meta)


def _tile_sizes(tuned, axis: str, meta) -> list[int]:
    """The tile sizes a pass may run with: its configs' (CUDA), or the interpreter's one."""
    if triton_interpreting():
        return [_interpreted_tile(meta)]
    return sorted({cfg.kwargs[axis] for cfg in tuned.configs})


def _dense_programs(rows: int):
    return lambda tile: triton.cdiv(rows, tile)


_NO_PACK = (None, None, None, None)


def _index_args(index, transposed: bool) -> tuple:
    """Pointers and (broadcast-aware) strides of the sparse index, or placeholders for a dense call."""
    if index is None:
        return (None, None, None, None, 0, 0, 0, 0, 0, 0)
    if transposed:
        tensors = (index.q_count_full, index.q_index_full, index.q_count_part, index.q_index_part)
    else:
        tensors = (index.kv_count_full, index.kv_index_full, index.kv_count_part, index.kv_index_part)
    count, lists = tensors[0], tensors[1]
    count_strides = tuple(s if n > 1 else 0 for s, n in zip(count.stride(), count.shape))
    list_strides = tuple(s if n > 1 else 0 for s, n in zip(lists.stride()[:3], lists.shape[:3]))
    return tensors + count_strides + list_strides


def _bias_args(bias, dbias=None) -> tuple:
    """The bias pointer, its gradient's (same layout) and their strides, broadcast dimensions 0."""
    if bias is None:
        return (None, None, 0, 0, 0, 0)
    return (bias, dbias, *(st if n > 1 else 0 for st, n in zip(bias.stride(), bias.shape)))


def _common_meta(q, k, v, window, softcap, index, bias=None, seqlens=None):
    left, right = window
    return dict(
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0, HAS_BIAS=bias is not None, BIAS_GRAD=False,
        VARLEN=seqlens is not None,
        SPARSE_Q=0 if index is None else index.block_q, SPARSE_K=0 if index is None else index.block_k,
        BLOCK_D=next_pow2(q.shape[-1]), BLOCK_DV=next_pow2(v.shape[-1]), PRECISION=dot_precision(q.dtype),
    )


def _tune_bucket(x: int) -> int:
    return triton.next_power_of_2(x)


def _tma_ready(*tensors) -> bool:
    """Tensor descriptors can describe these (B, H, rows, D) tensors: unit last stride, every other
    stride and the base address 16-byte aligned, 16-bit elements."""
    for x in tensors:
        if x.dtype not in (torch.float16, torch.bfloat16) or x.stride(-1) != 1 or x.data_ptr() % 16:
            return False
        if any(st * x.element_size() % 16 for st in x.stride()[:-1]):
            return False
    return True


def _tma_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def use_tma(q, k, v) -> bool:
    """The forward's q / k / v tiles come through tensor descriptors (TMA): on Hopper (sm_90) when the
    tensors allow it (_tma_ready). ATTNZOO_FLASH_TMA=0 turns it off, =1 asks for it wherever the
    tensors allow (also under the interpreter, which tests the descriptor path on CPU)."""
    forced = os.environ.get("ATTNZOO_FLASH_TMA", "")
    if forced == "0" or not _tma_ready(q, k, v):
        return False
    if forced == "1":
        return True
    return not triton_interpreting() and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9


def flash_fwd(q, k, v, *, scale: float, window=(-1, -1), softcap: float = 0.0, index=None, bias=None,
              seqlens=None):
    """o (B, Hq, N, Dv) in q's dtype and lse (B, Hq, N) fp32. `index`: a SparseIndex or None (dense);
    `bias`: an additive bias (B|1, Hq|1, N|1, M|1), contiguous, or None. `seqlens`: None, or a pack's
    (q_starts, k_starts) (B = 1, S + 1 offsets each, python ints; the index has one row per
    sequence): one launch for every sequence, each query tile mapped to its sequence by a tile table."""
    B, Hq, N, D = q.shape
    Hk, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    o = new_output((B, Hq, N, Dv), q.dtype, q.device)
    lse = new_output((B, Hq, N), torch.float32, q.device)
    tma = use_tma(q, k, v)
    meta = dict(_common_meta(q, k, v, window, softcap, index, bias, seqlens), TMA=tma)
    tiles = None if seqlens is None else pack_tiles(*seqlens, _tile_sizes(_flash_fwd_tuned, "BLOCK_M", meta),
                                                     q.device)
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *_index_args(index, False),
            *_bias_args(bias), *(_NO_PACK if tiles is None else tiles.args()), Hq, N, M, D, Dv, Hq // Hk, scale,
            softcap, window[0], window[1], _tune_bucket(N), _tune_bucket(M))
    if tma and q.is_cuda and isinstance(triton.runtime._allocation._allocator.get(),
                                        triton.runtime._allocation.NullAllocator):
        triton.set_allocator(_tma_allocator)  # device-side descriptors need a little global scratch
    _launch(_flash_fwd_kernel, _flash_fwd_tuned, _dense_programs(N) if tiles is None else tiles.programs, B * Hq,
            args, meta, "BLOCK_M")
    return o, lse


def flash_bwd(do, q, k, v, o, lse, *, scale: float, window=(-1, -1), softcap: float = 0.0, index=None,
              dlse=None, bias=None, bias_grad: bool = False, seqlens=None):
    """Gradients (dq, dk, dv, dbias) given do (and optionally dlse, the gradient of the returned lse),
    recomputing probabilities from the saved lse. d lse / d s = p, so dlse enters as delta - dlse.
    With `bias_grad`, dbias (fp32, the bias's shape) is summed by the dQ pass; else None. `seqlens` as
    flash_fwd's: the dQ pass tiles each sequence's queries, the dK/dV pass its keys."""
    B, Hq, N, D = q.shape
    Hk, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    delta = new_output((B, Hq, N), torch.float32, q.device)
    delta_tile = fixed_tile(64)
    _delta_kernel[(triton.cdiv(N, delta_tile), B * Hq)](
        o, do, delta, *o.stride(), *do.stride(), Hq, N, Dv, BLOCK_M=delta_tile, BLOCK_DV=next_pow2(Dv))
    if dlse is not None:
        delta -= dlse

    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    dbias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias_grad else None
    meta = _common_meta(q, k, v, window, softcap, index, bias, seqlens)
    shared = (scale, softcap, window[0], window[1], _tune_bucket(N), _tune_bucket(M))
    q_programs, k_programs, q_pack, k_pack = _dense_programs(N), _dense_programs(M), _NO_PACK, _NO_PACK
    if seqlens is not None:
        q_tiles = pack_tiles(*seqlens, _tile_sizes(_flash_dq_tuned, "BLOCK_M", meta), q.device)
        k_tiles = pack_tiles(seqlens[1], seqlens[0], _tile_sizes(_flash_dkdv_tuned, "BLOCK_N", meta), q.device)
        q_programs, k_programs = q_tiles.programs, k_tiles.programs
        q_pack = q_tiles.args()
        k_pack = (k_tiles.table, k_tiles.base, k_tiles.cu_cols, k_tiles.cu_rows)  # the kernel takes CU_Q, CU_K

    _launch(_flash_dq_kernel, _flash_dq_tuned, q_programs, B * Hq,
            (q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
             *_index_args(index, False), *_bias_args(bias, dbias), *q_pack, Hq, N, M, D, Dv, Hq // Hk, *shared),
            dict(meta, BIAS_GRAD=bias_grad), "BLOCK_M")
    _launch(_flash_dkdv_kernel, _flash_dkdv_tuned, k_programs, B * Hk,
            (q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
             *dk.stride(), *dv.stride(), *_index_args(index, True), *_bias_args(bias), *k_pack, Hq, Hk, N, M, D,
             Dv, Hq // Hk, *shared),
            meta, "BLOCK_N")
    return dq, dk, dv, dbias
