"""flashbias - attention with a low-rank additive bias (Wu et al., FlashBias, arXiv 2505.12044).

    out = softmax(scale * q k^T + U W^T) v,     U (N, R), W (M, R) per (batch, head)

The bias is never materialised: since [scale * q, U] . [k, W]^T = scale * q k^T + U W^T, the shared
flash kernel runs on the concatenated head dim D + R with softmax scale 1 (the paper's "SDPA
variant"); the bias is therefore not multiplied by `scale`, and autograd through the concatenation
gives dq, dk, dv, dU = dS W and dW = dS^T U. v keeps its own head dim Dv.

Three ways to give the bias (exactly one per call):
- `bias_factors=(U, W)`: U (B|1, Hq|1, N, R), W (B|1, Hk|Hq|1, M, R);
- `alibi_slopes` (Hq,): ALiBi, causal only, as exact factors (`alibi_factors`);
- `bias` (B|1, Hq|1, N, M) with `rank`: truncated SVD (`svd_factors`), rank None = the smallest rank
  keeping 99.9% of the energy of every (batch, head) matrix.

GQA: U follows the query head. W shared by a kv head's query group (1 or Hk heads) keeps k and v
shared; W with one slice per query head (Hq heads, Hq != Hk) gives every query head its own key, so k
and v are repeated to Hq heads for the call (memory Hq/Hk times larger for k and v).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from ..ops.flash import flash_attention, max_head_dim
from ..validation import check_finite, check_int, check_optional, check_tensor

DEFAULT_ENERGY = 0.999
_DIGIT_BITS = 8  # base-256 digits: integers below 256 are exact in every float dtype (bfloat16 has 8 bits)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LowRankBias(NamedTuple):
    """Factors of a bias B ~= u w^T and the share of B's energy (squared Frobenius norm) they keep:
    the smallest share over the (batch, head) matrices."""

    u: torch.Tensor  # (..., N, R)
    w: torch.Tensor  # (..., M, R)
    kept_energy: float


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------


def flashbias(q, k, v, *, causal: bool, scale: float, backend: str, rank=None, bias_factors=None, bias=None,
              alibi_slopes=None, pack=None):
    """softmax(scale q k^T + bias) v with the bias given as `bias_factors=(U, W)`, `alibi_slopes` or a full
    `bias` factored to `rank`. q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> (B, Hq, N, Dv).
    `pack`: the sequences of a packed call: factors per token, ALiBi at each sequence's own positions, a
    full bias factored per sequence (its diagonal blocks), then one attention launch."""
    u, w = bias_to_factors(q, k, causal=causal, rank=rank, bias_factors=bias_factors, bias=bias,
                           alibi_slopes=alibi_slopes, pack=pack)
    return biased_attention(q, k, v, u, w, scale=scale, causal=causal, backend=backend, pack=pack)


def biased_attention(q, k, v, u, w, *, scale: float, causal: bool, backend: str, pack=None):
    """The flash kernel on [q * scale, U] and [k, W] with scale 1. Inputs validated by the caller."""
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    rank = u.shape[-1]
    limit = max_head_dim(backend)
    if limit is not None and D + rank > limit:
        raise ValueError(f"flashbias runs the flash kernel at head dim D + R = {D} + {rank}, above the "
                         f"{limit} it supports; use a smaller rank or backend='torch'")
    if w.shape[1] not in (1, Hk):  # W per query head: each query head needs its own key
        k, v = k.repeat_interleave(Hq // Hk, dim=1), v.repeat_interleave(Hq // Hk, dim=1)
        Hk = Hq
    q_cat = torch.cat([q * scale, u.to(q.dtype).expand(B, Hq, N, rank)], dim=-1)  # (B, Hq, N, D + R)
    k_cat = torch.cat([k, w.to(k.dtype).expand(B, Hk, M, rank)], dim=-1)  # (B, Hk, M, D + R)
    out, _ = flash_attention(q_cat, k_cat, v, scale=1.0, causal=causal, backend=backend, pack=pack)
    return out


def bias_to_factors(q, k, *, causal: bool, rank=None, bias_factors=None, bias=None, alibi_slopes=None, pack=None):
    """Validate the one bias form given and return its factors U (B|1, Hq|1, N, R), W (B|1, H|1, M, R)
    (for a pack, over its tokens)."""
    given = [name for name, x in (("bias_factors", bias_factors), ("bias", bias), ("alibi_slopes", alibi_slopes))
             if x is not None]
    if len(given) != 1:
        raise ValueError(f"flashbias needs exactly one of bias_factors=(U, W), bias or alibi_slopes; "
                         f"got {', '.join(given) or 'none'}")
    B, Hq, N, _ = q.shape
    Hk, M = k.shape[1], k.shape[2]
    largest_rank = min(N, M) if pack is None else min(min(n, m) for n, m in zip(pack.q_lengths, pack.k_lengths)
                                                       if n and m)
    rank = check_optional(check_int, "rank", rank, low=1, high=largest_rank)
    if rank is not None and bias is None:
        raise ValueError(f"rank={rank!r} sets the SVD rank of a full `bias`; it does not apply to {given[0]}")
    if bias_factors is not None:
        return _check_factors(bias_factors, q, B, Hq, Hk, N, M)
    if alibi_slopes is not None:
        _check_alibi(alibi_slopes, q, Hq, causal)
        return alibi_factors(alibi_slopes, N, M, key_lengths=None if pack is None else pack.k_lengths)
    check_tensor("bias", bias, shape=((1, B), (1, Hq), N, M), like=q, dtype=_FLOATS, finite=pack is None)
    if pack is not None:
        return _packed_svd_factors(bias, rank, pack)
    low_rank = svd_factors(bias, rank)
    if rank is not None and low_rank.kept_energy < DEFAULT_ENERGY:
        warnings.warn(f"flashbias: rank={rank} keeps {100 * low_rank.kept_energy:.2f}% of the bias energy "
                      f"(rank=None picks the smallest rank keeping {100 * DEFAULT_ENERGY:g}%)", stacklevel=3)
    return low_rank.u, low_rank.w


def _packed_svd_factors(bias: torch.Tensor, rank, pack) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's diagonal block of a pack's bias (1|., Hq|1, total_q, total_k) factored on its own
    (`svd_factors`, rank None: the smallest keeping DEFAULT_ENERGY of that block), the factors padded to
    the largest rank with zero columns (which add nothing) and joined along the tokens."""
    check_finite("bias", torch.cat([bias[..., pack.q_span(s), pack.k_span(s)].flatten() for s in range(len(pack))]))
    factors = [svd_factors(bias[..., pack.q_span(s), pack.k_span(s)], rank) if n and m else None
               for s, (n, m) in enumerate(zip(pack.q_lengths, pack.k_lengths))]
    width = max(f.u.shape[-1] for f in factors if f is not None)
    dtype = next(f.u.dtype for f in factors if f is not None)
    u = bias.new_zeros(*bias.shape[:2], bias.shape[2], width, dtype=dtype)
    w = bias.new_zeros(*bias.shape[:2], bias.shape[3], width, dtype=dtype)
    for s, f in enumerate(factors):
        if f is not None:
            u[..., pack.q_span(s), :f.u.shape[-1]] = f.u
            w[..., pack.k_span(s), :f.w.shape[-1]] = f.w
    return u, w


