"""FlashAttention-2 in PyTorch: the CPU backend of attnzoo/kernels/flash.py.

Same algorithm as the Triton kernel: keys are visited in chunks with an online softmax, the
logsumexp is saved, and the backward recomputes probabilities from it, so memory stays linear in the
sequence length (one (N, chunk) score tile per step, never (N, M)). Query heads of a GQA group read
their kv head through a broadcast view, never a copy.

Shapes: q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv), o (B, Hq, N, Dv), lse (B, Hq, N) fp32.
An optional block mask (B|1, Hq|1, nQB, nKB) bool with block sizes (block_q, block_k) restricts
which (query block, key block) pairs are computed, exactly as the sparse index does in the kernel.
"""

from __future__ import annotations

import math

import torch

_CHUNK = 512  # keys per step; a multiple of the sparse key block when one is given


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, Hq, N, D) -> (B, Hk, G, N, D) view: query heads grouped under their kv head."""
    B, Hq, N, D = x.shape
    return x.reshape(B, n_kv_heads, Hq // n_kv_heads, N, D)


def _visible(rows: torch.Tensor, cols: torch.Tensor, n: int, m: int, window: tuple[int, int]) -> torch.Tensor:
    """(len(rows), len(cols)) bool: key j visible to query i under the bottom-right aligned window."""
    left, right = window
    rel = cols[None, :] - rows[:, None] - (m - n)
    keep = cols[None, :] < m
    if right >= 0:
        keep = keep & (rel <= right)
    if left >= 0:
        keep = keep & (rel >= -left)
    return keep


def _chunk_mask(start: int, stop: int, n: int, m: int, window, block_mask, block_q, block_k, n_kv_heads):
    """Element mask of keys [start, stop) for all queries, broadcastable to (B, Hk, G, N, chunk)."""
    device = block_mask.device if block_mask is not None else None
    rows = torch.arange(n, device=device)
    cols = torch.arange(start, stop, device=device)
    keep = _visible(rows, cols, n, m, window)
    if block_mask is not None:
        blocks = block_mask[..., rows // block_q, :][..., cols // block_k]  # (B|1, Hq|1, N, chunk)
        Bm, Hm = blocks.shape[:2]
        blocks = blocks.reshape(Bm, n_kv_heads if Hm > 1 else 1, -1 if Hm > 1 else 1, n, stop - start)
        keep = keep & blocks
    return keep


def _chunks(m: int, block_k: int | None):
    step = _CHUNK if block_k is None else max(block_k, _CHUNK // block_k * block_k)
    for start in range(0, m, step):
        yield start, min(start + step, m)


def _scores(q, k, scale, softcap):
    """Scaled (and soft-capped) scores and tanh(raw/softcap) for the backward (None without softcap)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        t = torch.tanh(s / softcap)
        return softcap * t, t
    return s, None


def flash_fwd(q, k, v, *, scale: float, window=(-1, -1), softcap: float = 0.0,
              block_mask: torch.Tensor | None = None, block_q: int = 0, block_k: int = 0):
    """Returns o (B, Hq, N, Dv) in q's dtype and lse (B, Hq, N) fp32 (-inf for rows that see no key)."""
    B, Hq, N, _ = q.shape
    Hk, M, Dv = k.shape[1], k.shape[2], v.shape[-1]
    acc_dtype = _accum_dtype(q.dtype)
    qg = _grouped(q, Hk).to(acc_dtype)  # (B, Hk, G, N, D)
    kg = k[:, :, None].to(acc_dtype)  # (B, Hk, 1, M, D)
    vg = v[:, :, None].to(acc_dtype)  # (B, Hk, 1, M, Dv)

    row_max = torch.full(qg.shape[:-1], -math.inf, dtype=acc_dtype, device=q.device)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros(*qg.shape[:-1], Dv, dtype=acc_dtype, device=q.device)
    for start, stop in _chunks(M, block_k or None):
        s, _ = _scores(qg, kg[..., start:stop, :], scale, softcap)
        keep = _chunk_mask(start, stop, N, M, window, block_mask, block_q, block_k, Hk)
        s = s.masked_fill(~keep, -math.inf)
        new_max = torch.maximum(row_max, s.amax(dim=-1))
        safe_max = new_max.masked_fill(new_max == -math.inf, 0.0)  # rows with nothing visible yet
        p = torch.exp(s - safe_max[..., None])
        alpha = torch.exp(row_max - safe_max)
        row_sum = row_sum * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + torch.matmul(p, vg[..., start:stop, :])
        row_max = new_max

    empty = row_sum == 0
    o = acc / row_sum.masked_fill(empty, 1.0)[..., None]
    lse = (row_max + torch.log(row_sum)).masked_fill(empty, -math.inf)
    return o.reshape(B, Hq, N, Dv).to(q.dtype), lse.reshape(B, Hq, N).float()


def flash_bwd(do, q, k, v, o, lse, *, scale: float, window=(-1, -1), softcap: float = 0.0,
              block_mask: torch.Tensor | None = None, block_q: int = 0, block_k: int = 0, dlse=None):
    """Gradients (dq, dk, dv) from the saved lse: probabilities are recomputed chunk by chunk.
    `dlse` (B, Hq, N), the gradient of the returned lse, enters as delta - dlse (d lse / d s = p)."""
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    acc_dtype = _accum_dtype(q.dtype)
    qg = _grouped(q, Hk).to(acc_dtype)  # (B, Hk, G, N, D)
    dog = _grouped(do, Hk).to(acc_dtype)  # (B, Hk, G, N, Dv)
    delta = (dog * _grouped(o, Hk).to(acc_dtype)).sum(dim=-1)  # (B, Hk, G, N)
    if dlse is not None:
        delta = delta - _grouped(dlse[..., None], Hk)[..., 0].to(acc_dtype)
    lse_g = _grouped(lse[..., None], Hk)[..., 0].to(acc_dtype)
    lse_g = lse_g.masked_fill(lse_g == -math.inf, math.inf)  # rows that saw nothing: p = 0
    kg = k[:, :, None].to(acc_dtype)
    vg = v[:, :, None].to(acc_dtype)

    dq = torch.zeros_like(qg)
    dk = torch.zeros(B, Hk, M, D, dtype=acc_dtype, device=q.device)
    dv = torch.zeros(B, Hk, M, v.shape[-1], dtype=acc_dtype, device=q.device)
    for start, stop in _chunks(M, block_k or None):
        kc, vc = kg[..., start:stop, :], vg[..., start:stop, :]
        s, tanh_s = _scores(qg, kc, scale, softcap)
        keep = _chunk_mask(start, stop, N, M, window, block_mask, block_q, block_k, Hk)
        p = torch.exp((s - lse_g[..., None]).masked_fill(~keep, -math.inf))  # (B, Hk, G, N, chunk)
        dv[:, :, start:stop] = torch.matmul(p.transpose(-1, -2), dog).sum(dim=2)
        dp = torch.matmul(dog, vc.transpose(-1, -2))
        ds = p * (dp - delta[..., None])
        if tanh_s is not None:
            ds = ds * (1 - tanh_s * tanh_s)
        dq += torch.matmul(ds, kc) * scale
        dk[:, :, start:stop] = torch.matmul(ds.transpose(-1, -2), qg).sum(dim=2) * scale
    return dq.reshape(B, Hq, N, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
