"""FlashAttention-2 in PyTorch: the twin of attnzoo/kernels/flash.py (same signature, same index, same work).

The rows of every pass are cut into *items*, the unit the kernel gives one program: a query tile
(forward, dQ) or a key tile (dK/dV), for every (batch, kv head) - and for every query head of the
group when the index has per-head lists (otherwise the query heads of a group are rows of one item,
so k and v are never repeated). Each item visits exactly what the kernel visits:
- a dense call (tiles of `twin_tile()` rows), the contiguous span of keys (queries, in dK/dV) that
  the window/causal rule lets the tile see (`geometry.visible_span`): the middle that every row sees
  unmasked, the edges masked;
- a sparse call (the blocks of its `SparseIndex`), the listed blocks: *full* blocks unmasked,
  *partial* blocks masked element-wise (causal/window edge, ragged tail); dK/dV walks the transposed
  lists (per key block, its query blocks). Unlisted blocks are never read.
Items whose lists have the same length are computed together, one batched call per length (a
*piece*), so the cost follows the blocks listed: no padding to the longest list, and one Python
step per distinct list length rather than per tile. The pieces of one item are joined by their
logsumexp; the backward recomputes probabilities from the saved lse.

Inside a piece the math runs in torch's fused CPU flash-attention kernel (the one SDPA uses, called
with its logsumexp and its backward) when the device is the CPU, D == Dv and there is no softcap
(and, backward, no gradient through lse); otherwise it is written out in torch ops (`_explicit_*`).

Shapes: q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> o (B, Hq, N, Dv) in q's dtype,
lse (B, Hq, N) fp32 (-inf for rows that see no key).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import geometry

_PIECE_ELEMENTS = 1 << 23  # score elements (items x rows x keys) per piece: bounds the explicit path's memory
_FUSED_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FUSED_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def twin_tile() -> int:
    """Query (and, backward, key) tile of a dense call: ATTNZOO_TWIN_TILE rows, default 128."""
    return int(os.environ.get("ATTNZOO_TWIN_TILE", "128"))


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _Call:
    """The geometry of one call, shared by the passes."""

    n: int
    m: int
    batch: int
    n_kv_heads: int
    group: int
    window: tuple[int, int]
    scale: float
    softcap: float
    fused: bool  # the pieces run in torch's fused CPU kernel
    guarded: bool = False  # k or v hold NaN / inf: masked pieces keep them out of the rows that do not see them


def _call(q, k, v, scale, window, softcap, guarded: bool = False) -> _Call:
    fused = q.device.type == "cpu" and softcap == 0 and q.shape[-1] == v.shape[-1]
    return _Call(q.shape[2], k.shape[2], q.shape[0], k.shape[1], q.shape[1] // k.shape[1], tuple(window),
                 scale, softcap, fused, guarded)


def _has_nonfinite(*tensors: torch.Tensor) -> bool:
    """Whether any of the tensors holds NaN or inf (one pass each, once per call; False on meta)."""
    return any(t.device.type != "meta" and not bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------------------------------------------
# Items: a pass's rows cut into tiles
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """(B, H, L, E) tensors as items: (B, Hk, groups, nBlocks) tiles of (heads_per_item * block) rows,
    H = Hk * groups * heads_per_item (queries: heads_per_item = G // groups; keys: 1, groups = 1)."""

    batch: int
    kv_heads: int
    groups: int
    heads_per_item: int
    block: int
    length: int

    @property
    def n_blocks(self) -> int:
        return geometry.num_blocks(self.length, self.block)

    @property
    def count(self) -> int:
        return self.batch * self.kv_heads * self.groups * self.n_blocks

    def items(self, x: torch.Tensor, pad: float = 0.0) -> torch.Tensor:
        """(B, H, L, E) -> (items, heads_per_item * block, E); rows past L hold `pad`."""
        B, H, L, E = x.shape
        x = F.pad(x, (0, 0, 0, self.n_blocks * self.block - L), value=pad)
        x = x.view(B, self.kv_heads, self.groups, self.heads_per_item, self.n_blocks, self.block, E)
        return x.transpose(3, 4).reshape(self.count, self.heads_per_item * self.block, E)

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `items`: (items, heads_per_item * block, E) -> (B, H, L, E)."""
        E = x.shape[-1]
        x = x.view(self.batch, self.kv_heads, self.groups, self.n_blocks, self.heads_per_item, self.block, E)
        x = x.transpose(3, 4).reshape(self.batch, -1, self.n_blocks * self.block, E)
        return x[:, :, :self.length]

    def positions(self, items: torch.Tensor) -> torch.Tensor:
        """(P,) item ids -> (P, heads_per_item * block) sequence positions of their rows."""
        offsets = torch.arange(self.block, device=items.device).repeat(self.heads_per_item)
        return (items % self.n_blocks * self.block)[:, None] + offsets

    def batch_of(self, items: torch.Tensor) -> torch.Tensor:
        """(P,) item ids -> (P,) their batch entry."""
        return items // (self.kv_heads * self.groups * self.n_blocks)

    def heads_of(self, items: torch.Tensor) -> torch.Tensor:
        """(P,) item ids -> (P, heads_per_item * block) the head of each of their rows."""
        first_head = items // self.n_blocks % (self.kv_heads * self.groups) * self.heads_per_item
        return first_head[:, None] + torch.arange(self.heads_per_item, device=items.device).repeat_interleave(self.block)

    def first_items(self, block: int) -> torch.Tensor:
        """(B * Hk * groups,) ids of the items of tile `block`, one per (batch, kv head, group)."""
        return torch.arange(self.batch * self.kv_heads * self.groups) * self.n_blocks + block


def _layouts(call: _Call, block_q: int, block_k: int, groups: int) -> tuple[_Layout, _Layout]:
    """The query and key layouts of a call (`groups`: G for per-head lists, else 1)."""
    queries = _Layout(call.batch, call.n_kv_heads, groups, call.group // groups, block_q, call.n)
    keys = _Layout(call.batch, call.n_kv_heads, 1, 1, block_k, call.m)
    return queries, keys


def _index_groups(index, group: int) -> int:
    """How the query heads of a group are laid out: 1 (rows of one item) unless the lists are per head."""
    return group if index is not None and index.kv_count_full.shape[1] > 1 else 1


# ---------------------------------------------------------------------------------------------------
# Pieces: what a batch of items visits
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """Items (P,) of the pass's layout, their query-side rows (P, Lq, .) and key-side rows (P, Lk, .),
    which pairs are visible (bool broadcastable to (P, Lq, Lk), None when all are), and where the
    pairs sit: (batch, query head, query position, key position), broadcastable to (P, Lq, Lk)."""

    items: torch.Tensor
    rows: list[torch.Tensor]
    keys: list[torch.Tensor]
    keep: torch.Tensor | None
    where: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _query_side(queries: _Layout, items: torch.Tensor):
    """(batch (P, 1, 1), heads (P, Lq, 1), positions (P, Lq, 1)) of query items' rows."""
    return (queries.batch_of(items)[:, None, None], queries.heads_of(items)[:, :, None],
            queries.positions(items)[:, :, None])


class _Bias:
    """An additive bias broadcastable to (B, Hq, N, M), read and its gradient written at a piece's pairs."""

    def __init__(self, bias: torch.Tensor, n: int, m: int, dtype: torch.dtype):
        self.value = bias.to(dtype)
        self.limits = (None, None, n - 1, m - 1)

    def _index(self, where):
        """Index tensors into the bias (broadcast dims read index 0; rows / keys past the end, which
        are masked or discarded, read the last one)."""
        zero = torch.zeros((), dtype=torch.long, device=self.value.device)
        return tuple(zero if size == 1 else (i if top is None else i.clamp(max=top))
                     for i, size, top in zip(where, self.value.shape, self.limits))

    def tile(self, where) -> torch.Tensor:
        """The bias at the piece's pairs, broadcastable to (P, Lq, Lk)."""
        tile = self.value[self._index(where)]
        return tile.view((1,) * (3 - tile.dim()) + tuple(tile.shape))

    def add_grad(self, grad: torch.Tensor, where, ds: torch.Tensor) -> None:
        """grad (the bias's shape) += ds (P, Lq, Lk) at the piece's pairs; pairs that share a bias entry
        (broadcast dims) are summed first."""
        index = self._index(where)
        grad.index_put_(index, ds.sum_to_size(torch.broadcast_shapes(*(i.shape for i in index))), accumulate=True)


def _on_grid(x: torch.Tensor, call: _Call, groups: int) -> torch.Tensor:
    """An index tensor (Bm, Hm, R, ...) -> (B, Hk, groups, R, ...)."""
    x = x.expand(call.batch, *x.shape[1:])
    if x.shape[1] == 1:
        return x[:, :, None].expand(call.batch, call.n_kv_heads, groups, *x.shape[2:])
    return x.unflatten(1, (call.n_kv_heads, groups))


def _forward_work(counts, lists, call: _Call, groups: int, keys: _Layout):
    """Per query item: its count (P,) and its listed key items (P, nKB) (valid first)."""
    counts = _on_grid(counts, call, groups).reshape(-1).long()
    lists = _on_grid(lists, call, groups).long()  # (B, Hk, groups, nQB, nKB) key blocks
    head = torch.arange(call.batch * call.n_kv_heads, device=lists.device).view(call.batch, call.n_kv_heads)
    key_items = lists + (head * keys.n_blocks)[:, :, None, None, None]
    return counts, key_items.flatten(0, 3)


def _transposed_work(counts, lists, call: _Call, groups: int, queries: _Layout):
    """Per key item: its count (P,) and its listed query items (P, groups * nQB) (valid first), the
    lists of the query heads of its group side by side."""
    counts = _on_grid(counts, call, groups).long()  # (B, Hk, groups, nKB)
    lists = _on_grid(lists, call, groups).long()  # (B, Hk, groups, nKB, nQB) query blocks
    row_item = torch.arange(call.batch * call.n_kv_heads * groups, device=lists.device)
    query_items = lists + (row_item * queries.n_blocks).view(call.batch, call.n_kv_heads, groups, 1, 1)
    valid = torch.arange(lists.shape[-1], device=lists.device) < counts[..., None]
    query_items, valid = (x.transpose(2, 3).flatten(3, 4).flatten(0, 2) for x in (query_items, valid))
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)  # valid entries first
    return valid.sum(-1), query_items.gather(-1, order)


