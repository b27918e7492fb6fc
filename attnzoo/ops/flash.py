"""The exact / block-sparse attention op: one autograd Function over the flash kernel or its twin.

Every exact and block-sparse method ends here: `flash_attention(q, k, v, scale=..., causal=...,
block_mask=...)` returns (out, lse). Which implementation runs is decided once, in `flash_path`:
- "triton": the Triton kernel (attnzoo/kernels/flash.py): CUDA, or CPU under TRITON_INTERPRET=1;
- "sdpa": on the torch backend, a dense call that torch's fused SDPA computes exactly (no block
  mask, softcap or window; causal only when N == M, as SDPA aligns causal top-left) and whose lse
  nobody asked for: `torch.nn.functional.scaled_dot_product_attention` with its own backward;
- "twin": otherwise on the torch backend, the PyTorch twin (attnzoo/torch_impl/flash.py): the same
  signature, the same SparseIndex and the same work as the kernel.
Both the kernel and the twin take `flash_fwd(q, k, v, *, scale, window, softcap, index, bias)` and
`flash_bwd(do, q, k, v, o, lse, *, scale, window, softcap, index, dlse, bias, bias_grad)` ->
(dq, dk, dv, dbias); gradients flow to q, k, v (and a bias) through both out and lse. Sinks are
merged after either implementation by their logsumexp (`with_sinks`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..block_mask import BlockMask, SparseIndex
from ..geometry import Pack, block_geometry, causal_window
from .dispatch import implementation


# The two halves of the op are torch custom ops, so that torch.compile treats them as opaque calls
# (no graph break for the data-dependent loops inside either implementation) and meta / fake tensors
# get outputs of the right shape. A SparseIndex travels as its eight tensors and its block sizes.

_INDEX_FIELDS = ("kv_count_full", "kv_index_full", "kv_count_part", "kv_index_part",
                 "q_count_full", "q_index_full", "q_count_part", "q_index_part")


def _index_parts(index: SparseIndex | None) -> tuple[list[torch.Tensor], list[int]]:
    if index is None:
        return [], []
    return [getattr(index, name) for name in _INDEX_FIELDS], [index.block_q, index.block_k]


def _index_from(parts: list[torch.Tensor], blocks: list[int]) -> SparseIndex | None:
    return SparseIndex(blocks[0], blocks[1], *parts) if parts else None


def _seqlens_from(q_starts: list[int], k_starts: list[int]):
    """A pack's (q_starts, k_starts) as the implementations take it; None (no pack) for empty lists."""
    return (q_starts, k_starts) if q_starts else None


@torch.library.custom_op("attnzoo::flash_forward", mutates_args=())
def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   index: list[torch.Tensor], blocks: list[int], scale: float, window: list[int], softcap: float,
                   impl: str, q_starts: list[int], k_starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("flash", impl).flash_fwd(q, k, v, scale=scale, window=tuple(window), softcap=softcap,
                                                   index=_index_from(index, blocks), bias=bias,
                                                   seqlens=_seqlens_from(q_starts, k_starts))


@_flash_forward.register_fake
def _(q, k, v, bias, index, blocks, scale, window, softcap, impl, q_starts, k_starts):
    B, Hq, N = q.shape[:3]
    return q.new_empty(B, Hq, N, v.shape[-1]), q.new_empty(B, Hq, N, dtype=torch.float32)


