"""Context-parallel forms of the exact and block-sparse methods: choose the global block mask, then ring.

Each function takes the method's own arguments on local shards and reads like the method: (1) the
block mask, chosen over the whole sequence so that it equals the single-device choice, (2) the ring
(attnzoo/distributed/ring.py). Masks that depend on the data (xattention, seerattention, sparsed)
are computed by the method's own selection on every rank from q and k gathered without gradient;
masks that depend only on the shape (s2) or come from the user (block_sparse, a seerattention score
tensor) need no gather. Per-query and per-key inputs (FlashBias's U and W) are local shards.
"""

from __future__ import annotations

import torch

from ..block_mask import BlockMask
from ..methods import block_sparse as _block_sparse
from ..methods import flashbias as _flashbias
from ..methods import s2 as _s2
from ..methods import seerattention as _seer
from ..methods import sparsed as _sparsed
from ..methods import xattention as _xattention
from ..ops.flash import max_head_dim
from ..validation import check_softcap
from .layout import Layout, gather, global_stand_in, shard
from .ring import RingSpec, ring_attention


def _global_lengths(q, k, layout: Layout) -> tuple[int, int]:
    return q.shape[2] * layout.world, k.shape[2] * layout.world


def _check_blocks(block_mask: BlockMask, n: int, m: int, layout: Layout) -> None:
    """Chunks must start on block boundaries: the ring cuts the global mask along them."""
    for what, length, block in (("q", n, block_mask.block_q), ("k/v", m, block_mask.block_k)):
        chunk = layout.chunk_length(length, what)
        if chunk % block:
            raise ValueError(f"{what} length {length} over world size {layout.world} gives chunks of {chunk} "
                             f"tokens ({layout.num_chunks} chunks), not a multiple of the block size {block}; "
                             f"pad the sequence to a multiple of {layout.num_chunks * block}")


def _ring(q, k, v, *, layout: Layout, backend: str, causal: bool, scale: float, softcap: float = 0.0,
          block_mask: BlockMask | None = None):
    """(out, lse) of the local query shard; `block_mask` is the global mask (None: every block)."""
    n, m = _global_lengths(q, k, layout)
    layout.chunk_length(n, "q")
    layout.chunk_length(m, "k/v")
    if block_mask is not None:
        _check_blocks(block_mask, n, m, layout)
    spec = RingSpec(layout, backend, n, m, causal, scale, softcap, block_mask)
    return ring_attention(q, k, v, spec)


def _gathered(q, k, layout: Layout):
    """The full q and k on every rank, without gradient: the input of a data-dependent selection."""
    with torch.no_grad():
        return gather(q.detach(), layout), gather(k.detach(), layout)


def _stand_ins(q, k, layout: Layout):
    n, m = _global_lengths(q, k, layout)
    return global_stand_in(q, n), global_stand_in(k, m)


def dense(q, k, v, *, causal, scale, backend, layout, softcap=0.0, return_lse=False):
    out, lse = _ring(q, k, v, layout=layout, backend=backend, causal=causal, scale=scale,
                     softcap=check_softcap(softcap))
    return (out, lse) if return_lse else out


def block_sparse(q, k, v, *, causal, scale, backend, layout, block_size=128, block_mask=None, softcap=0.0,
                 return_block_mask=False):
    """`block_mask` is the global mask (every rank passes the same, unsharded)."""
    block_mask = _block_sparse.as_block_mask(block_mask, block_size, *_stand_ins(q, k, layout))
    out, _ = _ring(q, k, v, layout=layout, backend=backend, causal=causal, scale=scale,
                   softcap=check_softcap(softcap), block_mask=block_mask)
    return (out, block_mask) if return_block_mask else out


def s2(q, k, v, *, causal, scale, backend, layout, block_size=64, local_blocks=16, vert_stride=8, homo_head=False,
       num_dense_heads=0, head_sliding_offset=0, head_sliding_step=None, softcap=0.0, return_block_mask=False):
    pattern = _s2.check_s2_params(k.shape[1], block_size=block_size, local_blocks=local_blocks,
                                  vert_stride=vert_stride, homo_head=homo_head, num_dense_heads=num_dense_heads,
                                  head_sliding_offset=head_sliding_offset, head_sliding_step=head_sliding_step)
    n, m = _global_lengths(q, k, layout)
    block_mask = _s2.s2_block_mask(n, m, q.shape[1], k.shape[1], causal=causal, device=q.device, **pattern)
    out, _ = _ring(q, k, v, layout=layout, backend=backend, causal=causal, scale=scale,
                   softcap=check_softcap(softcap), block_mask=block_mask)
    if return_block_mask:  # a copy: the cached pattern serves later calls
        return out, BlockMask(block_mask.mask.clone(), block_mask.block_size)
    return out


def xattention(q, k, v, *, causal, scale, backend, layout, stride=8, threshold=0.9, block_size=128,
               selection="attnzoo", chunk_size=None, softcap=0.0, return_block_mask=False):
    params = _xattention.xattention_params(stride, threshold, block_size, selection, chunk_size)
    q_all, k_all = _gathered(q, k, layout)
    block_mask = _xattention.select_blocks(q_all, k_all, stride=params.stride, threshold=params.threshold,
                                           block_q=params.block_q, block_k=params.block_k, scale=scale, causal=causal,
                                           backend=backend, selection=params.selection, chunk_size=params.chunk_size)
    out, _ = _ring(q, k, v, layout=layout, backend=backend, causal=causal, scale=scale,
                   softcap=check_softcap(softcap), block_mask=block_mask)
    return (out, block_mask) if return_block_mask else out


