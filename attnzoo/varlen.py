"""Packed variable-length sequences: `fn(q, k, v, cu_seqlens_q=..., cu_seqlens_k=...)` for every method.

A pack holds S sequences end to end, in attnzoo's layout: q (1, Hq, total_q, D), k and v (1, Hk, total_k, D),
sequence s being q[:, :, cu_seqlens_q[s]:cu_seqlens_q[s + 1]] and the same slice of k, v by cu_seqlens_k
(int32, (S + 1,), starting at 0, non-decreasing, ending at the total length: flash-attn's and fla's
convention). Each sequence is computed exactly as if it were called alone: causal alignment, windows,
block grids (restarting at its first token), block choice, linear-attention state (reset at every
boundary).

How it runs (docs/varlen.md): every method takes the whole pack in one call (its function has a `pack`
keyword, an attnzoo.geometry.Pack; `runs_whole`), and its kernels serve every sequence in one launch per
pass. `packed` is the fallback, one call of the method per sequence on views of the pack: for a method
function without `pack`, and for a pack in which no sequence has both queries and keys. A sequence with
no query token contributes nothing; one with queries but no key outputs zeros (lse -inf, or its sink
logit), as any query row that sees no key does.

Call-time inputs follow the sequences they belong to (a whole-pack call reads them so; the fallback cuts
them with `split_input`): per-token tensors (gates, bias
factors, WERSA gains, a full bias) are cut along their token dimension, per-sequence ones (a linear
method's `initial_state` (S, Hk, D, Dv)) are indexed by s, block grids (block_sparse's `block_mask`,
seerattention's gate scores, (S, H|1, ceil(max_seqlen_q / bq), ceil(max_seqlen_k / bk))) give each
sequence their top-left corner, and per-head ones (sinks, conv kernels, ALiBi slopes, a gate module) are
shared. Optional outputs come back per sequence: lse packed as (1, Hq, total_q), block masks as a list of
S masks (None for an empty sequence), final states stacked as (S, Hk, D, Dv).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch

from .block_mask import BlockMask
from .geometry import Pack
from .validation import check_block_size

_PER_HEAD_INPUTS = ("sinks", "alibi_slopes", "conv_q", "conv_k")  # shared by every sequence
_REFUSED_INPUTS = {"cache": "sparsed's cache holds the selection of one sequence: call each sequence on its own"}


def _offsets(name: str, cu_seqlens, total: int) -> list[int]:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor of shape (S + 1,), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be an int32 tensor of shape (S + 1,) with S >= 1, got dtype "
                         f"{cu_seqlens.dtype} and shape {tuple(cu_seqlens.shape)}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {offsets[-1]}")
    return offsets


def _max_length(name: str, given, lengths: list[int]) -> int:
    longest = max(lengths)
    if given is None:
        return longest
    if isinstance(given, bool) or not isinstance(given, int):
        raise TypeError(f"{name} must be an int or None, got {given!r}")
    if given < longest:
        raise ValueError(f"{name}={given} is shorter than the longest sequence ({longest} tokens)")
    return given


def check_pack(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
               max_seqlen_k=None) -> Pack:
    """The pack's sequence offsets, or an error naming what is wrong with the packed call."""
    if cu_seqlens_q is None or cu_seqlens_k is None:
        given = "cu_seqlens_q" if cu_seqlens_k is None else "cu_seqlens_k"
        raise ValueError(f"a packed call needs both cu_seqlens_q and cu_seqlens_k, got only {given}")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != 1:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"a packed call takes {name} of shape (1, H, total, D) (the sequences end to end), "
                             f"got {shape}")
    q_starts = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[2])
    k_starts = _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[2])
    if len(q_starts) != len(k_starts):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(q_starts) - 1} and {len(k_starts) - 1}")
    q_lengths = [b - a for a, b in zip(q_starts, q_starts[1:])]
    k_lengths = [b - a for a, b in zip(k_starts, k_starts[1:])]
    return Pack(tuple(q_starts), tuple(k_starts), _max_length("max_seqlen_q", max_seqlen_q, q_lengths),
                _max_length("max_seqlen_k", max_seqlen_k, k_lengths))


