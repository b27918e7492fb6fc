"""Communication volume and time of attnzoo's context parallelism, per method and world size.

    python benchmarks/distributed_volume.py                      # CPU, gloo, world sizes 2 and 4
    python benchmarks/distributed_volume.py --worlds 2 --length 512 --out /tmp/cp.csv

For every method and world size W, one process group (torch.multiprocessing, gloo on CPU, NCCL with
--cuda) runs the context-parallel call forward and backward on the rank's shard. The bytes each rank
sends are counted by wrapping the torch.distributed calls attnzoo makes (isend in
batch_isend_irecv, all_gather, all_reduce; an all_gather sends its input to W - 1 peers, a ring
all_reduce sends 2 (W - 1) / W of its tensor) and set against the theoretical volume of the scheme:

- ring (dense and sparse methods): forward (W - 1) (|k| + |v|) for the circulating k/v shards;
  backward (W - 1) (|k| + |v|) + W (|dk| + |dv|) (dk, dv travel home in fp32). Data-dependent masks
  (xattention, seerattention's oracle, sparsed) add an all_gather of q and k, (W - 1) (|q| + |k|).
- state passing (linear methods): forward (W - 1) x chunks per rank x |state| for the all_gather of
  the chunk states (B, H, F, V + 1 [+ 1]); backward a ring all_reduce of the gathered gradient,
  2 (W - 1) x chunks x |state|. LAWCAT's halos add (W - 1) x chunks x |tail of q and k|.

Time: the median forward + backward wall time of a rank against the single-process call on the same
global inputs (every process one thread; on a machine with fewer cores than ranks they contend).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import attnzoo

HEAD_DIM = 64
BLOCK = 64
BIAS_RANK = 8
# method -> (causal, params): one representative call per method
CALLS = {
    "dense": (True, {}),
    "block_sparse": (True, {"block_size": BLOCK}),
    "xattention": (True, {"block_size": BLOCK, "stride": 8, "threshold": 0.9}),
    "seerattention": (True, {"block_size": BLOCK, "topk_ratio": 0.3}),
    "s2": (True, {"block_size": BLOCK, "local_blocks": 2, "vert_stride": 4}),
    "sparsed": (False, {"block_size": BLOCK, "select": 0.3}),
    "flashbias": (True, {}),
    "gla": (True, {}),
    "based": (True, {}),
    "lawcat": (True, {}),
    "wersa": (False, {"num_features": 64}),
}
RING_METHODS = ("dense", "block_sparse", "xattention", "seerattention", "s2", "sparsed", "flashbias")
GATHERS_QK = ("xattention", "seerattention", "sparsed")
SEQUENCE_INPUTS = ("g", "bias_factors")  # per-token extra inputs: sharded like q


def make_inputs(method: str, n: int, device) -> tuple:
    """Global q, k, v and extra inputs on `device` (the same in every process)."""
    gen = torch.Generator().manual_seed(0)
    hq, hk = (8, 2) if method in RING_METHODS else (4, 4)
    d = 16 if method == "based" else HEAD_DIM
    q, k, v = (torch.randn(1, h, n, dd, generator=gen) for h, dd in ((hq, d), (hk, d), (hk, HEAD_DIM)))
    extra = {}
    if method == "block_sparse":
        extra["block_mask"] = attnzoo.masks.random(n, n, 0.3, BLOCK, heads=hq, seed=1, causal=True)
    if method == "flashbias":
        extra["bias_factors"] = (torch.randn(1, hq, n, BIAS_RANK, generator=gen) / 3,
                                 torch.randn(1, 1, n, BIAS_RANK, generator=gen) / 3)
    if method in ("gla", "lawcat"):
        extra["g"] = F.logsigmoid(torch.randn(q.shape, generator=gen) + 2)
    if method == "lawcat":
        extra["conv_q"] = extra["conv_k"] = torch.randn(hq, d, 4, generator=gen) / 2
    return q.to(device), k.to(device), v.to(device), {name: _to(x, device) for name, x in extra.items()}


def _to(x, device):
    if isinstance(x, tuple):
        return tuple(t.to(device) for t in x)
    return attnzoo.BlockMask(x.mask.to(device), x.block_size) if isinstance(x, attnzoo.BlockMask) else x.to(device)


class Traffic:
    """Bytes this rank sends through the torch.distributed calls attnzoo makes, while installed."""

    def __init__(self, world: int):
        self.world, self.sent = world, 0
        self._originals = {name: getattr(dist, name) for name in ("batch_isend_irecv", "all_gather", "all_reduce")}
        isend = dist.isend

        def batch_isend_irecv(ops):
            self.sent += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is isend)
            return self._originals["batch_isend_irecv"](ops)

        def all_gather(outputs, tensor, *args, **kwargs):
            self.sent += (self.world - 1) * tensor.numel() * tensor.element_size()
            return self._originals["all_gather"](outputs, tensor, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.sent += 2 * (self.world - 1) * tensor.numel() * tensor.element_size() // self.world
            return self._originals["all_reduce"](tensor, *args, **kwargs)

        self._wrappers = {"batch_isend_irecv": batch_isend_irecv, "all_gather": all_gather, "all_reduce": all_reduce}

    def __enter__(self):
        for name, fn in self._wrappers.items():
            setattr(dist, name, fn)
        return self

    def __exit__(self, *exc):
        for name, fn in self._originals.items():
            setattr(dist, name, fn)


def theory(method: str, q_local, k_local, v_local, world: int, chunks: int) -> tuple[int, int]:
    """(forward, backward) bytes per rank of the scheme (see the module docstring)."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    if method in RING_METHODS:  # FlashBias's ring carries k with its bias factor W: [k, W], D + R wide
        k_width = k_local.shape[-1] + (BIAS_RANK if method == "flashbias" else 0)
        k_ring = k_local.numel() // k_local.shape[-1] * k_width
        kv = (k_ring + v_local.numel()) * k_local.element_size()
        forward = (world - 1) * kv + ((world - 1) * (size(q_local) + size(k_local)) if method in GATHERS_QK else 0)
        return forward, (world - 1) * kv + world * (k_ring + v_local.numel()) * 4
    B, H, n, _ = q_local.shape
    taylor = 1 + 16 + 16 * 17 // 2  # BASED's features of D = 16
    features = {"based": taylor, "wersa": CALLS["wersa"][1]["num_features"]}.get(method, q_local.shape[-1])
    columns = v_local.shape[-1] + (0 if method == "gla" else 1) + 1  # values [+ normaliser] + log decay
    state = B * H * features * columns * 4 * chunks
    halo = 2 * B * H * 3 * q_local.shape[-1] * q_local.element_size() * chunks if method == "lawcat" else 0
    return (world - 1) * (state + halo), 2 * (world - 1) * (state + halo)


