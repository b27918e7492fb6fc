"""Packed sequences vs padding: many sequences of mixed length, side by side in one run (issue 14).

    python benchmarks/varlen.py                      # -> benchmarks/results/cpu/varlen.{csv,json}
    python benchmarks/varlen.py --reps 5 --out /tmp/varlen

S sequences with lengths drawn from a long-tailed mix (seeded), H=8 (kv heads 2), D=64, fp32, on the
torch backend (CPU). Per method, the packed call (`cu_seqlens_q/k`) against the padded batch
(B=S, every sequence right-padded to the longest; causal, so the padding is invisible to the real
tokens and both compute the same outputs there), forward only and forward + backward. Timing as in
kernel_boundary.py: one warm-up each, then interleaved repetitions; the ratio packed / padded per
repetition, median [IQR]. The padded batch's cost follows S x max_len, the pack's the real lengths.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

import attnzoo
from kernel_boundary import _quartiles, environment, interleaved

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64
METHODS = {"dense": {}, "xattention": {"threshold": 0.9, "block_size": 64}, "gla": {}}


def mixed_lengths(count: int, longest: int, seed: int) -> list[int]:
    """Long-tailed lengths in [16, longest]: most short, a few near `longest` (the longest is included)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (16 + (longest - 16) * torch.rand(count, generator=gen) ** 3).long().tolist()
    lengths[0] = longest
    return lengths


def packed_and_padded(lengths: list[int], grad: bool):
    """(q, k, v) packed (1, H, total, D) and padded (S, H, max, D) from the same random tokens."""
    gen = torch.Generator().manual_seed(0)
    seqs = [[torch.randn(1, h, n, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS)] for n in lengths]
    packed = [torch.cat([s[i] for s in seqs], dim=2).requires_grad_(grad) for i in range(3)]
    longest = max(lengths)
    padded = [torch.cat([torch.nn.functional.pad(s[i], (0, 0, 0, longest - s[i].shape[2])) for s in seqs])
              .requires_grad_(grad) for i in range(3)]
    return packed, padded


def timed(fn, inputs, backward: bool, **kw):
    grad = torch.randn(inputs[0].shape[:3] + (HEAD_DIM,), generator=torch.Generator().manual_seed(1))

    def call():
        out = fn(*inputs, causal=True, backend="torch", **kw)
        if backward:
            out.backward(grad)
    return call


def cases(reps: int, count: int, longest: int):
    lengths = mixed_lengths(count, longest, seed=0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for backward in (False, True):
        packed, padded = packed_and_padded(lengths, backward)
        for name, params in METHODS.items():
            fn = attnzoo.get(name, **params)
            times = interleaved({"packed": timed(fn, packed, backward, cu_seqlens_q=cu, cu_seqlens_k=cu),
                                 "padded": timed(fn, padded, backward)}, reps)
            ratios = [a / b for a, b in zip(times["packed"], times["padded"])]
            q1, median, q3 = _quartiles(ratios)
            yield dict(method=name, mode="fwd+bwd" if backward else "fwd", sequences=count, tokens=sum(lengths),
                       padded_tokens=count * longest, ratio=round(median, 3), ratio_q1=round(q1, 3),
                       ratio_q3=round(q3, 3), packed_ms=round(statistics.median(times["packed"]) * 1e3, 1),
                       padded_ms=round(statistics.median(times["padded"]) * 1e3, 1), reps=reps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (>= 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--sequences", type=int, default=32, help="sequences per pack")
    parser.add_argument("--longest", type=int, default=2048, help="the longest sequence")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    args.shrink = 1
    torch.set_num_threads(args.threads)
    rows = []
    for row in cases(args.reps, args.sequences, args.longest):
        rows.append(row)
        print(f"{row['method']:<11} {row['mode']:<8} {row['sequences']} seqs, {row['tokens']} tokens "
              f"({row['padded_tokens']} padded): packed / padded {row['ratio']:.3f} "
              f"[{row['ratio_q1']:.3f}, {row['ratio_q3']:.3f}]  {row['packed_ms']} / {row['padded_ms']} ms", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "varlen.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    env = {**environment(args), "command": "python benchmarks/varlen.py " + " ".join(args.argv),
           "shape": f"H={HEADS}, Hk={KV_HEADS}, D={HEAD_DIM}, fp32, causal, torch backend"}
    (args.out / "varlen.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=2))
    print(f"wrote {args.out / 'varlen.csv'} and varlen.json at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
