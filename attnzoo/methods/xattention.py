"""xattention - XAttention: block-sparse attention with antidiagonal scoring (Xu et al., 2025).

Algorithm (prefill):
1. Estimate: for stride S, score every (query block, key block) by the strided antidiagonal
   estimator (attnzoo/kernels/scoring.py, or its PyTorch twin): per query group of S rows, a
   softmax over key groups of the averaged antidiagonal logits, summed inside each block.
2. Select, per (batch, query head, query block): the forced blocks (key block 0, and for causal
   the diagonal block), then the other blocks in descending score until the selected mass reaches
   `threshold` times the row total (the block that crosses it is kept). threshold >= 1 keeps every
   block that causal attention touches.
3. Attend: block-sparse FlashAttention over the selected blocks (attnzoo/ops/flash.py).
GQA: query head h is scored against kv head h // (Hq // Hk); masks are per query head.
"""

from __future__ import annotations

import torch

from ..block_mask import BlockMask, _as_pair
from ..geometry import block_geometry, diagonal_key_block
from ..ops.flash import flash_attention
from ..ops.scoring import antidiagonal_block_scores


def check_params(stride, threshold, block_size) -> tuple[int, int]:
    """Validate the parameters; returns (block_q, block_k)."""
    block_q, block_k = _as_pair(block_size)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or stride & (stride - 1):
        raise ValueError(f"stride must be a power of two >= 1, got {stride!r}")
    if stride > min(block_q, block_k):
        raise ValueError(f"stride must divide the block size, got stride={stride} with block_size={block_size!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"threshold must be a float >= 0 (>= 1 keeps every block), got {threshold!r}")
    return block_q, block_k


def forced_blocks(n: int, m: int, block_q: int, block_k: int, *, causal: bool, admissible: torch.Tensor) -> torch.Tensor:
    """Bool (nQB, nKB): key block 0, and for causal the diagonal key block, where attention sees them
    (`admissible`, the blocks holding a visible pair)."""
    device = admissible.device
    key = torch.arange(admissible.shape[1], device=device)[None, :]
    forced = key == 0
    if causal:
        forced = forced | (key == diagonal_key_block(n, m, block_q, block_k, device=device)[:, None])
    return forced & admissible


def threshold_select(scores: torch.Tensor, threshold: float, forced: torch.Tensor,
                     admissible: torch.Tensor) -> torch.Tensor:
    """scores (..., nQB, nKB) >= 0; forced, admissible bool (nQB, nKB) -> bool (..., nQB, nKB).

    Per row: the forced blocks, then the admissible others in descending score (ties: lower index
    first) while the mass kept before a block is < threshold * row total, so the crossing block is
    kept. threshold >= 1 keeps every admissible block."""
    if threshold >= 1:
        return admissible.expand_as(scores).clone()
    candidates = admissible & ~forced
    total = (scores * admissible).sum(-1, keepdim=True)
    forced_mass = (scores * forced).sum(-1, keepdim=True)
    ranked, order = scores.masked_fill(~candidates, -1.0).sort(dim=-1, descending=True, stable=True)
    running = torch.cumsum(ranked.clamp(min=0), dim=-1)
    kept_before = torch.cat([torch.zeros_like(running[..., :1]), running[..., :-1]], dim=-1)  # exclusive
    take = (ranked >= 0) & (forced_mass + kept_before < threshold * total)
    return torch.zeros_like(take).scatter(-1, order, take) | forced


def select_blocks(q, k, *, stride: int, threshold: float, block_q: int, block_k: int, scale: float,
                  causal: bool, backend: str) -> BlockMask:
    """XAttention's block mask (B|1, Hq|1, nQB, nKB) for q (B, Hq, N, D), k (B, Hk, M, D)."""
    n, m = q.shape[2], k.shape[2]
    admissible, _ = block_geometry(n, m, block_q, block_k, causal=causal, device=q.device)
    if threshold >= 1:  # every admissible block: no estimate needed
        return BlockMask(admissible[None, None], (block_q, block_k))
    forced = forced_blocks(n, m, block_q, block_k, causal=causal, admissible=admissible)
    scores = antidiagonal_block_scores(q, k, stride=stride, block_q=block_q, block_k=block_k, scale=scale,
                                       causal=causal, backend=backend)
    return BlockMask(threshold_select(scores, threshold, forced, admissible), (block_q, block_k))


def xattention(q, k, v, *, causal: bool, scale: float, backend: str, stride: int = 8, threshold: float = 0.9,
               block_size=128, return_block_mask: bool = False):
    """XAttention prefill: q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> out (B, Hq, N, Dv),
    or (out, block_mask) with `return_block_mask`. `stride` (power of two dividing `block_size`) is the
    antidiagonal stride S; `threshold` the fraction of estimated mass each query-block row keeps."""
    block_q, block_k = check_params(stride, threshold, block_size)
    block_mask = select_blocks(q, k, stride=stride, threshold=float(threshold), block_q=block_q, block_k=block_k,
                               scale=scale, causal=causal, backend=backend)
    out, _ = flash_attention(q, k, v, scale=scale, causal=causal, block_mask=block_mask, backend=backend)
    return (out, block_mask) if return_block_mask else out


def example_kwargs(q, k, v, *, causal):
    """Blocks small enough that `attnzoo check`'s inputs span several, and a threshold that drops some."""
    return {"block_size": 32, "stride": 8, "threshold": 0.5}
