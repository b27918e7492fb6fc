"""The block-scoring op: XAttention's strided antidiagonal estimate of every (query block, key block).

`antidiagonal_block_scores(q, k, ..., backend)` runs the Triton kernel (attnzoo/kernels/scoring.py)
or its PyTorch twin (attnzoo/torch_impl/scoring.py); both implement one signature and one definition
(see the kernel's docstring). SparseD uses it with stride 1, where it is the exact block-summed softmax.
"""

from __future__ import annotations

import torch

from ..geometry import Pack
from .dispatch import implementation


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, *, stride: int, block_q: int, block_k: int,
                              scale: float, causal: bool, backend: str, pack: Pack | None = None) -> torch.Tensor:
    """q (B, Hq, N, D), k (B, Hk, M, D) -> block scores (B, Hq, nQB, nKB) fp32, no gradient. For a pack
    (attnzoo.geometry.Pack, B = 1): (S, Hq, nQB, nKB) over the longest sequences' grid, each sequence's
    scores in its top-left corner (one kernel launch), 0 past its end."""
    seqlens = None if pack is None else (pack.q_starts, pack.k_starts)
    with torch.no_grad():
        return implementation("scoring", backend).antidiagonal_block_scores(
            q, k, stride=stride, block_q=block_q, block_k=block_k, scale=scale, causal=causal, seqlens=seqlens)
