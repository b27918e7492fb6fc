"""Timing and peak memory of one callable.

CUDA: `triton.testing.do_bench` (warm-up excluded, L2 flushed between calls), its median.
CPU: the median of `repeats` wall-clock calls after `warmup` untimed ones. CPU timings say nothing
about GPU performance; the report says so next to every CPU number.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

CUDA_WARMUP_MS = 25
CUDA_REPEAT_MS = 100


def _median_ms_cpu(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _median_ms_cuda(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=CUDA_WARMUP_MS, rep=CUDA_REPEAT_MS, return_mode="median"))


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median time of one call of `fn` in milliseconds."""
    if device.type == "cuda":
        return _median_ms_cuda(fn)
    return _median_ms_cpu(fn, warmup=warmup, repeats=repeats)


def describe(device: torch.device, *, warmup: int, repeats: int) -> str:
    """One line for the report header: how the times were taken."""
    if device.type == "cuda":
        return (f"CUDA: triton.testing.do_bench median (warm-up {CUDA_WARMUP_MS} ms excluded, "
                f"~{CUDA_REPEAT_MS} ms of repeats)")
    return (f"CPU timings (not GPU performance): median of {repeats} wall-clock calls after "
            f"{warmup} warm-up call(s), {torch.get_num_threads()} threads")


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """CUDA memory allocated by one call of `fn` at its peak, beyond what was allocated before it
    (inputs excluded). None on CPU, where torch keeps no such counter."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