def timed(fn, reps: int, device) -> float:
    """Median wall time of fn() over `reps` runs (after a CUDA sync on GPUs)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(fn, tensors, extra, causal: bool) -> None:
    leaves = [t.detach().requires_grad_() for t in tensors]
    fn(*leaves, causal=causal, **extra).square().sum().backward()


def measure(method: str, world: int, args, device) -> dict:
    """One CSV row: this rank's bytes sent forward and backward, the scheme's, and the times."""
    from attnzoo.distributed import context_parallel, shard_sequence

    causal, params = CALLS[method]
    zigzag = method in RING_METHODS  # the linear methods on contiguous shards, as their users would

    def shard(x):
        return tuple(map(shard, x)) if isinstance(x, tuple) else shard_sequence(x, zigzag=zigzag)

    q, k, v, extra = make_inputs(method, args.length, device)
    local = [shard(x) for x in (q, k, v)]
    local_extra = {name: shard(x) if name in SEQUENCE_INPUTS else x for name, x in extra.items()}
    call = context_parallel(method, zigzag=zigzag, **params)
    with Traffic(world) as forward, torch.no_grad():
        call(*local, causal=causal, **local_extra)
    out = call(*[t.detach().requires_grad_() for t in local], causal=causal, **local_extra)
    with Traffic(world) as backward:
        out.square().sum().backward()
    cp_time = timed(lambda: forward_backward(call, local, local_extra, causal), args.reps, device)
    dist.barrier()
    single = attnzoo.get(method, **params)
    single_time = timed(lambda: forward_backward(single, (q, k, v), extra, causal), args.reps, device) \
        if dist.get_rank() == 0 else 0.0
    dist.barrier()
    theory_fwd, theory_bwd = theory(method, *local, world, 2 if zigzag else 1)
    return dict(method=method, world_size=world, length=args.length, causal=causal, zigzag=zigzag,
                sent_fwd_bytes=forward.sent, theory_fwd_bytes=theory_fwd, sent_bwd_bytes=backward.sent,
                theory_bwd_bytes=theory_bwd, cp_fwd_bwd_s=round(cp_time, 4), single_fwd_bwd_s=round(single_time, 4))


def worker(rank: int, world: int, port: int, args, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    rows = [measure(method, world, args, device) for method in CALLS if not args.methods or method in args.methods]
    if rank == 0:
        torch.save(rows, out_file)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--length", type=int, default=1024, help="global sequence length")
    parser.add_argument("--methods", nargs="*", default=None, help="a subset of the methods (default: all)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu" / "distributed.csv")
    args = parser.parse_args(argv)
    rows = []
    for world in args.worlds:
        out_file = f"/tmp/attnzoo_cp_bench_{os.getpid()}_{world}.pt"
        mp.spawn(worker, args=(world, free_port(), args, out_file), nprocs=world, join=True)
        rows += torch.load(out_file)
        os.remove(out_file)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"{row['method']:>13} W={row['world_size']}  fwd {row['sent_fwd_bytes']:>9} B (theory "
              f"{row['theory_fwd_bytes']:>9})  bwd {row['sent_bwd_bytes']:>9} B (theory {row['theory_bwd_bytes']:>9})  "
              f"time {row['cp_fwd_bwd_s']:.3f} s vs {row['single_fwd_bwd_s']:.3f} s single")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
