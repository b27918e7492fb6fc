"""Seeded q, k, v for the sweep.

- `random`: independent standard normal entries. Attention maps are nearly flat, so a sparse method
  has little to find; it shows the cost of a method when sparsity does not pay.
- `structured`: what real prefill attention looks like, in miniature. q and k share a slowly varying
  per-position signal (locality: nearby tokens attend to each other) and a few key positions, the
  first token among them, carry a direction that every query also carries (heavy hitters / attention
  sinks). Scaled scores of nearby or heavy-hitter keys are about sqrt(D) above the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CORRELATION_LENGTH = 64  # tokens over which the shared locality signal changes
TOKENS_PER_HEAVY_HITTER = 512
NOISE = 0.5  # std of the per-token noise added to q and k around the shared signal


def _normal(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def _smooth_signal(batch: int, heads: int, seqlen: int, dim: int, generator, device) -> torch.Tensor:
    """(B, H, N, D) with unit-variance entries that change over ~CORRELATION_LENGTH tokens:
    coarse normal noise, linearly interpolated to every position, renormalised."""
    coarse_len = max(2, seqlen // CORRELATION_LENGTH + 1)
    coarse = _normal((batch * heads, dim, coarse_len), generator, device)
    fine = F.interpolate(coarse, size=seqlen, mode="linear", align_corners=True)
    fine = fine / fine.std(dim=-1, keepdim=True).clamp_min(1e-6)
    return fine.reshape(batch, heads, dim, seqlen).transpose(-1, -2)


def _heavy_hitter_positions(seqlen: int, generator, device) -> torch.Tensor:
    count = max(1, seqlen // TOKENS_PER_HEAVY_HITTER)
    others = torch.randperm(seqlen - 1, generator=generator, device=device)[: count - 1] + 1
    return torch.cat([torch.zeros(1, dtype=torch.long, device=device), others])


def _structured_qk(batch, heads, kv_heads, seqlen, dim, generator, device):
    shared = _smooth_signal(batch, kv_heads, seqlen, dim, generator, device)
    shared_q = shared.repeat_interleave(heads // kv_heads, dim=1)
    q = shared_q + NOISE * _normal((batch, heads, seqlen, dim), generator, device)
    k = shared + NOISE * _normal((batch, kv_heads, seqlen, dim), generator, device)
    direction = _normal((dim,), generator, device)
    q = q + direction
    k[:, :, _heavy_hitter_positions(seqlen, generator, device)] += direction
    return q, k


def make_qkv(kind: str, *, batch: int, heads: int, kv_heads: int, seqlen: int, head_dim: int,
             dtype: torch.dtype, device: torch.device, seed: int):
    """q (B, H, N, D), k and v (B, Hkv, N, D) of `kind` ('random' or 'structured'), seeded."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if kind == "random":
        q = _normal((batch, heads, seqlen, head_dim), generator, device)
        k = _normal((batch, kv_heads, seqlen, head_dim), generator, device)
    elif kind == "structured":
        q, k = _structured_qk(batch, heads, kv_heads, seqlen, head_dim, generator, device)
    else:
        raise ValueError(f"input kind must be 'random' or 'structured', got {kind!r}")
    v = _normal((batch, kv_heads, seqlen, head_dim), generator, device)
    return tuple(t.to(dtype).contiguous() for t in (q, k, v))
