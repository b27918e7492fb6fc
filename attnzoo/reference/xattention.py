"""XAttention's oracle (METHODS.md, xattention): the antidiagonal estimate and the threshold selection,
written from their definitions in float64 with explicit loops.

Estimate, for stride S: query group a = rows [a S, a S + S), key group b = keys [b S, b S + S)
(zero rows past the end), est[a, b] = scale / S * sum_t q[a S + S - 1 - t] . k[b S + t];
causal: key group b is masked for query group a iff its first key b S is not visible to the last
real query of group a (bottom-right aligned); softmax over b per query group; the block score of
(query block i, key block j) is the sum of the probabilities of the groups inside the tile.

Selection, per (batch, query head, query block) row: the forced blocks (key block 0, and for causal
the diagonal block: the key block holding the diagonal key of the block's last query), where they
hold a visible pair; then the other admissible blocks in descending score (ties: lower index first),
each kept while the mass kept so far is < threshold * row total (so the crossing block is kept);
threshold >= 1 keeps every admissible block.
"""

from __future__ import annotations

import torch

from .blocks import admissible_blocks, last_query_diagonal_blocks, num_blocks


def antidiagonal_estimate(q, k, *, stride: int, block_q: int, block_k: int, scale: float, causal: bool):
    """float64 (B, Hq, nQB, nKB) block scores for q (B, Hq, N, D), k (B, Hk, M, D)."""
    S = stride
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    group = Hq // Hk
    q = q.double()
    k = torch.stack([k.double()[:, h // group] for h in range(Hq)], dim=1)  # query head h reads kv head h // G
    n_groups, m_groups = num_blocks(N, S), num_blocks(M, S)
    est = torch.zeros(B, Hq, n_groups, m_groups, dtype=torch.float64)
    for t in range(S):
        for a in range(n_groups):
            row = a * S + S - 1 - t
            if row >= N:
                continue
            for b in range(m_groups):
                col = b * S + t
                if col >= M:
                    continue
                est[:, :, a, b] += (q[:, :, row] * k[:, :, col]).sum(-1)
    est = est * scale / S
    visible = torch.ones(n_groups, m_groups, dtype=torch.bool)
    if causal:
        for a in range(n_groups):
            last_query = min(a * S + S - 1, N - 1)
            for b in range(m_groups):
                visible[a, b] = b * S <= last_query + (M - N)
    probs = torch.zeros_like(est)
    for a in range(n_groups):
        cols = visible[a].nonzero()[:, 0]
        if len(cols):
            probs[:, :, a, cols] = torch.softmax(est[:, :, a, cols], dim=-1)
    scores = torch.zeros(B, Hq, num_blocks(N, block_q), num_blocks(M, block_k), dtype=torch.float64)
    for a in range(n_groups):
        for b in range(m_groups):
            scores[:, :, (a * S) // block_q, (b * S) // block_k] += probs[:, :, a, b]
    return scores


def forced_blocks(n: int, m: int, block_q: int, block_k: int, *, causal: bool) -> torch.Tensor:
    """Bool (nQB, nKB): key block 0 and (causal) the diagonal block, where they hold a visible pair."""
    forced = torch.zeros(num_blocks(n, block_q), num_blocks(m, block_k), dtype=torch.bool)
    forced[:, 0] = True
    if causal:
        forced |= last_query_diagonal_blocks(n, m, block_q, block_k)
    return forced & admissible_blocks(n, m, block_q, block_k, causal=causal)


def threshold_select(scores, threshold: float, forced, admissible, *, return_margin: bool = False):
    """scores (..., nQB, nKB) >= 0; forced, admissible bool (nQB, nKB) -> keep bool (..., nQB, nKB).

    With `return_margin`, also (..., nQB) float64: how close the row came to a different choice,
    relative to its total (the smallest |kept mass - threshold * total| at a decision, and the
    smallest gap between consecutive ranked scores up to the first dropped block); a computation of
    the scores that differs from these by less than the margin chooses the same blocks."""
    lead = scores.shape[:-2]
    n_qb, n_kb = scores.shape[-2:]
    flat = scores.reshape(-1, n_qb, n_kb).double()
    keep = torch.zeros(flat.shape, dtype=torch.bool)
    margin = torch.full(flat.shape[:2], float("inf"), dtype=torch.float64)
    for r in range(flat.shape[0]):
        for i in range(n_qb):
            row = flat[r, i]
            allowed = [j for j in range(n_kb) if admissible[i, j]]
            if threshold >= 1:
                keep[r, i, allowed] = True
                continue
            total = sum(float(row[j]) for j in allowed)
            mass = 0.0
            for j in allowed:
                if forced[i, j]:
                    keep[r, i, j] = True
                    mass += float(row[j])
            others = sorted((j for j in allowed if not forced[i, j]), key=lambda j: (-float(row[j]), j))
            closest = float("inf")
            previous = None
            for j in others:
                if previous is not None:
                    closest = min(closest, abs(float(row[previous]) - float(row[j])))
                closest = min(closest, abs(mass - threshold * total))
                if not mass < threshold * total:
                    break
                keep[r, i, j] = True
                mass += float(row[j])
                previous = j
            margin[r, i] = closest / total if total > 0 else float("inf")
    keep = keep.reshape(*lead, n_qb, n_kb)
    return (keep, margin.reshape(*lead, n_qb)) if return_margin else keep


def select_blocks(q, k, *, stride: int, threshold: float, block_q: int, block_k: int, scale: float, causal: bool,
                  return_margin: bool = False):
    """XAttention's blocks (B, Hq, nQB, nKB) from the float64 estimate (and the margin, see
    `threshold_select`)."""
    n, m = q.shape[2], k.shape[2]
    admissible = admissible_blocks(n, m, block_q, block_k, causal=causal)
    forced = forced_blocks(n, m, block_q, block_k, causal=causal)
    if threshold >= 1:
        keep = admissible.expand(q.shape[0], q.shape[1], -1, -1).clone()
        return (keep, torch.full(keep.shape[:-1], float("inf"), dtype=torch.float64)) if return_margin else keep
    scores = antidiagonal_estimate(q, k, stride=stride, block_q=block_q, block_k=block_k, scale=scale, causal=causal)
    return threshold_select(scores, threshold, forced, admissible, return_margin=return_margin)
