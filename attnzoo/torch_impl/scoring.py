"""XAttention's strided antidiagonal block-importance estimator in PyTorch: the CPU twin of
attnzoo/kernels/scoring.py, with the same signature and the same definition (see that module).

The query axis is processed in chunks of query blocks, so memory holds one (chunk groups x M/S)
estimate at a time, never N/S x M/S for long N.
"""

from __future__ import annotations

import torch

from .. import geometry

_CHUNK_ELEMENTS = 1 << 22  # group-logit entries per query chunk and head


def _grouped_rows(x: torch.Tensor, block: int, stride: int, *, reverse: bool) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, L_pad / stride, stride * D) fp32: rows zero-padded to a whole number of
    blocks, each group of `stride` rows concatenated (in reverse order when `reverse`)."""
    length = x.shape[2]
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, -(-length // block) * block - length))
    groups = padded.unflatten(2, (-1, stride))
    return (groups.flip(3) if reverse else groups).flatten(3)


def _admissible(q_groups: torch.Tensor, n_k_groups: int, stride: int, n: int, m: int, causal: bool,
                device) -> torch.Tensor:
    """(A, Bg) bool for the query groups `q_groups`: real groups, and the group's first key visible to
    the group's last query (causal) or inside [0, M)."""
    k_first = torch.arange(n_k_groups, device=device)[None, :] * stride
    q_first = q_groups[:, None] * stride
    q_last = torch.clamp(q_first + stride - 1, max=n - 1)
    return (q_first < n) & geometry.visible(q_last, k_first, n, m, geometry.causal_window(causal))


def _chunks(count: int, per_chunk: int) -> list[tuple[int, int]]:
    """[first, stop) ranges of at most `per_chunk` covering range(count). One range when it fits, so that
    torch.compile with dynamic shapes guards on count <= per_chunk rather than on count (no recompile
    per length)."""
    if count <= per_chunk:
        return [(0, count)]
    return [(first, min(first + per_chunk, count)) for first in range(0, count, per_chunk)]


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, *, stride: int, block_q: int, block_k: int,
                              scale: float, causal: bool, seqlens=None) -> torch.Tensor:
    """q (B, Hq, N, D), k (B, Hk, M, D) -> block scores (B, Hq, nQB, nKB) fp32 (see the Triton kernel);
    a pack (`seqlens`, as the kernel's) one sequence at a time, into its corner of (S, Hq, nQB, nKB)."""
    if seqlens is not None:
        return _packed_scores(q, k, stride=stride, block_q=block_q, block_k=block_k, scale=scale, causal=causal,
                              seqlens=seqlens)
    Hq, N = q.shape[1], q.shape[2]
    Hk, M = k.shape[1], k.shape[2]
    n_qb, n_kb = -(-N // block_q), -(-M // block_k)
    groups_q, groups_k = block_q // stride, block_k // stride
    q_hat = _grouped_rows(q, block_q, stride, reverse=True).unflatten(1, (Hk, Hq // Hk))  # (B, Hk, G, A, S*D)
    k_hat = _grouped_rows(k, block_k, stride, reverse=False)  # (B, Hk, Bg, S*D)
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // (groups_q * k_hat.shape[2]))
    window = geometry.causal_window(causal)
    scores = []
    for first_block, stop_block in _chunks(n_qb, blocks_per_chunk):
        # as the kernel: only the key blocks that the chunk's last query may see (all when not causal)
        _, _, _, hi = geometry.visible_span(0, min(stop_block * block_q, N) - 1, N, M, window)
        seen_kb = geometry.num_blocks(hi, block_k)
        rows = torch.arange(first_block * groups_q, stop_block * groups_q, device=q.device)
        est = torch.einsum("bkgas,bkcs->bkgac", q_hat[:, :, :, rows], k_hat[:, :, :seen_kb * groups_k])
        keep = _admissible(rows, seen_kb * groups_k, stride, N, M, causal, q.device)
        probs = torch.softmax((est * (scale / stride)).masked_fill(~keep, float("-inf")), dim=-1)
        probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)  # rows with no admissible key
        block_sums = probs.unflatten(-1, (seen_kb, groups_k)).sum(-1).unflatten(-2, (-1, groups_q)).sum(-2)
        scores.append(torch.nn.functional.pad(block_sums, (0, n_kb - seen_kb)))  # unseen key blocks score 0
    return torch.cat(scores, dim=-2).flatten(1, 2)  # (B, Hq, nQB, nKB)


def _packed_scores(q, k, *, stride, block_q, block_k, scale, causal, seqlens):
    (q_starts, k_starts), longest = seqlens, [max(b - a for a, b in zip(x, x[1:])) for x in seqlens]
    out = q.new_zeros(len(q_starts) - 1, q.shape[1], -(-longest[0] // block_q), -(-longest[1] // block_k),
                      dtype=torch.float32)
    for s, (qa, qb, ka, kb) in enumerate(zip(q_starts, q_starts[1:], k_starts, k_starts[1:])):
        if qb > qa and kb > ka:
            scores = antidiagonal_block_scores(q[:, :, qa:qb], k[:, :, ka:kb], stride=stride, block_q=block_q,
                                               block_k=block_k, scale=scale, causal=causal)
            out[s, :, :scores.shape[2], :scores.shape[3]] = scores[0]
    return out
