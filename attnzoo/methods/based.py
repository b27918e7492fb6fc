"""BASED: Taylor linear attention (Arora, Eyuboglu, Zhang et al.; arXiv 2402.18668, ICML 2024).

The second-order Taylor feature map turns exp(s) into 1 + s + s^2 / 2, s = scale * q . k:

    phi(x) = [1, x, x_i x_j c_ij for i <= j]     c_ii = 1 / sqrt 2, c_ij = 1 (i < j)
    o_t = sum_s phi(q_t) . phi(k_s) v_s / (sum_s phi(q_t) . phi(k_s) + eps)   (s <= t when causal)

phi(scale * q) . phi(k) = 1 + s + s^2 / 2 exactly. This symmetric map has 1 + D + D(D+1)/2 features
(153 for D = 16) instead of the 1 + D + D^2 of the full outer product; the kernel value is the same.
The features run through the chunked linear kernel. BASED's sliding-window layers are `dense` with
`window_size`, a separate layer in the paper's hybrid stack.
"""

from __future__ import annotations

import warnings

import torch

from ..ops import linear as _linear
from ..validation import check_bool, check_positive
from . import at_least_fp32

_WARN_HEAD_DIM = 64


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., 1 + D + D(D+1)/2): the symmetric second-order Taylor features of x."""
    D = x.shape[-1]
    rows, cols = torch.triu_indices(D, D, device=x.device)
    coef = torch.ones(rows.shape[0], dtype=x.dtype, device=x.device).masked_fill(rows == cols, 0.5 ** 0.5)
    pairs = x[..., rows] * x[..., cols] * coef
    return torch.cat([torch.ones_like(x[..., :1]), x, pairs], dim=-1)


def _features(q, k, scale: float):
    """(phi(scale q), phi(k)) in fp32 at least: the pair products square the inputs (x100 in fp16 would
    overflow), and the state sums them over the sequence."""
    D = q.shape[-1]
    if D > _WARN_HEAD_DIM:
        warnings.warn(f"based: q/k head dim {D} gives {1 + D + D * (D + 1) // 2} features per head; BASED "
                      f"projects q and k to a small dim (16) first", stacklevel=3)
    return taylor_feature_map(at_least_fp32(q) * scale), taylor_feature_map(at_least_fp32(k))


def _check_lengths(q, k) -> None:
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"based needs q and k of one length, got q length {q.shape[2]} and k length {k.shape[2]}")


def based(q, k, v, *, causal: bool, scale: float, backend: str, use_norm: bool = True, eps: float = 1e-6,
          chunk_size=None, pack=None):
    """q, k (B, H, N, D) (D small, e.g. 16), v (B, H, N, Dv) -> o (B, H, N, Dv). `use_norm=False`
    returns the numerator only. `pack`: the sequences of a packed call (the features are per token)."""
    _check_lengths(q, k)
    use_norm, eps = check_bool("use_norm", use_norm), check_positive("eps", eps)
    phi_q, phi_k = _features(q, k, scale)
    return _linear.linear_attention(phi_q, phi_k, v, scale=1.0, causal=causal, backend=backend, normalize=use_norm,
                                    eps=eps, chunk_size=chunk_size, pack=pack)


def step(q_t, k_t, v_t, state=None, *, scale: float | None = None, use_norm: bool = True, eps: float = 1e-6):
    """One causal decoding step: q_t, k_t (B, H, 1, D), v_t (B, H, 1, Dv); state over the Taylor
    features, (S, z) with `use_norm` else S, None to start. Returns (o_t, state)."""
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    phi_q, phi_k = _features(q_t, k_t, scale)
    return _linear.step(phi_q, phi_k, v_t, state, scale=1.0, normalize=use_norm, eps=eps)
