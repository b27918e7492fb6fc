"""BASED's oracle (METHODS.md, based): the second-order Taylor kernel, written two ways.

    phi(q) . phi(k) = 1 + s + s^2 / 2,   s = scale * q . k
    o_t = sum_s K(q_t, k_s) v_s / (sum_s K(q_t, k_s) + eps)      (s <= t when causal)

`based` builds the (N, N) kernel matrix from s directly (no features: memory N^2, not N D^2);
`taylor_features` is the full 1 + D + D^2 feature map, for tests of the identity.
"""

from __future__ import annotations

import torch

from .linear import per_query_head, quadratic_linear_attention


def taylor_features(x, scale: float = 1.0):
    """BASED's full second-order Taylor map, 1 + D + D^2 features: [1, x, vec(x x^T) / sqrt 2] of
    x * sqrt(scale), so that phi(q) . phi(k) = 1 + s + s^2 / 2 with s = scale * q . k (scale >= 0)."""
    x = x * scale ** 0.5
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / 2 ** 0.5
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


def taylor_kernel(q, k, scale: float):
    """(B, H, N, M): 1 + s + s^2 / 2 with s = scale * q k^T."""
    s = scale * torch.einsum("bhnd,bhmd->bhnm", q, k)
    return 1 + s + s * s / 2


def based(q, k, v, *, causal: bool, scale: float, use_norm: bool = True, eps: float = 1e-6):
    """o (B, Hq, N, Dv) for q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hk, N, Dv) (query head h reads kv
    head h // (Hq / Hk)); `use_norm=False` returns the numerator sum_s K v_s only."""
    k, v = per_query_head(k, q.shape[1]), per_query_head(v, q.shape[1])
    return quadratic_linear_attention(taylor_kernel(q, k, scale), v, causal=causal, normalize=use_norm, eps=eps)
