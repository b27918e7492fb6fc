"""Common block-sparsity patterns as `BlockMask`s, and combinators over block masks.

Every builder works on block indices only, on the requested device, with no host loop over rows.
Positions follow the library's bottom-right alignment (query i sits at key position i + M - N), so
`causal(n, m, ...)` keeps exactly the blocks that causal attention touches.
"""

from __future__ import annotations

import functools

import torch

from .block_mask import BlockMask
from .geometry import block_geometry, diagonal_key_block
from .validation import check_block_size, check_int, check_window

__all__ = ["and_", "causal", "local_strided", "or_", "random", "sliding_window"]


def _check_lengths(n, m) -> None:
    for name, length in (("n", n), ("m", m)):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"{name} (a sequence length) must be an int >= 1, got {length!r}")


def causal(n: int, m: int, block_size=128, *, device=None) -> BlockMask:
    """The blocks (1, 1, nQB, nKB) holding at least one pair that bottom-right causal attention sees."""
    _check_lengths(n, m)
    block_q, block_k = check_block_size(block_size)
    any_visible, _ = block_geometry(n, m, block_q, block_k, causal=True, device=device)
    return BlockMask(any_visible[None, None], (block_q, block_k))


def sliding_window(n: int, m: int, window_size, block_size=128, *, device=None) -> BlockMask:
    """The blocks (1, 1, nQB, nKB) that a (left, right) window touches (-1 = unbounded side), as in
    flash-attn: query i sees key j iff -left <= j - i - (M - N) <= right. (w, 0) is causal sliding window."""
    _check_lengths(n, m)
    block_q, block_k = check_block_size(block_size)
    any_visible, _ = block_geometry(n, m, block_q, block_k, causal=False, window=check_window(window_size),
                                    device=device)
    return BlockMask(any_visible[None, None], (block_q, block_k))


def local_strided(n: int, m: int, block_size: int = 64, *, local_blocks: int = 16, vert_stride: int = 8,
                  heads: int = 1, causal: bool = True, homo_head: bool = False, num_dense_heads: int = 0,
                  head_sliding_offset: int = 0, head_sliding_step: int | None = None, device=None) -> BlockMask:
    """S2-Attention's local + vertical-stride pattern, one per head: (1, heads, nQB, nKB).

    With query block i's diagonal key block d(i) (`diagonal_key_block`; d(i) = i when N = M):
    causal: key block j is kept for head h iff j <= d(i) and (d(i) - j < local_blocks or
    (j + h * step + head_sliding_offset) % vert_stride == 0), step = `head_sliding_step`, by default
    max(1, vert_stride // heads) (dkernel's default, whose `num_heads` counts query heads: S2 passes
    its own step when the pattern's heads are kv heads).
    Non-causal: kept iff |d(i) - j| < local_blocks, or the distance outside that band,
    max(0, d(i) - j - local_blocks + 1) + max(0, j - d(i) - local_blocks + 1), is a multiple of
    vert_stride (the same for every head). The last `num_dense_heads` heads keep every (causal)
    block; `homo_head` gives every head head 0's pattern.
    """
    _check_lengths(n, m)
    check_int("local_blocks", local_blocks, low=1)
    check_int("vert_stride", vert_stride, low=1)
    check_int("heads", heads, low=1)
    if isinstance(num_dense_heads, bool) or not isinstance(num_dense_heads, int) or not 0 <= num_dense_heads <= heads:
        raise ValueError(f"num_dense_heads must be an int in [0, {heads}] (the kv heads), got {num_dense_heads!r}")
    if homo_head and num_dense_heads:
        raise ValueError(f"homo_head=True gives every head one pattern; it cannot have num_dense_heads="
                         f"{num_dense_heads} dense heads")
    if isinstance(head_sliding_offset, bool) or not isinstance(head_sliding_offset, int):
        raise TypeError(f"head_sliding_offset must be an int, got {head_sliding_offset!r}")
    step = max(1, vert_stride // heads) if head_sliding_step is None else head_sliding_step
    check_int("head_sliding_step", step, low=0)
    block_q, block_k = check_block_size(block_size)
    diag = diagonal_key_block(n, m, block_q, block_k, device=device)[:, None]  # (nQB, 1)
    key = torch.arange(-(-m // block_k), device=device)[None, :]  # (1, nKB)
    head = torch.arange(heads, device=device)[:, None, None]  # (H, 1, 1)
    if homo_head:
        head = torch.zeros_like(head)
    if causal:
        strided = (key + head * step + head_sliding_offset) % vert_stride == 0
        sparse = (key <= diag) & ((diag - key < local_blocks) | strided)
        dense = (key <= diag).expand_as(sparse)
    else:
        outside = torch.clamp(diag - key - local_blocks + 1, min=0) + torch.clamp(key - diag - local_blocks + 1, min=0)
        sparse = (outside % vert_stride == 0).expand(heads, -1, -1)
        dense = torch.ones_like(sparse)
    is_dense = torch.arange(heads, device=device)[:, None, None] >= heads - num_dense_heads
    return BlockMask(torch.where(is_dense, dense, sparse)[None].contiguous(), (block_q, block_k))


def random(n: int, m: int, density: float, block_size=128, *, batch: int = 1, heads: int = 1, seed: int = 0,
           causal: bool = False, device=None) -> BlockMask:
    """A random mask (batch, heads, nQB, nKB): every query-block row keeps floor(density * a + 1/2) of its a
    admissible key blocks (all blocks, or those causal attention touches), chosen uniformly with a
    torch.Generator seeded by `seed` on `device`. density 0 keeps nothing, density 1 everything."""
    _check_lengths(n, m)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be a float in [0, 1], got {density!r}")
    block_q, block_k = check_block_size(block_size)
    admissible, _ = block_geometry(n, m, block_q, block_k, causal=causal, device=device)  # (nQB, nKB)
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    shape = (check_int("batch", batch, low=1), check_int("heads", heads, low=1), *admissible.shape)
    priority = torch.rand(shape, generator=generator, device=device).masked_fill(~admissible, -1.0)
    rank = priority.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = highest priority
    keep_count = torch.floor(admissible.sum(-1, keepdim=True, dtype=torch.float64) * density + 0.5)  # (nQB, 1)
    return BlockMask(rank < keep_count, (block_q, block_k))


def _combine(op, masks) -> BlockMask | torch.Tensor:
    if len(masks) < 2:
        raise ValueError(f"combine at least two block masks, got {len(masks)}")
    block_masks = [mk for mk in masks if isinstance(mk, BlockMask)]
    sizes = {mk.block_size for mk in block_masks}
    if len(sizes) > 1:
        raise ValueError(f"block masks with different block sizes cannot be combined: {sorted(sizes)}")
    tensors = []
    for mk in masks:
        tensor = mk.to_dense() if isinstance(mk, BlockMask) else mk
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.bool:
            raise TypeError(f"masks must be BlockMasks or bool tensors, got {type(mk).__name__}")
        tensors.append(tensor)
    result = functools.reduce(op, tensors)
    return BlockMask(result, sizes.pop()) if sizes else result


def and_(*masks) -> BlockMask | torch.Tensor:
    """Blocks kept by every mask (shapes broadcast). A BlockMask if any input is one, else a bool tensor."""
    return _combine(torch.logical_and, masks)


def or_(*masks) -> BlockMask | torch.Tensor:
    """Blocks kept by any mask (shapes broadcast). A BlockMask if any input is one, else a bool tensor."""
    return _combine(torch.logical_or, masks)
