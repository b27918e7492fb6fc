"""WERSA: Wavelet-Enhanced Random Spectral Attention (Dentamaro; arXiv 2507.08637, 2025).

    q~, k~ = IDWT(gains * DWT(gelu(q or k)))      orthonormal Haar along the sequence, `levels` levels
    phi(x) = relu(x Omega) / sqrt(m)               Omega (D, m) fixed Gaussian drawn from `seed`
    o      = phi(q~) (phi(k~)^T v) / (phi(q~) . sum_s phi(k~_s) + eps)

Non-causal only: a Haar coefficient mixes every token of its dyadic block, so with any gain != 1 the
filtered q~_t, k~_t depend on later tokens. The sequence is zero-padded to a power of two (at least
2**levels) for the transform and cropped back. The attention itself runs on the chunked linear kernel
(non-causal: one global state). The official code is not public; this follows METHODS.md (see
docs/methods/wersa.md for what comes from where).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops import linear as _linear
from ..validation import check_int, check_tensor
from . import at_least_fp32

_EPS = 1e-6
_SQRT_HALF = 0.5 ** 0.5


def haar_dwt(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Orthonormal Haar DWT along dim 2 of x (B, H, N2, D), N2 divisible by 2**levels:
    bands [d^1, ..., d^L, a^L], d^j and a^j of N2 / 2**j rows."""
    bands = []
    for _ in range(levels):
        even, odd = x[:, :, 0::2], x[:, :, 1::2]
        bands.append((even - odd) * _SQRT_HALF)
        x = (even + odd) * _SQRT_HALF
    return bands + [x]