def _buckets(counts: torch.Tensor, entries: torch.Tensor, entry_elements: int):
    """(items (p,), entries (p, c)) for every list length c > 0, items chunked to bound the score
    elements (entry_elements per entry)."""
    for length in torch.unique(counts).tolist():
        if length == 0:
            continue
        items = (counts == length).nonzero()[:, 0]
        step = max(1, _PIECE_ELEMENTS // (length * entry_elements))
        for first in range(0, items.numel(), step):
            chosen = items[first:first + step]
            yield chosen, entries[chosen, :length]


def _row_lists(index, transposed: bool):
    """(counts, lists, masked) of the full and the partial lists."""
    if transposed:
        return ((index.q_count_full, index.q_index_full, False), (index.q_count_part, index.q_index_part, True))
    return ((index.kv_count_full, index.kv_index_full, False), (index.kv_count_part, index.kv_index_part, True))


def _by_mask(call: _Call, queries: _Layout, keys: _Layout, query_items, key_items):
    """Split the items of a masked piece by their element mask: (chosen (p,), keep (1, Lq, Lk)) per
    mask. query_items (P, a) and key_items (P, b) are the blocks each item's rows and keys come from;
    items whose key blocks sit at the same offsets from their query blocks (and reach past the last
    key alike) have the same mask, so it is built once, not per item."""
    query_start = query_items % queries.n_blocks * queries.block
    key_start = key_items % keys.n_blocks * keys.block
    ragged = key_start + keys.block > call.m
    signature = torch.cat([(key_start[:, None, :] - query_start[:, :, None]).flatten(1), ragged.long()], dim=1)
    masks, which = torch.unique(signature, dim=0, return_inverse=True)
    for mask in range(masks.shape[0]):
        chosen = (which == mask).nonzero()[:, 0]
        rows = queries.positions(query_items[chosen[0]]).reshape(1, -1, 1)
        cols = keys.positions(key_items[chosen[0]]).reshape(1, 1, -1)
        yield chosen, geometry.visible(rows, cols, call.n, call.m, call.window)


def _listed_query_pieces(call: _Call, index, queries: _Layout, keys: _Layout, rows, key_rows):
    """Sparse forward / dQ: query items over their listed key blocks. `rows`: query-side tensors in
    item layout (items, R, .); `key_rows`: key-side tensors (key items, block_k, .)."""
    for counts, lists, masked in _row_lists(index, transposed=False):
        counts, key_items = _forward_work(counts, lists, call, queries.groups, keys)
        for items, listed in _buckets(counts, key_items, queries.heads_per_item * queries.block * keys.block):
            split = _by_mask(call, queries, keys, items[:, None], listed) if masked else [(slice(None), None)]
            for chosen, keep in split:
                mine, theirs = items[chosen], listed[chosen]
                cols = keys.positions(theirs.reshape(-1)).view(mine.numel(), 1, -1)
                yield _Piece(mine, [x[mine] for x in rows], [x[theirs].flatten(1, 2) for x in key_rows], keep,
                             (*_query_side(queries, mine), cols))


def _listed_key_pieces(call: _Call, index, queries: _Layout, keys: _Layout, rows, key_rows):
    """Sparse dK/dV: key items over their listed (transposed) query blocks."""
    for counts, lists, masked in _row_lists(index, transposed=True):
        counts, query_items = _transposed_work(counts, lists, call, queries.groups, queries)
        for items, listed in _buckets(counts, query_items, queries.heads_per_item * queries.block * keys.block):
            split = _by_mask(call, queries, keys, listed, items[:, None]) if masked else [(slice(None), None)]
            for chosen, keep in split:
                mine, theirs = items[chosen], listed[chosen]
                _, heads, positions = _query_side(queries, theirs.reshape(-1))
                where = (keys.batch_of(mine)[:, None, None], heads.view(mine.numel(), -1, 1),
                         positions.view(mine.numel(), -1, 1), keys.positions(mine)[:, None, :])
                yield _Piece(mine, [x[theirs].flatten(1, 2) for x in rows], [x[mine] for x in key_rows], keep, where)


def _span_parts(span: tuple[int, int, int, int], step: int):
    """(start, stop, masked) chunks of a (lo, full_lo, full_hi, hi) span: the edges masked."""
    lo, full_lo, full_hi, hi = span
    for start, end, masked in ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)):
        for first in range(start, end, step):
            yield first, min(first + step, end), masked


