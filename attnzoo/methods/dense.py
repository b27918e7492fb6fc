"""dense - exact softmax attention, FlashAttention-2 (Dao, 2023).

Algorithm: for each query tile, stream key tiles with an online softmax (running max and sum,
exp2), keep the logsumexp for the backward; the backward recomputes probabilities tile by tile.
An additive `bias` (T5's relative position bias, ALiBi, a padding mask) is read tile by tile and
added to the scores; attention `sinks` (gpt-oss) add one logit per head to every row's softmax
denominator. Everything happens in the shared flash op (attnzoo/ops/flash.py); this file only
maps the method's parameters onto it.
"""

from __future__ import annotations

from ..ops.flash import flash_attention
from ..validation import check_bias, check_bool, check_sinks, check_softcap, check_window


def dense(q, k, v, *, causal: bool, scale: float, backend: str, window_size=(-1, -1), softcap: float = 0.0,
          bias=None, sinks=None, return_lse: bool = False, pack=None):
    """Exact attention. `window_size` (left, right) limits each query to keys within that distance of
    its (bottom-right aligned) diagonal, -1 = unbounded; `softcap` > 0 applies softcap * tanh(s / softcap)
    to the scaled scores (Gemma 2). `bias`: additive, broadcastable to (B, Hq, N, M), added after the
    softcap (differentiable); `sinks`: (Hq,) sink logits, differentiable. Returns out (B, Hq, N, Dv), or
    (out, lse) with `return_lse` (lse includes the sinks). `pack`: the sequences of a packed call
    (attnzoo.geometry.Pack; q, k, v (1, H, total, D), `bias` over the pack), one kernel call for all."""
    return_lse = check_bool("return_lse", return_lse)
    if bias is not None:
        check_bias(bias, q, k.shape[2], pack)
    if sinks is not None:
        check_sinks(sinks, q)
    out, lse = flash_attention(q, k, v, scale=scale, causal=causal, window_size=check_window(window_size),
                               softcap=check_softcap(softcap), bias=bias, sinks=sinks, backend=backend,
                               need_lse=return_lse, pack=pack)
    return (out, lse) if return_lse else out
