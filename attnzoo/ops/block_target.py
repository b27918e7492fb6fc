"""The block-target op: the largest softmax probability of every (block x block) pair, from the lse.

`block_max_probs(q, k, lse, ..., backend)` runs the Triton kernel (attnzoo/kernels/block_target.py)
or its PyTorch twin (attnzoo/torch_impl/block_target.py), one signature for both. SeerAttention's
distillation target (`attnzoo.methods.seerattention.block_attention_target`) is built on it.
"""

from __future__ import annotations

import torch

from ..geometry import Pack
from .dispatch import implementation


def block_max_probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, scale: float, causal: bool,
                    block_size: int, backend: str, pack: Pack | None = None) -> torch.Tensor:
    """(B, Hq, nQB, nKB) fp32: max over each (block x block) pair of exp(scale q k^T - lse), no gradient.
    For a pack (attnzoo.geometry.Pack, B = 1): (S, Hq, nQB, nKB) over the longest sequences' grid, each
    sequence's in its top-left corner (one kernel launch)."""
    seqlens = None if pack is None else (pack.q_starts, pack.k_starts)
    with torch.no_grad():
        return implementation("block_target", backend).block_max_probs(q, k, lse, scale=scale, causal=causal,
                                                                       block_size=block_size, seqlens=seqlens)
