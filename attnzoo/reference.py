"""Slow, obviously-correct attention, for checking kernels. Shares no code with them.

Everything here materialises the full (N, M) score matrix and works in the dtype it is given, so
tests call it in float64.
"""

from __future__ import annotations

import torch


def visible_mask(n: int, m: int, *, causal: bool = False, window_size=(-1, -1),
                 device=None) -> torch.Tensor:
    """Bool (N, M): which key each query may see. Causal and windows are bottom-right aligned:
    query i sees key j iff i + (M - N) - left <= j <= i + (M - N) + right (-1 = unbounded side),
    and causal means right = 0, as in flash-attn."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    diag = i + (m - n)
    keep = torch.ones(n, m, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= diag + right
    if left >= 0:
        keep &= j >= diag - left
    return keep


def expand_block_mask(block_mask: torch.Tensor, n: int, m: int, block_q: int, block_k: int) -> torch.Tensor:
    """Bool (..., nQB, nKB) per block -> bool (..., N, M) per element."""
    rows = torch.arange(n, device=block_mask.device) // block_q
    cols = torch.arange(m, device=block_mask.device) // block_k
    return block_mask[..., rows, :][..., :, cols]


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, mask=None, bias=None,
              window_size=(-1, -1), softcap: float = 0.0, return_lse: bool = False):
    """softmax(softcap(scale * q k^T) + bias, masked) v for q (B, Hq, N, D), k/v (B, Hk, M, D|Dv).

    `mask` is a bool tensor broadcastable to (B, Hq, N, M) (True = may attend), `bias` an additive
    float tensor broadcastable to the same (added after scaling and softcap). Rows that see no key
    output 0 and have lse -inf. Returns out (B, Hq, N, Dv) and, with `return_lse`, lse (B, Hq, N).
    """
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    group = Hq // Hk
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = D ** -0.5 if scale is None else scale

    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    keep = visible_mask(N, M, causal=causal, window_size=window_size, device=q.device)
    if mask is not None:
        keep = keep & mask
    keep = keep.expand_as(scores)
    sees_any = keep.any(dim=-1, keepdim=True)
    # Rows that see no key get finite dummy scores (so softmax and its gradient stay finite), then
    # their probabilities are zeroed by `keep`.
    scores = scores.masked_fill(~keep & sees_any, float("-inf")).masked_fill(~sees_any, 0.0)
    probs = torch.softmax(scores, dim=-1) * keep
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~sees_any[..., 0], float("-inf"))
    out = torch.einsum("bhnm,bhmd->bhnd", probs, v)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------
# Linear attention: token-by-token recurrences and the feature maps of the linear methods, written
# from their definitions (METHODS.md) in whatever dtype they are given (tests use float64).
# ---------------------------------------------------------------------------------------------------


def recurrent_linear_attention(q, k, v, *, g=None, scale: float = 1.0, causal: bool = True,
                               normalize: bool = False, eps: float = 0.0, initial_state=None,
                               initial_normalizer=None):
    """Linear attention run one token at a time, per (batch, head).

    q, k (B, H, N, F); v (B, H, N, V); g (B, H, N, F) log forget gates (None = no decay);
    initial_state (B, H, F, V) and initial_normalizer (B, H, F) start the recurrence.
    Causal:      S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  z_t = exp(g_t) * z_{t-1} + k_t,
                 o_t = scale q_t S_t  (normalize: divided by scale q_t . z_t + eps).
    Non-causal:  every o_t reads the state after the last token (g must be None).
    Returns (out (B, H, N, V), final state S (B, H, F, V), final normaliser z (B, H, F)).
    """
    B, H, N, F = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, F, V) if initial_state is None else initial_state.to(q.dtype).clone()
    z = q.new_zeros(B, H, F) if initial_normalizer is None else initial_normalizer.to(q.dtype).clone()
    states, normalizers = [], []
    for t in range(N):
        if g is not None:
            decay = torch.exp(g[:, :, t])
            S = decay[..., None] * S
            z = decay * z
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + k[:, :, t]
        states.append(S)
        normalizers.append(z)
    if not causal:
        states, normalizers = [S] * N, [z] * N
    out = torch.stack([scale * torch.einsum("bhf,bhfv->bhv", q[:, :, t], states[t]) for t in range(N)], dim=2)
    if normalize:
        den = torch.stack([scale * (q[:, :, t] * normalizers[t]).sum(-1) for t in range(N)], dim=2)
        out = out / (den[..., None] + eps)
    return out, S, z


def taylor_features(x, scale: float = 1.0):
    """BASED's full second-order Taylor map, 1 + D + D^2 features: [1, x, vec(x x^T) / sqrt 2] of
    x * sqrt(scale), so that phi(q) . phi(k) = 1 + s + s^2 / 2 with s = scale * q . k (scale >= 0)."""
    x = x * scale ** 0.5
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / 2 ** 0.5
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


def causal_depthwise_conv(x, weight):
    """x (B, H, N, D), weight (H, D, r + 1): y_t = sum_j weight[..., j] * x_{t - r + j} (zero before 0),
    so weight[..., -1] multiplies the current token."""
    r = weight.shape[-1] - 1
    out = torch.zeros_like(x)
    for t in range(x.shape[2]):
        for j in range(r + 1):
            s = t - r + j
            if s >= 0:
                out[:, :, t] += weight[None, :, :, j] * x[:, :, s]
    return out


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