def seerattention(q, k, v, *, causal, scale, backend, layout, gate=None, threshold=None, topk_ratio=None,
                  block_size=64, last_blocks_dense=2, softcap=0.0, return_block_mask=False):
    """`gate`: None (oracle scores) or an AttnGate (both read the gathered q, k), or global scores
    (B|1, Hq|1, nQB, nKB), unsharded, which need no gather."""
    threshold, topk_ratio, block_size, last_blocks_dense = _seer._check_selection(threshold, topk_ratio, block_size,
                                                                                  last_blocks_dense)
    n, m = _global_lengths(q, k, layout)
    q_all, k_all = _stand_ins(q, k, layout) if isinstance(gate, torch.Tensor) else _gathered(q, k, layout)
    scores = _seer.block_scores(q_all, k_all, gate, block_size=block_size, causal=causal, scale=scale, backend=backend)
    keep = _seer.select_blocks(scores, n, m, block_size=block_size, causal=causal, threshold=threshold,
                               topk_ratio=topk_ratio, last_blocks_dense=last_blocks_dense)
    block_mask = BlockMask(keep, block_size)
    out, _ = _ring(q, k, v, layout=layout, backend=backend, causal=causal, scale=scale,
                   softcap=check_softcap(softcap), block_mask=block_mask)
    return (out, block_mask) if return_block_mask else out


def sparsed(q, k, v, *, causal, scale, backend, layout, select=0.3, block_size=128, skip=0.2, step=None,
            total_steps=None, cache=None, gen_len=None, softcap=0.0, return_block_mask=False):
    """SparseD's schedule as on one device: `cache` (one dict per layer, on every rank) stores the
    global pattern made at step t*."""
    if causal:
        raise ValueError("sparsed is for bidirectional (diffusion) models; call it with causal=False")
    n, m = _global_lengths(q, k, layout)
    select, skip, block_q, block_k, gen_len = _sparsed.sparsed_params(select, skip, block_size, gen_len, m)
    step, total_steps = _sparsed.check_schedule(step, total_steps, cache)

    def pattern():
        q_all, k_all = _gathered(q, k, layout)
        return _sparsed._pattern(q_all, k_all, select, block_q, block_k, scale, gen_len, backend)

    if step is None:
        block_mask = pattern()
    else:
        q_stand_in, k_stand_in = _stand_ins(q, k, layout)
        block_mask = _sparsed._scheduled_pattern(q_stand_in, k_stand_in, step, total_steps, skip, cache, pattern)
    out, _ = _ring(q, k, v, layout=layout, backend=backend, causal=False, scale=scale,
                   softcap=check_softcap(softcap), block_mask=block_mask)
    if return_block_mask:
        return out, block_mask if block_mask is not None else _sparsed._all_blocks(n, m, block_q, block_k, q.device)
    return out


def flashbias(q, k, v, *, causal, scale, backend, layout, rank=None, bias_factors=None, bias=None, alibi_slopes=None):
    """`bias_factors=(U, W)`: U sharded like q (along N), W like k (along M); `alibi_slopes` (Hq,) as on
    one device. A full `bias` is refused: its SVD needs the whole (N, M) matrix."""
    if bias is not None:
        raise ValueError("context_parallel('flashbias') takes bias_factors=(U, W) (U sharded like q, W like k) or "
                         "alibi_slopes, not a full bias: factor it first (attnzoo.methods.flashbias.svd_factors)")
    u, w = _flashbias.bias_to_factors(q, k, causal=causal, rank=rank, bias_factors=bias_factors,
                                      alibi_slopes=alibi_slopes)
    if alibi_slopes is not None:  # the factors hold global key positions: build them whole, keep this shard
        u, w = (shard(f, layout) for f in _flashbias.alibi_factors(alibi_slopes, *_global_lengths(q, k, layout)))
    B, Hq, n, D = q.shape
    Hk, m, R = k.shape[1], k.shape[2], u.shape[-1]
    limit = max_head_dim(backend)
    if limit is not None and D + R > limit:
        raise ValueError(f"flashbias runs the flash kernel at head dim D + R = {D} + {R}, above the {limit} it "
                         f"supports; use a smaller rank or backend='torch'")
    if w.shape[1] not in (1, Hk):  # W per query head: each query head needs its own key
        k, v, Hk = k.repeat_interleave(Hq // Hk, dim=1), v.repeat_interleave(Hq // Hk, dim=1), Hq
    q_cat = torch.cat([q * scale, u.to(q.dtype).expand(B, Hq, n, R)], dim=-1)  # (B, Hq, n, D + R)
    k_cat = torch.cat([k, w.to(k.dtype).expand(B, Hk, m, R)], dim=-1)  # (B, Hk, m, D + R)
    out, _ = _ring(q_cat, k_cat, v, layout=layout, backend=backend, causal=causal, scale=1.0)
    return out


FLASH_METHODS = {f.__name__: f for f in (dense, block_sparse, s2, xattention, seerattention, sparsed, flashbias)}
