"""Which keys a query may see, and what that means for blocks and tiles: the one home of the rule.

Queries and keys are bottom-right aligned (flash-attn >= 2.1): query i sits at key position
i + (M - N), and with a window (left, right) (-1 = unbounded side) it sees key j iff

    -left <= j - i - (M - N) <= right        and 0 <= j < M;   causal means right = 0.

Everything that needs the rule takes it from here: the block masks and their kernel index
(block_mask.py, masks.py), the torch twins' tile spans and element masks, the selection rules of
the sparse methods, and HF patching's key-validity check. (The Triton kernels restate it in
Triton, kernels/_common.py `_visible`; the float64 reference restates it on purpose, to share
nothing with what it checks.)
"""

from __future__ import annotations

import torch

UNBOUNDED = -1


def num_blocks(length: int, block: int) -> int:
    """ceil(length / block)."""
    return -(-length // block)


def causal_window(causal: bool, window=(UNBOUNDED, UNBOUNDED)) -> tuple[int, int]:
    """The (left, right) window of a call: causal sets the right side to 0."""
    left, right = window
    return int(left), 0 if causal else int(right)


def visible(rows: torch.Tensor, cols: torch.Tensor, n: int, m: int, window=(UNBOUNDED, UNBOUNDED)) -> torch.Tensor:
    """Bool, broadcast of rows and cols: key `cols` lies in [0, M) and is visible to query `rows`."""
    left, right = window
    rel = cols - rows - (m - n)
    keep = (cols >= 0) & (cols < m)
    if right >= 0:
        keep = keep & (rel <= right)
    if left >= 0:
        keep = keep & (rel >= -left)
    return keep


def visible_span(first: int, last: int, n: int, m: int, window=(UNBOUNDED, UNBOUNDED)) -> tuple[int, int, int, int]:
    """Keys seen by the query rows [first, last] (python ints): (lo, full_lo, full_hi, hi) with
    lo <= full_lo <= full_hi <= hi, keys [lo, hi) seen by at least one row and keys
    [full_lo, full_hi) seen by every row (no element mask needed there)."""
    left, right = window
    diag = m - n
    lo, full_lo, hi, full_hi = 0, 0, m, m
    if left >= 0:
        lo = min(max(first + diag - left, 0), m)
        full_lo = min(max(last + diag - left, 0), m)
    if right >= 0:
        hi = min(max(last + diag + right + 1, 0), m)
        full_hi = min(max(first + diag + right + 1, 0), m)
    hi = max(hi, lo)
    full_lo = min(max(full_lo, lo), hi)
    full_hi = min(max(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


def query_span(first: int, last: int, n: int, m: int, window=(UNBOUNDED, UNBOUNDED)) -> tuple[int, int, int, int]:
    """Queries that see the keys [first, last]: (lo, full_lo, full_hi, hi) as in `visible_span`, on
    the query axis (the transposed view the dK/dV pass walks)."""
    left, right = window
    # key j is seen by queries i with j - diag - right <= i <= j - diag + left
    return visible_span(first, last, m, n, (right, left))


def block_geometry(n: int, m: int, block_q: int, block_k: int, *, causal: bool = False,
                   window=(UNBOUNDED, UNBOUNDED), device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(any_visible, fully_visible), bool (nQB, nKB): blocks holding at least one visible pair, and
    blocks whose every pair is visible. A block reaching past the last key is never fully visible
    (its tail needs masking)."""
    left, right = causal_window(causal, window)
    q_first = torch.arange(num_blocks(n, block_q), device=device)[:, None] * block_q
    q_last = torch.clamp(q_first + block_q, max=n) - 1
    k_first = torch.arange(num_blocks(m, block_k), device=device)[None, :] * block_k
    k_last_full = k_first + block_k - 1
    k_last = torch.clamp(k_last_full, max=m - 1)
    diag = m - n
    any_visible = torch.ones(q_first.shape[0], k_first.shape[1], dtype=torch.bool, device=device)
    fully = any_visible & (k_last_full < m)
    if right >= 0:
        any_visible &= k_first - q_last - diag <= right
        fully &= k_last_full - q_first - diag <= right
    if left >= 0:
        any_visible &= k_last - q_first - diag >= -left
        fully &= k_first - q_last - diag >= -left
    return any_visible, fully & any_visible


def diagonal_key_block(n: int, m: int, block_q: int, block_k: int, *, device=None) -> torch.Tensor:
    """int64 (nQB,): the key block holding the last key that the last query of each query block may
    see under causal alignment (negative when that query sees no key)."""
    last_query = torch.clamp((torch.arange(num_blocks(n, block_q), device=device) + 1) * block_q, max=n) - 1
    return torch.div(last_query + (m - n), block_k, rounding_mode="floor")
