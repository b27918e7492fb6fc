"""Block max-pooled softmax map in Triton: SeerAttention's distillation target, never materialising N x M.

For every (batch, query head, query block, key block) the kernel returns the largest attention
probability inside the block, max_{i in qblock, j in kblock} exp(scale q_i . k_j - lse_i), where lse
is the row logsumexp that the flash forward already saved (attnzoo/kernels/flash.py): with each
row's final statistic known, one more pass over the score tiles turns every score into its exact
probability. It shares the flash kernel's tile loads, scores and visibility test (_common.py:
bottom-right aligned causal, ragged tails); causal calls skip key blocks past the diagonal and write
0 there. A NaN probability (from a non-finite q, k or lse) counts as 0, as in the twin.

Grid (query blocks, B * Hq); each program walks the key blocks of its query block and, inside a
(block x block) pair, the (BLOCK_M x BLOCK_N) tiles; the running maximum stays in a register.

Shapes at the boundary: q (B, Hq, N, D), k (B, Hk, M, D), any strides; lse (B, Hq, N) fp32
contiguous (-inf for rows that see no key); out (B, Hq, nQB, nKB) fp32 contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _dot, _head, _load_lse_log2, _load_rows, _scores_log2, _tile_of, _visible
from ._config import dot_precision, fixed_tile, new_output, next_pow2, pack_tiles


@triton.jit
def _tile_max_prob(q, lse2, K, stride_kn, stride_kd, start_n, offs_m, offs_d, D, M, diag, scale,
                   CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Largest probability of the (BLOCK_M, BLOCK_N) tile of keys [start_n, +BLOCK_N); 0 where masked
    and where it is NaN (a non-finite q, k or lse): one rule for every device, since the GPU's max
    skips a NaN and the interpreter's keeps it."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, offs_n, stride_kn, M, offs_d, stride_kd, D)  # (BLOCK_N, BLOCK_D)
    s = _scores_log2(_dot(q, tl.trans(k), PRECISION), scale, 0.0, False)  # (BLOCK_M, BLOCK_N), log2 units
    keep = _visible(offs_m[:, None], offs_n[None, :], M, diag, 0, 0, False, CAUSAL)
    p = tl.exp2(s - lse2[:, None])
    p = tl.where(keep & (p == p), p, 0.0)
    return tl.max(tl.max(p, 1), 0)


@triton.jit
def _block_target_kernel(
    Q, K, LSE, OUT,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_oi,
    TILES, TILE_BASE, CU_Q, CU_K,  # a pack's query block table and offsets (VARLEN, see _common._tile_of)
    HQ, N, M, D, GROUP, N_KB, scale,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # q (B, HQ, N, D), k (B, HQ // GROUP, M, D), lse (B, HQ, N) -> out (B, HQ, cdiv(N, BLOCK), N_KB);
    # a pack (B = 1) -> out (S, HQ, ., N_KB), sequence s's blocks in row s's top-left corner
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    seq, q_first, q0, k0, n_q, n_k = _tile_of(tl.program_id(0), TILES, TILE_BASE, CU_Q, CU_K, N, M, VARLEN, BLOCK)
    LSE += pid_bh.to(tl.int64) * N + q0
    N, M = n_q, n_k  # from here on the lengths of this program's sequence
    Q = _head(Q, b, h, stride_qb, stride_qh) + q0 * stride_qn
    K = _head(K, b, h // GROUP, stride_kb, stride_kh) + k0 * stride_kn
    OUT = _head(OUT, b + seq, h, stride_ob, stride_oh) + (q_first // BLOCK) * stride_oi
    offs_d = tl.arange(0, BLOCK_D)
    diag = M - N

    if VARLEN:
        N_KB = tl.cdiv(M, BLOCK)
    kb_end = N_KB
    if CAUSAL:  # key blocks holding a key visible to the block's last query
        last_key = tl.minimum(tl.minimum(q_first + BLOCK, N) - 1 + diag, M - 1)
        kb_end = (tl.maximum(last_key + 1, 0) + BLOCK - 1) // BLOCK
    for kb in range(0, kb_end):
        block_max = 0.0
        for t in tl.static_range(BLOCK // BLOCK_M):
            offs_m = q_first + t * BLOCK_M + tl.arange(0, BLOCK_M)
            q = _load_rows(Q, offs_m, stride_qn, N, offs_d, stride_qd, D)  # (BLOCK_M, BLOCK_D)
            lse2 = _load_lse_log2(LSE, offs_m, N)  # (BLOCK_M,); +inf for rows that see nothing: p = 0
            for u in tl.static_range(BLOCK // BLOCK_N):
                block_max = tl.maximum(block_max, _tile_max_prob(
                    q, lse2, K, stride_kn, stride_kd, kb * BLOCK + u * BLOCK_N, offs_m, offs_d, D, M, diag,
                    scale, CAUSAL, BLOCK_N, PRECISION))
        tl.store(OUT + kb, block_max)
    for kb in range(kb_end, N_KB):
        tl.store(OUT + kb, 0.0)


def block_max_probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, scale: float, causal: bool,
                    block_size: int, seqlens=None) -> torch.Tensor:
    """(B, Hq, nQB, nKB) fp32: the largest softmax probability of every (block x block) pair, from the
    saved lse (B, Hq, N) of softmax(scale q k^T) (causal bottom-right aligned). `seqlens`: None, or a
    pack's (q_starts, k_starts) (B = 1): (S, Hq, nQB, nKB) over the longest sequences' grid, each
    sequence's in its top-left corner and 0 past its end, in one launch."""
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    if seqlens is None:
        n_qb, n_kb = triton.cdiv(N, block_size), triton.cdiv(M, block_size)
        out, tiles, programs = new_output((B, Hq, n_qb, n_kb), torch.float32, q.device), None, n_qb
    else:
        longest = [max(b - a for a, b in zip(x, x[1:])) for x in seqlens]
        n_qb, n_kb = triton.cdiv(longest[0], block_size), triton.cdiv(longest[1], block_size)
        out = torch.zeros(len(seqlens[0]) - 1, Hq, n_qb, n_kb, dtype=torch.float32, device=q.device)
        tiles = pack_tiles(*seqlens, [block_size], q.device)
        programs = tiles.programs(block_size)
    if programs == 0:
        return out
    tile = min(fixed_tile(64), block_size)
    _block_target_kernel[(programs, B * Hq)](
        q, k, lse.contiguous(), out, *q.stride(), *k.stride(), *out.stride()[:3],
        *((None,) * 4 if tiles is None else tiles.args()), Hq, N, M, D, Hq // Hk, n_kb, scale,
        CAUSAL=causal, VARLEN=tiles is not None, BLOCK=block_size, BLOCK_M=tile, BLOCK_N=tile, BLOCK_D=next_pow2(D),
        PRECISION=dot_precision(q.dtype))
    return out
