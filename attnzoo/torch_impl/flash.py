"""FlashAttention-2 in PyTorch: the CPU backend of attnzoo/kernels/flash.py.

Same algorithm as the Triton kernel: keys are visited in chunks with an online softmax, the
logsumexp is saved, and the backward recomputes probabilities from it, so memory stays linear in the
sequence length (one (G*N, chunk) score tile per kv head per step, never (N, M)). The query heads of
a GQA group are stacked as extra rows of their kv head, (B, Hk, G*N, D), so every product with k or
v is one plain batched matmul, k and v are never repeated, and dK/dV sum over the group by
construction.

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


def _fold_group(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, Hq, N, ...) -> (B, Hk, G*N, ...): query heads of a GQA group stacked as rows of their kv head."""
    B, Hq, N = x.shape[:3]
    return x.reshape(B, n_kv_heads, (Hq // n_kv_heads) * N, *x.shape[3:])


def _visible(n: int, m: int, start: int, stop: int, window: tuple[int, int], device) -> torch.Tensor:
    """(N, stop - start) bool: key j visible to query i under the bottom-right aligned window."""
    left, right = window
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(start, stop, device=device)[None, :]
    rel = cols - rows - (m - n)
    keep = torch.ones(n, stop - start, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= rel <= right
    if left >= 0:
        keep &= rel >= -left
    return keep


def _chunk_mask(start: int, stop: int, n: int, m: int, window, block_mask, block_q, block_k, n_kv_heads, group,
                device) -> torch.Tensor:
    """Element mask of keys [start, stop), broadcastable to the folded scores (B, Hk, G*N, chunk)."""
    keep = _visible(n, m, start, stop, window, device)  # (N, chunk)
    if block_mask is not None:
        rows = torch.arange(n, device=device) // block_q
        cols = torch.arange(start, stop, device=device) // block_k
        keep = keep & block_mask[..., rows, :][..., cols]  # (B|1, Hq|1, N, chunk)
        if keep.shape[1] > 1:  # per query head: fold exactly like q
            return _fold_group(keep, n_kv_heads)
        return keep.repeat(1, 1, group, 1)  # one pattern for all heads: tile it over the group's rows
    return keep.repeat(group, 1)


def _unread_keys_zeroed(k_chunk, v_chunk, keep):
    """Zero the keys/values of this chunk that no query of their kv head may see, as the kernel never
    loads them: NaN or garbage there must not leak through 0 * NaN in the products."""
    read = keep.any(dim=-2)[..., None]  # (B|1, Hk|1, chunk, 1)
    return k_chunk.masked_fill(~read, 0.0), v_chunk.masked_fill(~read, 0.0)


def _chunks(m: int, block_k: int | None):
    step = _CHUNK if block_k is None else max(block_k, _CHUNK // block_k * block_k)
    for start in range(0, m, step):
        yield start, min(start + step, m)


def _scores(q, k, scale, softcap):
    """Scaled (and soft-capped) scores, and tanh(scores / softcap) for the backward (None without softcap)."""
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
    qf = _fold_group(q, Hk).to(acc_dtype)  # (B, Hk, G*N, D)
    kf, vf = k.to(acc_dtype), v.to(acc_dtype)

    row_max = torch.full(qf.shape[:-1], -math.inf, dtype=acc_dtype, device=q.device)  # (B, Hk, G*N)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros(*qf.shape[:-1], Dv, dtype=acc_dtype, device=q.device)
    for start, stop in _chunks(M, block_k or None):
        keep = _chunk_mask(start, stop, N, M, window, block_mask, block_q, block_k, Hk, Hq // Hk, q.device)
        kc, vc = _unread_keys_zeroed(kf[:, :, start:stop], vf[:, :, start:stop], keep)
        s, _ = _scores(qf, kc, scale, softcap)
        s = s.masked_fill(~keep, -math.inf)
        new_max = torch.maximum(row_max, s.amax(dim=-1))
        safe_max = new_max.masked_fill(new_max == -math.inf, 0.0)  # rows with nothing visible yet
        p = torch.exp(s - safe_max[..., None])
        alpha = torch.exp(row_max - safe_max)
        row_sum = row_sum * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + torch.matmul(p, vc)
        row_max = new_max

    empty = row_sum == 0
    o = acc / row_sum.masked_fill(empty, 1.0)[..., None]
    lse = (row_max + torch.log(row_sum.masked_fill(empty, 1.0))).masked_fill(empty, -math.inf)
    return o.reshape(B, Hq, N, Dv).to(q.dtype), lse.reshape(B, Hq, N).float()


def flash_bwd(do, q, k, v, o, lse, *, scale: float, window=(-1, -1), softcap: float = 0.0,
              block_mask: torch.Tensor | None = None, block_q: int = 0, block_k: int = 0, dlse=None):
    """Gradients (dq, dk, dv) from the saved lse: probabilities are recomputed chunk by chunk.
    `dlse` (B, Hq, N), the gradient of the returned lse, enters as delta - dlse (d lse / d s = p)."""
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    acc_dtype = _accum_dtype(q.dtype)
    qf = _fold_group(q, Hk).to(acc_dtype)  # (B, Hk, G*N, D)
    dof = _fold_group(do, Hk).to(acc_dtype)  # (B, Hk, G*N, Dv)
    delta = (dof * _fold_group(o, Hk).to(acc_dtype)).sum(dim=-1)  # (B, Hk, G*N)
    if dlse is not None:
        delta = delta - _fold_group(dlse, Hk).to(acc_dtype)
    lse_f = _fold_group(lse, Hk).to(acc_dtype)
    lse_f = lse_f.masked_fill(lse_f == -math.inf, math.inf)  # rows that saw nothing: p = 0
    kf, vf = k.to(acc_dtype), v.to(acc_dtype)

    dq = torch.zeros_like(qf)
    dk = torch.empty(B, Hk, M, D, dtype=acc_dtype, device=q.device)
    dv = torch.empty(B, Hk, M, v.shape[-1], dtype=acc_dtype, device=q.device)
    for start, stop in _chunks(M, block_k or None):
        keep = _chunk_mask(start, stop, N, M, window, block_mask, block_q, block_k, Hk, Hq // Hk, q.device)
        kc, vc = _unread_keys_zeroed(kf[:, :, start:stop], vf[:, :, start:stop], keep)
        s, tanh_s = _scores(qf, kc, scale, softcap)
        p = torch.exp((s - lse_f[..., None]).masked_fill(~keep, -math.inf))  # (B, Hk, G*N, chunk)
        dv[:, :, start:stop] = torch.matmul(p.transpose(-1, -2), dof)
        ds = p * (torch.matmul(dof, vc.transpose(-1, -2)) - delta[..., None])
        if tanh_s is not None:
            ds = ds * (1 - tanh_s * tanh_s)
        dq += torch.matmul(ds, kc) * scale
        dk[:, :, start:stop] = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return dq.reshape(B, Hq, N, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
