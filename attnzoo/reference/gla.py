"""GLA's oracle (METHODS.md, gla): the gated recurrence, one token at a time.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t      (causal only)
"""

from __future__ import annotations

from .linear import per_query_head, recurrent_linear_attention


def gla(q, k, v, *, scale: float, g=None, initial_state=None):
    """(out (B, Hq, N, Dv), final state (B, Hk, D, Dv)) for q (B, Hq, N, D), k (B, Hk, N, D), g
    (B, Hk, N, D) | None, initial_state (B, Hk, D, Dv) | None. With GQA each query head runs the
    recurrence of its kv head (k, v, g, state); the kv head's final state is then that of its first
    query head (all of its query heads carry the same one)."""
    hq, hk = q.shape[1], k.shape[1]
    k, v, g, initial_state = (per_query_head(x, hq) for x in (k, v, g, initial_state))
    out, state, _ = recurrent_linear_attention(q, k, v, g=None if g is None else g.to(q.dtype), scale=scale,
                                               causal=True, initial_state=initial_state)
    return out, state[:, :: hq // hk]