def _check_factors(bias_factors, q, B, Hq, Hk, N, M):
    if not (isinstance(bias_factors, (tuple, list)) and len(bias_factors) == 2):
        raise TypeError(f"bias_factors must be a pair (U, W), got {type(bias_factors).__name__}")
    u, w = bias_factors
    check_tensor("bias_factors U", u, shape=((1, B), (1, Hq), N, None), like=q, dtype=_FLOATS, finite=True)
    rank = u.shape[-1]
    check_tensor("bias_factors W", w, shape=((1, B), (1, Hk, Hq), M, rank), like=q, dtype=_FLOATS, finite=True)
    if rank < 1:
        raise ValueError(f"bias_factors U has rank R = 0 (shape {tuple(u.shape)}); expected R >= 1")
    return u, w


def _check_alibi(slopes, q, Hq: int, causal: bool) -> None:
    check_tensor("alibi_slopes", slopes, shape=(Hq,), like=q, dtype=_FLOATS, finite=True)
    if not causal:
        raise ValueError("alibi_slopes needs causal=True: ALiBi's bias -slope * |i - j| is low rank only where "
                         "the sign of i - j is fixed (causal); for non-causal ALiBi pass the explicit `bias`")


# ---------------------------------------------------------------------------------------------------
# Factors of common biases
# ---------------------------------------------------------------------------------------------------


