"""How one sequence is cut across the ranks of a process group, and the collectives that move it.

The sequence (length L along `dim`) is cut into equal chunks:
- contiguous (zigzag=False): W chunks, rank r holds chunk r;
- zigzag (zigzag=True): 2W chunks, rank r holds chunks r and 2W - 1 - r (one early, one late chunk,
  so that causal attention gives every rank the same work).
A rank's shard is its chunks concatenated in that order. Lengths that do not split into equal chunks
are refused (ValueError naming the length and the world size): pad the sequence yourself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def check_zigzag(zigzag) -> bool:
    if not isinstance(zigzag, bool):
        raise TypeError(f"zigzag must be a bool (True: rank r holds chunks r and 2W - 1 - r), "
                        f"got {type(zigzag).__name__}")
    return zigzag


@dataclass(frozen=True)
class Layout:
    """The chunks of one process group's sequence layout."""

    group: dist.ProcessGroup
    world: int
    rank: int
    zigzag: bool

    @classmethod
    def of(cls, group, zigzag: bool) -> Layout:
        check_zigzag(zigzag)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("attnzoo.distributed needs torch.distributed initialised "
                               "(torch.distributed.init_process_group, or run under torchrun)")
        group = dist.group.WORLD if group is None else group
        return cls(group, dist.get_world_size(group), dist.get_rank(group), zigzag)

    @property
    def num_chunks(self) -> int:
        return 2 * self.world if self.zigzag else self.world

    def chunk_ids(self, rank: int | None = None) -> tuple[int, ...]:
        """The chunks a rank holds, in shard order."""
        rank = self.rank if rank is None else rank
        return (rank, 2 * self.world - 1 - rank) if self.zigzag else (rank,)

    def peer(self, offset: int) -> int:
        """Global rank of the group member `offset` places after this one on the ring."""
        return dist.get_global_rank(self.group, (self.rank + offset) % self.world)

    def chunk_length(self, length: int, what: str) -> int:
        """Length of one chunk of a sequence of `length`; ValueError unless it splits evenly."""
        if length % self.num_chunks:
            cut = f"2 x world size {self.world} = {self.num_chunks} (zigzag chunks)" if self.zigzag \
                else f"world size {self.world}"
            raise ValueError(f"{what} length {length} does not split into {cut} equal chunks; pad the sequence "
                             f"to a multiple of {self.num_chunks} (attnzoo.distributed refuses uneven shards)")
        return length // self.num_chunks

    def local_chunks(self, x: torch.Tensor, dim: int = 2) -> list[torch.Tensor]:
        """This rank's shard of x split into its chunks (views), in shard order."""
        return list(x.chunk(len(self.chunk_ids()), dim=dim))


class _AllGather(torch.autograd.Function):
    """(W, *x.shape): every rank's x, stacked in rank order. Backward: the gradients of all ranks for
    this rank's x, summed (an all_reduce, which every backend has)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        parts = [torch.empty_like(x) for _ in range(layout.world)]
        dist.all_gather(parts, x.contiguous(), group=layout.group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.layout.group)
        return grad[ctx.layout.rank], None


def all_gather(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Differentiable all_gather: (W, *x.shape) in rank order."""
    return _AllGather.apply(x, layout)


def chunks_in_order(per_rank: torch.Tensor, layout: Layout) -> torch.Tensor:
    """per_rank (W, slots, ...), slot s of rank r holding chunk layout.chunk_ids(r)[s] -> (C, ...) in
    sequence order. (One indexing op: whatever a rank reads from the result keeps the whole gather in
    its autograd graph, so every rank runs the gather's backward collective.)"""
    slots = per_rank.shape[1]
    source = {chunk: rank * slots + slot for rank in range(layout.world)
              for slot, chunk in enumerate(layout.chunk_ids(rank))}
    order = torch.tensor([source[c] for c in range(layout.num_chunks)], device=per_rank.device)
    return per_rank.flatten(0, 1)[order]


def shard(x: torch.Tensor, layout: Layout, dim: int = 2) -> torch.Tensor:
    """This rank's shard of the full tensor x along `dim`."""
    layout.chunk_length(x.shape[dim], f"sequence (dim {dim})")
    chunks = x.chunk(layout.num_chunks, dim=dim)
    return torch.cat([chunks[c] for c in layout.chunk_ids()], dim=dim)


def gather(x_local: torch.Tensor, layout: Layout, dim: int = 2) -> torch.Tensor:
    """The full tensor from every rank's shard (differentiable)."""
    per_rank = all_gather(x_local, layout)  # (W, *x_local.shape)
    slotted = per_rank.unflatten(dim + 1, (len(layout.chunk_ids()), -1)).movedim(dim + 1, 1)  # (W, slots, ...)
    return chunks_in_order(slotted, layout).movedim(0, dim).flatten(dim, dim + 1)


def global_stand_in(x_local: torch.Tensor, length: int) -> torch.Tensor:
    """A zero-copy tensor with x_local's shape but `length` rows along dim 2 (a broadcast of its first
    row): for the method checks that read only a shape and a device."""
    shape = list(x_local.shape)
    shape[2] = length
    return x_local[:, :, :1].expand(shape)


def shard_sequence(x: torch.Tensor, group=None, zigzag: bool = True, *, dim: int = 2) -> torch.Tensor:
    """This rank's shard of the full tensor x along `dim` (2 for q, k, v (B, H, L, D) and per-token
    inputs such as gates or bias factors; 1 for WERSA's gains (B, L, levels + 1)). See the module
    docstring for the layout; ValueError when L does not split into equal chunks."""
    return shard(x, Layout.of(group, zigzag), dim)


def gather_sequence(x_local: torch.Tensor, group=None, zigzag: bool = True, *, dim: int = 2) -> torch.Tensor:
    """Inverse of `shard_sequence`: the full tensor on every rank (differentiable: every rank's
    gradient flows back to the shard it came from)."""
    return gather(x_local, Layout.of(group, zigzag), dim)
