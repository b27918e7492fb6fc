"""The shared exact/block-sparse attention entry: one autograd Function over the flash kernels.

Every exact and block-sparse method ends here: `flash_attention(q, k, v, scale=..., causal=...,
block_mask=...)` runs the Triton kernel (attnzoo/kernels/flash.py) or its PyTorch twin
(attnzoo/torch_impl/flash.py) and returns (out, lse); gradients flow to q, k, v through both out
and lse.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .block_mask import BlockMask


def _impl(backend: str):
    if backend == "triton":
        from .kernels import flash
    elif backend == "torch":
        from .torch_impl import flash
    else:
        raise ValueError(f"the flash kernel has backends 'triton' and 'torch', not {backend!r}")
    return flash


def _mask_args(backend: str, block_mask: BlockMask | None, n: int, m: int, window) -> dict:
    """What each implementation needs of the block mask: the kernel's index lists, or the bool blocks."""
    if block_mask is None:
        return {}
    if backend == "triton":
        return {"index": block_mask.sparse_index(n, m, causal=False, window=window)}
    return {"block_mask": block_mask.mask, "block_q": block_mask.block_q, "block_k": block_mask.block_k}


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, window, softcap, block_mask, backend):
        impl = _impl(backend)
        mask_args = _mask_args(backend, block_mask, q.shape[2], k.shape[2], window)
        o, lse = impl.flash_fwd(q, k, v, scale=scale, window=window, softcap=softcap, **mask_args)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (impl, scale, window, softcap, mask_args)
        return o, lse

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable: a second derivative raises
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        impl, scale, window, softcap, mask_args = ctx.args
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = impl.flash_bwd(do, q, k, v, o, lse, scale=scale, window=window, softcap=softcap,
                                    dlse=dlse, **mask_args)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                    window_size=(-1, -1), softcap: float = 0.0, block_mask: BlockMask | None = None,
                    backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(softcap(scale q k^T) masked) v over the blocks of `block_mask` (all blocks if None).

    q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> out (B, Hq, N, Dv), lse (B, Hq, N) fp32.
    Causal and windows are bottom-right aligned; causal sets the window's right side to 0.
    Inputs are assumed validated (attnzoo.api does it).
    """
    left, right = window_size
    window = (left, 0 if causal else right)
    return _FlashAttention.apply(q, k, v, scale, window, softcap, block_mask, backend)
