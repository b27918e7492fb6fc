"""The exact / block-sparse attention op: one autograd Function over the flash kernel or its twin.

Every exact and block-sparse method ends here: `flash_attention(q, k, v, scale=..., causal=...,
block_mask=...)` returns (out, lse). Which implementation runs is decided once, in `flash_path`:
- "triton": the Triton kernel (attnzoo/kernels/flash.py): CUDA, or CPU under TRITON_INTERPRET=1;
- "sdpa": on the torch backend, a dense call that torch's fused SDPA computes exactly (no block
  mask, softcap or window; causal only when N == M, as SDPA aligns causal top-left) and whose lse
  nobody asked for: `torch.nn.functional.scaled_dot_product_attention` with its own backward;
- "twin": otherwise on the torch backend, the PyTorch twin (attnzoo/torch_impl/flash.py): the same
  signature, the same SparseIndex and the same work as the kernel.
Both the kernel and the twin take `flash_fwd(q, k, v, *, scale, window, softcap, index)` and
`flash_bwd(do, q, k, v, o, lse, *, scale, window, softcap, index, dlse)`; gradients flow to q, k, v
through both out and lse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..block_mask import BlockMask
from ..geometry import causal_window
from .dispatch import implementation


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, window, softcap, index, impl):
        o, lse = impl.flash_fwd(q, k, v, scale=scale, window=window, softcap=softcap, index=index)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.set_materialize_grads(False)  # an unused lse brings dlse None, not zeros (the twin's fast path)
        ctx.args = (impl, scale, window, softcap, index)
        return o, lse

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable: a second derivative raises
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        impl, scale, window, softcap, index = ctx.args
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = impl.flash_bwd(do, q, k, v, o, lse, scale=scale, window=window, softcap=softcap,
                                    index=index, dlse=dlse)
        return dq, dk, dv, None, None, None, None, None


def max_head_dim(backend: str) -> int | None:
    """The largest head dim an implementation takes: the Triton kernel's register tiles stop at 256
    (the registry's dense head_dims); the torch path has no limit (None)."""
    return 256 if backend == "triton" else None


def flash_path(backend: str, *, n: int, m: int, window: tuple[int, int], softcap: float, sparse: bool,
               need_lse: bool) -> str:
    """Which implementation computes a call: "triton", "sdpa" or "twin" (see the module docstring)."""
    if backend == "triton":
        return "triton"
    if backend != "torch":
        raise ValueError(f"the flash op has backends 'triton' and 'torch', not {backend!r}")
    plain_window = window == (-1, -1) or (window == (-1, 0) and n == m)
    if not sparse and not need_lse and softcap == 0 and plain_window:
        return "sdpa"
    return "twin"


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                    window_size=(-1, -1), softcap: float = 0.0, block_mask: BlockMask | None = None,
                    backend: str = "torch", need_lse: bool = True):
    """softmax(softcap(scale q k^T) masked) v over the blocks of `block_mask` (all blocks if None).

    q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> out (B, Hq, N, Dv), lse (B, Hq, N) fp32
    (None when `need_lse` is False and SDPA served the call). Causal and windows are bottom-right
    aligned; causal sets the window's right side to 0. Inputs are assumed validated (attnzoo.api).
    """
    n, m = q.shape[2], k.shape[2]
    window = causal_window(causal, window_size)
    path = flash_path(backend, n=n, m=m, window=window, softcap=softcap, sparse=block_mask is not None,
                      need_lse=need_lse)
    if path == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=window == (-1, 0), scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out, None
    index = None if block_mask is None else block_mask.sparse_index(n, m, causal=False, window=window)
    impl = implementation("flash", "triton" if path == "triton" else "torch")
    return _FlashAttention.apply(q, k, v, scale, window, softcap, index, impl)
