"""GLA: Gated Linear Attention (Yang, Wang, Shen, Panda, Kim; arXiv 2312.06635, ICML 2024).

Per head, with log forget gates g_t <= 0 (one per key channel):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

Causal only. Runs on the chunked linear kernel (attnzoo/kernels/linear.py); on CUDA, backend="fla"
runs fla's `chunk_gla` instead. `GLAGate` computes g from hidden states as the paper's layer does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import linear as _linear
from ..validation import check_bool, check_tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def check_gla_inputs(q, causal: bool, g, k_len: int, kv_heads: int | None = None) -> None:
    """g, when given, is per kv head: (B, Hk, N, D), shared by the kv head's query heads (GQA); kv_heads
    None means Hk = Hq."""
    B, Hq, N, D = q.shape
    if not causal:
        raise ValueError("gla is causal only: its gates decay the state along the sequence order, so a "
                         "non-causal sum has nothing to decay; call it with causal=True")
    if k_len != q.shape[2]:
        raise ValueError(f"gla needs q and k of one length (a recurrence over one sequence), got q length "
                         f"{q.shape[2]} and k length {k_len}")
    if g is not None:
        check_tensor("g", g, shape=(B, Hq if kv_heads is None else kv_heads, N, D), like=q, dtype=_FLOATS)
        _linear.check_log_gates("g", g)


def gla(q, k, v, *, causal: bool, scale: float, backend: str, chunk_size=None, g=None, initial_state=None,
        output_final_state: bool = False, pack=None):
    """q (B, Hq, N, D); k (B, Hk, N, D); v (B, Hk, N, Dv); g (B, Hk, N, D) log gates <= 0 (None = no
    decay), per kv head; initial_state (B, Hk, D, Dv) fp32. Returns o (B, Hq, N, Dv), and with
    `output_final_state` also the final state (B, Hk, D, Dv) fp32. `pack`: the sequences of a packed
    call (B = 1), each with its own state: initial and final states (S, Hk, D, Dv)."""
    check_gla_inputs(q, causal, g, k.shape[2], k.shape[1])
    return _linear.linear_attention(q, k, v, g=g, scale=scale, causal=True, backend=backend,
                                    initial_state=initial_state,
                                    output_final_state=check_bool("output_final_state", output_final_state),
                                    chunk_size=chunk_size, pack=pack)


def step(q_t, k_t, v_t, state=None, *, g_t=None, scale: float | None = None):
    """One decoding step: q_t, k_t (B, H, 1, D), v_t (B, H, 1, Dv), g_t (B, H, 1, D) | None, state
    (B, H, D, Dv) fp32 | None. Returns (o_t (B, H, 1, Dv), state)."""
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    return _linear.step(q_t, k_t, v_t, state, g_t=g_t, scale=scale)


class GLAGate(torch.nn.Module):
    """The paper's forget gate: g = logsigmoid(W2 W1 x + b) / normalizer, a rank-`low_rank` projection
    of hidden states x (B, N, hidden_size) to g (B, num_heads, N, head_dim) <= 0. The normalizer
    (temperature 16 in the paper) keeps gates near 0, i.e. slow forgetting."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, low_rank: int = 16, normalizer: float = 16.0):
        super().__init__()
        self.num_heads, self.head_dim, self.normalizer = num_heads, head_dim, normalizer
        self.down = torch.nn.Linear(hidden_size, low_rank, bias=False)
        self.up = torch.nn.Linear(low_rank, num_heads * head_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.down.in_features:
            raise ValueError(f"x must be (B, N, {self.down.in_features}), got shape {tuple(x.shape)}")
        logits = self.up(self.down(x))
        g = F.logsigmoid(logits) / self.normalizer
        return g.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)


def example_kwargs(q, k, v, *, causal):
    return {"g": F.logsigmoid(torch.randn_like(k)) / 4}  # per kv head