@torch.library.custom_op("attnzoo::flash_backward", mutates_args=())
def _flash_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, dlse: torch.Tensor | None, bias: torch.Tensor | None,
                    index: list[torch.Tensor], blocks: list[int], scale: float, window: list[int], softcap: float,
                    impl: str, bias_grad: bool, q_starts: list[int],
                    k_starts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias); dbias is empty without `bias_grad`."""
    dq, dk, dv, dbias = implementation("flash", impl).flash_bwd(
        do, q, k, v, o, lse, scale=scale, window=tuple(window), softcap=softcap, index=_index_from(index, blocks),
        dlse=dlse, bias=bias, bias_grad=bias_grad, seqlens=_seqlens_from(q_starts, k_starts))
    return dq, dk, dv, (dbias.to(bias.dtype) if bias_grad else q.new_empty(0))


@_flash_backward.register_fake
def _(do, q, k, v, o, lse, dlse, bias, index, blocks, scale, window, softcap, impl, bias_grad, q_starts, k_starts):
    dbias = torch.empty_like(bias) if bias_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale, window, softcap, index, impl, seqlens):
        parts, blocks = _index_parts(index)
        starts = ([], []) if seqlens is None else tuple(list(x) for x in seqlens)
        o, lse = _flash_forward(q, k, v, bias, parts, blocks, scale, list(window), softcap, impl, *starts)
        ctx.save_for_backward(q, k, v, o, lse, bias, *parts)
        ctx.set_materialize_grads(False)  # an unused lse brings dlse None, not zeros (the twin's fast path)
        ctx.args = (impl, scale, list(window), softcap, blocks, starts)
        return o, lse

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable: a second derivative raises
    def backward(ctx, do, dlse):
        q, k, v, o, lse, bias, *parts = ctx.saved_tensors
        impl, scale, window, softcap, blocks, starts = ctx.args
        if do is None:
            do = torch.zeros_like(o)
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _flash_backward(do, q, k, v, o, lse, dlse, bias, parts, blocks, scale, window, softcap,
                                            impl, bias_grad, *starts)
        return dq, dk, dv, (dbias if bias_grad else None), None, None, None, None, None, None


def compact_bias(bias: torch.Tensor) -> torch.Tensor:
    """A bias broadcastable to (B, Hq, N, M) as both implementations read it: 4-D, contiguous, its
    broadcast dimensions (missing, of size 1, or expanded with stride 0) of size 1 - never larger
    than the storage it came in. Differentiable: the gradient reaches the caller's tensor."""
    bias = bias[(None,) * (4 - bias.dim())]
    keep_all = slice(None)
    return bias[tuple(slice(0, 1) if st == 0 else keep_all for st in bias.stride())].contiguous()


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """Attention sinks (gpt-oss): per query head h a logit sinks[h] joins every row's softmax
    denominator and carries no value. That is one more key with value 0, so it is merged by the
    logsumexp after the kernel, exactly: out * exp(lse - lse'), lse' = logaddexp(lse, sink); autograd
    carries the gradient to out, lse (hence q, k, v) and sinks. out (B, Hq, N, Dv), lse (B, Hq, N)."""
    sink = sinks.to(lse.dtype)[None, :, None].expand_as(lse)
    total = torch.logaddexp(lse, sink)
    return out * torch.exp(lse - total)[..., None].to(out.dtype), total


def _sdpa(q, k, v, scale: float, window: tuple[int, int]) -> torch.Tensor:
    """torch's fused SDPA for a call `flash_path` gave it (causal only when N == M)."""
    causal_sdpa = _python_bool(window == (-1, 0))
    values = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) if causal_sdpa else v
    out = F.scaled_dot_product_attention(q, k, values, is_causal=causal_sdpa, scale=scale,
                                         enable_gqa=_python_bool(q.shape[1] != k.shape[1]))
    return _poison_seen_values(out, v) if causal_sdpa else out


def _python_bool(flag) -> bool:
    """flag as a Python bool. Under torch.compile with dynamic shapes a comparison of sizes is a SymBool,
    which SDPA's bool arguments refuse; branching on it specialises it instead (a guard, no graph break)."""
    if flag:
        return True
    return False


