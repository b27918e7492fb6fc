"""sparsed - SparseD: sparse attention for diffusion language models (Wang et al., 2025).

Algorithm (bidirectional attention, one layer, one denoising step):
1. Schedule: with `step` / `total_steps`, t* = floor(total_steps * skip) + 1. Steps <= t* run dense
   attention; step t* also computes the pattern from its own q, k and stores it in `cache` (a dict
   the caller keeps per layer); later steps reuse the stored pattern. Without `step`, the pattern is
   computed from the given q, k.
2. Pattern, per (batch, query head, query block): block importance = the mean of the softmax
   probabilities inside each (query block, key block) tile; keep the top
   k = min(n, floor(n * select) + 1) of the n = nKB key blocks. With `gen_len`, the key blocks
   from the first one starting inside the last `gen_len` keys (or the last block) form the
   generation region, which keeps its own top min(n_gen, floor(n_gen * select) + 1) by
   probabilities renormalised over that region only (isolated selection). The prompt region keeps
   its top min(n_prompt, k) by the all-key importance. (The paper takes the top k over all blocks
   and drops those in the generation region, which can leave a row no prompt block; ranking inside
   the prompt region keeps at least one.)
3. Attend: block-sparse FlashAttention over the pattern.
Importance sums come from the antidiagonal estimator with stride 1, which is exactly the
block-summed softmax; the mean differs from the sum by the constant tile area, so the ranking is
the same.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..block_mask import BlockMask
from ..geometry import Pack, num_blocks
from ..ops.flash import flash_attention, ran_blocks
from ..ops.scoring import antidiagonal_block_scores
from ..validation import (check_block_size, check_bool, check_int, check_optional, check_real, check_softcap,
                          check_window)

CACHE_KEY = "sparsed_block_mask"


class SparseDParams(NamedTuple):
    """SparseD's parameters, validated."""

    select: float
    skip: float
    block_q: int
    block_k: int
    gen_len: int | None


def sparsed_params(select, skip, block_size, gen_len, m: int) -> SparseDParams:
    """Validate the pattern's parameters for keys of length m (numbers may be Python, numpy or 0-d
    tensor scalars)."""
    select = check_real("select", select, low=0.0, high=1.0)
    skip = check_real("skip", skip, low=0.0)
    block_q, block_k = check_block_size(block_size)
    gen_len = check_optional(check_int, "gen_len", gen_len, low=1, high=m)
    return SparseDParams(select, skip, block_q, block_k, gen_len)


def check_schedule(step, total_steps, cache) -> tuple[int | None, int | None]:
    """A `step` (None = no schedule) needs `total_steps` and a dict `cache` kept across steps; returns
    the validated (step, total_steps)."""
    step = check_optional(check_int, "step", step, low=0)
    total_steps = check_optional(check_int, "total_steps", total_steps, low=1)
    if step is None:
        return None, total_steps
    if total_steps is None:
        raise ValueError("sparsed: step was given without total_steps (the number of denoising steps)")
    if not isinstance(cache, dict):
        raise TypeError(f"sparsed: with step, cache must be a dict kept per layer across steps, got "
                        f"{type(cache).__name__}")
    return step, total_steps


def keep_count(n_blocks: int, select: float) -> int:
    """How many key blocks a row keeps out of n_blocks: floor(n_blocks * select) + 1. (int() is floor
    here, select >= 0, and torch.compile traces it for symbolic sizes and floats; math.floor fails.)"""
    return int(n_blocks * select) + 1


