"""Block max-pooled softmax map in PyTorch: the twin of attnzoo/kernels/block_target.py.

Same signature and work: per query block, the key blocks up to the last one its rows may see (all
of them when not causal; `geometry.visible_span`), in chunks of key blocks, turning each score into
its exact probability exp(scale q k^T - lse) with the saved row logsumexp and max-pooling each
(block x block) pair; key blocks past the causal diagonal are 0 without being computed. Query heads
of a GQA group read their kv head through a broadcast view (k is never repeated). A NaN probability
(from a non-finite q, k or lse) counts as 0, as in the kernel.

Shapes: q (B, Hq, N, D), k (B, Hk, M, D), lse (B, Hq, N) fp32 (-inf for rows that see no key);
out (B, Hq, nQB, nKB) fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import geometry

_CHUNK = 2048  # keys per step, rounded to whole key blocks


def block_max_probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, scale: float, causal: bool,
                    block_size: int, seqlens=None) -> torch.Tensor:
    """(B, Hq, nQB, nKB) fp32: the largest softmax probability of every (block x block) pair; a pack
    (`seqlens`, as the kernel's) one sequence at a time, into its corner of (S, Hq, nQB, nKB)."""
    if seqlens is not None:
        return _packed_max_probs(q, k, lse, scale=scale, causal=causal, block_size=block_size, seqlens=seqlens)
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    window = geometry.causal_window(causal)
    n_kb = geometry.num_blocks(M, block_size)
    qg = q.reshape(B, Hk, Hq // Hk, N, D).to(acc_dtype)  # (B, Hk, G, N, D)
    lse_g = lse.reshape(B, Hk, Hq // Hk, N, 1).to(acc_dtype)
    lse_g = lse_g.masked_fill(lse_g == -math.inf, math.inf)  # rows that see nothing: p = 0
    kf = k[:, :, None].to(acc_dtype)  # (B, Hk, 1, M, D)
    step = max(block_size, _CHUNK // block_size * block_size)
    out = torch.zeros(B, Hk, Hq // Hk, geometry.num_blocks(N, block_size), n_kb, dtype=torch.float32,
                      device=q.device)
    for row, first in enumerate(range(0, N, block_size)):
        stop = min(first + block_size, N)
        _, _, _, hi = geometry.visible_span(first, stop - 1, N, M, window)
        rows = torch.arange(first, stop, device=q.device)[:, None]
        for start in range(0, hi, step):
            end = min(start + step, hi)
            log_p = torch.matmul(qg[:, :, :, first:stop], kf[:, :, :, start:end].transpose(-1, -2)) * scale
            log_p = log_p - lse_g[:, :, :, first:stop]  # (B, Hk, G, rows, keys)
            if causal:  # mask before exp: a hidden key's exp can overflow, and inf * 0 would be NaN
                cols = torch.arange(start, end, device=q.device)[None, :]
                log_p = log_p.masked_fill(~geometry.visible(rows, cols, N, M, window), -math.inf)
            p = torch.exp(log_p)
            p = p.masked_fill(p.isnan(), 0.0)  # a non-finite q, k or lse: counts 0, as in the kernel
            width = geometry.num_blocks(end - start, block_size) * block_size
            p = F.pad(p, (0, width - (end - start)))  # zeros: probabilities are >= 0
            pooled = p.unflatten(-1, (-1, block_size)).amax(dim=(-3, -1))  # (B, Hk, G, blocks)
            out[..., row, start // block_size:start // block_size + pooled.shape[-1]] = pooled.float()
    return out.reshape(B, Hq, -1, n_kb)


def _packed_max_probs(q, k, lse, *, scale, causal, block_size, seqlens):
    (q_starts, k_starts), longest = seqlens, [max(b - a for a, b in zip(x, x[1:])) for x in seqlens]
    out = q.new_zeros(len(q_starts) - 1, q.shape[1], geometry.num_blocks(longest[0], block_size),
                      geometry.num_blocks(longest[1], block_size), dtype=torch.float32)
    for s, (qa, qb, ka, kb) in enumerate(zip(q_starts, q_starts[1:], k_starts, k_starts[1:])):
        if qb > qa and kb > ka:
            probs = block_max_probs(q[:, :, qa:qb], k[:, :, ka:kb], lse[:, :, qa:qb], scale=scale, causal=causal,
                                    block_size=block_size)
            out[s, :, :probs.shape[2], :probs.shape[3]] = probs[0]
    return out
