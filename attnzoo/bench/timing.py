"""Timing the contenders of one case together, and peak memory of one call.

`measure(steps, ...)` times several no-argument callables the same way:

1. warm-up: `warmup` untimed calls of each, then the device's calibration (untimed too);
2. `repeats` rounds; a round takes one sample of every step in turn (A B C A B C ...), so that a
   machine that slows down or speeds up mid-run (frequency scaling, other load, a warming cache)
   affects every contender alike instead of whichever happened to run then;
3. per step, the median of its samples and their quartiles. A row whose interquartile range exceeds
   `NOISY` (20 %) of its median is flagged `noisy`.

One sample is, on CUDA, the median of `triton.testing.do_bench` over `sample_ms` of calls (L2 cache
flushed between calls); on CPU, the mean call time of one block of `torch.utils.benchmark.Timer.timeit`
calls, the block as many calls as one untimed calibration call says fill `sample_ms`. CPU timings say
nothing about GPU performance; the report says so next to every CPU number.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

NOISY = 0.2  # interquartile range / median above which a timing is flagged
CUDA_ROUND_WARMUP_MS = 5  # do_bench's own warm-up in each round (the first warm-up is done before)

Step = Callable[[], object]
Sampler = Callable[[], float]


@dataclass(frozen=True)
class Timing:
    """Summary of one step's samples (ms per call): median and quartiles (None with one sample)."""

    median_ms: float
    q1_ms: float | None
    q3_ms: float | None
    samples: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Timing":
        if len(samples_ms) < 2:
            return cls(statistics.median(samples_ms), None, None, len(samples_ms))
        q1, median, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
        return cls(median, q1, q3, len(samples_ms))

    @property
    def rel_iqr(self) -> float | None:
        """(q3 - q1) / median: the spread of the samples relative to the reported time."""
        return None if self.q1_ms is None else (self.q3_ms - self.q1_ms) / self.median_ms

    @property
    def noisy(self) -> bool | None:
        return None if self.rel_iqr is None else self.rel_iqr > NOISY


def _cpu_sampler(step: Step, sample_ms: float) -> Sampler:
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    one_call_ms = timer.timeit(1).median * 1e3  # calibration (untimed): calls per block of >= sample_ms
    number = max(1, math.ceil(sample_ms / one_call_ms))
    return lambda: timer.timeit(number).median * 1e3


def _cuda_sampler(step: Step, sample_ms: float) -> Sampler:
    from triton.testing import do_bench

    torch.cuda.synchronize()
    return lambda: float(do_bench(step, warmup=CUDA_ROUND_WARMUP_MS, rep=sample_ms, return_mode="median"))


def _sampler(step: Step, device: torch.device, *, warmup: int, sample_ms: float) -> Sampler:
    for _ in range(warmup):
        step()
    make = _cuda_sampler if device.type == "cuda" else _cpu_sampler
    return make(step, sample_ms)


def measure(steps: dict[Hashable, Step], device: torch.device, *, warmup: int, repeats: int, sample_ms: float,
            on_round: Callable[[int], None] | None = None) -> tuple[dict[Hashable, Timing], dict[Hashable, Exception]]:
    """Time every step, interleaved. Returns (timings, failures): a step that raises is dropped with its
    exception and the others go on."""
    samplers: dict[Hashable, Sampler] = {}
    failures: dict[Hashable, Exception] = {}
    for key, step in steps.items():
        try:
            samplers[key] = _sampler(step, device, warmup=warmup, sample_ms=sample_ms)
        except Exception as err:  # reported by the caller, the sweep goes on
            failures[key] = err
    samples: dict[Hashable, list[float]] = {key: [] for key in samplers}
    for round_index in range(repeats):
        for key in [k for k in samplers if k not in failures]:
            try:
                samples[key].append(samplers[key]())
            except Exception as err:
                failures[key] = err
        if on_round is not None:
            on_round(round_index)
    return {key: Timing.of(s) for key, s in samples.items() if key not in failures}, failures


def describe(device: torch.device, *, warmup: int, repeats: int, sample_ms: float) -> str:
    """One line for the report: how the times were taken."""
    rounds = (f"{warmup} warm-up call(s), then {repeats} interleaved rounds (A B C A B C ...), "
              f"median and quartiles of the rounds' samples")
    if device.type == "cuda":
        return f"CUDA: triton.testing.do_bench median over {sample_ms:g} ms per sample; {rounds}"
    return (f"CPU timings (not GPU performance), {torch.get_num_threads()} threads: torch.utils.benchmark "
            f"blocks of >= {sample_ms:g} ms per sample; {rounds}")


def peak_memory_mib(fn: Step, device: torch.device) -> float | None:
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
