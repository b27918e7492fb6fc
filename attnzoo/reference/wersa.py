"""WERSA's oracle (METHODS.md, wersa; docs/methods/wersa.md), with its transforms by explicit loops.

    q~, k~ = IDWT(gains * DWT(gelu(q or k)))       orthonormal Haar along the sequence, `levels` levels,
                                                   zero-padded to a power of two >= 2**levels, cropped
    phi(x) = relu(x Omega) / sqrt(m)               Omega (D, m) standard Gaussian drawn from `seed`
    o      = A v / (A 1 + eps),  A = phi(q~) phi(k~)^T                                (non-causal)

Bands are [d^1, ..., d^L, a^L]. Gains (L+1,) scale band b by gains[b]; gains (B, N, L+1) scale
coefficient i of band b (of band_len coefficients) by gains[:, floor(i * N / band_len), b], the
nearest index of the N-token series, shared by heads and channels.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6


def omega(head_dim: int, num_features: int, seed: int) -> torch.Tensor:
    """The fixed projection (head_dim, num_features) float64: standard Gaussian from a CPU generator
    seeded with `seed` (so every device sees one matrix)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return torch.randn(head_dim, num_features, generator=generator, dtype=torch.float64)


def gelu(x):
    """x Phi(x), Phi the standard normal CDF (the exact GELU)."""
    return x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def haar_dwt(x, levels: int):
    """Orthonormal Haar DWT along dim 2 of x (B, H, N2, D), N2 divisible by 2**levels.
    Returns the bands [d^1, ..., d^L, a^L]: d^j, a^j have N2 / 2**j rows."""
    bands, approx = [], x
    for _ in range(levels):
        n = approx.shape[2] // 2
        even = torch.stack([approx[:, :, 2 * i] for i in range(n)], dim=2)
        odd = torch.stack([approx[:, :, 2 * i + 1] for i in range(n)], dim=2)
        bands.append((even - odd) / 2 ** 0.5)
        approx = (even + odd) / 2 ** 0.5
    return bands + [approx]


def haar_idwt(bands):
    """Inverse of `haar_dwt`."""
    approx = bands[-1]
    for detail in reversed(bands[:-1]):
        rows = []
        for i in range(approx.shape[2]):
            rows.append((approx[:, :, i] + detail[:, :, i]) / 2 ** 0.5)
            rows.append((approx[:, :, i] - detail[:, :, i]) / 2 ** 0.5)
        approx = torch.stack(rows, dim=2)
    return approx


def padded_length(n: int, levels: int) -> int:
    """The smallest power of two >= n and >= 2**levels."""
    length = 1
    while length < n or length < 2 ** levels:
        length *= 2
    return length


def scale_band(band, gains, index: int, n: int):
    """band (B, H, band_len, D) times its gains (see the module docstring)."""
    if gains.dim() == 1:
        return band * gains[index]
    band_len = band.shape[2]
    rows = [band[:, :, i] * gains[:, (i * n) // band_len, index][:, None, None] for i in range(band_len)]
    return torch.stack(rows, dim=2)


def wavelet_filter(x, levels: int, gains):
    """IDWT(gains * DWT(gelu(x))) for x (B, H, N, D); gains None = all 1."""
    B, H, n, D = x.shape
    if gains is None:
        gains = torch.ones(levels + 1, dtype=x.dtype, device=x.device)
    gains = gains.to(x.dtype)
    padded = torch.cat([gelu(x), x.new_zeros(B, H, padded_length(n, levels) - n, D)], dim=2)
    bands = haar_dwt(padded, levels)
    bands = [scale_band(band, gains, index, n) for index, band in enumerate(bands)]
    return haar_idwt(bands)[:, :, :n]


def random_features(x, projection):
    m = projection.shape[-1]
    z = x @ projection
    return torch.where(z > 0, z, torch.zeros_like(z)) / math.sqrt(m)


def wersa(q, k, v, *, levels: int = 2, num_features: int = 256, gains=None, seed: int = 0):
    """o (B, Hq, N, Dv) for q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hk, N, Dv); rows with no feature
    mass output 0."""
    projection = omega(q.shape[-1], num_features, seed).to(dtype=q.dtype, device=q.device)
    phi_q = random_features(wavelet_filter(q, levels, gains), projection)
    phi_k = random_features(wavelet_filter(k, levels, gains), projection)
    group = q.shape[1] // k.shape[1]  # GQA: query head h reads kv head h // group
    phi_k, v = phi_k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    weights = phi_q @ phi_k.transpose(-1, -2)
    return weights @ v / (weights.sum(-1, keepdim=True) + EPS)
