"""BlockMask: which (query block, key block) pairs attention computes, in user and kernel form.

User form: a bool tensor (B|1, H|1, nQB, nKB), True = compute. Kernel form (`SparseIndex`), built on
the mask's device with no host sync, FlexAttention style: for every (batch, head, query block) the
number and the list of key blocks to visit, split into *full* blocks (every query/key pair in the
block is visible: no element mask needed) and *partial* blocks (on a causal/window boundary or the
ragged tail: element mask applied), plus the transposed lists (per key block, the query blocks) that
the backward's dK/dV pass walks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .geometry import Pack, block_geometry, num_blocks
from .validation import check_block_size

__all__ = ["BlockMask", "SparseIndex", "block_geometry", "INDEX_CACHE_ENTRIES"]

# Geometries (N, M, causal, window) whose SparseIndex one BlockMask keeps; the least recently used goes
# first. An entry holds 4 count tensors and 4 int32 lists of the mask's size: about 16 bytes per mask
# element (plus 8 per block row and column), so a mask's cache holds at most about
# INDEX_CACHE_ENTRIES * 16 * mask.numel() bytes.
INDEX_CACHE_ENTRIES = 4


@dataclass(frozen=True)
class SparseIndex:
    """Kernel form of a block mask for one call geometry (N, M, causal, window).

    Counts are int32 (Bm, Hm, rows); index lists int32 (Bm, Hm, rows, cols) with the first `count`
    entries valid, in ascending order. Bm is 1 or B, Hm is 1 or Hq (broadcast when 1); for a pack Bm
    is 1 or S, one row of lists per sequence.
    """

    block_q: int
    block_k: int
    kv_count_full: torch.Tensor  # (Bm, Hm, nQB)
    kv_index_full: torch.Tensor  # (Bm, Hm, nQB, nKB)
    kv_count_part: torch.Tensor
    kv_index_part: torch.Tensor
    q_count_full: torch.Tensor  # (Bm, Hm, nKB)
    q_index_full: torch.Tensor  # (Bm, Hm, nKB, nQB)
    q_count_part: torch.Tensor
    q_index_part: torch.Tensor


def _lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., R, C) bool -> counts (..., R) int32 and the selected column indices first, ascending."""
    counts = selected.sum(dim=-1, dtype=torch.int32)
    order = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices
    return counts.contiguous(), order.to(torch.int32).contiguous()


