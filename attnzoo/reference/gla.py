"""GLA's oracle (METHODS.md, gla): the gated recurrence, one token at a time.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,     o_t = scale * q_t S_t      (causal only)
"""

from __future__ import annotations

from .linear import recurrent_linear_attention


def gla(q, k, v, *, scale: float, g=None, initial_state=None):
    """(out (B, H, N, Dv), final state (B, H, D, Dv)) for q, k (B, H, N, D), g (B, H, N, D) | None."""
    out, state, _ = recurrent_linear_attention(q, k, v, g=None if g is None else g.to(q.dtype), scale=scale,
                                               causal=True, initial_state=initial_state)
    return out, state
