"""What a row reports besides its time and errors: FLOPs and density.

FLOP convention (FlashAttention-2's, also the Triton tutorial's): a forward is two GEMMs,
2*N*M*D + 2*N*M*Dv per (batch, head) = 4*B*H*N*M*D when Dv = D, halved for causal; fwd+bwd counts
3.5x the forward (backward = 2.5x: two GEMMs for dV/dP, two for dQ/dK, plus recomputing P).
"""

from __future__ import annotations

import torch

from ..block_mask import block_geometry

FWD_BWD_FACTOR = 3.5


def mode_factor(mode: str) -> float:
    return FWD_BWD_FACTOR if mode == "fwd+bwd" else 1.0


def dense_equivalent_flops(batch: int, heads: int, seqlen: int, kv_seqlen: int, head_dim: int,
                           v_dim: int, *, causal: bool, mode: str) -> float:
    """FLOPs dense attention does for this shape: the numerator of every effective TFLOP/s."""
    forward = 2.0 * batch * heads * seqlen * kv_seqlen * (head_dim + v_dim)
    return forward * (0.5 if causal else 1.0) * mode_factor(mode)


def _block_extents(length: int, block: int) -> torch.Tensor:
    """Number of positions in each block of a sequence (the last block may be ragged)."""
    starts = torch.arange(0, length, block, dtype=torch.float64)
    return torch.clamp(length - starts, max=block)


def _computed_blocks(block_mask, seqlen: int, kv_seqlen: int, *, causal: bool):
    """The blocks the kernel visits: chosen by the method and touched by the causal mask.
    Returns (kept (Bm, Hm, nQB, nKB) bool, admissible (nQB, nKB) bool)."""
    block_q, block_k = block_mask.block_size
    admissible, _ = block_geometry(seqlen, kv_seqlen, block_q, block_k, causal=causal,
                                   device=block_mask.to_dense().device)
    return block_mask.to_dense() & admissible, admissible


def density(block_mask, seqlen: int, kv_seqlen: int, *, causal: bool) -> float:
    """Fraction of the blocks that dense attention computes (under the same causal flag) that the
    method computes: 1.0 is dense, 0.1 skips nine blocks in ten. Comparable across methods whatever
    they store outside the causal region."""
    kept, admissible = _computed_blocks(block_mask, seqlen, kv_seqlen, causal=causal)
    return (kept.sum(dim=(-1, -2)).double() / admissible.sum()).mean().item()


def computed_flops(block_mask, batch: int, heads: int, seqlen: int, kv_seqlen: int, head_dim: int,
                   v_dim: int, *, causal: bool, mode: str) -> float:
    """FLOPs of the tiles a block-sparse kernel actually multiplies (whole tiles, as the kernel
    computes them, including the masked half of diagonal tiles)."""
    kept, _ = _computed_blocks(block_mask, seqlen, kv_seqlen, causal=causal)
    block_q, block_k = block_mask.block_size
    rows = _block_extents(seqlen, block_q).to(kept.device)
    cols = _block_extents(kv_seqlen, block_k).to(kept.device)
    pairs = torch.einsum("bhij,i,j->", kept.double(), rows, cols).item()
    broadcast = batch * heads / (kept.shape[0] * kept.shape[1])
    return 2.0 * pairs * broadcast * (head_dim + v_dim) * mode_factor(mode)
