"""Ring attention over the flash op, with a global block mask.

Every rank keeps its query shard; the key/value shards travel round the ring (rank r sends to r + 1,
receives from r - 1), so at step s rank r holds the shard of rank (r - s) mod W. For every pair
(local query chunk, visiting key chunk) the flash op (`ops.flash.flash_attention`) computes a
partial output and its logsumexp, which are merged by logsumexp. A pair is skipped, never computed,
when no key of it is visible (causal) or none of its blocks is selected by the global block mask.

Sub-problem geometry: a query chunk at global rows [qa, qa + cq) against a key chunk [ka, ka + ck),
causal bottom-right aligned over the global lengths (query i sees key j iff j <= i + M - N). Only
the keys up to the last query's diagonal are passed (m' of them) and the rule is restated in the
sub-problem's own bottom-right alignment as the window (-1, right) with right >= 0, which the flash
op takes; the sub-mask is the global mask's rows and columns of the pair.

Backward: a second ring. (k, v, dk, dv) travel together; every rank adds its pairs' dk, dv to the
visiting shard's buffers, and after W steps one more hop brings every shard's dk, dv home. A pair's
gradients come from the op's own backward on the recomputed partial (out_p, lse_p), fed with the
merge's chain rule: with w_p = exp(lse_p - lse), d out_p = w_p d out and
d lse_p = w_p (rowsum(d out * (out_p - out)) + d lse), which gives the op exactly the global
probabilities' gradient (its delta becomes w_p times the global one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..block_mask import BlockMask
from ..geometry import block_geometry
from ..ops.flash import flash_attention
from .layout import Layout


@dataclass(frozen=True)
class RingSpec:
    """Everything a ring call needs besides the tensors."""

    layout: Layout
    backend: str
    n: int  # global query length
    m: int  # global key length
    causal: bool
    scale: float
    softcap: float
    block_mask: BlockMask | None  # global (B|1, Hq|1, nQB, nKB), or None: every block


@dataclass(frozen=True)
class Pair:
    """One (local query chunk, visiting key chunk) sub-problem."""

    q_rows: slice  # rows of the local query shard
    k_rows: slice  # rows of the visiting key shard (truncated at the last visible key)
    window: tuple[int, int]
    block_mask: BlockMask | None  # the pair's blocks (None: every block)


def plan_pair(spec: RingSpec, q_chunk: int, q_slot: int, k_chunk: int, k_slot: int) -> Pair | None:
    """The sub-problem of global query chunk `q_chunk` (slot `q_slot` of the local shard) against key
    chunk `k_chunk` (slot `k_slot` of the visiting shard), or None when nothing in it is computed."""
    cq, ck = spec.n // spec.layout.num_chunks, spec.m // spec.layout.num_chunks
    qa, ka = q_chunk * cq, k_chunk * ck
    keys, window = ck, (-1, -1)
    if spec.causal:
        reach = qa + cq + spec.m - spec.n - ka  # keys of the chunk up to the last query's diagonal
        keys = min(ck, reach)
        if keys <= 0:
            return None
        window = (-1, qa - ka + spec.m - spec.n - (keys - cq))
    q_rows, k_rows = slice(q_slot * cq, (q_slot + 1) * cq), slice(k_slot * ck, k_slot * ck + keys)
    if spec.block_mask is None:
        return Pair(q_rows, k_rows, window, None)
    sub = _sub_mask(spec.block_mask, qa, cq, ka, keys)
    seen, _ = block_geometry(cq, keys, sub.block_q, sub.block_k, window=window, device=sub.mask.device)
    if not bool((sub.mask & seen).any()):
        return None
    return Pair(q_rows, k_rows, window, sub)


def _sub_mask(block_mask: BlockMask, qa: int, cq: int, ka: int, keys: int) -> BlockMask:
    """The blocks of rows [qa, qa + cq) x keys [ka, ka + keys) (qa, ka, cq on block boundaries)."""
    bq, bk = block_mask.block_size
    rows = slice(qa // bq, (qa + cq) // bq)
    cols = slice(ka // bk, -(-(ka + keys) // bk))
    return BlockMask(block_mask.mask[..., rows, cols].contiguous(), (bq, bk))


def plan_ring(spec: RingSpec) -> list[list[Pair]]:
    """plans[s]: this rank's pairs at ring step s (visiting shard of rank (r - s) mod W)."""
    layout = spec.layout
    plans = []
    for step in range(layout.world):
        source = (layout.rank - step) % layout.world
        pairs = [plan_pair(spec, qc, qs, kc, ks)
                 for qs, qc in enumerate(layout.chunk_ids())
                 for ks, kc in enumerate(layout.chunk_ids(source))]
        plans.append([p for p in pairs if p is not None])
    return plans


