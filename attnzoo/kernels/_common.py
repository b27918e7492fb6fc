"""Device-side pieces shared by the Triton kernels: constants and @triton.jit helpers, no kernel.

Every kernel file takes its shared private names from here (and its host-side launch plumbing from
_config.py), never from another kernel file. Conventions:
- tiles are (rows, cols) index vectors into a (rows, cols) matrix with its two strides; rows past
  `n_rows` and cols past `n_cols` read as 0 and are never written;
- offsets into a tensor are 64-bit (`_head` and the row offsets of `_load_rows` / `_store_rows`);
- softmax scores are kept in log2 units (pre-multiplied by LOG2E) so the kernels use exp2 / log2.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))  # host code reads the float as LOG2E.value
LN2 = tl.constexpr(math.log(2.0))


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------

@triton.jit
def _head(X, b, h, stride_b, stride_h):
    """Pointer to the (b, h) slice of a (B, H, ...) tensor, with 64-bit offsets."""
    return X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _load_rows(ptr, rows, stride_row, n_rows, cols, stride_col, n_cols):
    """Load a (len(rows), len(cols)) tile, zero outside [0, n_rows) x [0, n_cols)."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _store_rows(ptr, value, rows, stride_row, n_rows, cols, stride_col, n_cols):
    """Store a (len(rows), len(cols)) tile, cast to ptr's dtype, inside [0, n_rows) x [0, n_cols) only."""
    tl.store(ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col,
             value.to(ptr.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _add_rows(ptr, value, rows, stride_row, n_rows, cols, stride_col, n_cols):
    """Atomically add a (len(rows), len(cols)) fp32 tile inside [0, n_rows) x [0, n_cols): programs
    (and, with a stride 0, elements of one tile) may add to the same entry."""
    tl.atomic_add(ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col, value,
                  mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _load_lse_log2(LSE, offs_m, N):
    """(len(offs_m),) saved row logsumexp in log2 units; +inf for rows that saw no key (lse = -inf)
    or lie past N, so that exp2(s - lse) is 0 there."""
    lse = tl.load(LSE + offs_m, mask=offs_m < N, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _load_row_stats(LSE, DELTA, offs_m, N):
    """The backward's per-row statistics: lse in log2 units (see _load_lse_log2) and delta (0 past N)."""
    return _load_lse_log2(LSE, offs_m, N), tl.load(DELTA + offs_m, mask=offs_m < N, other=0.0)


# ----------------------------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. PRECISION (from _config.dot_precision): "ieee" exact fp32
    products, "tf32", or "upcast": operands cast to fp32 first, then "ieee" (the Triton
    interpreter's tl.dot is wrong for bf16 operands)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


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
def _online_softmax(s, row_max, MAY_BE_EMPTY: tl.constexpr):
    """One step of the base-2 online softmax. s (R, C) scores in log2 units (-inf where masked),
    row_max (R,) the running row max. Returns p = exp2(s - new_max) (R, C), alpha = exp2(row_max -
    new_max) (R,) that rescales what was summed so far, and new_max (R,). MAY_BE_EMPTY: some row may
    have seen only -inf so far; it keeps max -inf and gets p = 0, alpha = 0 (not NaN)."""
    new_max = tl.maximum(row_max, tl.max(s, 1))
    safe_max = new_max
    if MAY_BE_EMPTY:
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    return tl.exp2(s - safe_max[:, None]), tl.exp2(row_max - safe_max), new_max


@triton.jit
def _masked_pv(acc, p, v, keep, PRECISION: tl.constexpr):
    """acc + p @ v over a masked tile, where a masked pair adds nothing even when its value is NaN or inf
    (p = 0 there, and 0 * NaN is NaN): non-finite values enter the product as 0, and the (row, column)
    entries that see one through a visible pair become NaN, as the product would make them.
    p, keep (R, C); v (C, Dv) in its dtype; acc (R, Dv) fp32."""
    finite = (v == v) & (tl.abs(v) != float("inf"))
    acc += _dot(p.to(v.dtype), tl.where(finite, v, 0.0).to(v.dtype), PRECISION)
    hits = _dot(keep.to(v.dtype), tl.where(finite, 0.0, 1.0).to(v.dtype), PRECISION)
    return tl.where(hits > 0, float("nan"), acc)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------

@triton.jit
def _visible(rows, cols, M, diag, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Bool tile: key `cols` visible to query `rows` (broadcastable index tensors): cols < M and
    -window_left <= cols - rows - diag <= window_right (bottom-right aligned when diag = M - N)."""
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
    [full_lo, full_hi) are visible to every row and lie inside `extent`, so they need no mask;
    tiles in [lo, full_lo) and [full_hi, hi) need one."""
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


# ----------------------------------------------------------------------------------------------
# Packs
# ----------------------------------------------------------------------------------------------

@triton.jit
def _tile_of(pid, TILES, TILE_BASE, CU_ROWS, CU_COLS, n_rows, n_cols, VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """Where program `pid` of a pass works: (its sequence, its tile's first row within the sequence, the
    sequence's first row and first column in the tensors (64-bit), its rows, its columns). A batch is
    one n_rows x n_cols sequence per batch entry, tile pid. A pack (VARLEN) reads the tile table the
    launcher built: TILES (n_tiles, 2) int32, per tile its sequence and first row, the table of
    BLOCK-row tiles starting at entry TILE_BASE[BLOCK]; CU_ROWS, CU_COLS (S + 1,) int32 the offsets."""
    if VARLEN:
        entry = tl.load(TILE_BASE + BLOCK) + pid
        seq = tl.load(TILES + 2 * entry)
        start = tl.load(TILES + 2 * entry + 1)
        first_row = tl.load(CU_ROWS + seq)
        first_col = tl.load(CU_COLS + seq)
        rows = tl.load(CU_ROWS + seq + 1) - first_row
        cols = tl.load(CU_COLS + seq + 1) - first_col
        first_row, first_col = first_row.to(tl.int64), first_col.to(tl.int64)
    else:
        seq, start, first_row, first_col, rows, cols = 0, pid * BLOCK, 0, 0, n_rows, n_cols
    return seq, start, first_row, first_col, rows, cols
