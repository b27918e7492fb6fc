"""dense - exact softmax attention, FlashAttention-2 (Dao, 2023).

Algorithm: for each query tile, stream key tiles with an online softmax (running max and sum,
exp2), keep the logsumexp for the backward; the backward recomputes probabilities tile by tile.
Everything happens in the shared flash kernel (attnzoo/kernels/flash.py); this file only maps the
method's parameters onto it.
"""

from __future__ import annotations

from ..ops.flash import flash_attention
from ..validation import check_softcap, check_window


def dense(q, k, v, *, causal: bool, scale: float, backend: str, window_size=(-1, -1), softcap: float = 0.0,
          return_lse: bool = False):
    """Exact attention. `window_size` (left, right) limits each query to keys within that distance of
    its (bottom-right aligned) diagonal, -1 = unbounded; `softcap` > 0 applies softcap * tanh(s / softcap)
    to the scaled scores (Gemma 2). Returns out (B, Hq, N, Dv), or (out, lse) with `return_lse`."""
    out, lse = flash_attention(q, k, v, scale=scale, causal=causal, window_size=check_window(window_size),
                               softcap=check_softcap(softcap), backend=backend, need_lse=return_lse)
    return (out, lse) if return_lse else out