def _poison_seen_values(out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal isolation for SDPA, which multiplies a masked NaN / inf value by 0 into every row: SDPA ran
    on v with its non-finite entries zeroed, and here the (row, column) entries of out (B, Hq, N, Dv)
    that see a non-finite v[j, c] (rows i >= j, N == M) become NaN, as the twin and the kernel make
    them. v (B, Hk, M, Dv); shape-agnostic, so it traces without a graph break."""
    nonfinite = ~torch.isfinite(v)
    n = v.shape[2]
    first = torch.where(nonfinite.any(dim=2), nonfinite.to(torch.uint8).argmax(dim=2), n)  # (B, Hk, Dv)
    seen = torch.arange(n, device=v.device)[:, None] >= first[:, :, None, :]  # (B, Hk, N, Dv)
    grouped = out.unflatten(1, (v.shape[1], -1))  # (B, Hk, G, N, Dv)
    return grouped.masked_fill(seen[:, :, None], math.nan).flatten(1, 2)


def max_head_dim(backend: str) -> int | None:
    """The largest head dim an implementation takes: the Triton kernel's register tiles stop at 256
    (the registry's dense head_dims); the torch path has no limit (None)."""
    return 256 if backend == "triton" else None


def flash_path(backend: str, *, n, m, window: tuple[int, int], softcap: float, sparse: bool,
               need_lse: bool, extras: bool = False) -> str:
    """Which implementation computes a call: "triton", "sdpa" or "twin" (see the module docstring);
    `extras`: the call has a bias or sinks. n, m: the lengths, or a pack's per-sequence lengths (whose
    "sdpa" is one SDPA call per sequence)."""
    if backend == "triton":
        return "triton"
    if backend != "torch":
        raise ValueError(f"the flash op has backends 'triton' and 'torch', not {backend!r}")
    plain_window = window == (-1, -1) or (window == (-1, 0) and n == m)
    if not sparse and not need_lse and not extras and softcap == 0 and plain_window:
        return "sdpa"
    return "twin"


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                    window_size=(-1, -1), softcap: float = 0.0, block_mask: BlockMask | None = None,
                    bias: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                    backend: str = "torch", need_lse: bool = True, pack: Pack | None = None):
    """softmax(softcap(scale q k^T) + bias, masked, with sinks) v over the blocks of `block_mask`
    (all blocks if None).

    q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> out (B, Hq, N, Dv), lse (B, Hq, N) fp32
    (None when `need_lse` is False and SDPA served the call). Causal and windows are bottom-right
    aligned; causal sets the window's right side to 0. `bias`: additive, 4-D, broadcastable to
    (B, Hq, N, M) (read tile by tile; it gets a gradient when it requires one); `sinks`: (Hq,) per-head
    sink logits (`with_sinks`). Inputs are assumed validated (attnzoo.api, attnzoo.validation).

    `pack`: None, or where the sequences of a pack lie (q, k, v of batch 1 holding them end to end,
    attnzoo.geometry.Pack): each sequence is aligned, windowed and blocked from its own first token;
    `block_mask` is then (S|1, H|1, nQB, nKB) over the pack's grid (its longest sequences) and `bias`
    covers the pack (1|., Hq|1, total_q|1, total_k|1). One kernel launch per pass serves the pack.
    """
    n, m = q.shape[2], k.shape[2]
    lengths = (n, m) if pack is None else (pack.q_lengths, pack.k_lengths)
    window = causal_window(causal, window_size)
    path = flash_path(backend, n=lengths[0], m=lengths[1], window=window, softcap=softcap,
                      sparse=block_mask is not None, need_lse=need_lse, extras=bias is not None or sinks is not None)
    if path == "sdpa" and pack is not None:  # the torch backend may loop: SDPA on each sequence's views
        return torch.cat([_sdpa(q[:, :, pack.q_span(s)], k[:, :, pack.k_span(s)], v[:, :, pack.k_span(s)], scale,
                                window) if n_s and m_s else q.new_zeros(1, q.shape[1], n_s, v.shape[-1])
                          for s, (n_s, m_s) in enumerate(zip(*lengths))], dim=2), None
    if path == "sdpa":
        return _sdpa(q, k, v, scale, window), None
    index = None if block_mask is None else block_mask.sparse_index(*lengths, causal=False, window=window)
    impl = "triton" if path == "triton" else "torch"
    bias = None if bias is None else compact_bias(bias)
    seqlens = None if pack is None else (pack.q_starts, pack.k_starts)
    out, lse = _FlashAttention.apply(q, k, v, bias, scale, window, softcap, index, impl, seqlens)
    return (out, lse) if sinks is None else with_sinks(out, lse, sinks)


def windowed_blocks(block_mask: BlockMask, n, m, *, causal: bool, window: tuple[int, int]) -> BlockMask:
    """The blocks of a sparse method's choice that run under a window: those holding a pair the window
    (and causal) lets through. Without a window, the choice itself. n, m: the lengths, or for a pack the
    per-sequence lengths (Pack.q_lengths, Pack.k_lengths)."""
    if window == (-1, -1):
        return block_mask
    admissible, _ = block_geometry(n, m, block_mask.block_q, block_mask.block_k, causal=causal, window=window,
                                   device=block_mask.mask.device)
    return BlockMask(block_mask.mask & admissible, block_mask.block_size)


def ran_blocks(block_mask: BlockMask, q, k, *, causal: bool, window, pack: Pack | None = None):
    """What a sparse method's `return_block_mask` returns: the blocks that ran (`windowed_blocks`); for a
    pack, one mask per sequence (None for a sequence without queries or keys)."""
    if pack is None:
        return windowed_blocks(block_mask, q.shape[2], k.shape[2], causal=causal, window=window)
    ran = windowed_blocks(block_mask, pack.q_lengths, pack.k_lengths, causal=causal, window=window)
    return ran.per_sequence(pack)
