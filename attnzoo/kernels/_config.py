"""Host-side launch plumbing shared by the Triton launchers: tile choice, autotune pruning, dot
precision, output allocation. (The shared device-side helpers live in _common.py.)

On CUDA the flash kernels are autotuned over a small list of configs. Under the Triton interpreter
(TRITON_INTERPRET=1, CPU tensors) there is nothing to tune, so a launcher calls the plain kernel with
one small tile (ATTNZOO_INTERPRET_TILE, default 16) so that tiny test shapes still cross several
tiles, ragged tails and diagonal blocks.

On CUDA the autotuners also prune per device (`prune_for_device`): a config whose shared memory
exceeds the device's limit, or which spills more than SPILL_BUDGET bytes, is dropped before anything
compiles. The numbers come from the static compile of every config for sm_80 / sm_90a
(scripts/kernel_report.py -> _fit_table.py, see docs/gpu.md); there is no GPU in the loop.

ATTNZOO_POISON=1 makes launchers fill their outputs with NaN before the kernel writes them, so a
test notices any element a kernel forgets to write (the test suite sets it).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from .._env import interpret_tile, poisoning, triton_interpreting

__all__ = ["triton_interpreting", "interpret_tile", "fixed_tile", "new_output", "dot_precision", "next_pow2",
           "prune_for_sparse", "prune_for_device", "prune_table_entry", "SHARED_LIMIT", "SPILL_BUDGET", "PackTiles",
           "pack_tiles"]

# Largest shared memory one block may use (the opt-in limit, bytes), by compute capability. A GPU
# reports its own (shared_memory_per_block_optin); these are for the static report and for fallback.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# Spill bytes (stores + loads, from ptxas) a kept config may have: none. When every config of a
# kernel spills, prune_table_entry keeps the least-spilling one that fits.
SPILL_BUDGET = 0


def fixed_tile(cuda_tile: int) -> int:
    """The tile of a kernel launched without autotuning: `cuda_tile` on a GPU, the interpreter tile
    under the interpreter."""
    return interpret_tile() if triton_interpreting() else cuda_tile


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer for a kernel to fill: NaN-poisoned when ATTNZOO_POISON=1, else uninitialised."""
    if poisoning():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """The PRECISION constexpr of the kernels' dots (_common._dot). fp32 inputs get exact fp32
    products ("ieee", not tf32): attnzoo promises fp32 accuracy in fp32. "upcast" works around the
    Triton interpreter, whose tl.dot computes garbage for bf16 operands: there the kernel upcasts them
    to fp32 first."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and triton_interpreting():
        return "upcast"
    return "tf32"


def next_pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def prune_for_sparse(configs, named_args, **kwargs):
    """Autotune `early_config_prune`: with a sparse index, keep configs whose query tile BLOCK_M
    divides the sparse query block and whose key tile BLOCK_N divides the sparse key block. Sparse
    blocks are powers of two >= 16, so a 16x16 config always survives."""
    sparse_q = kwargs.get("SPARSE_Q", named_args.get("SPARSE_Q", 0))
    sparse_k = kwargs.get("SPARSE_K", named_args.get("SPARSE_K", 0))
    if not sparse_q:
        return configs
    return [c for c in configs if sparse_q % c.kwargs["BLOCK_M"] == 0 and sparse_k % c.kwargs["BLOCK_N"] == 0]


def prune_table_entry(entry: dict, arch: int, limit: int | None = None, spill_budget: int = SPILL_BUDGET,
                      shared_scale: int = 1, check_spills: bool = True) -> list:
    """The configs of one fit-table entry {config: (shared bytes, spill bytes)} that the autotuner
    keeps on `arch` with shared-memory `limit` (default SHARED_LIMIT[arch]): those that fit and spill
    at most `spill_budget`; if none, the least-spilling ones that fit; if none fit, the smallest."""
    limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[80]) if limit is None else limit
    fits = {cfg: spill for cfg, (shared, spill) in entry.items() if shared * shared_scale <= limit}
    if not fits:
        return [min(entry, key=lambda cfg: entry[cfg][0])] if entry else []
    if not check_spills:
        return list(fits)
    clean = [cfg for cfg, spill in fits.items() if spill <= spill_budget]
    if clean:
        return clean
    least = min(fits.values())
    return [cfg for cfg, spill in fits.items() if spill == least]


def _table_arch(major: int) -> int | None:
    """The compiled target whose numbers stand for a device of this major version (sm_8x -> sm_80,
    sm_90 -> sm_90a); None where the table has none (no spill pruning there, shared memory only)."""
    return {8: 80, 9: 90}.get(major)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    arch = props.major * 10 + props.minor
    limit = getattr(props, "shared_memory_per_block_optin", 0) or SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
    return arch, int(limit)


def _fit_entry(kind: str, table_arch: int, block_d: int, variant: str) -> dict | None:
    """The fit-table entry for the smallest measured head dim >= block_d (a smaller head dim uses
    no more registers or shared memory), or None."""
    from ._fit_table import FIT
    dims = sorted(d for (k, a, d, v) in FIT if (k, a, v) == (kind, table_arch, variant) and d >= block_d)
    return FIT[(kind, table_arch, dims[0], variant)] if dims else None


def _config_key(cfg) -> tuple:
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages


def prune_for_device(kind: str, *, arch: int | None = None, limit: int | None = None):
    """Autotune `early_config_prune` for flash kernel `kind` ("fwd", "dq", "dkdv"): prune_for_sparse,
    then drop the configs the static table says do not fit this device (shared memory above its
    limit, spills above SPILL_BUDGET; prune_table_entry). `arch` / `limit` fix the device (tests);
    otherwise they are read off the device of the first tensor argument. fp32 inputs ("ieee") use
    twice the bf16 shared memory and are pruned on that estimate only."""
    def prune(configs, named_args, **kwargs):
        configs = prune_for_sparse(configs, named_args, **kwargs)
        meta = {**named_args, **kwargs}
        dev_arch, dev_limit = arch, limit
        if dev_arch is None:
            tensor = next((v for v in named_args.values() if isinstance(v, torch.Tensor)), None)
            if tensor is None or tensor.device.type != "cuda":
                return configs
            dev_arch, dev_limit = _device_limits(tensor.device.index or 0)
        table_arch = _table_arch(dev_arch // 10)
        if table_arch is None:
            table_arch = 90
            check_spills = False
        else:
            check_spills = meta.get("PRECISION") != "ieee"
        variant = "sparse" if meta.get("SPARSE_Q") else \
            "dense-causal" if meta.get("HAS_RIGHT") or meta.get("HAS_LEFT") else "dense"
        block_d = max(meta.get("BLOCK_D", 0), meta.get("BLOCK_DV", 0))
        entry = None
        if meta.get("TMA"):  # the TMA forward's own rows, else (head dims it was not compiled for) the plain ones
            entry = _fit_entry(kind + "_tma", table_arch, block_d, variant)
        entry = entry or _fit_entry(kind, table_arch, block_d, variant)
        if entry is None:
            return configs
        known = {_config_key(c): entry[_config_key(c)] for c in configs if _config_key(c) in entry}
        kept = set(prune_table_entry(known, table_arch, dev_limit if dev_limit else SHARED_LIMIT.get(dev_arch),
                                     shared_scale=2 if meta.get("PRECISION") == "ieee" else 1,
                                     check_spills=check_spills))
        return [c for c in configs if _config_key(c) in kept or _config_key(c) not in known] or configs
    return prune


class PackTiles(NamedTuple):
    """The tile table of one pass over a pack (see _common._tile_of): the kernel arguments TILES, TILE_BASE,
    CU_ROWS, CU_COLS, and how many tiles of each size there are."""

    table: torch.Tensor  # (n_entries, 2) int32: (sequence, first row) of every tile of every size
    base: torch.Tensor  # (max size + 1,) int32: base[size] = the entry where the tiles of `size` rows start
    cu_rows: torch.Tensor  # (S + 1,) int32
    cu_cols: torch.Tensor
    counts: dict[int, int]  # size -> number of tiles

    def args(self) -> tuple:
        return self.table, self.base, self.cu_rows, self.cu_cols

    def programs(self, size: int) -> int:
        return self.counts[size]


def pack_tiles(row_starts: list[int], col_starts: list[int], sizes: list[int], device) -> PackTiles:
    """The tile table of a pack whose sequences start at `row_starts` (the rows a program tiles) and
    `col_starts` (the other side), for tiles of each of `sizes` rows: built on the host, one copy."""
    cu_rows = torch.tensor(row_starts, dtype=torch.int64)
    lengths = cu_rows[1:] - cu_rows[:-1]
    entries, base, counts, offset = [], torch.zeros(max(sizes) + 1, dtype=torch.int32), {}, 0
    for size in sizes:
        per_sequence = (lengths + size - 1) // size  # tiles of each sequence
        sequence = torch.repeat_interleave(torch.arange(len(lengths)), per_sequence)
        first_tile = torch.cumsum(per_sequence, 0) - per_sequence
        start = (torch.arange(len(sequence)) - first_tile[sequence]) * size
        entries.append(torch.stack([sequence, start], dim=1))
        base[size], counts[size] = offset, len(sequence)
        offset += len(sequence)
    host = torch.cat([torch.cat(entries).to(torch.int32).flatten(), base,
                      cu_rows.to(torch.int32), torch.tensor(col_starts, dtype=torch.int32)])
    table, base, rows, cols = host.to(device).split([2 * offset, len(base), len(row_starts), len(col_starts)])
    return PackTiles(table, base, rows, cols, counts)
