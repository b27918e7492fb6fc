"""The block-target op: the largest softmax probability of every (block x block) pair, from the lse.

`block_max_probs(q, k, lse, ..., backend)` runs the Triton kernel (attnzoo/kernels/block_target.py)
or its PyTorch twin (attnzoo/torch_impl/block_target.py), one signature for both. SeerAttention's
distillation target (`attnzoo.methods.seerattention.block_attention_target`) is built on it.
"""

from __future__ import annotations

import torch

from .dispatch import implementation


def block_max_probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, scale: float, causal: bool,
                    block_size: int, backend: str) -> torch.Tensor:
    """(B, Hq, nQB, nKB) fp32: max over each (block x block) pair of exp(scale q k^T - lse), no gradient."""
    with torch.no_grad():
        return implementation("block_target", backend).block_max_probs(q, k, lse, scale=scale, causal=causal,
                                                        block_size=block_size)
