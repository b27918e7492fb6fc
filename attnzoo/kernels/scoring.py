"""XAttention's strided antidiagonal block-importance estimator in Triton.

For stride S, query group a holds queries a*S .. a*S+S-1 and key group b keys b*S .. b*S+S-1. The
estimated logit of (a, b) is the antidiagonal of their S x S tile,

    est[a, b] = scale / S * sum_t q[a*S + S-1-t] . k[b*S + t]       (rows past N / M count as zero)

Causal: group b is admissible for group a iff its first key b*S is visible to the group's last query
min(a*S+S-1, N-1) (bottom-right aligned). Each group row is softmaxed over its admissible key groups,
and the block score of (query block I, key block J) is the sum of those probabilities over the groups
inside the block. A row with no admissible key group contributes 0.

One program per (query block, batch x query head) makes two passes over the key blocks: the first
keeps the online row max and sum, the second sums the normalised probabilities per key block. Only
the (B, Hq, nQB, nKB) block scores are written: nothing of size N x M (or N/S x M/S) exists, for any N.
GQA: query head h reads kv head h // (Hq // Hk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, _dot, _head, _online_softmax, _tile_of
from ._config import dot_precision, new_output, next_pow2, pack_tiles, triton_interpreting


@triton.jit
def _load_grouped(X, groups, stride_n, stride_d, L, D, t_first, STRIDE: tl.constexpr, T_CHUNK: tl.constexpr,
                  BLOCK_D: tl.constexpr, REVERSE: tl.constexpr):
    """(TILE, T_CHUNK * BLOCK_D): row r holds, side by side, rows t_first .. t_first + T_CHUNK - 1 of
    group groups[r] (counted from the group's end when REVERSE): column c = (t - t_first) * BLOCK_D + d
    is row groups[r] * STRIDE + (STRIDE-1-t if REVERSE else t), dim d. Rows past L, dims past D are 0."""
    offs_c = tl.arange(0, T_CHUNK * BLOCK_D)
    within = t_first + offs_c // BLOCK_D
    if REVERSE:
        within = STRIDE - 1 - within
    dims = offs_c % BLOCK_D
    rows = groups[:, None] * STRIDE + within[None, :]
    return tl.load(X + rows.to(tl.int64) * stride_n + dims[None, :] * stride_d,
                   mask=(rows < L) & (dims[None, :] < D), other=0.0)


@triton.jit
def _group_logits(Q, K, q_groups, k_groups, stride_qn, stride_qd, stride_kn, stride_kd, N, M, D, est_scale_log2,
                  STRIDE: tl.constexpr, T_CHUNK: tl.constexpr, TILE_A: tl.constexpr, TILE_B: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """(TILE_A, TILE_B) fp32: est[a, b] in log2 units. The S antidiagonal products are summed by dots
    over T_CHUNK stride positions at a time (contraction width T_CHUNK * BLOCK_D)."""
    acc = tl.zeros((TILE_A, TILE_B), dtype=tl.float32)
    for t_first in tl.static_range(0, STRIDE, T_CHUNK):
        q_part = _load_grouped(Q, q_groups, stride_qn, stride_qd, N, D, t_first, STRIDE, T_CHUNK, BLOCK_D, True)
        k_part = _load_grouped(K, k_groups, stride_kn, stride_kd, M, D, t_first, STRIDE, T_CHUNK, BLOCK_D, False)
        acc += _dot(q_part, tl.trans(k_part), PRECISION)
    return acc * est_scale_log2


@triton.jit
def _admissible(row_valid, last_query, k_groups, lane_b, N, M, STRIDE: tl.constexpr, GROUPS_K: tl.constexpr,
                CAUSAL: tl.constexpr):
    """(TILE_A, TILE_B) bool: real query group, real key group, and (causal) first key visible."""
    keep = row_valid[:, None] & ((lane_b < GROUPS_K) & (k_groups * STRIDE < M))[None, :]
    if CAUSAL:
        keep = keep & (k_groups[None, :] * STRIDE <= last_query[:, None] + (M - N))
    return keep


@triton.jit
def _antidiagonal_kernel(
    Q, K, OUT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_oi, stride_oj,
    TILES, TILE_BASE, CU_Q, CU_K,  # a pack's query block table and offsets (VARLEN, see _common._tile_of)
    H, N, M, D, GROUP, n_kb, est_scale_log2,
    STRIDE: tl.constexpr, T_CHUNK: tl.constexpr, GROUPS_Q: tl.constexpr, GROUPS_K: tl.constexpr,
    TILE_A: tl.constexpr, TILE_B: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
):
    # q (B, H, N, D), k (B, H // GROUP, M, D) -> out (B, H, cdiv(N, GROUPS_Q * STRIDE), n_kb); a pack
    # (B = 1) -> out (S, H, ...): sequence s's blocks of its own N_s x M_s in row s's top-left corner
    bh = tl.program_id(1)
    batch, head = bh // H, bh % H
    seq, first_query, q0, k0, N, M = _tile_of(tl.program_id(0), TILES, TILE_BASE, CU_Q, CU_K, N, M, VARLEN,
                                              GROUPS_Q * STRIDE)
    q_block = first_query // (GROUPS_Q * STRIDE)
    if VARLEN:
        n_kb = tl.cdiv(M, GROUPS_K * STRIDE)
    Q = _head(Q, batch, head, stride_qb, stride_qh) + q0 * stride_qn
    K = _head(K, batch, head // GROUP, stride_kb, stride_kh) + k0 * stride_kn
    OUT = _head(OUT, batch + seq, head, stride_ob, stride_oh) + q_block.to(tl.int64) * stride_oi

    lane_a = tl.arange(0, TILE_A)
    q_groups = q_block * GROUPS_Q + lane_a  # (TILE_A,)
    row_valid = (lane_a < GROUPS_Q) & (q_groups * STRIDE < N)
    last_query = tl.minimum(q_groups * STRIDE + STRIDE - 1, N - 1)  # (TILE_A,)
    lane_b = tl.arange(0, TILE_B)

    n_visit = n_kb
    if CAUSAL:
        block_last_query = tl.minimum((q_block + 1) * GROUPS_Q * STRIDE, N) - 1
        n_visit = tl.minimum(tl.maximum((block_last_query + M - N) // (GROUPS_K * STRIDE) + 1, 0), n_kb)

    row_max = tl.full((TILE_A,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((TILE_A,), dtype=tl.float32)
    for k_block in range(n_visit):  # pass 1: online max and sum per group row (log2 units)
        k_groups = k_block * GROUPS_K + lane_b
        logits = _group_logits(Q, K, q_groups, k_groups, stride_qn, stride_qd, stride_kn, stride_kd, N, M, D,
                               est_scale_log2, STRIDE, T_CHUNK, TILE_A, TILE_B, BLOCK_D, PRECISION)
        keep = _admissible(row_valid, last_query, k_groups, lane_b, N, M, STRIDE, GROUPS_K, CAUSAL)
        p, alpha, row_max = _online_softmax(tl.where(keep, logits, float("-inf")), row_max, True)
        row_sum = row_sum * alpha + tl.sum(p, 1)

    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    inv_sum = 1.0 / tl.where(row_sum > 0, row_sum, float("inf"))  # 0 for rows with no key
    for k_block in range(n_visit):  # pass 2: normalised probabilities summed per key block
        k_groups = k_block * GROUPS_K + lane_b
        logits = _group_logits(Q, K, q_groups, k_groups, stride_qn, stride_qd, stride_kn, stride_kd, N, M, D,
                               est_scale_log2, STRIDE, T_CHUNK, TILE_A, TILE_B, BLOCK_D, PRECISION)
        keep = _admissible(row_valid, last_query, k_groups, lane_b, N, M, STRIDE, GROUPS_K, CAUSAL)
        probs = tl.where(keep, tl.exp2(logits - safe_max[:, None]) * inv_sum[:, None], 0.0)
        tl.store(OUT + k_block * stride_oj, tl.sum(tl.sum(probs, 1), 0))
    for k_block in range(n_visit, n_kb):  # key blocks past the causal diagonal score 0
        tl.store(OUT + k_block * stride_oj, 0.0)


def stride_chunk(stride: int, block_d: int) -> int:
    """Stride positions per dot: all of them under the interpreter (fewest interpreted ops), else as
    many as keep the contraction width <= 256 (bounded registers for any stride and head dim)."""
    if triton_interpreting():
        return stride
    return max(1, min(stride, 256 // block_d))


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, *, stride: int, block_q: int, block_k: int,
                              scale: float, causal: bool, t_chunk: int | None = None, seqlens=None) -> torch.Tensor:
    """q (B, Hq, N, D), k (B, Hk, M, D) -> block scores (B, Hq, nQB, nKB) fp32.

    `stride` must divide `block_q` and `block_k` (powers of two). Every real query group row sums to 1
    over key groups, so a full query block's scores sum to block_q / stride. `t_chunk` (a power of two
    dividing `stride`) overrides how many stride positions one dot covers (`stride_chunk`). `seqlens`:
    None, or a pack's (q_starts, k_starts) (B = 1): scores (S, Hq, nQB, nKB) over the longest sequences'
    grid, each sequence's in its top-left corner and 0 past its end, in one launch."""
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    if seqlens is None:
        n_qb, n_kb = triton.cdiv(N, block_q), triton.cdiv(M, block_k)
        out, tiles, programs = new_output((B, Hq, n_qb, n_kb), torch.float32, q.device), None, n_qb
    else:
        (q_starts, k_starts), longest = seqlens, [max(b - a for a, b in zip(x, x[1:])) for x in seqlens]
        n_qb, n_kb = triton.cdiv(longest[0], block_q), triton.cdiv(longest[1], block_k)
        out = torch.zeros(len(q_starts) - 1, Hq, n_qb, n_kb, dtype=torch.float32, device=q.device)
        tiles = pack_tiles(q_starts, k_starts, [block_q], q.device)
        programs = tiles.programs(block_q)
    if programs == 0:
        return out
    groups_q, groups_k = block_q // stride, block_k // stride
    _antidiagonal_kernel[(programs, B * Hq)](
        q, k, out, *q.stride(), *k.stride(), *out.stride(), *((None,) * 4 if tiles is None else tiles.args()),
        Hq, N, M, D, Hq // Hk, n_kb, scale / stride * LOG2E.value,
        STRIDE=stride, T_CHUNK=t_chunk or stride_chunk(stride, next_pow2(D)), GROUPS_Q=groups_q, GROUPS_K=groups_k,
        TILE_A=max(16, groups_q), TILE_B=max(16, groups_k), BLOCK_D=next_pow2(D),
        CAUSAL=causal, VARLEN=tiles is not None, PRECISION=dot_precision(q.dtype),
    )
    return out
