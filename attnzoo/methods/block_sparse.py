"""block_sparse - block-sparse FlashAttention with a user-given block mask.

Algorithm: the mask names, per (batch, query head, query block), the key blocks to compute; the
shared flash kernel (attnzoo/kernels/flash.py) visits only those blocks, with the online softmax
renormalised over the selected keys (not dense attention with zeroed weights). Causal masking is
applied element-wise on top of the block mask. `attnzoo.masks` builds common patterns.
"""

from __future__ import annotations

import torch

from .. import masks
from ..block_mask import BlockMask
from ..ops.flash import flash_attention, ran_blocks
from ..validation import check_block_size, check_bool, check_softcap, check_window


def as_block_mask(block_mask, block_size, q: torch.Tensor, k: torch.Tensor, pack=None) -> BlockMask:
    """A BlockMask (or a bool tensor (B|1, Hq|1, nQB, nKB) with `block_size`) checked against q, k; for a
    pack, its grid (S, Hq|1, ceil(max_q / bq), ceil(max_k / bk))."""
    block_size = check_block_size(block_size)
    if block_mask is None:
        raise TypeError("block_sparse needs block_mask=: an attnzoo.BlockMask or a bool tensor "
                        "(B|1, Hq|1, nQB, nKB); attnzoo.masks builds common ones")
    if isinstance(block_mask, torch.Tensor):
        block_mask = BlockMask(block_mask, block_size)
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be an attnzoo.BlockMask or a bool tensor, got {type(block_mask).__name__}")
    if pack is not None:
        block_mask.check_fits_pack(q.shape[1], pack, device=q.device)
        return block_mask.for_pack(pack)
    block_mask.check_fits(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device)
    return block_mask


def block_sparse(q, k, v, *, causal: bool, scale: float, backend: str, block_size=128, block_mask=None,
                 window_size=(-1, -1), softcap: float = 0.0, return_block_mask: bool = False, pack=None):
    """Attention over the blocks of `block_mask` (an attnzoo.BlockMask, or a bool tensor
    (B|1, Hq|1, nQB, nKB) cut into `block_size` blocks; a BlockMask carries its own block size).
    q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> out (B, Hq, N, Dv); rows that keep no
    visible key output 0. `window_size` and `softcap` as dense's (the window intersects the blocks).
    With `return_block_mask`, returns (out, block_mask) (the blocks that ran, under a window). `pack`:
    the sequences of a packed call, `block_mask` its grid (docs/varlen.md)."""
    block_mask = as_block_mask(block_mask, block_size, q, k, pack)
    window, softcap = check_window(window_size), check_softcap(softcap)
    return_block_mask = check_bool("return_block_mask", return_block_mask)
    out, _ = flash_attention(q, k, v, scale=scale, causal=causal, window_size=window, softcap=softcap,
                             block_mask=block_mask, backend=backend, pack=pack)
    return (out, ran_blocks(block_mask, q, k, causal=causal, window=window, pack=pack)) if return_block_mask else out


def example_kwargs(q, k, v, *, causal):
    """A random half-density mask (per batch and query head) for `attnzoo check`, drawn on the CPU (the
    same blocks on every device, the meta device too)."""
    block = 16 if min(q.shape[2], k.shape[2]) <= 256 else 128
    drawn = masks.random(q.shape[2], k.shape[2], 0.5, block, batch=q.shape[0], heads=q.shape[1], seed=0,
                         causal=causal)
    return {"block_mask": BlockMask(drawn.mask.to(q.device), drawn.block_size)}
