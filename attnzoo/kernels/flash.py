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
- rows that see no key produce 0 and lse = -inf, and get zero gradients.

Shapes at the boundary: q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv), any strides;
o (B, Hq, N, Dv) in q's dtype; lse and delta (B, Hq, N) fp32 contiguous. Offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import interpret_tile, new_output, next_pow2, dot_precision, prune_for_sparse, triton_interpreting

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; PRECISION comes from _config.dot_precision."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _visible(rows, cols, M, diag, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Bool tile: key `cols` visible to query `rows` (broadcastable index tensors)."""
    keep = cols < M
    rel = cols - rows - diag
    if HAS_RIGHT:
        keep = keep & (rel <= window_right)
    if HAS_LEFT:
        keep = keep & (rel >= -window_left)
    return keep


@triton.jit
def _partner_tiles(first, last, extent, lo_off, hi_off,
                   HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, TILE: tl.constexpr):
    """Tiles of the other axis seen by rows [first, last], where row x sees [x + lo_off, x + hi_off]
    clipped to [0, extent). Returns tile indices lo <= full_lo <= full_hi <= hi: tiles in
    [full_lo, full_hi) are visible to every row and lie inside `extent`, so they need no mask."""
    lo = 0
    full_lo = 0
    hi = extent
    full_hi = extent
    if HAS_LO:
        lo = tl.maximum(first + lo_off, 0)
        full_lo = tl.maximum(last + lo_off, 0)
    if HAS_HI:
        hi = tl.minimum(tl.maximum(last + hi_off + 1, 0), extent)
        full_hi = tl.minimum(tl.maximum(first + hi_off + 1, 0), extent)
    t_lo = lo // TILE
    t_hi = (hi + TILE - 1) // TILE
    t_full_lo = tl.minimum(tl.maximum((full_lo + TILE - 1) // TILE, t_lo), t_hi)
    t_full_hi = tl.minimum(tl.maximum(full_hi // TILE, t_full_lo), t_hi)
    return t_lo, t_full_lo, t_full_hi, t_hi


@triton.jit
def _scores_log2(qk, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> softmax scores in log2 units (scale, then softcap * tanh(. / softcap))."""
    if HAS_SOFTCAP:
        return softcap * _tanh(qk * (scale / softcap)) * LOG2E
    return qk * (scale * LOG2E)


@triton.jit
def _softcap_grad(qk, scale, softcap):
    """d softcap(x) / dx at x = scale * q.k: 1 - tanh^2."""
    t = _tanh(qk * (scale / softcap))
    return 1.0 - t * t


@triton.jit
def _load_rows(ptr, rows, stride_row, n_rows, cols, stride_col, n_cols):
    """Load a (len(rows), len(cols)) tile, zero outside [0, n_rows) x [0, n_cols)."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tile(acc, row_sum, row_max, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
              start_n, offs_m, offs_d, offs_dv, D, DV, M, diag, window_left, window_right, scale, softcap,
              MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax: update (acc, row_sum, row_max) with keys [start_n, +BLOCK_N)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, offs_n, stride_kn, M, offs_d, stride_kd, D)  # (BLOCK_N, BLOCK_D)
    s = _scores_log2(_dot(q, tl.trans(k), PRECISION), scale, softcap, HAS_SOFTCAP)
    if MASKED:
        keep = _visible(offs_m[:, None], offs_n[None, :], M, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(keep, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing visible yet
    else:
        new_max = tl.maximum(row_max, tl.max(s, 1))
        safe_max = new_max
    p = tl.exp2(s - safe_max[:, None])  # (BLOCK_M, BLOCK_N)
    alpha = tl.exp2(row_max - safe_max)
    v = _load_rows(V, offs_n, stride_vn, M, offs_dv, stride_vd, DV)  # (BLOCK_N, BLOCK_DV)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, row_sum * alpha + tl.sum(p, 1), new_max


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    COUNT_FULL, INDEX_FULL, COUNT_PART, INDEX_PART,  # sparse index (unused when SPARSE_Q == 0)
    stride_cb, stride_ch, stride_cr, stride_ib, stride_ih, stride_ir,
    HQ, N, M, D, DV, GROUP, scale, softcap, window_left, window_right, TUNE_N, TUNE_M,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # q (B, HQ, N, D), k (B, HQ // GROUP, M, D), v (B, HQ // GROUP, M, DV) -> o (B, HQ, N, DV), lse (B, HQ, N)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // GROUP
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q, offs_m, stride_qn, N, offs_d, stride_qd, D)  # (BLOCK_M, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    diag = M - N

    if SPARSE_Q > 0:
        row = b * stride_cb + h * stride_ch + (start_m // SPARSE_Q) * stride_cr
        lists = b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + (start_m // SPARSE_Q) * stride_ir
        for i in range(tl.load(COUNT_FULL + row)):
            key_block = tl.load(INDEX_FULL + lists + i)
            for t in tl.static_range(SPARSE_K // BLOCK_N):
                acc, row_sum, row_max = _fwd_tile(
                    acc, row_sum, row_max, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                    key_block * SPARSE_K + t * BLOCK_N, offs_m, offs_d, offs_dv, D, DV, M, diag,
                    window_left, window_right, scale, softcap,
                    False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, PRECISION)
        for i in range(tl.load(COUNT_PART + row)):
            key_block = tl.load(INDEX_PART + lists + i)
            for t in tl.static_range(SPARSE_K // BLOCK_N):
                acc, row_sum, row_max = _fwd_tile(
                    acc, row_sum, row_max, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                    key_block * SPARSE_K + t * BLOCK_N, offs_m, offs_d, offs_dv, D, DV, M, diag,
                    window_left, window_right, scale, softcap,
                    True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, PRECISION)
    else:
        t_lo, t_full_lo, t_full_hi, t_hi = _partner_tiles(
            start_m, tl.minimum(start_m + BLOCK_M, N) - 1, M, diag - window_left, diag + window_right,
            HAS_LEFT, HAS_RIGHT, BLOCK_N)
        for t in range(t_lo, t_full_lo):
            acc, row_sum, row_max = _fwd_tile(
                acc, row_sum, row_max, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                t * BLOCK_N, offs_m, offs_d, offs_dv, D, DV, M, diag, window_left, window_right, scale, softcap,
                True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, PRECISION)
        for t in range(t_full_lo, t_full_hi):
            acc, row_sum, row_max = _fwd_tile(
                acc, row_sum, row_max, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                t * BLOCK_N, offs_m, offs_d, offs_dv, D, DV, M, diag, window_left, window_right, scale, softcap,
                False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, PRECISION)
        for t in range(t_full_hi, t_hi):
            acc, row_sum, row_max = _fwd_tile(
                acc, row_sum, row_max, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                t * BLOCK_N, offs_m, offs_d, offs_dv, D, DV, M, diag, window_left, window_right, scale, softcap,
                True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, PRECISION)

    empty = row_sum == 0.0
    out = acc / tl.where(empty, 1.0, row_sum)[:, None]
    lse = tl.where(empty, float("-inf"), (row_max + tl.log2(tl.where(empty, 1.0, row_sum))) * LN2)
    tl.store(O + offs_m[:, None].to(tl.int64) * stride_on + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_dv[None, :] < DV))
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)


# ----------------------------------------------------------------------------------------------
# Backward
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
    o = _load_rows(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, offs_m, stride_on, N,
                   offs_dv, stride_od, DV)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, stride_don, N,
                    offs_dv, stride_dod, DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _load_row_stats(LSE, DELTA, offs_m, N):
    """lse in log2 units (+inf for rows that saw nothing or lie past N, so their p is 0) and delta."""
    lse = tl.load(LSE + offs_m, mask=offs_m < N, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return lse2, tl.load(DELTA + offs_m, mask=offs_m < N, other=0.0)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
             start_n, offs_m, offs_d, offs_dv, D, DV, M, diag, window_left, window_right, scale, softcap,
             MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS k for keys [start_n, +BLOCK_N), probabilities recomputed from the saved lse."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, offs_n, stride_kn, M, offs_d, stride_kd, D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V, offs_n, stride_vn, M, offs_dv, stride_vd, DV)  # (BLOCK_N, BLOCK_DV)
    qk = _dot(q, tl.trans(k), PRECISION)  # (BLOCK_M, BLOCK_N)
    s = _scores_log2(qk, scale, softcap, HAS_SOFTCAP)
    if MASKED:
        keep = _visible(offs_m[:, None], offs_n[None, :], M, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(keep, s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    dp = _dot(do, tl.trans(v), PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * _softcap_grad(qk, scale, softcap)
    return dq + _dot(ds.to(k.dtype), k, PRECISION)


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
    HQ, N, M, D, DV, GROUP, scale, softcap, window_left, window_right, TUNE_N, TUNE_M,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # q, do (B, HQ, N, D|DV), k, v (B, HQ // GROUP, M, D|DV), lse, delta (B, HQ, N) -> dq (B, HQ, N, D)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // GROUP
    K += b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, stride_qn, N,
                   offs_d, stride_qd, D)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, stride_don, N,
                    offs_dv, stride_dod, DV)
    lse2, delta = _load_row_stats(LSE + pid_bh.to(tl.int64) * N, DELTA + pid_bh.to(tl.int64) * N, offs_m, N)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    diag = M - N

    if SPARSE_Q > 0:
        row = b * stride_cb + h * stride_ch + (start_m // SPARSE_Q) * stride_cr
        lists = b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + (start_m // SPARSE_Q) * stride_ir
        for i in range(tl.load(COUNT_FULL + row)):
            key_block = tl.load(INDEX_FULL + lists + i)
            for t in tl.static_range(SPARSE_K // BLOCK_N):
                dq = _dq_tile(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                              key_block * SPARSE_K + t * BLOCK_N, offs_m, offs_d, offs_dv, D, DV, M, diag,
                              window_left, window_right, scale, softcap,
                              False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, PRECISION)
        for i in range(tl.load(COUNT_PART + row)):
            key_block = tl.load(INDEX_PART + lists + i)
            for t in tl.static_range(SPARSE_K // BLOCK_N):
                dq = _dq_tile(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                              key_block * SPARSE_K + t * BLOCK_N, offs_m, offs_d, offs_dv, D, DV, M, diag,
                              window_left, window_right, scale, softcap,
                              True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, PRECISION)
    else:
        t_lo, t_full_lo, t_full_hi, t_hi = _partner_tiles(
            start_m, tl.minimum(start_m + BLOCK_M, N) - 1, M, diag - window_left, diag + window_right,
            HAS_LEFT, HAS_RIGHT, BLOCK_N)
        for t in range(t_lo, t_full_lo):
            dq = _dq_tile(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                          t * BLOCK_N, offs_m, offs_d, offs_dv, D, DV, M, diag, window_left, window_right,
                          scale, softcap, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, PRECISION)
        for t in range(t_full_lo, t_full_hi):
            dq = _dq_tile(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                          t * BLOCK_N, offs_m, offs_d, offs_dv, D, DV, M, diag, window_left, window_right,
                          scale, softcap, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, PRECISION)
        for t in range(t_full_hi, t_hi):
            dq = _dq_tile(dq, q, do, lse2, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                          t * BLOCK_N, offs_m, offs_d, offs_dv, D, DV, M, diag, window_left, window_right,
                          scale, softcap, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, PRECISION)

    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(DQ + offs_m[:, None].to(tl.int64) * stride_dqn + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < D))


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qn, stride_qd, stride_don, stride_dod,
               start_m, offs_n, offs_d, offs_dv, D, DV, N, M, diag, window_left, window_right, scale, softcap,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """dk += dS^T q, dv += P^T do for queries [start_m, +BLOCK_M), computed transposed (keys x queries)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, offs_m, stride_qn, N, offs_d, stride_qd, D)  # (BLOCK_M, BLOCK_D)
    do = _load_rows(DO, offs_m, stride_don, N, offs_dv, stride_dod, DV)  # (BLOCK_M, BLOCK_DV)
    lse2, delta = _load_row_stats(LSE, DELTA, offs_m, N)
    qk_t = _dot(k, tl.trans(q), PRECISION)  # (BLOCK_N, BLOCK_M)
    s_t = _scores_log2(qk_t, scale, softcap, HAS_SOFTCAP)
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
    HQ, HK, N, M, D, DV, GROUP, scale, softcap, window_left, window_right, TUNE_N, TUNE_M,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # q, do (B, HQ, N, D|DV), k, v (B, HK, M, D|DV) -> dk, dv (B, HK, M, D|DV), summed over the GQA group
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HK
    kvh = pid_bh % HK
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh, offs_n, stride_kn, M,
                   offs_d, stride_kd, D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh, offs_n, stride_vn, M,
                   offs_dv, stride_vd, DV)  # (BLOCK_N, BLOCK_DV)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    diag = M - N

    for g in range(GROUP):
        h = kvh * GROUP + g
        Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DOh = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        LSEh = LSE + (b * HQ + h).to(tl.int64) * N
        DELTAh = DELTA + (b * HQ + h).to(tl.int64) * N
        if SPARSE_Q > 0:
            row = b * stride_cb + h * stride_ch + (start_n // SPARSE_K) * stride_cr
            lists = b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + (start_n // SPARSE_K) * stride_ir
            for i in range(tl.load(COUNT_FULL + row)):
                query_block = tl.load(INDEX_FULL + lists + i)
                for t in tl.static_range(SPARSE_Q // BLOCK_M):
                    dk, dv = _dkdv_tile(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qn, stride_qd, stride_don,
                                        stride_dod, query_block * SPARSE_Q + t * BLOCK_M, offs_n, offs_d, offs_dv,
                                        D, DV, N, M, diag, window_left, window_right, scale, softcap,
                                        False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_M, PRECISION)
            for i in range(tl.load(COUNT_PART + row)):
                query_block = tl.load(INDEX_PART + lists + i)
                for t in tl.static_range(SPARSE_Q // BLOCK_M):
                    dk, dv = _dkdv_tile(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qn, stride_qd, stride_don,
                                        stride_dod, query_block * SPARSE_Q + t * BLOCK_M, offs_n, offs_d, offs_dv,
                                        D, DV, N, M, diag, window_left, window_right, scale, softcap,
                                        True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_M, PRECISION)
        else:
            # queries that see key j: j - diag - right <= i <= j - diag + left
            t_lo, t_full_lo, t_full_hi, t_hi = _partner_tiles(
                start_n, tl.minimum(start_n + BLOCK_N, M) - 1, N, -diag - window_right, -diag + window_left,
                HAS_RIGHT, HAS_LEFT, BLOCK_M)
            for t in range(t_lo, t_full_lo):
                dk, dv = _dkdv_tile(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qn, stride_qd, stride_don,
                                    stride_dod, t * BLOCK_M, offs_n, offs_d, offs_dv, D, DV, N, M, diag,
                                    window_left, window_right, scale, softcap,
                                    True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_M, PRECISION)
            for t in range(t_full_lo, t_full_hi):
                dk, dv = _dkdv_tile(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qn, stride_qd, stride_don,
                                    stride_dod, t * BLOCK_M, offs_n, offs_d, offs_dv, D, DV, N, M, diag,
                                    window_left, window_right, scale, softcap,
                                    False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_M, PRECISION)
            for t in range(t_full_hi, t_hi):
                dk, dv = _dkdv_tile(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qn, stride_qd, stride_don,
                                    stride_dod, t * BLOCK_M, offs_n, offs_d, offs_dv, D, DV, N, M, diag,
                                    window_left, window_right, scale, softcap,
                                    True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_M, PRECISION)

    DK += b.to(tl.int64) * stride_dkb + kvh.to(tl.int64) * stride_dkh
    DV_OUT += b.to(tl.int64) * stride_dvb + kvh.to(tl.int64) * stride_dvh
    tl.store(DK + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=(offs_n[:, None] < M) & (offs_d[None, :] < D))
    tl.store(DV_OUT + offs_n[:, None].to(tl.int64) * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV_OUT.dtype.element_ty), mask=(offs_n[:, None] < M) & (offs_dv[None, :] < DV))


# ----------------------------------------------------------------------------------------------
# Autotuning (CUDA) and launchers
# ----------------------------------------------------------------------------------------------

def _configs(shapes):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


_TUNE_KEY = ["TUNE_N", "TUNE_M", "BLOCK_D", "BLOCK_DV", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "SPARSE_Q", "SPARSE_K"]
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                         (64, 32, 4, 4), (32, 32, 4, 3), (16, 16, 2, 2)])
_DQ_CONFIGS = _configs([(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2),
                        (16, 16, 2, 2)])
_DKDV_CONFIGS = _configs([(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2),
                          (16, 16, 2, 2)])

_flash_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune_for_sparse})(_flash_fwd_kernel)
_flash_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune_for_sparse})(_flash_dq_kernel)
_flash_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune_for_sparse})(_flash_dkdv_kernel)


def _launch(plain, tuned, grid_rows, grid_cols, args, meta, tile_axis: str):
    """Autotuned launch on CUDA; under the interpreter one fixed small tile (see _config.py).
    `tile_axis` names the tile ("BLOCK_M" or "BLOCK_N") that splits `grid_rows` over programs."""
    if triton_interpreting():
        blocks = [meta.get(name, 0) for name in ("SPARSE_Q", "SPARSE_K")]
        tile = min([interpret_tile()] + [b for b in blocks if b])  # tiles must divide the sparse blocks
        plain[(triton.cdiv(grid_rows, tile), grid_cols)](*args, **meta, BLOCK_M=tile, BLOCK_N=tile)
    else:
        tuned[lambda cfg: (triton.cdiv(grid_rows, cfg[tile_axis]), grid_cols)](*args, **meta)


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


def _common_meta(q, k, v, window, softcap, index):
    left, right = window
    return dict(
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0,
        SPARSE_Q=0 if index is None else index.block_q, SPARSE_K=0 if index is None else index.block_k,
        BLOCK_D=next_pow2(q.shape[-1]), BLOCK_DV=next_pow2(v.shape[-1]), PRECISION=dot_precision(q.dtype),
    )


def _tune_bucket(x: int) -> int:
    return triton.next_power_of_2(x)


def flash_fwd(q, k, v, *, scale: float, window=(-1, -1), softcap: float = 0.0, index=None):
    """o (B, Hq, N, Dv) in q's dtype and lse (B, Hq, N) fp32. `index`: a SparseIndex or None (dense)."""
    B, Hq, N, D = q.shape
    Hk, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    o = new_output((B, Hq, N, Dv), q.dtype, q.device)
    lse = new_output((B, Hq, N), torch.float32, q.device)
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *_index_args(index, False),
            Hq, N, M, D, Dv, Hq // Hk, scale, softcap, window[0], window[1], _tune_bucket(N), _tune_bucket(M))
    _launch(_flash_fwd_kernel, _flash_fwd_tuned, N, B * Hq, args,
            _common_meta(q, k, v, window, softcap, index), "BLOCK_M")
    return o, lse


def flash_bwd(do, q, k, v, o, lse, *, scale: float, window=(-1, -1), softcap: float = 0.0, index=None,
              dlse=None):
    """Gradients (dq, dk, dv) given do (and optionally dlse, the gradient of the returned lse),
    recomputing probabilities from the saved lse. d lse / d s = p, so dlse enters as delta - dlse."""
    B, Hq, N, D = q.shape
    Hk, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    delta = new_output((B, Hq, N), torch.float32, q.device)
    delta_tile = interpret_tile() if triton_interpreting() else 64
    _delta_kernel[(triton.cdiv(N, delta_tile), B * Hq)](
        o, do, delta, *o.stride(), *do.stride(), Hq, N, Dv, BLOCK_M=delta_tile, BLOCK_DV=next_pow2(Dv))
    if dlse is not None:
        delta -= dlse

    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    meta = _common_meta(q, k, v, window, softcap, index)
    shared = (scale, softcap, window[0], window[1], _tune_bucket(N), _tune_bucket(M))

    _launch(_flash_dq_kernel, _flash_dq_tuned, N, B * Hq,
            (q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
             *_index_args(index, False), Hq, N, M, D, Dv, Hq // Hk, *shared),
            meta, "BLOCK_M")
    _launch(_flash_dkdv_kernel, _flash_dkdv_tuned, M, B * Hk,
            (q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
             *dk.stride(), *dv.stride(), *_index_args(index, True), Hq, Hk, N, M, D, Dv, Hq // Hk, *shared),
            meta, "BLOCK_N")
    return dq, dk, dv