def haar_idwt(bands: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `haar_dwt`."""
    x = bands[-1]
    for detail in reversed(bands[:-1]):
        x = torch.stack([x + detail, x - detail], dim=3).flatten(2, 3) * _SQRT_HALF
    return x


def padded_length(n: int, levels: int) -> int:
    return max(1 << max(n - 1, 0).bit_length(), 1 << levels)


def _band_gains(gains: torch.Tensor, band: int, band_len: int, n: int) -> torch.Tensor:
    """Gain of `band` for each of its band_len coefficients, broadcastable to (B, H, band_len, D):
    a (B, N, L+1) series is resampled to the band by nearest index floor(i * N / band_len)."""
    if gains.dim() == 1:
        return gains[band]
    rows = torch.arange(band_len, device=gains.device) * n // band_len
    return gains[:, None, rows, band, None]


def wavelet_filter(x: torch.Tensor, levels: int, gains: torch.Tensor | None) -> torch.Tensor:
    """IDWT(gains * DWT(gelu(x))) for x (B, H, N, D), zero-padded to a power of two and cropped."""
    n = x.shape[2]
    x = F.gelu(x)
    if gains is None:  # IDWT(DWT(x)) == x
        return x
    x = F.pad(x, (0, 0, 0, padded_length(n, levels) - n))
    bands = haar_dwt(x, levels)
    bands = [band * _band_gains(gains.to(x.dtype), i, band.shape[2], n) for i, band in enumerate(bands)]
    return haar_idwt(bands)[:, :, :n]


def packed_wavelet_filter(x: torch.Tensor, levels: int, gains: torch.Tensor | None, pack=None) -> torch.Tensor:
    """wavelet_filter over each sequence of a pack (B = 1; per-token gains (1, total, L + 1) cut the same
    way): the dyadic blocks of the transform start at every sequence's first token. Without gains the
    filter is per token (gelu), so the pack is filtered whole."""
    if pack is None or gains is None:
        return wavelet_filter(x, levels, gains)
    pieces = []
    for s in range(len(pack)):
        tokens = pack.q_span(s)
        if tokens.stop > tokens.start:
            own = gains if gains.dim() == 1 else gains[:, tokens]
            pieces.append(wavelet_filter(x[:, :, tokens], levels, own))
    return torch.cat(pieces, dim=2)


@torch.compiler.disable  # a seeded torch.Generator cannot be traced: one clean graph break
def wersa_omega(head_dim: int, num_features: int, seed: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The fixed projection Omega (head_dim, num_features), standard Gaussian, drawn on the CPU from `seed`
    so that every device and backend sees the same matrix."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(head_dim, num_features, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def random_features(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """relu(x Omega) / sqrt(m). (A bandwidth dividing x Omega would cancel in the normalised output:
    relu is positively homogeneous.)"""
    return torch.relu(x @ omega) / math.sqrt(omega.shape[-1])


def check_wersa_args(q, k, causal, levels, num_features, gains, seed) -> tuple[int, int, int]:
    """The validated (levels, num_features, seed)."""
    if causal:
        raise ValueError("wersa is non-causal only: each Haar coefficient mixes all tokens of its dyadic block, "
                         "so filtered q and k at position t depend on later tokens; call it with causal=False")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"wersa filters q and k along one sequence: q length {q.shape[2]} != k length {k.shape[2]}")
    levels, num_features = check_int("levels", levels, low=0), check_int("num_features", num_features, low=1)
    seed = check_int("seed", seed, low=0, high=2 ** 63 - 1)
    if gains is not None:
        if not isinstance(gains, torch.Tensor):
            raise TypeError(f"gains must be a torch.Tensor of shape (levels + 1,) or (B, N, levels + 1) or None, "
                            f"got {type(gains).__name__}")
        B, _, N, _ = q.shape
        shape = (levels + 1,) if gains.dim() == 1 else (B, N, levels + 1)
        check_tensor("gains", gains, shape=shape, like=q, dtype=(torch.float16, torch.bfloat16, torch.float32,
                                                                  torch.float64), finite=True)
    return levels, num_features, seed


def wersa(q, k, v, *, causal: bool, scale: float, backend: str, levels: int = 2, num_features: int = 256,
          gains=None, seed: int = 0, chunk_size=None, pack=None):
    """q, k (B, H, N, D), v (B, H, N, Dv) -> o (B, H, N, Dv). gains (L+1,) or (B, N, L+1), shared by
    heads and channels (None = all 1). `scale` is unused: it would cancel in the normalised output.
    `pack`: the sequences of a packed call, each filtered over its own tokens (`packed_wavelet_filter`)."""
    levels, num_features, seed = check_wersa_args(q, k, causal, levels, num_features, gains, seed)
    _linear.check_one_recurrence(pack)
    filtered_q, filtered_k = (packed_wavelet_filter(at_least_fp32(x), levels, gains, pack)  # fp32 at least
                              for x in (q, k))
    omega = wersa_omega(q.shape[-1], num_features, seed, dtype=filtered_q.dtype, device=q.device)
    phi_q, phi_k = random_features(filtered_q, omega), random_features(filtered_k, omega)
    return _linear.linear_attention(phi_q, phi_k, v, scale=1.0, causal=False, backend=backend, normalize=True,
                                    eps=_EPS, chunk_size=chunk_size, pack=pack)


class WERSAGates(torch.nn.Module):
    """Content-adaptive band gains from hidden states x (B, N, hidden_size) -> (B, N, levels + 1):
    sigmoid(MLP(depthwise conv(x))) * scale_weights, with a 'same'-padded depthwise conv of
    `kernel_size` taps (it looks ahead, like the transform) and an MLP hidden -> hidden/4 -> levels+1."""

    def __init__(self, hidden_size: int, levels: int = 2, kernel_size: int = 33):
        super().__init__()
        self.conv = torch.nn.Conv1d(hidden_size, hidden_size, kernel_size, padding="same", groups=hidden_size)
        width = max(1, hidden_size // 4)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden_size, width), torch.nn.ReLU(),
                                       torch.nn.Linear(width, levels + 1))
        self.scale_weights = torch.nn.Parameter(torch.ones(levels + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.conv.in_channels:
            raise ValueError(f"x must be (B, N, {self.conv.in_channels}), got shape {tuple(x.shape)}")
        pooled = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return torch.sigmoid(self.mlp(pooled)) * self.scale_weights


def example_kwargs(q, k, v, *, causal):
    return {"gains": torch.rand(q.shape[0], q.shape[2], 3, device=q.device) + 0.5}
