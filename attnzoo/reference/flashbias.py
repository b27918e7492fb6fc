"""FlashBias's oracle (METHODS.md, flashbias): softmax attention with the bias written out in full.

    out = softmax(scale * q k^T + bias) v       (the bias is not multiplied by `scale`)

The bias each input form stands for, as a (B|1, Hq, N, M) tensor:
- bias_factors (U, W): bias = U W^T, U (B|1, Hq|1, N, R), W (B|1, 1|Hk|Hq, M, R); a W with Hk heads
  serves query head h from kv head h // (Hq // Hk);
- alibi_slopes (Hq,): flash-attn's causal ALiBi, bias[h, i, j] = -slope_h * (i + M - N - j), with its
  row-constant part kept (softmax ignores it);
- bias (B|1, Hq|1, N, M): that bias itself (whatever `rank` the method was asked to factor it to).
"""

from __future__ import annotations

import torch

from .dense import attention


def factor_bias(u, w, q_heads: int):
    """U W^T (B|1, Hq|1, N, M) with W's heads expanded to the query heads."""
    if w.shape[1] not in (1, q_heads):
        group = q_heads // w.shape[1]
        w = torch.stack([w[:, h // group] for h in range(q_heads)], dim=1)
    return torch.einsum("bhnr,bhmr->bhnm", u, w)


def alibi_bias(slopes, n: int, m: int):
    """(1, H, N, M): -slope_h * (i + M - N - j), float64 (or the slopes' dtype when wider)."""
    dtype = torch.promote_types(slopes.dtype, torch.float64)
    i = torch.arange(n, dtype=dtype, device=slopes.device)[:, None]
    j = torch.arange(m, dtype=dtype, device=slopes.device)[None, :]
    return (-slopes.to(dtype)[:, None, None] * (i + (m - n) - j))[None]


def relative_position_bias(table, n: int, m: int):
    """(H, N, M) from a table (H, N + M - 1) indexed by the key's offset from the query's bottom-right
    aligned position: entry (i, j) = table[h, (j - (i + M - N)) + (M - 1)], offsets -(M-1) .. N-1."""
    H = table.shape[0]
    out = table.new_empty(H, n, m)
    for i in range(n):
        for j in range(m):
            out[:, i, j] = table[:, j - (i + m - n) + m - 1]
    return out


def explicit_bias(q, k, *, bias_factors=None, bias=None, alibi_slopes=None):
    """The full bias of whichever form is given, in q's dtype."""
    given = [x is not None for x in (bias_factors, bias, alibi_slopes)]
    if sum(given) != 1:
        raise ValueError("give exactly one of bias_factors, bias, alibi_slopes")
    if bias is not None:
        return bias.to(q.dtype)
    if alibi_slopes is not None:
        return alibi_bias(alibi_slopes, q.shape[2], k.shape[2]).to(q.dtype)
    u, w = bias_factors
    return factor_bias(u.to(q.dtype), w.to(q.dtype), q.shape[1])


def flashbias(q, k, v, *, causal: bool, scale: float, bias_factors=None, bias=None, alibi_slopes=None):
    """softmax(scale q k^T + bias) v with the explicit bias (a full `bias` is used as given: this is the
    exact definition, not the rank-`rank` approximation the method computes)."""
    full = explicit_bias(q, k, bias_factors=bias_factors, bias=bias, alibi_slopes=alibi_slopes)
    return attention(q, k, v, causal=causal, scale=scale, bias=full)
