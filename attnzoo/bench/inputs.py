"""q, k, v for the sweep, by input kind (`--inputs`).

- `random`: independent standard normal entries. Attention maps are nearly flat, so a sparse method
  has little to find; it shows the cost of a method when sparsity does not pay.
- `structured`: what real prefill attention looks like, in miniature. q and k share a slowly varying
  per-position signal (locality: nearby tokens attend to each other) and a few key positions, the
  first token among them, carry a direction that every query also carries (heavy hitters / attention
  sinks). Scaled scores of nearby or heavy-hitter keys are about sqrt(D) above the rest.
- `minilm`: q, k, v captured from a real pretrained model (all-MiniLM-L6-v2) reading real text, see
  `real_inputs`. Its head dim is the model's (32) whatever `--head-dims` says, N <= 512, no GQA.

`random` and `structured` are seeded; `minilm` is fixed by the weights and the text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import real_inputs
from .real_inputs import Unavailable

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
    fine = fine / fine.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)  # unit RMS per channel
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


def _synthetic(kind: str):
    def make(*, batch: int, heads: int, kv_heads: int, seqlen: int, head_dim: int, dtype: torch.dtype,
             device: torch.device, seed: int):
        generator = torch.Generator(device=device).manual_seed(seed)
        if kind == "random":
            q = _normal((batch, heads, seqlen, head_dim), generator, device)
            k = _normal((batch, kv_heads, seqlen, head_dim), generator, device)
        else:
            q, k = _structured_qk(batch, heads, kv_heads, seqlen, head_dim, generator, device)
        v = _normal((batch, kv_heads, seqlen, head_dim), generator, device)
        return tuple(t.to(dtype).contiguous() for t in (q, k, v))

    return make


KINDS = {"random": _synthetic("random"), "structured": _synthetic("structured"), "minilm": real_inputs.minilm_qkv}
FIXED_HEAD_DIM = {"minilm": real_inputs.HEAD_DIM}  # kinds whose source fixes D


def head_dims(kind: str, requested: tuple[int, ...]) -> tuple[int, ...]:
    """The head dims a kind is swept at: its own where its source fixes it, else those requested."""
    return (FIXED_HEAD_DIM[kind],) if kind in FIXED_HEAD_DIM else requested


def make_qkv(kind: str, *, batch: int, heads: int, kv_heads: int, seqlen: int, head_dim: int,
             dtype: torch.dtype, device: torch.device, seed: int):
    """q (B, H, N, D), k and v (B, Hkv, N, D) of `kind`; raises `Unavailable` (with the reason) when the
    kind cannot give this shape."""
    if kind not in KINDS:
        raise ValueError(f"input kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return KINDS[kind](batch=batch, heads=heads, kv_heads=kv_heads, seqlen=seqlen, head_dim=head_dim,
                       dtype=dtype, device=device, seed=seed)


__all__ = ["KINDS", "Unavailable", "head_dims", "make_qkv"]
