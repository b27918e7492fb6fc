"""SeerAttention's oracle (METHODS.md, seerattention): the block target, the selection rules and the
AttnGate, written from their definitions in float64.

Selection per (batch, query head) row of blocks: keep a block whose score is at least `threshold`
(the gate probability, or the oracle target without a gate), or the top ceil(topk_ratio * a) of the
row's a admissible blocks (ties: lower index first), and with neither a threshold of 5e-4 (the
official README's prefill setting); always keep the blocks holding a query's
diagonal key and every block of the last `last_blocks_dense` query-block rows; never keep a block
holding no visible pair.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from .blocks import admissible_blocks, every_query_diagonal_blocks, num_blocks
from .dense import attention


def attention_map(q, k, *, causal: bool, scale=None):
    """softmax(scale q k^T) (B, Hq, N, M) in float64 (rows that see no key: 0), by attention with v = I."""
    M = k.shape[2]
    identity = torch.eye(M, dtype=torch.float64).expand(k.shape[0], k.shape[1], M, M)
    return attention(q.double(), k.double(), identity, causal=causal, scale=scale)


def block_target(q, k, block_size: int, *, causal: bool, scale=None):
    """The gate's training target (B, Hq, nQB, nKB): the max of the attention map over each tile,
    each row divided by its sum (rows with no visible key: 0)."""
    probs = attention_map(q, k, causal=causal, scale=scale)
    N, M = probs.shape[-2:]
    n_qb, n_kb = num_blocks(N, block_size), num_blocks(M, block_size)
    pooled = torch.zeros(*probs.shape[:2], n_qb, n_kb, dtype=torch.float64)
    for i in range(n_qb):
        for j in range(n_kb):
            tile = probs[..., i * block_size:(i + 1) * block_size, j * block_size:(j + 1) * block_size]
            pooled[..., i, j] = tile.flatten(-2).amax(-1)
    total = pooled.sum(-1, keepdim=True)
    return torch.where(total > 0, pooled / torch.where(total > 0, total, 1.0), 0.0)


def topk_count(ratio: float, admissible: int) -> int:
    """ceil(ratio * admissible) with the ratio read as the decimal it was written as (0.3 * 10 = 3),
    at least 1, at most `admissible`."""
    wanted = math.ceil(Fraction(repr(float(ratio))) * admissible)
    return min(max(wanted, 1), admissible)


def select_blocks(scores, n: int, m: int, *, block_size: int, causal: bool, threshold=None, topk_ratio=None,
                  last_blocks_dense: int = 2):
    """Bool (..., nQB, nKB) from scores (..., nQB, nKB)."""
    if threshold is None and topk_ratio is None:
        threshold = 5e-4
    admissible = admissible_blocks(n, m, block_size, block_size, causal=causal)
    n_qb, n_kb = admissible.shape
    lead = scores.shape[:-2]
    flat = scores.reshape(-1, n_qb, n_kb).double()
    keep = torch.zeros(flat.shape, dtype=torch.bool)
    for r in range(flat.shape[0]):
        for i in range(n_qb):
            allowed = [j for j in range(n_kb) if admissible[i, j]]
            if threshold is not None:
                chosen = [j for j in allowed if float(flat[r, i, j]) >= threshold]
            elif allowed:
                ranked = sorted(allowed, key=lambda j: (-float(flat[r, i, j]), j))
                chosen = ranked[:topk_count(topk_ratio, len(allowed))]
            else:
                chosen = []
            keep[r, i, chosen] = True
    keep = keep.reshape(*lead, n_qb, n_kb)
    keep = keep | every_query_diagonal_blocks(n, m, block_size, block_size, causal=causal)
    if last_blocks_dense > 0:
        keep[..., max(0, n_qb - last_blocks_dense):, :] = True
    return keep & admissible


def rope(x, positions, base: float):
    """Rotate-half RoPE as a complex rotation: pair (x_i, x_{i + E/2}) times exp(i * p * base^(-2i/E))."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = positions.double()[:, None] * freqs
    turned = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([turned.real, turned.imag], -1)


def attn_gate_probs(q_proj, k_proj, q, k, *, block_size: int, hidden: int, causal: bool, rope_base: float = 10000.0):
    """AttnGate's block probabilities (B, Hq, nQB, nKB) for its weights q_proj (Hq, D, hidden) and
    k_proj (Hk, 3D, hidden): q average-pooled, k max/min/avg-pooled per block (a ragged block pools its
    tokens), per-head linear maps, RoPE at each block's first position (queries at i + M - N), logits
    qg kg^T / sqrt(hidden), softmax over the admissible key blocks (others 0; rows with none: 0)."""
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    bs = block_size
    q_blocks = [q[:, :, s:s + bs] for s in range(0, N, bs)]
    k_blocks = [k[:, :, s:s + bs] for s in range(0, M, bs)]
    pooled_q = torch.stack([x.mean(2) for x in q_blocks], dim=2)
    pooled_k = torch.stack([torch.cat([x.amax(2), x.amin(2), x.mean(2)], -1) for x in k_blocks], dim=2)
    gate_q = torch.einsum("bhnd,hde->bhne", pooled_q, q_proj)
    gate_k = torch.einsum("bhnd,hde->bhne", pooled_k, k_proj)
    gate_q = rope(gate_q, torch.arange(len(q_blocks)) * bs + (M - N), rope_base)
    gate_k = rope(gate_k, torch.arange(len(k_blocks)) * bs, rope_base)
    gate_k = torch.stack([gate_k[:, h // (Hq // Hk)] for h in range(Hq)], dim=1)
    logits = gate_q @ gate_k.transpose(-1, -2) / hidden ** 0.5
    admissible = admissible_blocks(N, M, bs, bs, causal=causal)
    probs = torch.softmax(logits.masked_fill(~admissible, -math.inf), -1)
    return torch.where(admissible.any(-1, keepdim=True), probs, 0.0)
