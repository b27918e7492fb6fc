"""Packed sequences vs padding and vs one call per sequence, side by side in one run (issue 14).

    python benchmarks/varlen.py                      # -> benchmarks/results/cpu/varlen.{csv,json}
    python benchmarks/varlen.py --reps 5 --out /tmp/varlen
    python benchmarks/varlen.py --device cuda --dtype bfloat16 --out benchmarks/results/<gpu>   # Triton kernels

S sequences with lengths drawn from a long-tailed mix (seeded), H=8 (kv heads 2), D=64, causal; on
the CPU the torch backend in fp32, on CUDA the Triton kernels. Per method three contenders: the packed
call (`cu_seqlens_q/k`: one kernel launch per pass for the whole pack), the padded batch (B=S, every
sequence right-padded to the longest; causal, so the padding is invisible to the real tokens and both
compute the same outputs there) and a Python loop calling the method on each sequence's views (what a
library without varlen kernels does), forward only and forward + backward. Timing as in
kernel_boundary.py (CUDA synchronised per call): one warm-up each, then interleaved repetitions; the
ratios packed / padded and packed / loop per repetition, median [IQR]. The padded batch's cost follows
S x max_len, the pack's the real lengths; the loop's launches grow with S, the pack's do not.
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


def packed_and_padded(lengths: list[int], grad: bool, device: str, dtype: torch.dtype):
    """(q, k, v) packed (1, H, total, D) and padded (S, H, max, D) from the same random tokens."""
    gen = torch.Generator().manual_seed(0)
    seqs = [[torch.randn(1, h, n, HEAD_DIM, generator=gen).to(device, dtype) for h in (HEADS, KV_HEADS, KV_HEADS)]
            for n in lengths]
    packed = [torch.cat([s[i] for s in seqs], dim=2).requires_grad_(grad) for i in range(3)]
    longest = max(lengths)
    padded = [torch.cat([torch.nn.functional.pad(s[i], (0, 0, 0, longest - s[i].shape[2])) for s in seqs])
              .requires_grad_(grad) for i in range(3)]
    return packed, padded


def _synchronised(call, device: str):
    if device != "cuda":
        return call

    def synced():
        call()
        torch.cuda.synchronize()
    return synced


def timed(fn, inputs, backward: bool, device: str, **kw):
    grad = torch.randn(inputs[0].shape[:3] + (HEAD_DIM,), generator=torch.Generator().manual_seed(1))
    grad = grad.to(inputs[0].device, inputs[0].dtype)

    def call():
        out = fn(*inputs, causal=True, **kw)
        if backward:
            out.backward(grad)
    return _synchronised(call, device)


def looped(fn, inputs, lengths: list[int], backward: bool, device: str):
    """The method called on each sequence's views of the pack, one after the other."""
    starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    grad = torch.randn(inputs[0].shape[:3] + (HEAD_DIM,), generator=torch.Generator().manual_seed(1))
    grad = grad.to(inputs[0].device, inputs[0].dtype)

    def call():
        outs = [fn(*(x[:, :, a:b] for x in inputs), causal=True) for a, b in zip(starts, starts[1:])]
        if backward:
            torch.cat(outs, dim=2).backward(grad)
    return _synchronised(call, device)


def cases(reps: int, count: int, longest: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    lengths = mixed_lengths(count, longest, seed=0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    for backward in (False, True):
        packed, padded = packed_and_padded(lengths, backward, device, dtype)
        for name, params in METHODS.items():
            fn = attnzoo.get(name, **params)
            times = interleaved({"packed": timed(fn, packed, backward, device, cu_seqlens_q=cu, cu_seqlens_k=cu),
                                 "padded": timed(fn, padded, backward, device),
                                 "loop": looped(fn, packed, lengths, backward, device)}, reps)
            row = dict(method=name, mode="fwd+bwd" if backward else "fwd", sequences=count, tokens=sum(lengths),
                       padded_tokens=count * longest)
            for other in ("padded", "loop"):
                q1, median, q3 = _quartiles([a / b for a, b in zip(times["packed"], times[other])])
                row.update({f"vs_{other}": round(median, 3), f"vs_{other}_q1": round(q1, 3),
                            f"vs_{other}_q3": round(q3, 3)})
            yield dict(row, **{f"{who}_ms": round(statistics.median(t) * 1e3, 1) for who, t in times.items()},
                       reps=reps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (>= 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--sequences", type=int, default=32, help="sequences per pack")
    parser.add_argument("--longest", type=int, default=2048, help="the longest sequence")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: the torch backend; cuda: the Triton kernels")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    args.shrink = 1
    torch.set_num_threads(args.threads)
    rows = []
    for row in cases(args.reps, args.sequences, args.longest, args.device, getattr(torch, args.dtype)):
        rows.append(row)
        print(f"{row['method']:<11} {row['mode']:<8} {row['sequences']} seqs, {row['tokens']} tokens "
              f"({row['padded_tokens']} padded): packed / padded {row['vs_padded']:.3f} "
              f"[{row['vs_padded_q1']:.3f}, {row['vs_padded_q3']:.3f}], packed / loop {row['vs_loop']:.3f} "
              f"[{row['vs_loop_q1']:.3f}, {row['vs_loop_q3']:.3f}]  ({row['packed_ms']} / {row['padded_ms']} / "
              f"{row['loop_ms']} ms)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "varlen.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    backend = "Triton kernels" if args.device == "cuda" else "torch backend"
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else environment(args)["device"]
    env = {**environment(args), "device": device, "command": "python benchmarks/varlen.py " + " ".join(args.argv),
           "shape": f"H={HEADS}, Hk={KV_HEADS}, D={HEAD_DIM}, {args.dtype}, causal, {backend}"}
    (args.out / "varlen.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=2))
    print(f"wrote {args.out / 'varlen.csv'} and varlen.json at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