# ---------------------------------------------------------------------------------------------------
# inputs: what of each belongs to sequence s


def _grid_corner(name: str, grid: torch.Tensor, s: int, pack: Pack, block_size) -> torch.Tensor:
    """Sequence s's top-left corner of a pack's block grid (S, H|1, ceil(max_q / bq), ceil(max_k / bk))."""
    bq, bk = check_block_size(block_size)
    want = (len(pack), math.ceil(pack.max_q / bq), math.ceil(pack.max_k / bk))
    if grid.dim() != 4 or (grid.shape[0], grid.shape[2], grid.shape[3]) != want:
        raise ValueError(f"{name} for a pack of {len(pack)} sequences must have shape ({want[0]}, H|1, {want[1]}, "
                         f"{want[2]}) (ceil(max_seqlen / block) blocks, block size ({bq}, {bk})), got "
                         f"{tuple(grid.shape)}")
    n_q, n_k = pack.q_starts[s + 1] - pack.q_starts[s], pack.k_starts[s + 1] - pack.k_starts[s]
    return grid[s:s + 1, :, :math.ceil(n_q / bq), :math.ceil(n_k / bk)]


def _token_slice(name: str, t: torch.Tensor, dim: int, total: int, span: slice) -> torch.Tensor:
    if t.shape[dim] == 1 and total != 1:  # broadcast along the tokens
        return t
    if t.shape[dim] != total:
        raise ValueError(f"{name} of a pack must have the packed length {total} in dim {dim}, got shape "
                         f"{tuple(t.shape)}")
    return t.narrow(dim, span.start, span.stop - span.start)


def check_packed_inputs(keywords: dict) -> None:
    """Refuse the inputs that no packed call takes."""
    for name, why in _REFUSED_INPUTS.items():
        if keywords.get(name) is not None:
            raise ValueError(f"{name} is not supported in a packed call: {why}")


def runs_whole(fn: Callable, pack: Pack) -> bool:
    """Whether the method function `fn` computes the pack in one call (it takes `pack=`; docs/varlen.md):
    every pack with a sequence that has queries and keys. Otherwise `packed` calls it once per sequence."""
    some_pair = any(n and m for n, m in zip(pack.q_lengths, pack.k_lengths))
    return "pack" in inspect.signature(fn).parameters and some_pair


def split_input(name: str, value, s: int, pack: Pack, block_size):
    """Sequence s's part of the keyword `name` of a packed call (a parameter or a call-time input);
    `block_size` is the method's, for block grids given as bool tensors or scores."""
    if not isinstance(value, (torch.Tensor, BlockMask, tuple)) or name in _PER_HEAD_INPUTS:
        return value  # numbers, flags, windows, modules (a gate), per-head tensors
    total_q, total_k = pack.q_starts[-1], pack.k_starts[-1]
    if name == "g":  # (1, Hk, total, [D]): a gate per token
        return _token_slice(name, value, 2, total_k, pack.k_span(s))
    if name == "gains":  # (L + 1,) shared, or (1, total, L + 1) per token
        return value if value.dim() < 3 else _token_slice(name, value, 1, total_q, pack.q_span(s))
    if name == "bias":  # broadcastable to (1, Hq, total_q, total_k): the sequence's diagonal block
        value = _token_slice(name, value, value.dim() - 2, total_q, pack.q_span(s))
        return _token_slice(name, value, value.dim() - 1, total_k, pack.k_span(s))
    if name == "bias_factors":  # (U (1, Hq, total_q, r), W (1, Hk, total_k, r))
        u, w = value
        return (_token_slice("bias_factors[0]", u, 2, total_q, pack.q_span(s)),
                _token_slice("bias_factors[1]", w, 2, total_k, pack.k_span(s)))
    if name == "initial_state":  # (S, Hk, D, Dv): one per sequence
        if value.shape[0] != len(pack):
            raise ValueError(f"initial_state of a pack of {len(pack)} sequences must have shape (S, Hk, D, Dv) = "
                             f"({len(pack)}, ...), got {tuple(value.shape)}")
        return value[s:s + 1]
    if name == "block_mask" and isinstance(value, BlockMask):
        return BlockMask(_grid_corner(name, value.mask, s, pack, value.block_size), value.block_size)
    if name in ("block_mask", "gate"):  # a bool block mask, or gate scores (S, Hq, nQB, nKB)
        return _grid_corner(name, value, s, pack, block_size)
    if isinstance(value, tuple):
        return value
    raise ValueError(f"a packed call does not know how to split {name!r} between sequences; call each "
                     f"sequence on its own")


