"""The block-scoring op: XAttention's strided antidiagonal estimate of every (query block, key block).

`antidiagonal_block_scores(q, k, ..., backend)` runs the Triton kernel (attnzoo/kernels/scoring.py)
or its PyTorch twin (attnzoo/torch_impl/scoring.py); both implement one signature and one definition
(see the kernel's docstring). SparseD uses it with stride 1, where it is the exact block-summed softmax.
"""

from __future__ import annotations

import torch

from .dispatch import implementation


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, *, stride: int, block_q: int, block_k: int,
                              scale: float, causal: bool, backend: str) -> torch.Tensor:
    """q (B, Hq, N, D), k (B, Hk, M, D) -> block scores (B, Hq, nQB, nKB) fp32, no gradient."""
    with torch.no_grad():
        return implementation("scoring", backend).antidiagonal_block_scores(
            q, k, stride=stride, block_q=block_q, block_k=block_k, scale=scale, causal=causal)
