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

from typing import NamedTuple

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


def block_geometry(n, m, block_q: int, block_k: int, *, causal: bool = False,
                   window=(UNBOUNDED, UNBOUNDED), device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(any_visible, fully_visible), bool (nQB, nKB): blocks holding at least one visible pair, and
    blocks whose every pair is visible. A block reaching past the last key is never fully visible
    (its tail needs masking).

    For a pack of S sequences, n and m are the per-sequence lengths (sequences of ints) and both are
    (S, 1, nQB, nKB) over the pack's grid (its longest sequences): each sequence's blocks from its own
    first token, blocks past its end neither visible nor full."""
    if not isinstance(n, (tuple, list)):
        return tuple(x[0, 0] for x in _grid_geometry(n, m, num_blocks(n, block_q), num_blocks(m, block_k),
                                                    block_q, block_k, causal_window(causal, window), device))
    n_t = torch.tensor(n, device=device)[:, None, None, None]
    m_t = torch.tensor(m, device=device)[:, None, None, None]
    return _grid_geometry(n_t, m_t, num_blocks(max(n, default=0), block_q), num_blocks(max(m, default=0), block_k),
                          block_q, block_k, causal_window(causal, window), device)


def _grid_geometry(n, m, n_qb: int, n_kb: int, block_q: int, block_k: int, window, device):
    """block_geometry on an (n_qb, n_kb) grid, n and m ints or (S, 1, 1, 1) tensors -> (S|1, 1, nQB, nKB)."""
    left, right = window
    q_first = torch.arange(n_qb, device=device)[:, None] * block_q
    q_last = torch.clamp(q_first + block_q, max=n) - 1
    k_first = torch.arange(n_kb, device=device)[None, :] * block_k
    k_last_full = k_first + block_k - 1
    k_last = torch.clamp(k_last_full, max=m - 1)
    diag = m - n
    any_visible = (q_first < n) & (k_first < m)
    fully = any_visible & (k_last_full < m)
    if right >= 0:
        any_visible &= k_first - q_last - diag <= right
        fully &= k_last_full - q_first - diag <= right
    if left >= 0:
        any_visible &= k_last - q_first - diag >= -left
        fully &= k_first - q_last - diag >= -left
    any_visible, fully = (torch.broadcast_to(x, (*x.shape[:-2], n_qb, n_kb)) for x in (any_visible, fully))
    return any_visible[(None,) * (4 - any_visible.dim())], (fully & any_visible)[(None,) * (4 - fully.dim())]


def diagonal_key_block(n, m, block_q: int, block_k: int, *, device=None) -> torch.Tensor:
    """int64 (nQB,): the key block holding the last key that the last query of each query block may
    see under causal alignment (negative when that query sees no key). For a pack (n, m the
    per-sequence lengths): (S, 1, nQB) over the longest sequences' grid."""
    if not isinstance(n, (tuple, list)):
        return _diagonal_key_block(n, m, num_blocks(n, block_q), block_q, block_k, device)
    n_t = torch.tensor(n, device=device)[:, None, None]
    m_t = torch.tensor(m, device=device)[:, None, None]
    return _diagonal_key_block(n_t, m_t, num_blocks(max(n, default=0), block_q), block_q, block_k, device)


def _diagonal_key_block(n, m, n_qb: int, block_q: int, block_k: int, device) -> torch.Tensor:
    last_query = torch.clamp((torch.arange(n_qb, device=device) + 1) * block_q, max=n) - 1
    return torch.div(last_query + (m - n), block_k, rounding_mode="floor")


class Pack(NamedTuple):
    """Where the S sequences of a pack lie (docs/varlen.md): sequence s is the queries
    q_starts[s]:q_starts[s + 1] and the keys k_starts[s]:k_starts[s + 1], each aligned, windowed and cut
    into blocks from its own first token. `max_q` / `max_k` size the pack's block grids."""

    q_starts: tuple[int, ...]  # S + 1 offsets into total_q
    k_starts: tuple[int, ...]  # S + 1 offsets into total_k
    max_q: int
    max_k: int

    @classmethod
    def of_lengths(cls, q_lengths, k_lengths) -> Pack:
        """The pack of sequences of these query and key lengths, end to end."""
        def starts(lengths) -> tuple[int, ...]:
            return tuple(int(x) for x in torch.tensor([0, *lengths]).cumsum(0))
        return cls(starts(q_lengths), starts(k_lengths), max(q_lengths, default=0), max(k_lengths, default=0))

    def __len__(self) -> int:
        return len(self.q_starts) - 1

    def q_span(self, s: int) -> slice:
        return slice(self.q_starts[s], self.q_starts[s + 1])

    def k_span(self, s: int) -> slice:
        return slice(self.k_starts[s], self.k_starts[s + 1])

    @property
    def q_lengths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.q_starts, self.q_starts[1:]))

    @property
    def k_lengths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.k_starts, self.k_starts[1:]))
