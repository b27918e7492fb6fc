"""Block max-pooled softmax map in PyTorch: the CPU backend of attnzoo/kernels/block_target.py.

Same algorithm: probabilities exp(scale q k^T - lse) from the saved row logsumexp, taken a chunk of
key blocks at a time (one (N, chunk) tile per step, never N x M) and max-pooled over each
(block x block) pair. Query heads of a GQA group read their kv head through a broadcast view.

Shapes: q (B, Hq, N, D), k (B, Hk, M, D), lse (B, Hq, N) fp32 (-inf for rows that see no key);
out (B, Hq, nQB, nKB) fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CHUNK = 512  # keys per step, rounded to whole key blocks


def _causal_keep(n: int, m: int, start: int, stop: int, device) -> torch.Tensor:
    """(N, stop - start) bool: query i sees key j iff j <= i + (M - N)."""
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(start, stop, device=device)[None, :]
    return cols <= rows + (m - n)


def block_max_probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, scale: float, causal: bool,
                    block_size: int) -> torch.Tensor:
    """(B, Hq, nQB, nKB) fp32: the largest softmax probability of every (block x block) pair."""
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_qb = -(-N // block_size)
    qg = q.reshape(B, Hk, Hq // Hk, N, D).to(acc_dtype)  # (B, Hk, G, N, D)
    lse_g = lse.reshape(B, Hk, Hq // Hk, N, 1).to(acc_dtype)
    lse_g = lse_g.masked_fill(lse_g == -math.inf, math.inf)  # rows that see nothing: p = 0
    step = max(block_size, _CHUNK // block_size * block_size)
    pooled = []
    for start in range(0, M, step):
        stop = min(start + step, M)
        kc = k[:, :, None, start:stop].to(acc_dtype)  # (B, Hk, 1, chunk, D)
        log_p = torch.matmul(qg, kc.transpose(-1, -2)) * scale - lse_g  # (B, Hk, G, N, chunk)
        if causal:  # mask before exp: a hidden key's exp can overflow, and inf * 0 would be NaN
            log_p = log_p.masked_fill(~_causal_keep(N, M, start, stop, q.device), -math.inf)
        p = torch.exp(log_p)
        cols = -(-(stop - start) // block_size) * block_size
        p = F.pad(p, (0, cols - (stop - start), 0, n_qb * block_size - N))  # zeros: probabilities are >= 0
        blocks = p.reshape(B, Hk, Hq // Hk, n_qb, block_size, cols // block_size, block_size)
        pooled.append(blocks.amax(dim=(4, 6)))
    return torch.cat(pooled, dim=-1).reshape(B, Hq, n_qb, -1).float()
