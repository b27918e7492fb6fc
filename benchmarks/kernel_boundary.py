"""Does the CPU path's cost follow the work? The ratios of issue 10, measured side by side in one run.

    python benchmarks/kernel_boundary.py                       # -> benchmarks/results/cpu/kernel_boundary.{csv,json}
    python benchmarks/kernel_boundary.py --reps 9 --threads 2 --out /tmp/kb

Every case times its contenders interleaved (A B C A B C ...) after one warm-up call each, on the
same inputs, B=1, H=8, D=64, fp32, on the torch backend (CPU). A ratio is computed per repetition
(the contenders of one repetition ran back to back, so machine noise hits them alike) and reported as
the median with its interquartile range. Cases:
- dense vs SDPA (N = 2048, 4096): attnzoo's dense path (which hands plain calls to SDPA), and the
  PyTorch twin itself (return_lse=True, which SDPA cannot serve);
- dense causal vs non-causal (N = 4096), on both paths;
- block_sparse at density 0.1 / 0.25 / 0.5 vs the same call at density 1.0 (N = 4096, block 128);
- xattention (threshold 0.9, structured inputs) vs dense (N = 8192), with the share of its time
  spent choosing blocks (the antidiagonal estimate and the threshold selection);
each forward only and forward + backward.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import attnzoo
from attnzoo import masks
from attnzoo.bench.inputs import make_qkv
from attnzoo.methods.xattention import select_blocks

HEADS, HEAD_DIM = 8, 64
BLOCK = 128


def _inputs(kind: str, seqlen: int, *, grad: bool, seed: int = 0):
    q, k, v = make_qkv(kind, batch=1, heads=HEADS, kv_heads=HEADS, seqlen=seqlen, head_dim=HEAD_DIM,
                       dtype=torch.float32, device=torch.device("cpu"), seed=seed)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _run(forward: Callable, inputs, backward: bool) -> Callable[[], None]:
    """One timed call: forward, and with `backward` also the gradient of a fixed random projection."""
    def call():
        out = forward(*inputs)
        if backward:
            out.backward(grad)
    grad = torch.randn(inputs[0].shape[:3] + (inputs[2].shape[-1],), generator=torch.Generator().manual_seed(1))
    return call


def interleaved(calls: dict[str, Callable[[], None]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of every contender: one warm-up each, then `reps` rounds A B C ... ."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def cases(reps: int, shrink: int = 1):
    """Yield one result row per (case, mode, contender vs its baseline). `shrink` divides every sequence
    length (a smoke test of the script; the committed results use 1)."""
    dense, sparse, xattn = attnzoo.get("dense"), attnzoo.get("block_sparse"), attnzoo.get("xattention", threshold=0.9)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def dense_twin(causal):
        return lambda q, k, v: dense(q, k, v, causal=causal, return_lse=True, backend="torch")[0]

    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        for n in (2048 // shrink, 4096 // shrink):
            x = _inputs("random", n, grad=backward)
            calls = {"sdpa": _run(lambda q, k, v: sdpa(q, k, v), x, backward),
                     "dense": _run(lambda q, k, v: dense(q, k, v, backend="torch"), x, backward),
                     "dense twin": _run(dense_twin(False), x, backward)}
            yield from _ratios(f"dense vs sdpa, N={n}", mode, interleaved(calls, reps), "sdpa")

        n = 4096 // shrink
        x = _inputs("random", n, grad=backward)
        calls = {"dense non-causal": _run(lambda q, k, v: dense(q, k, v, backend="torch"), x, backward),
                 "dense causal": _run(lambda q, k, v: dense(q, k, v, causal=True, backend="torch"), x, backward),
                 "dense twin non-causal": _run(dense_twin(False), x, backward),
                 "dense twin causal": _run(dense_twin(True), x, backward)}
        times = interleaved(calls, reps)
        yield from _ratios(f"causal vs non-causal, N={n}", mode, times, "dense non-causal", only=["dense causal"])
        yield from _ratios(f"causal vs non-causal (twin), N={n}", mode, times, "dense twin non-causal",
                           only=["dense twin causal"])

        calls = {}
        for density in (1.0, 0.5, 0.25, 0.1):
            mask = masks.random(n, n, density, BLOCK, heads=HEADS, seed=0)
            calls[f"block_sparse density {density}"] = _run(
                lambda q, k, v, mask=mask: sparse(q, k, v, block_mask=mask, backend="torch"), x, backward)
        yield from _ratios(f"block_sparse vs density 1.0, N={n}", mode, interleaved(calls, reps),
                           "block_sparse density 1.0")

        n = 8192 // shrink
        x = _inputs("structured", n, grad=backward)
        choose = _run(lambda q, k, v: select_blocks(q, k, stride=8, threshold=0.9, block_q=BLOCK, block_k=BLOCK,
                                                    scale=HEAD_DIM ** -0.5, causal=True, backend="torch"),
                      x, False)
        calls = {"dense causal": _run(lambda q, k, v: dense(q, k, v, causal=True, backend="torch"), x, backward),
                 "xattention causal": _run(lambda q, k, v: xattn(q, k, v, causal=True, backend="torch"), x, backward),
                 "xattention block choice": choose}
        times = interleaved(calls, reps)
        _, chosen = xattn(*x, causal=True, backend="torch", return_block_mask=True)
        yield from _ratios(f"xattention vs dense, structured, N={n}", mode, times, "dense causal",
                           only=["xattention causal"], density=chosen.density())
        yield from _ratios("xattention block-choice share", mode, times, "xattention causal",
                           only=["xattention block choice"])


def _ratios(case: str, mode: str, times: dict[str, list[float]], baseline: str, only=None, density=None):
    for name, samples in times.items():
        if name == baseline or (only is not None and name not in only):
            continue
        per_rep = [a / b for a, b in zip(samples, times[baseline])]
        q1, median, q3 = _quartiles(per_rep)
        yield dict(case=case, mode=mode, contender=name, baseline=baseline, ratio=round(median, 3),
                   ratio_q1=round(q1, 3), ratio_q3=round(q3, 3),
                   contender_ms=round(statistics.median(samples) * 1e3, 1),
                   baseline_ms=round(statistics.median(times[baseline]) * 1e3, 1),
                   density="" if density is None else round(density, 3), reps=len(samples))


def environment(args) -> dict:
    return dict(device=f"CPU ({platform.processor() or platform.machine()})", threads=torch.get_num_threads(),
                torch=torch.__version__, attnzoo=attnzoo.__version__, python=platform.python_version(),
                reps=args.reps, shrink=args.shrink, shape=f"B=1, H={HEADS}, D={HEAD_DIM}, fp32",
                command="python benchmarks/kernel_boundary.py " + " ".join(args.argv),
                when=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per case (>= 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu")
    parser.add_argument("--shrink", type=int, default=1, help="divide every sequence length (smoke tests only)")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    torch.set_num_threads(args.threads)
    rows = []
    for row in cases(args.reps, args.shrink):
        rows.append(row)
        print(f"{row['case']:<42} {row['mode']:<8} {row['contender']:<26} ratio {row['ratio']:.3f} "
              f"[{row['ratio_q1']:.3f}, {row['ratio_q3']:.3f}]  {row['contender_ms']:.1f} / {row['baseline_ms']:.1f} ms"
              + (f"  density {row['density']}" if row["density"] != "" else ""), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "kernel_boundary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "kernel_boundary.json").write_text(json.dumps(dict(environment=environment(args), rows=rows),
                                                              indent=2))
    print(f"wrote {args.out / 'kernel_boundary.csv'} and kernel_boundary.json")


if __name__ == "__main__":
    main()