# ---------------------------------------------------------------------------------------------------
# the call


def _empty_sequence(q, v, n_q: int, flag: str | None, inputs: dict):
    """A sequence without keys (or without queries): zero outputs; lse -inf or the sink logit."""
    out = q.new_zeros(1, q.shape[1], n_q, v.shape[-1])
    if flag == "return_lse":
        sinks = inputs.get("sinks")
        lse = q.new_full((1, q.shape[1], n_q), float("-inf"), dtype=torch.float32)
        return out, lse if sinks is None else lse + sinks.float()[None, :, None]
    if flag == "output_final_state":
        state = inputs.get("initial_state")
        return out, (state if state is not None else q.new_zeros(1, v.shape[1], q.shape[-1], v.shape[-1],
                                                                  dtype=torch.float32))
    return (out, None) if flag == "return_block_mask" else out


def _joined(flag: str | None, outs: list[torch.Tensor], extras: list):
    out = torch.cat(outs, dim=2)
    if flag is None:
        return out
    if flag == "return_lse":
        return out, torch.cat(extras, dim=2)
    if flag == "output_final_state":
        return out, torch.cat(extras, dim=0)
    return out, extras  # return_block_mask: one mask per sequence


def packed_call(call: Callable, q, k, v, pack: Pack, *, keywords: dict[str, Any], flags: dict[str, Any],
                block_size=None):
    """`call(q_s, k_s, v_s, **keywords_s, **flags)` for each sequence s (keywords_s: sequence s's part of
    each keyword, `split_input`), joined into the pack's outputs. `flags` holds the output flags the
    caller set; at most one is on."""
    flag = next((name for name, on in flags.items() if on is True), None)
    outs, extras = [], []
    for s in range(len(pack)):
        qs, ks, vs = q[:, :, pack.q_span(s)], k[:, :, pack.k_span(s)], v[:, :, pack.k_span(s)]
        own = {name: split_input(name, value, s, pack, block_size) for name, value in keywords.items()}
        if qs.shape[2] == 0 or ks.shape[2] == 0:
            result = _empty_sequence(qs, vs, qs.shape[2], flag, own)
        else:
            result = call(qs, ks, vs, **own, **flags)
        out, extra = result if flag else (result, None)
        outs.append(out)
        extras.append(extra)
    return _joined(flag, outs, extras)


PACK_KEYWORDS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def packed(method, q, k, v, pack: Pack, *, causal=None, scale=None, backend: str = "auto", **kwargs):
    """`method` (an attnzoo.Method) over a pack, one call per sequence: what `method(q, k, v,
    cu_seqlens_q=..., ...)` runs for a method that does not take the whole pack (`runs_whole`)."""
    outputs = method.info.supports.outputs
    flags = {name: value for name, value in kwargs.items() if name in outputs}
    keywords = {**method.bound, **{name: value for name, value in kwargs.items() if name not in outputs}}
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def call(qs, ks, vs, **own):
        return method(qs, ks, vs, causal=causal, scale=scale, backend=backend, **own)

    return packed_call(call, q, k, v, pack, keywords=keywords, flags=flags,
                       block_size=keywords.get("block_size", method.params.get("block_size")))