def _span_query_pieces(call: _Call, queries: _Layout, rows, k, v):
    """Dense forward / dQ: every query tile over the keys it sees, all (batch, kv head) at once."""
    k, v = k.flatten(0, 1), v.flatten(0, 1)  # (B * Hk, M, .)
    row_count = queries.heads_per_item * queries.block
    for tile in range(queries.n_blocks):
        items = queries.first_items(tile).to(k.device)
        first, stop = tile * queries.block, min((tile + 1) * queries.block, call.n)
        span = geometry.visible_span(first, stop - 1, call.n, call.m, call.window)
        tile_rows = [x[items] for x in rows]
        batch, heads, positions = _query_side(queries, items)
        for lo, hi, masked in _span_parts(span, max(1, _PIECE_ELEMENTS // (items.numel() * row_count))):
            cols = torch.arange(lo, hi, device=k.device)
            keep = geometry.visible(positions[:1], cols, call.n, call.m, call.window) if masked else None
            yield _Piece(items, tile_rows, [k[:, lo:hi], v[:, lo:hi]], keep, (batch, heads, positions, cols))


def _span_key_pieces(call: _Call, keys: _Layout, rows, key_rows):
    """Dense dK/dV: every key tile over the query rows that see it (the query heads of its group).
    `rows`: query-side tensors (B, Hq, N, .)."""
    per_group = [x.unflatten(1, (call.n_kv_heads, call.group)).flatten(0, 1) for x in rows]  # (B*Hk, G, N, .)
    for tile in range(keys.n_blocks):
        items = keys.first_items(tile).to(rows[0].device)
        first, stop = tile * keys.block, min((tile + 1) * keys.block, call.m)
        span = geometry.query_span(first, stop - 1, call.n, call.m, call.window)
        tile_keys = [x[items] for x in key_rows]
        step = max(1, _PIECE_ELEMENTS // (items.numel() * call.group * keys.block))
        first_head = keys.heads_of(items)[:, :1] * call.group  # (B * Hk, 1): query head of group member 0
        cols = keys.positions(items)[:, None, :]
        for lo, hi, masked in _span_parts(span, step):
            members = torch.arange(call.group, device=items.device).repeat_interleave(hi - lo)
            positions = torch.arange(lo, hi, device=items.device).repeat(call.group)[None, :, None]
            keep = geometry.visible(positions, cols[:1], call.n, call.m, call.window) if masked else None
            where = (keys.batch_of(items)[:, None, None], (first_head + members)[:, :, None], positions, cols)
            yield _Piece(items, [x[:, :, lo:hi].flatten(1, 2) for x in per_group], tile_keys, keep, where)


# ---------------------------------------------------------------------------------------------------
# The math of one piece
# ---------------------------------------------------------------------------------------------------


def _logits_mask(keep: torch.Tensor | None, bias: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """What torch's kernel adds to the scores: the bias tile, -inf where `keep` is False;
    (P|1, 1, Lq, Lk), or None when there is neither."""
    if keep is None and bias is None:
        return None
    added = torch.zeros(keep.shape, dtype=dtype, device=keep.device) if bias is None else bias.to(dtype)
    if keep is not None:
        added = added.masked_fill(~keep, -math.inf)
    return added[:, None]


def _scores(q, k, bias, call: _Call):
    """softcap(scale q k^T) + bias, and tanh(scale q k^T / softcap) for the backward (None without)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    t = None
    if call.softcap > 0:
        t = torch.tanh(s / call.softcap)
        s = call.softcap * t
    return (s if bias is None else s + bias), t


def _attend(q, k, v, keep, bias, call: _Call):
    """(o (P, Lq, Dv), lse (P, Lq)) of rows q (P, Lq, D) over keys k, v (P, Lk, .), with visibility
    `keep` and additive `bias` tile (each broadcastable to (P, Lq, Lk), or None); lse -inf and o 0
    for a row that sees no key."""
    guard = call.guarded and keep is not None
    if call.fused and not guard:  # torch's kernel lets a masked NaN key or value reach every row (0 * NaN)
        added = _logits_mask(keep, bias, q.dtype)
        o, lse = _FUSED_FWD(q[:, None], k[:, None], v[:, None], attn_mask=added, scale=call.scale)
        o, lse = o[:, 0], lse[:, 0]
        if added is not None:  # torch's kernel reports lse 0 for a row with no visible key
            lse = lse.masked_fill((added[:, 0] == -math.inf).all(-1).expand_as(lse), -math.inf)
        return o, lse
    s, _ = _scores(q, k, bias, call)
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == -math.inf, 0.0)[..., None])
    return (_masked_pv(p, v, keep) if guard else torch.matmul(p, v)), lse


def _masked_pv(p, v, keep):
    """p @ v (P, Lq, Dv) where a masked pair adds nothing even when its value is NaN or inf: non-finite
    values enter as 0, and the (row, column) entries that see one through a visible pair become NaN, as
    the product would make them (the kernel's _masked_pv). p (P, Lq, Lk), keep broadcastable to it."""
    finite = torch.isfinite(v)
    out = torch.matmul(p, v.masked_fill(~finite, 0.0))
    hits = torch.matmul(keep.to(v.dtype).expand_as(p), (~finite).to(v.dtype))
    return out.masked_fill(hits > 0, math.nan)


def _attend_backward(q, do, o, lse, delta, k, v, keep, bias, call: _Call, fused: bool):
    """(dq, dk, dv, ds) of one piece, ds = d loss / d scores (the bias gradient; None from the fused
    kernel). lse (P, Lq) is +inf for rows that saw no key (their p is 0); delta (P, Lq) is
    rowsum(do * o) minus the gradient of lse (the fused kernel computes it from o, do)."""
    if fused:
        dq, dk, dv = _FUSED_BWD(do[:, None], q[:, None], k[:, None], v[:, None], o[:, None], lse[:, None], 0.0,
                                False, attn_mask=_logits_mask(keep, bias, q.dtype), scale=call.scale)
        return dq[:, 0], dk[:, 0], dv[:, 0], None
    s, tanh_s = _scores(q, k, bias, call)
    log_p = s - lse[..., None]
    if keep is not None:
        log_p = log_p.masked_fill(~keep, -math.inf)
    p = torch.exp(log_p)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - delta[..., None])
    ds_qk = ds if tanh_s is None else ds * (1 - tanh_s * tanh_s)
    dq = torch.matmul(ds_qk, k) * call.scale
    dk = torch.matmul(ds_qk.transpose(-1, -2), q) * call.scale
    return dq, dk, torch.matmul(p.transpose(-1, -2), do), ds


def _merge(o_a, lse_a, o_b, lse_b):
    """Join two partial results of the same rows by their logsumexp."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.masked_fill(lse == -math.inf, 0.0)
    return o_a * torch.exp(lse_a - safe)[..., None] + o_b * torch.exp(lse_b - safe)[..., None], lse


# ---------------------------------------------------------------------------------------------------
# The passes
# ---------------------------------------------------------------------------------------------------


def _query_layouts(call: _Call, index):
    if index is None:
        return _layouts(call, twin_tile(), twin_tile(), 1)
    return _layouts(call, index.block_q, index.block_k, _index_groups(index, call.group))


def _query_pieces(call, index, queries, keys, rows, k, v):
    if index is None:
        return _span_query_pieces(call, queries, rows, k, v)
    return _listed_query_pieces(call, index, queries, keys, rows, [keys.items(k), keys.items(v)])


def flash_fwd(q, k, v, *, scale: float, window=(-1, -1), softcap: float = 0.0, index=None, bias=None,
              seqlens=None):
    """o (B, Hq, N, Dv) in q's dtype and lse (B, Hq, N) fp32. `index`: a SparseIndex or None (dense);
    `bias`: an additive bias (4-D, broadcastable to (B, Hq, N, M)) or None. `seqlens`: None, or a pack's
    (q_starts, k_starts) (B = 1; the index has one row per sequence): the twin runs each sequence on
    its own (`_packed`), so its cost follows the real lengths."""
    if seqlens is not None:
        return _packed_fwd(q, k, v, scale=scale, window=window, softcap=softcap, index=index, bias=bias,
                           seqlens=seqlens)
    call = _call(q, k, v, scale, window, softcap, guarded=_has_nonfinite(k, v))
    out_dtype, acc_dtype = q.dtype, _accum_dtype(q.dtype)
    q, k, v = (x.to(acc_dtype) for x in (q, k, v))
    bias = None if bias is None else _Bias(bias, call.n, call.m, acc_dtype)
    queries, keys = _query_layouts(call, index)
    q_items = queries.items(q)
    o = q_items.new_zeros(q_items.shape[:-1] + (v.shape[-1],))
    lse = q_items.new_full(q_items.shape[:-1], -math.inf)
    for piece in _query_pieces(call, index, queries, keys, [q_items], k, v):
        bias_tile = None if bias is None else bias.tile(piece.where)
        o_piece, lse_piece = _attend(*piece.rows, *piece.keys, piece.keep, bias_tile, call)
        o[piece.items], lse[piece.items] = _merge(o[piece.items], lse[piece.items], o_piece, lse_piece)
    return queries.tensor(o).to(out_dtype), queries.tensor(lse[..., None])[..., 0].float()


def flash_bwd(do, q, k, v, o, lse, *, scale: float, window=(-1, -1), softcap: float = 0.0, index=None,
              dlse=None, bias=None, bias_grad: bool = False, seqlens=None):
    """Gradients (dq, dk, dv, dbias) given do (and optionally dlse, the gradient of the returned lse),
    recomputing probabilities from the saved lse. d lse / d s = p, so dlse enters as delta - dlse.
    dQ (and the bias gradient, in fp32 and the bias's shape, when `bias_grad`; else None) walks the
    forward's lists per query item, dK/dV the transposed lists per key item. `seqlens` as flash_fwd's."""
    if seqlens is not None:
        return _packed_bwd(do, q, k, v, o, lse, scale=scale, window=window, softcap=softcap, index=index,
                           dlse=dlse, bias=bias, bias_grad=bias_grad, seqlens=seqlens)
    call = _call(q, k, v, scale, window, softcap)
    fused = call.fused and dlse is None and not bias_grad
    acc_dtype = _accum_dtype(q.dtype)
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, do, o = (x.to(acc_dtype) for x in (q, k, v, do, o))
    lse = lse.to(acc_dtype).masked_fill(lse == -math.inf, math.inf)  # rows that saw nothing: p = 0
    delta = (do * o).sum(dim=-1) - (0 if dlse is None else dlse.to(acc_dtype))
    row_tensors = (q, do, o, lse[..., None], delta[..., None])
    biased = None if bias is None else _Bias(bias, call.n, call.m, acc_dtype)
    dbias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if bias_grad else None
    queries, keys = _query_layouts(call, index)

    rows = [queries.items(x, pad=math.inf if i == 3 else 0.0) for i, x in enumerate(row_tensors)]
    dq = torch.zeros_like(rows[0])
    for piece in _query_pieces(call, index, queries, keys, rows, k, v):
        dq_piece, _, _, ds = _piece_grads(piece, biased, call, fused)
        dq[piece.items] += dq_piece
        if dbias is not None:
            biased.add_grad(dbias, piece.where, ds)

    key_rows = [keys.items(k), keys.items(v)]
    dk, dv = torch.zeros_like(key_rows[0]), torch.zeros_like(key_rows[1])
    if index is None:
        key_pieces = _span_key_pieces(call, keys, list(row_tensors), key_rows)
    else:
        key_pieces = _listed_key_pieces(call, index, queries, keys, rows, key_rows)
    for piece in key_pieces:
        _, dk_piece, dv_piece, _ = _piece_grads(piece, biased, call, fused)
        dk[piece.items] += dk_piece
        dv[piece.items] += dv_piece
    grads = queries.tensor(dq).to(dtypes[0]), keys.tensor(dk).to(dtypes[1]), keys.tensor(dv).to(dtypes[2])
    return (*grads, None if dbias is None else dbias.float())


def _piece_grads(piece: _Piece, bias: _Bias | None, call: _Call, fused: bool):
    q, do, o, lse, delta = piece.rows
    bias_tile = None if bias is None else bias.tile(piece.where)
    return _attend_backward(q, do, o, lse[..., 0], delta[..., 0], *piece.keys, piece.keep, bias_tile, call, fused)


# ---------------------------------------------------------------------------------------------------
# Packs: one sequence at a time, on views (the kernel runs them in one launch, through its tile table)
# ---------------------------------------------------------------------------------------------------


def _sequences(seqlens):
    """(sequence, its query rows, its key rows) for every sequence of a pack that has queries and keys
    (a sequence without keys keeps the zero output, the -inf lse and the zero gradients it starts with)."""
    q_starts, k_starts = seqlens
    for s in range(len(q_starts) - 1):
        rows, keys = slice(q_starts[s], q_starts[s + 1]), slice(k_starts[s], k_starts[s + 1])
        if rows.stop > rows.start and keys.stop > keys.start:
            yield s, rows, keys


def _sequence_index(index, s: int, n: int, m: int):
    """Sequence s's SparseIndex: its row of the pack's lists (or the shared one), cut to its own grid."""
    if index is None:
        return None
    seq = slice(s, s + 1) if index.kv_count_full.shape[0] > 1 else slice(0, 1)
    n_qb, n_kb = geometry.num_blocks(n, index.block_q), geometry.num_blocks(m, index.block_k)
    counts = {"kv": n_qb, "q": n_kb}
    widths = {"kv": n_kb, "q": n_qb}
    cut = {}
    for side in ("kv", "q"):
        for kind in ("full", "part"):
            cut[f"{side}_count_{kind}"] = getattr(index, f"{side}_count_{kind}")[seq, :, :counts[side]]
            cut[f"{side}_index_{kind}"] = getattr(index, f"{side}_index_{kind}")[seq, :, :counts[side], :widths[side]]
    return dataclasses.replace(index, **cut)


def _sequence_bias(bias, rows: slice, keys: slice):
    """Sequence s's block of a pack's bias (1|., Hq|1, total_q|1, total_k|1): its rows and keys, broadcast
    dimensions kept."""
    if bias is None:
        return None
    return bias[:, :, rows if bias.shape[2] > 1 else slice(None), keys if bias.shape[3] > 1 else slice(None)]


def _packed_fwd(q, k, v, *, scale, window, softcap, index, bias, seqlens):
    o = q.new_zeros(*q.shape[:3], v.shape[-1])
    lse = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
    for s, rows, keys in _sequences(seqlens):
        o[:, :, rows], lse[:, :, rows] = flash_fwd(
            q[:, :, rows], k[:, :, keys], v[:, :, keys], scale=scale, window=window, softcap=softcap,
            index=_sequence_index(index, s, rows.stop - rows.start, keys.stop - keys.start),
            bias=_sequence_bias(bias, rows, keys))
    return o, lse


def _packed_bwd(do, q, k, v, o, lse, *, scale, window, softcap, index, dlse, bias, bias_grad, seqlens):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dbias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias_grad else None
    for s, rows, keys in _sequences(seqlens):
        dq[:, :, rows], dk[:, :, keys], dv[:, :, keys], dbias_s = flash_bwd(
            do[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], o[:, :, rows], lse[:, :, rows],
            scale=scale, window=window, softcap=softcap,
            index=_sequence_index(index, s, rows.stop - rows.start, keys.stop - keys.start),
            dlse=None if dlse is None else dlse[:, :, rows], bias=_sequence_bias(bias, rows, keys),
            bias_grad=bias_grad)
        if bias_grad:
            _sequence_bias(dbias, rows, keys).add_(dbias_s)
    return dq, dk, dv, dbias
