"""Host-side launch plumbing shared by the Triton launchers: tile choice, autotune pruning, dot
precision, output allocation. (The shared device-side helpers live in _common.py.)

On CUDA the flash kernels are autotuned over a small list of configs. Under the Triton interpreter
(TRITON_INTERPRET=1, CPU tensors) there is nothing to tune, so a launcher calls the plain kernel with
one small tile (ATTNZOO_INTERPRET_TILE, default 16) so that tiny test shapes still cross several
tiles, ragged tails and diagonal blocks.

ATTNZOO_POISON=1 makes launchers fill their outputs with NaN before the kernel writes them, so a
test notices any element a kernel forgets to write (the test suite sets it).
"""

from __future__ import annotations

import torch
import triton

from .._env import interpret_tile, poisoning, triton_interpreting

__all__ = ["triton_interpreting", "interpret_tile", "fixed_tile", "new_output", "dot_precision", "next_pow2",
           "prune_for_sparse"]


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
