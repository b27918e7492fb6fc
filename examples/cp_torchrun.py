"""Context parallelism with attnzoo: one sequence sharded over the ranks of a process group.

    torchrun --nproc-per-node 2 examples/cp_torchrun.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/cp_torchrun.py --cuda     # one GPU per rank, NCCL

Every rank builds the same full q, k, v (same seed), keeps its zigzag shard, runs XAttention's
context-parallel form forward and backward, and checks the gathered output against the
single-device call.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import attnzoo
from attnzoo.distributed import context_parallel, gather_sequence, shard_sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="NCCL and one GPU per rank (LOCAL_RANK)")
    parser.add_argument("--length", type=int, default=1024, help="global sequence length")
    args = parser.parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    generator = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    q = torch.randn(1, 8, args.length, 64, generator=generator).to(device)  # (B, Hq, N, D)
    k = torch.randn(1, 2, args.length, 64, generator=generator).to(device)  # (B, Hk, N, D): GQA
    v = torch.randn(1, 2, args.length, 64, generator=generator).to(device)

    params = dict(threshold=0.9, block_size=64, stride=8)
    q_local, k_local, v_local = (shard_sequence(x, zigzag=True).requires_grad_() for x in (q, k, v))
    attention = context_parallel("xattention", zigzag=True, **params)
    out_local, block_mask = attention(q_local, k_local, v_local, causal=True, return_block_mask=True)
    out_local.square().sum().backward()  # this rank's part of the loss; k_local.grad is complete
    out = gather_sequence(out_local.detach(), zigzag=True)

    single = attnzoo.get("xattention", **params)(q, k, v, causal=True)
    error = ((out - single).norm() / single.norm()).item()
    if rank == 0:
        print(f"world size {world}: shards of {q_local.shape[2]} tokens, density {block_mask.density():.3f}, "
              f"relative error vs one device {error:.1e}, |dk_local| {k_local.grad.norm():.3f}")
    dist.destroy_process_group()
    if error > 1e-5:
        raise SystemExit(f"context-parallel output differs from the single-device call: {error:.1e}")


if __name__ == "__main__":
    main()