class BlockMask:
    """A block-sparsity pattern: `mask` bool (B|1, H|1, nQB, nKB) with block size (block_q, block_k).

    Query head h uses row h of the mask (or row 0 when H is 1); the mask is per query head, so heads
    of one GQA group may choose different blocks.
    """

    def __init__(self, mask: torch.Tensor, block_size=128):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"block mask must be a bool tensor (True = compute the block), got {got}")
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4 or mask.shape[-1] < 1 or mask.shape[-2] < 1 or mask.shape[0] < 1 or mask.shape[1] < 1:
            raise ValueError(f"block mask must have shape (B|1, H|1, nQB, nKB) with every dim >= 1 "
                             f"(or (nQB, nKB)), got {tuple(mask.shape)}")
        self.mask = mask
        self.block_q, self.block_k = check_block_size(block_size)
        # geometry -> (the mask's storage and version when built, its SparseIndex)
        self._index_cache: OrderedDict[tuple, tuple[tuple, SparseIndex]] = OrderedDict()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    @property
    def block_size(self) -> tuple[int, int]:
        return self.block_q, self.block_k

    def density(self) -> float:
        """Fraction of blocks kept, over every stored (batch, head, query block, key block)."""
        return self.mask.float().mean().item()

    def to_dense(self) -> torch.Tensor:
        """The bool block mask (B|1, H|1, nQB, nKB)."""
        return self.mask

    def check_fits(self, batch: int, heads: int, n: int, m: int, device=None) -> None:
        """Raise ValueError unless this mask fits q (batch, heads, n, .) and k (., ., m, .) on `device`."""
        Bm, Hm, n_qb, n_kb = self.mask.shape
        want = (-(-n // self.block_q), -(-m // self.block_k))
        if (n_qb, n_kb) != want:
            raise ValueError(
                f"block_mask has {n_qb}x{n_kb} blocks of {self.block_q}x{self.block_k}; "
                f"N={n}, M={m} need {want[0]}x{want[1]}")
        if Bm not in (1, batch) or Hm not in (1, heads):
            raise ValueError(f"block_mask has shape {self.shape}; expected ({batch}|1, {heads}|1, {n_qb}, {n_kb})")
        if device is not None and self.mask.device != torch.device(device):
            raise ValueError(f"block_mask is on {self.mask.device}; q, k, v are on {device}")

    # -- packs (docs/varlen.md): one (S, H|1, nQB, nKB) grid, sequence s in the top-left corner of row s

    def check_fits_pack(self, heads: int, pack: Pack, device=None) -> None:
        """Raise ValueError unless this mask is a pack's grid: (S, heads|1, ceil(max_q / bq), ceil(max_k / bk))."""
        want = (len(pack), num_blocks(pack.max_q, self.block_q), num_blocks(pack.max_k, self.block_k))
        S, Hm, n_qb, n_kb = self.mask.shape
        if (S, n_qb, n_kb) != want or Hm not in (1, heads):
            raise ValueError(f"block_mask for a pack of {want[0]} sequences must have shape ({want[0]}, H|1, "
                             f"{want[1]}, {want[2]}) (ceil(max_seqlen / block) blocks, block size ({self.block_q}, "
                             f"{self.block_k})), got {self.shape}")
        if device is not None and self.mask.device != torch.device(device):
            raise ValueError(f"block_mask is on {self.mask.device}; q, k, v are on {device}")

    def for_pack(self, pack: Pack) -> BlockMask:
        """This pack grid cut to the grid the kernels walk: that of the longest sequences."""
        rows = num_blocks(max(pack.q_lengths), self.block_q)
        cols = num_blocks(max(pack.k_lengths), self.block_k)
        return BlockMask(self.mask[:, :, :rows, :cols], self.block_size)

    def per_sequence(self, pack: Pack) -> list[BlockMask | None]:
        """Each sequence's own mask (1, H|1, ceil(N_s / bq), ceil(M_s / bk)) from a pack grid; None for a
        sequence without queries or keys."""
        out = []
        for s, (n, m) in enumerate(zip(pack.q_lengths, pack.k_lengths)):
            corner = self.mask[s:s + 1, :, :num_blocks(n, self.block_q), :num_blocks(m, self.block_k)]
            out.append(BlockMask(corner, self.block_size) if n and m else None)
        return out

    @classmethod
    def packed(cls, masks: list[BlockMask | None], pack: Pack, heads: int) -> BlockMask:
        """The pack grid (S, heads|1, ...) over the longest sequences holding each sequence's mask (None: no
        blocks) in its top-left corner; the rest False."""
        first = next(mask for mask in masks if mask is not None)
        per_head = any(mask is not None and mask.shape[1] > 1 for mask in masks)
        grid = torch.zeros(len(pack), heads if per_head else 1, num_blocks(max(pack.q_lengths), first.block_q),
                           num_blocks(max(pack.k_lengths), first.block_k), dtype=torch.bool, device=first.mask.device)
        for s, mask in enumerate(masks):
            if mask is not None:
                grid[s, :, :mask.shape[2], :mask.shape[3]] = mask.mask[0]
        return cls(grid, first.block_size)

    def sparse_index(self, n, m, *, causal: bool, window=(-1, -1)) -> SparseIndex:
        """Kernel form for this geometry: full and partial lists, and their transposes. For a pack of S
        sequences n and m are tuples of the per-sequence lengths, the mask is (S|1, H|1, nQB, nKB) over
        the pack's grid and sequence s's blocks count from its own first token. It is cached per
        geometry (at most INDEX_CACHE_ENTRIES, least recently used evicted); an entry records the mask's
        storage and version counter, so editing or replacing `mask` rebuilds that entry in place. A mask
        made under torch.inference_mode has no version counter: its index is built on every call, as it is
        under torch.compile (the traced graph builds it from the mask, so a compiled call follows edits)."""
        if torch.compiler.is_compiling():
            return self._build_index(n, m, causal, window)
        geometry = (n, m, causal, tuple(window))
        stamp = self._stamp()
        cached = self._index_cache.get(geometry)
        if cached is not None and stamp is not None and cached[0] == stamp:
            self._index_cache.move_to_end(geometry)
            return cached[1]
        index = self._build_index(n, m, causal, window)
        self._index_cache.pop(geometry, None)
        if stamp is not None:
            self._index_cache[geometry] = (stamp, index)
            while len(self._index_cache) > INDEX_CACHE_ENTRIES:
                self._index_cache.popitem(last=False)
        return index

    def _stamp(self) -> tuple | None:
        """(storage pointer, version) of the mask; None for an inference tensor (no version counter)."""
        if self.mask.is_inference():
            return None
        return self.mask.data_ptr(), self.mask._version

    def _build_index(self, n, m, causal: bool, window) -> SparseIndex:
        any_visible, fully = block_geometry(n, m, self.block_q, self.block_k, causal=causal, window=window,
                                            device=self.mask.device)
        full = self.mask & fully
        part = self.mask & any_visible & ~fully
        return SparseIndex(self.block_q, self.block_k, *_lists(full), *_lists(part),
                           *_lists(full.transpose(-1, -2)), *_lists(part.transpose(-1, -2)))

    def to_flex(self, n: int, m: int, *, causal: bool = False):
        """This mask as a `torch.nn.attention.flex_attention.BlockMask` for q length n, k length m.

        Full blocks go to Flex's full lists, the others to its partial lists. The mask_mod (which Flex
        treats as the truth, e.g. when it runs unfused) reads this block table and applies the
        bottom-right causal mask when `causal`; indices are clamped so Flex's padded positions stay
        inside the table."""
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        self.check_fits(self.mask.shape[0], self.mask.shape[1], n, m)
        index = self.sparse_index(n, m, causal=causal)
        table, diag = self.mask, m - n
        per_batch, per_head = table.shape[0] > 1, table.shape[1] > 1
        last_qb, last_kb = table.shape[2] - 1, table.shape[3] - 1

        def visible(b, h, q_idx, kv_idx):
            q_block = torch.clamp(q_idx // self.block_q, max=last_qb)
            kv_block = torch.clamp(kv_idx // self.block_k, max=last_kb)
            block = table[b * per_batch, h * per_head, q_block, kv_block]
            keep = block & (kv_idx < m)
            return keep & (kv_idx <= q_idx + diag) if causal else keep

        return FlexBlockMask.from_kv_blocks(
            index.kv_count_part, index.kv_index_part, index.kv_count_full, index.kv_index_full,
            BLOCK_SIZE=self.block_size, mask_mod=visible, seq_lengths=(n, m))

    @classmethod
    def from_flex(cls, flex_mask) -> BlockMask:
        """The blocks a Flex `BlockMask` visits (its full and partial lists together). Its mask_mod is not
        carried over: pass the causal flag to the method, element masks inside partial blocks are lost."""
        blocks = flex_mask.to_dense().to(torch.bool)  # (B, H, nQB, nKB) over Flex's padded lengths
        n, m = flex_mask.seq_lengths
        block_q, block_k = flex_mask.BLOCK_SIZE
        return cls(blocks[..., : -(-n // block_q), : -(-m // block_k)].contiguous(), (block_q, block_k))

    def __repr__(self) -> str:
        head = (f"BlockMask(shape={self.shape}, block_size={self.block_size}, "
                f"density={self.density():.3f}")
        n_qb, n_kb = self.mask.shape[-2:]
        if n_qb > 16 or n_kb > 16:
            return head + ")"
        rows = ("".join("#" if kept else "." for kept in row) for row in self.mask[0, 0].tolist())
        return head + ", mask[0, 0]=\n  " + "\n  ".join(rows) + "\n)"