def top_blocks(scores: torch.Tensor, count, valid: torch.Tensor) -> torch.Tensor:
    """scores (..., n) -> bool (..., n): per row the `count` highest of its `valid` entries (all of them
    when fewer), ties to the lower index. count: an int or a tensor broadcastable to scores (one per
    sequence of a pack); valid: bool broadcastable to scores."""
    order = scores.masked_fill(~valid, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return (rank < count) & valid


def generation_start_block(m: int, block_k: int, gen_len: int) -> int:
    """First key block of the generation region: the one whose start lies within the last `gen_len`
    keys, or the last block."""
    n_kb = -(-m // block_k)
    return min(-(-(m - gen_len) // block_k), n_kb - 1)


def select_blocks(q, k, *, select: float, block_q: int, block_k: int, scale: float, gen_len, backend: str,
                  pack=None):
    """SparseD's pattern: bool (B, Hq, nQB, nKB) for q (B, Hq, N, D), k (B, Hk, M, D), non-causal. For a
    pack: (S, Hq, nQB, nKB) over the pack's grid, every sequence's own choice at once (one estimate
    launch per region); counts and regions are per sequence, (S, 1, 1, 1) columns."""
    key_lengths = [k.shape[2]] if pack is None else list(pack.k_lengths)
    scores = antidiagonal_block_scores(q, k, stride=1, block_q=block_q, block_k=block_k, scale=scale,
                                       causal=False, backend=backend, pack=pack)
    key_blocks = [num_blocks(m, block_k) for m in key_lengths]
    all_keys = _per_sequence([keep_count(n, select) for n in key_blocks], q.device)
    column = torch.arange(scores.shape[-1], device=q.device)
    if gen_len is None:
        return top_blocks(scores, all_keys, column < _per_sequence(key_blocks, q.device))
    first_gen = [generation_start_block(m, block_k, gen_len) if m else 0 for m in key_lengths]
    gen_k, gen_pack = _generation_keys(k, pack, [f * block_k for f in first_gen])
    gen_scores = antidiagonal_block_scores(q, gen_k, stride=1, block_q=block_q, block_k=block_k, scale=scale,
                                           causal=False, backend=backend, pack=gen_pack)
    gen_blocks = [n - f for n, f in zip(key_blocks, first_gen)]
    first_gen = _per_sequence(first_gen, q.device)
    prompt = top_blocks(scores, all_keys, column < first_gen)
    gen_column = torch.arange(gen_scores.shape[-1], device=q.device)
    generation = top_blocks(gen_scores, _per_sequence([keep_count(n, select) for n in gen_blocks], q.device),
                            gen_column < _per_sequence(gen_blocks, q.device))
    return prompt | _shifted(generation, first_gen, scores.shape[-1])


def _per_sequence(values: list[int], device) -> torch.Tensor:
    """(S|1, 1, 1, 1): one number per sequence (or for the whole batch), broadcast over heads and blocks."""
    return torch.tensor(values, device=device)[:, None, None, None]


def _generation_keys(k, pack, first_keys: list[int]):
    """The keys of the generation region (from key first_keys[s] of each sequence on) and, for a pack,
    the pack they form."""
    if pack is None:
        return k[:, :, first_keys[0]:], None
    spans = [slice(pack.k_starts[s] + first, pack.k_starts[s + 1]) for s, first in enumerate(first_keys)]
    generation = Pack.of_lengths(pack.q_lengths, [span.stop - span.start for span in spans])
    return torch.cat([k[:, :, span] for span in spans], dim=2), generation


def _shifted(blocks: torch.Tensor, offset: torch.Tensor, width: int) -> torch.Tensor:
    """blocks (..., n) moved right by `offset` (per sequence) into `width` columns, False elsewhere."""
    source = torch.arange(width, device=blocks.device) - offset  # (S|1, 1, 1, width)
    inside = (source >= 0) & (source < blocks.shape[-1])
    index = source.clamp(0, blocks.shape[-1] - 1).expand(*blocks.shape[:-1], width)
    return blocks.gather(-1, index) & inside


def sparsed(q, k, v, *, causal: bool, scale: float, backend: str, select: float = 0.3, block_size: int = 128,
            skip: float = 0.2, step=None, total_steps=None, cache=None, gen_len=None, window_size=(-1, -1),
            softcap: float = 0.0, return_block_mask: bool = False, pack=None):
    """SparseD: q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> out (B, Hq, N, Dv), or
    (out, block_mask) with `return_block_mask` (all blocks on dense steps). Non-causal. `pack`: the
    sequences of a packed call, each choosing its own pattern (no schedule: a cache is per sequence)."""
    if causal:
        raise ValueError("sparsed is for bidirectional (diffusion) models; call it with causal=False")
    n, m = q.shape[2], k.shape[2]
    shortest = m if pack is None else min(length for length in pack.k_lengths if length)  # gen_len fits every one
    select, skip, block_q, block_k, gen_len = sparsed_params(select, skip, block_size, gen_len, shortest)
    step, total_steps = check_schedule(step, total_steps, cache)
    window, softcap = check_window(window_size), check_softcap(softcap)
    return_block_mask = check_bool("return_block_mask", return_block_mask)

    if step is None:
        block_mask = _pattern(q, k, select, block_q, block_k, scale, gen_len, backend, pack)
    else:
        block_mask = _scheduled_pattern(q, k, step, total_steps, skip, cache,
                                        lambda: _pattern(q, k, select, block_q, block_k, scale, gen_len, backend))
    out, _ = flash_attention(q, k, v, scale=scale, causal=False, window_size=window, softcap=softcap,
                             block_mask=block_mask, backend=backend, pack=pack)
    if return_block_mask:
        chosen = block_mask if block_mask is not None else _all_blocks(n, m, block_q, block_k, q.device)
        return out, ran_blocks(chosen, q, k, causal=False, window=window, pack=pack)
    return out


def _pattern(q, k, select, block_q, block_k, scale, gen_len, backend, pack=None) -> BlockMask:
    return BlockMask(select_blocks(q, k, select=select, block_q=block_q, block_k=block_k, scale=scale,
                                   gen_len=gen_len, backend=backend, pack=pack), (block_q, block_k))


def _all_blocks(n: int, m: int, block_q: int, block_k: int, device) -> BlockMask:
    return BlockMask(torch.ones(1, 1, -(-n // block_q), -(-m // block_k), dtype=torch.bool, device=device),
                     (block_q, block_k))


def _scheduled_pattern(q, k, step: int, total_steps: int, skip: float, cache: dict, make) -> BlockMask | None:
    """The pattern for this step (None = dense): made and stored at step t*, reused after it."""
    made_at = int(total_steps * skip) + 1  # floor, as in keep_count
    if step == made_at:
        cache[CACHE_KEY] = make()
    if step <= made_at:
        return None
    if CACHE_KEY not in cache:
        raise ValueError(f"sparsed: step {step} reuses the pattern made at step {made_at}, but cache holds "
                         f"none; run step {made_at} with this cache first")
    block_mask = cache[CACHE_KEY]
    block_mask.check_fits(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device)
    return block_mask


def example_kwargs(q, k, v, *, causal):
    """Blocks small enough that `attnzoo check`'s inputs span several, with a generation region."""
    return {"block_size": 32, "gen_len": k.shape[2] // 4}