def _start_pass(tensors: list[torch.Tensor], layout: Layout):
    """Send `tensors` to the next rank and receive the previous rank's into new buffers; returns
    (buffers, pending works)."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, layout.peer(1), layout.group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, layout.peer(-1), layout.group) for t in received]
    return received, dist.batch_isend_irecv(ops)


def _finish_pass(works) -> None:
    for work in works:
        work.wait()


def _merge(out, lse, rows: slice, part_out, part_lse) -> None:
    """Fold a partial (out, lse) into the accumulators (fp32) at `rows`, in place."""
    old_lse = lse[:, :, rows]
    new_lse = torch.logaddexp(old_lse, part_lse)
    base = new_lse.masked_fill(new_lse == -torch.inf, 0.0)  # rows that saw no key so far stay 0
    out[:, :, rows] = (out[:, :, rows] * (old_lse - base).exp()[..., None]
                       + part_out.float() * (part_lse - base).exp()[..., None])
    lse[:, :, rows] = new_lse


def _partial(q_rows, k, v, p: Pair, spec: RingSpec):
    """(out_p, lse_p) of one pair: the flash op on its query rows q_rows (B, Hq, cq, D) and its keys."""
    return flash_attention(q_rows, k[:, :, p.k_rows], v[:, :, p.k_rows], scale=spec.scale,
                           window_size=p.window, softcap=spec.softcap, block_mask=p.block_mask,
                           backend=spec.backend, need_lse=True)


def ring_forward(q, k, v, spec: RingSpec, plans: list[list[Pair]]):
    """Local out (B, Hq, n, Dv) in q's dtype and lse (B, Hq, n) fp32 for the local query shard."""
    B, Hq, n, _ = q.shape
    out = torch.zeros(B, Hq, n, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq, n), -torch.inf, dtype=torch.float32, device=q.device)
    shard = [k.contiguous(), v.contiguous()]
    for step, pairs in enumerate(plans):
        last = step == len(plans) - 1
        incoming, works = ([], []) if last else _start_pass(shard, spec.layout)
        for p in pairs:
            _merge(out, lse, p.q_rows, *_partial(q[:, :, p.q_rows], *shard, p, spec))
        _finish_pass(works)
        shard = incoming
    return out.to(q.dtype), lse


def _pair_grads(do, dlse, q, k, v, out, lse, p: Pair, spec: RingSpec):
    """(dq of the pair's rows, dk, dv of the visiting shard) through the op's backward on the
    recomputed partial (see the module docstring)."""
    rows = p.q_rows
    with torch.enable_grad():
        q_p, k_p, v_p = (x.detach().requires_grad_() for x in (q[:, :, rows], k, v))
        out_p, lse_p = _partial(q_p, k_p, v_p, p, spec)
    total = lse[:, :, rows]
    weight = (lse_p.detach() - total.masked_fill(total == -torch.inf, 0.0)).exp()  # w_p, 0 where nothing is seen
    d_out = do[:, :, rows]
    d_lse = (d_out.float() * (out_p.detach().float() - out[:, :, rows].float())).sum(-1)
    if dlse is not None:
        d_lse = d_lse + dlse[:, :, rows]
    return torch.autograd.grad((out_p, lse_p), (q_p, k_p, v_p),
                               ((weight[..., None] * d_out.float()).to(out_p.dtype), weight * d_lse))


def ring_backward(do, dlse, q, k, v, out, lse, spec: RingSpec, plans: list[list[Pair]]):
    """(dq, dk, dv) of the local shards; dk, dv reach their owner after the second ring."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = [k.contiguous(), v.contiguous()]
    dkv = [torch.zeros(k.shape, dtype=torch.float32, device=q.device),
           torch.zeros(v.shape, dtype=torch.float32, device=q.device)]
    for step, pairs in enumerate(plans):
        last = step == len(plans) - 1
        incoming, works = ([], []) if last else _start_pass(kv, spec.layout)
        for p in pairs:
            part_dq, part_dk, part_dv = _pair_grads(do, dlse, q, *kv, out, lse, p, spec)
            dq[:, :, p.q_rows] += part_dq
            dkv[0] += part_dk
            dkv[1] += part_dv
        _finish_pass(works)
        if spec.layout.world > 1:
            dkv, dkv_works = _start_pass(dkv, spec.layout)
            _finish_pass(dkv_works)
        kv = incoming
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec):
        plans = plan_ring(spec)
        out, lse = ring_forward(q, k, v, spec, plans)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.plans = spec, plans
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        do = torch.zeros_like(out) if do is None else do.contiguous()
        dq, dk, dv = ring_backward(do, dlse, q, k, v, out, lse, ctx.spec, ctx.plans)
        return dq, dk, dv, None


def ring_attention(q, k, v, spec: RingSpec):
    """(out (B, Hq, n, Dv), lse (B, Hq, n) fp32) of the local query shard against the whole
    (sharded) key sequence; differentiable in q, k, v through out and lse."""
    return _RingAttention.apply(q, k, v, spec)
