"""Linear attention, token by token (the recurrence) and all at once (the quadratic form), in the
dtype it is given (tests use float64). The oracle of gla, and the core of based, lawcat and wersa.
"""

from __future__ import annotations

import torch


def per_query_head(x, query_heads: int):
    """GQA by definition: x (B, Hk, ...) of a kv head -> (B, Hq, ...), query head h reading kv head
    h // (Hq / Hk). None stays None."""
    if x is None:
        return None
    return x.repeat_interleave(query_heads // x.shape[1], dim=1)


def recurrent_linear_attention(q, k, v, *, g=None, scale: float = 1.0, causal: bool = True,
                               normalize: bool = False, eps: float = 0.0, initial_state=None,
                               initial_normalizer=None):
    """Linear attention run one token at a time, per (batch, head).

    q, k (B, H, N, F); v (B, H, N, V); g (B, H, N, F) log forget gates (None = no decay);
    initial_state (B, H, F, V) and initial_normalizer (B, H, F) start the recurrence.
    Causal:      S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  z_t = exp(g_t) * z_{t-1} + k_t,
                 o_t = scale q_t S_t  (normalize: divided by scale q_t . z_t + eps).
    Non-causal:  every o_t reads the state after the last token (g must be None).
    Returns (out (B, H, N, V), final state S (B, H, F, V), final normaliser z (B, H, F)).
    Holds one state at a time (memory O(F V), not O(N F V)).
    """
    if g is not None and not causal:
        raise ValueError("a non-causal linear attention has no order to decay along: g must be None")
    B, H, N, F = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, F, V) if initial_state is None else initial_state.to(q.dtype).clone()
    z = q.new_zeros(B, H, F) if initial_normalizer is None else initial_normalizer.to(q.dtype).clone()

    def read(t, S, z):
        o = scale * torch.einsum("bhf,bhfv->bhv", q[:, :, t], S)
        if normalize:
            o = o / (scale * (q[:, :, t] * z).sum(-1)[..., None] + eps)
        return o

    outs = []
    for t in range(N):
        if g is not None:
            decay = torch.exp(g[:, :, t])
            S = decay[..., None] * S
            z = decay * z
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + k[:, :, t]
        if causal:
            outs.append(read(t, S, z))
    if not causal:
        outs = [read(t, S, z) for t in range(N)]
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, V)
    return out, S, z


def quadratic_linear_attention(weights, v, *, causal: bool, normalize: bool, eps: float):
    """o = A v (normalize: / (A 1 + eps)) for a kernel matrix A = weights (B, H, N, M) >= 0, lower
    triangular (bottom-right aligned) when causal; v (B, H, M, V)."""
    if causal:
        n, m = weights.shape[-2:]
        rows = torch.arange(n, device=weights.device)[:, None]
        cols = torch.arange(m, device=weights.device)[None, :]
        weights = weights * (cols <= rows + (m - n))
    out = weights @ v
    if normalize:
        out = out / (weights.sum(-1, keepdim=True) + eps)
    return out
