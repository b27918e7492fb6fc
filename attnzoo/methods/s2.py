"""s2 - S2-Attention: sparsely-sharded local + vertical-stride attention (Lin et al., 2024).

Algorithm: a static block pattern per kv head (attnzoo.masks.local_strided): every query block keeps
its `local_blocks` most recent key blocks and every `vert_stride`-th key block, with the stride's
phase shifted by `head_sliding_step` from kv head to kv head so that the heads together cover the
whole context (dkernel's default step, max(1, vert_stride // Hq), counts query heads); the last
`num_dense_heads` kv heads are dense. The query heads of a GQA group share their kv head's pattern.
The pattern depends only on the shape, so it is built once per shape and device and cached (the last
PATTERN_CACHE_SIZE shapes; each entry holds the bool mask and its kernel index, about
17 * Hq * nQB * nKB bytes); the shared block-sparse flash kernel (forward and backward) then runs
over it.
"""

from __future__ import annotations

import functools

import torch

from .. import masks
from ..block_mask import BlockMask
from ..ops.flash import flash_attention, ran_blocks
from ..validation import check_block_size, check_bool, check_int, check_optional, check_softcap, check_window

PATTERN_CACHE_SIZE = 4


@functools.lru_cache(maxsize=PATTERN_CACHE_SIZE)
def s2_block_mask(n: int, m: int, q_heads: int, kv_heads: int, *, block_size: int, local_blocks: int,
                  vert_stride: int, homo_head: bool, num_dense_heads: int, head_sliding_offset: int,
                  causal: bool, device, head_sliding_step: int | None = None) -> BlockMask:
    """The S2 pattern (1, q_heads, nQB, nKB) for one shape: kv head h // (q_heads // kv_heads)'s
    pattern for query head h; `head_sliding_step` None is dkernel's default, max(1, vert_stride //
    q_heads). Cached (with its kernel index); treat it as read-only. Built as a normal tensor even
    under torch.inference_mode, so the cached entry serves later calls outside it."""
    step = max(1, vert_stride // q_heads) if head_sliding_step is None else head_sliding_step
    with torch.inference_mode(False):
        per_kv_head = masks.local_strided(
            n, m, block_size, local_blocks=local_blocks, vert_stride=vert_stride, heads=kv_heads, causal=causal,
            homo_head=homo_head, num_dense_heads=num_dense_heads, head_sliding_offset=head_sliding_offset,
            head_sliding_step=step, device=device)
        per_q_head = per_kv_head.mask.repeat_interleave(q_heads // kv_heads, dim=1)
        return BlockMask(per_q_head, per_kv_head.block_size)


def check_s2_params(kv_heads: int, *, block_size, local_blocks, vert_stride, homo_head, num_dense_heads,
                    head_sliding_offset, head_sliding_step) -> dict:
    """The pattern's parameters, validated (numbers may be Python, numpy or 0-d tensor scalars), as the
    keywords of `s2_block_mask`; `num_dense_heads` counts kv heads."""
    return dict(block_size=check_block_size(block_size), local_blocks=check_int("local_blocks", local_blocks, low=1),
                vert_stride=check_int("vert_stride", vert_stride, low=1), homo_head=check_bool("homo_head", homo_head),
                num_dense_heads=check_int("num_dense_heads", num_dense_heads, low=0, high=kv_heads),
                head_sliding_offset=check_int("head_sliding_offset", head_sliding_offset),
                head_sliding_step=check_optional(check_int, "head_sliding_step", head_sliding_step, low=0))


def s2(q, k, v, *, causal: bool, scale: float, backend: str, block_size: int = 64, local_blocks: int = 16,
       vert_stride: int = 8, homo_head: bool = False, num_dense_heads: int = 0, head_sliding_offset: int = 0,
       head_sliding_step: int | None = None, window_size=(-1, -1), softcap: float = 0.0,
       return_block_mask: bool = False, pack=None):
    """S2-Attention: q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> out (B, Hq, N, Dv), or
    (out, block_mask) with `return_block_mask`. See attnzoo.masks.local_strided for the pattern;
    `num_dense_heads` counts kv heads. `pack`: the sequences of a packed call, each with the pattern of
    its own shape (docs/varlen.md)."""
    pattern = check_s2_params(k.shape[1], block_size=block_size, local_blocks=local_blocks, vert_stride=vert_stride,
                              homo_head=homo_head, num_dense_heads=num_dense_heads,
                              head_sliding_offset=head_sliding_offset, head_sliding_step=head_sliding_step)
    window, softcap = check_window(window_size), check_softcap(softcap)
    return_block_mask = check_bool("return_block_mask", return_block_mask)
    if pack is None:
        block_mask = s2_block_mask(q.shape[2], k.shape[2], q.shape[1], k.shape[1], causal=causal, device=q.device,
                                   **pattern)
    else:  # each sequence's pattern (cached per shape), in the pack's grid
        block_mask = BlockMask.packed([s2_block_mask(n, m, q.shape[1], k.shape[1], causal=causal, device=q.device,
                                                     **pattern) if n and m else None
                                       for n, m in zip(pack.q_lengths, pack.k_lengths)], pack, q.shape[1])
    out, _ = flash_attention(q, k, v, scale=scale, causal=causal, window_size=window, softcap=softcap,
                             block_mask=block_mask, backend=backend, pack=pack)
    if not return_block_mask:
        return out
    ran = ran_blocks(block_mask, q, k, causal=causal, window=window, pack=pack)
    if pack is None:  # a copy: the cached pattern serves every later call of this shape
        ran = BlockMask(ran.mask.clone(), ran.block_size)
    return out, ran


def example_kwargs(q, k, v, *, causal):
    """A pattern with several local and strided blocks on `attnzoo check`'s small inputs."""
    return {"block_size": 16, "local_blocks": 2, "vert_stride": 2}