def alibi_factors(slopes: torch.Tensor, n: int, m: int, *, key_lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of causal ALiBi (flash-attn convention): for a visible key, bias -slope_h (i + m - n - j).

    The row-constant part -slope_h (i + m - n) does not change the softmax and is dropped, leaving
    slope_h * j, rank 1. Key positions j are written as base-256 digits (one factor column each, rank
    ceil(log256 m)), so that W holds integers below 256 and stays exact in float16/bfloat16 too; U holds
    slope_h * 256^d (a power of two times the slope, so every column rounds the slope alike).
    Returns U (1, H, n, R) and W (1, 1, m, R), float32 (float64 for float64 slopes). `key_lengths`: a
    pack's per-sequence key lengths (m their sum): positions restart at every sequence (whose row
    constant differs, and still drops out).
    """
    dtype = torch.float64 if slopes.dtype == torch.float64 else torch.float32
    positions = torch.arange(m, device=slopes.device, dtype=torch.int64)
    largest = m - 1
    if key_lengths is not None:
        lengths = torch.tensor(key_lengths, device=slopes.device)
        positions = positions - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        largest = max(key_lengths) - 1
    digits = max(1, -(-largest.bit_length() // _DIGIT_BITS))  # digits of the largest position
    shifts = _DIGIT_BITS * torch.arange(digits, device=slopes.device, dtype=torch.int64)  # (R,)
    w = (positions[:, None] >> shifts) & ((1 << _DIGIT_BITS) - 1)  # (m, R): digit d of key position j
    powers = torch.ldexp(torch.ones(digits, dtype=dtype, device=slopes.device), shifts.to(dtype))  # 256^d
    u = slopes.to(dtype)[:, None] * powers.to(dtype)  # (H, R)
    return u[None, :, None, :].expand(1, -1, n, -1), w.to(dtype)[None, None]


def distance_factors(x_q: torch.Tensor, x_k: torch.Tensor, *, weight=-1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of bias_ij = weight * ||x_q[i] - x_k[j]||^2 for point coordinates x_q (..., N, C),
    x_k (..., M, C): rank 3C, U = weight [x^2, 1, -2x], W = [1, y^2, y] per coordinate.

    Both point sets are first shifted by the mean of x_k (distances do not change), which keeps the
    squares small and the cancellation in U W^T mild. `weight` is a float or a tensor broadcastable to
    (..., 1, 1) (e.g. (H, 1, 1) for one weight per head).
    """
    center = x_k.mean(dim=-2, keepdim=True)
    x, y = x_q - center, x_k - center
    weight = torch.as_tensor(weight, dtype=x.dtype, device=x.device)
    u = weight * torch.cat([x * x, torch.ones_like(x), -2 * x], dim=-1)  # (..., N, 3C)
    w = torch.cat([torch.ones_like(y), y * y, y], dim=-1)  # (..., M, 3C)
    return u, w


def svd_factors(bias: torch.Tensor, rank: int | None = None, *, energy: float = DEFAULT_ENERGY) -> LowRankBias:
    """Truncated SVD of bias (..., N, M): U_R S_R^(1/2) and V_R S_R^(1/2). `rank` None = the smallest rank
    keeping `energy` of every matrix's energy. Runs in float64 for float64 input, float32 otherwise;
    gradients reach `bias` through torch.linalg.svd (defined while the kept singular values are distinct)."""
    work = bias if bias.dtype == torch.float64 else bias.float()
    left, sigma, right_t = torch.linalg.svd(work, full_matrices=False)  # (.., N, K), (.., K), (.., K, M)
    power = sigma.detach() ** 2
    total = power.sum(dim=-1, keepdim=True)
    kept = torch.where(total > 0, power.cumsum(dim=-1) / total.clamp_min(torch.finfo(work.dtype).tiny), 1.0)
    if rank is None:
        rank = min(int((kept < energy).sum(dim=-1).max()) + 1, sigma.shape[-1])
    root = sigma[..., :rank].sqrt()
    u = left[..., :rank] * root[..., None, :]
    w = right_t[..., :rank, :].transpose(-1, -2) * root[..., None, :]
    return LowRankBias(u, w, float(kept[..., rank - 1].min()))


def relative_position_bias(table: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Toeplitz bias (H, n, m) from a relative-position table (H, n + m - 1): entry (i, j) is
    table[h, j - i - (m - n) + m - 1], indexed by the key's offset from the query's (bottom-right
    aligned) position, -(m - 1) .. n - 1."""
    if table.dim() != 2 or table.shape[-1] != n + m - 1:
        raise ValueError(f"table must have shape (H, n + m - 1) = (H, {n + m - 1}), got {tuple(table.shape)}")
    i = torch.arange(n, device=table.device)[:, None]
    j = torch.arange(m, device=table.device)[None, :]
    return table[:, j - i + n - 1]


def relative_position_factors(table: torch.Tensor, n: int, m: int, rank: int | None = None, *,
                              energy: float = DEFAULT_ENERGY) -> LowRankBias:
    """Low-rank factors (1, H, n, R), (1, H, m, R) of a relative-position table's bias (see
    `relative_position_bias`), by truncated SVD. Meant for static learned tables (e.g. Swin V2):
    compute once per layer and pass as `bias_factors`."""
    low_rank = svd_factors(relative_position_bias(table, n, m), rank, energy=energy)
    return LowRankBias(low_rank.u[None], low_rank.w[None], low_rank.kept_energy)


# ---------------------------------------------------------------------------------------------------
# attnzoo check hooks
# ---------------------------------------------------------------------------------------------------


def example_kwargs(q, k, v, *, causal: bool) -> dict:
    """Random rank-8 factors with entries of order 1 (a bias of standard deviation about 1), drawn on
    the CPU (the same factors on every device, the meta device too)."""
    generator = torch.Generator().manual_seed(0)
    B, Hq, N, _ = q.shape
    M = k.shape[2]
    u, w = (torch.randn(*shape, generator=generator) / 8 ** 0.25 for shape in ((B, Hq, N, 8), (B, 1, M, 8)))
    return {"bias_factors": (u.to(q.device, q.dtype), w.to(q.device, q.dtype))}
