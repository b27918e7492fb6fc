"""LAWCAT's oracle (METHODS.md, lawcat; attnzoo's reconstruction), token by token.

    q~ = causal_conv(q), k~ = causal_conv(k)             depthwise, r + 1 taps per (head, channel)
    S_t = a_t S_{t-1} + phi(k~_t)^T v_t,   z_t = a_t z_{t-1} + phi(k~_t),   a_t = exp(g_t)
    o_t = phi(q~_t) S_t / (phi(q~_t) . z_t + eps)

g is per head (B, H, N) (one a_t for every channel) or per channel (B, H, N, D). Causal only.
phi is "elu1", "relu", or a callable applied as given (a learned feature map, shared by q and k).
"""

from __future__ import annotations

import torch

from .linear import per_query_head, recurrent_linear_attention


def elu1(x):
    """ELU(x) + 1: x + 1 for x > 0, exp(x) otherwise (> 0 everywhere)."""
    return torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0)))


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


FEATURE_MAPS = {"elu1": elu1, "relu": relu}


def causal_depthwise_conv(x, weight):
    """x (B, H, N, D), weight (H, D, r + 1): y_t = sum_j weight[..., j] * x_{t - r + j} (zero before 0),
    so weight[..., -1] multiplies the current token. weight None = identity."""
    if weight is None:
        return x
    weight = weight.to(x.dtype)
    r = weight.shape[-1] - 1
    out = torch.zeros_like(x)
    for t in range(x.shape[2]):
        for j in range(r + 1):
            s = t - r + j
            if s >= 0:
                out[:, :, t] += weight[None, :, :, j] * x[:, :, s]
    return out


def lawcat(q, k, v, *, g=None, conv_q=None, conv_k=None, feature_map: str = "elu1", eps: float = 1e-6):
    """o (B, Hq, N, Dv) for q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hk, N, Dv); conv_q (Hq, D, r + 1),
    conv_k and g of the kv heads (query head h reads kv head h // (Hq / Hk))."""
    phi = feature_map if callable(feature_map) else FEATURE_MAPS[feature_map]
    phi_q, phi_k = phi(causal_depthwise_conv(q, conv_q)), phi(causal_depthwise_conv(k, conv_k))
    if g is not None:
        g = g.to(q.dtype)
        if g.dim() == 3:  # one gate per head: the same decay for every channel
            g = g[..., None].expand(k.shape)
    hq = q.shape[1]
    phi_k, v, g = per_query_head(phi_k, hq), per_query_head(v, hq), per_query_head(g, hq)
    return recurrent_linear_attention(phi_q, phi_k, v, g=g, causal=True, normalize=True, eps=eps)[0]
