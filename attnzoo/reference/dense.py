"""Dense softmax attention, written out: the oracle of dense, block_sparse and every sparse method
(given the blocks it chose), and of flashbias (given the explicit bias).

Everything here materialises the full (N, M) score matrix and works in the dtype it is given, so
tests call it in float64. Visibility follows DESIGN.md: queries and keys are bottom-right aligned,
query i sits at key position i + (M - N).
"""

from __future__ import annotations

import torch


def visible_mask(n: int, m: int, *, causal: bool = False, window_size=(-1, -1),
                 device=None) -> torch.Tensor:
    """Bool (N, M): which key each query may see. Causal and windows are bottom-right aligned:
    query i sees key j iff i + (M - N) - left <= j <= i + (M - N) + right (-1 = unbounded side),
    and causal means right = 0, as in flash-attn."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    diag = i + (m - n)
    keep = torch.ones(n, m, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= diag + right
    if left >= 0:
        keep &= j >= diag - left
    return keep


def expand_block_mask(block_mask: torch.Tensor, n: int, m: int, block_q: int, block_k: int) -> torch.Tensor:
    """Bool (..., nQB, nKB) per block -> bool (..., N, M) per element."""
    rows = torch.arange(n, device=block_mask.device) // block_q
    cols = torch.arange(m, device=block_mask.device) // block_k
    return block_mask[..., rows, :][..., :, cols]


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, mask=None, bias=None,
              window_size=(-1, -1), softcap: float = 0.0, sinks=None, return_lse: bool = False):
    """softmax(softcap(scale * q k^T) + bias, masked) v for q (B, Hq, N, D), k/v (B, Hk, M, D|Dv).

    `mask` is a bool tensor broadcastable to (B, Hq, N, M) (True = may attend), `bias` an additive
    float tensor broadcastable to the same (added after scaling and softcap). `sinks` (Hq,): one more
    logit per head in every row's softmax, a key that every row sees and whose value is zero.
    Rows that see no key output 0 and have lse -inf (lse = the sink with sinks). Returns out
    (B, Hq, N, Dv) and, with `return_lse`, lse (B, Hq, N).
    """
    if sinks is not None:
        return _with_sink_column(q, k, v, causal=causal, scale=scale, mask=mask, bias=bias,
                                 window_size=window_size, softcap=softcap, sinks=sinks, return_lse=return_lse)
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    group = Hq // Hk
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = D ** -0.5 if scale is None else scale

    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    keep = visible_mask(N, M, causal=causal, window_size=window_size, device=q.device)
    if mask is not None:
        keep = keep & mask
    keep = keep.expand_as(scores)
    sees_any = keep.any(dim=-1, keepdim=True)
    # Rows that see no key get finite dummy scores (so softmax and its gradient stay finite), then
    # their probabilities are zeroed by `keep`.
    scores = scores.masked_fill(~keep & sees_any, float("-inf")).masked_fill(~sees_any, 0.0)
    probs = torch.softmax(scores, dim=-1) * keep
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~sees_any[..., 0], float("-inf"))
    out = torch.einsum("bhnm,bhmd->bhnd", probs, v)
    return (out, lse) if return_lse else out


def _with_sink_column(q, k, v, *, causal, scale, mask, bias, window_size, softcap, sinks, return_lse):
    """Attention with sinks, literally: a sink key appended after the last key, its score sinks[h]
    for every query of head h, visible to every query, with a zero value row."""
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    group = Hq // Hk
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = D ** -0.5 if scale is None else scale
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    keep = visible_mask(N, M, causal=causal, window_size=window_size, device=q.device)
    if mask is not None:
        keep = keep & mask
    scores = scores.masked_fill(~keep.expand_as(scores), float("-inf"))
    sink_scores = sinks.to(scores.dtype)[None, :, None, None].expand(B, Hq, N, 1)
    probs = torch.softmax(torch.cat([scores, sink_scores], dim=-1), dim=-1)[..., :M]
    out = torch.einsum("bhnm,bhmd->bhnd", probs, v)
    lse = torch.logsumexp(torch.cat([scores, sink_scores], dim=-1), dim=-1)
    return (out, lse) if return_lse else out
