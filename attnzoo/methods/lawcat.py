"""LAWCAT: linear attention with convolution across tokens (Liu et al.; arXiv 2509.18467, 2025).

    q~ = causal_conv(q), k~ = causal_conv(k)          depthwise, r + 1 taps per (head, channel)
    S_t = a_t S_{t-1} + phi(k~_t)^T v_t,   z_t = a_t z_{t-1} + phi(k~_t)
    o_t = phi(q~_t) S_t / (phi(q~_t) . z_t + eps)

a_t = exp(g_t), g per head (B, H, N) or per channel (B, H, N, D). Causal only. phi is a fixed map
("elu1", "relu") or a learned one shared by q and k (`LearnedFeatureMap`: a per-head linear layer and
a nonlinearity, applied after the convolution, as LAWCAT's feature map is).

RECONSTRUCTION: the paper's code was not available. The causal depthwise conv on q and k and the
"normalised gated linear attention" are what the abstract states; the exact formulas above, the gate
computed from k in `LAWCATAdapter`, the ELU + 1 nonlinearity and the identity initialisations are
attnzoo's choices (see docs/methods/lawcat.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..ops import linear as _linear
from ..validation import check_positive, check_tensor
from . import at_least_fp32

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def elu1(x: torch.Tensor) -> torch.Tensor:
    """ELU(x) + 1: x + 1 for x > 0, exp(x) otherwise. (Not F.elu(x) + 1, which forms exp(x) - 1 + 1 and
    loses exp(x) to cancellation for x << 0: at x = -20 nothing is left in fp32.)"""
    return torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0.0)))


FEATURE_MAPS = {"elu1": elu1, "relu": torch.relu}


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor | None, lengths=None) -> torch.Tensor:
    """x (B, H, N, D), weight (H, D, r + 1): y_t = sum_j weight[..., j] x_{t - r + j}, zeros before the
    start, so weight[..., -1] multiplies the current token. None = identity. A pack (B = 1) of sequences
    of `lengths` tokens starts each from zeros: r zero tokens go in front of each before the one
    convolution."""
    if weight is None:
        return x
    B, H, N, D = x.shape
    taps = weight.shape[-1]
    channels = x.permute(0, 1, 3, 2).reshape(B, H * D, N)
    if lengths is None:
        padded, kept = F.pad(channels, (taps - 1, 0)), slice(None)
    else:  # token t of sequence s moves to t + (s + 1) * r; the gaps hold zeros
        token_sequence = torch.repeat_interleave(torch.arange(len(lengths), device=x.device),
                                                 torch.tensor(lengths, device=x.device))
        kept = torch.arange(N, device=x.device) + (token_sequence + 1) * (taps - 1)
        padded = channels.new_zeros(B, H * D, N + len(lengths) * (taps - 1)).index_copy(2, kept, channels)
        kept = kept - (taps - 1)  # where each token's output lands after the valid convolution
    y = F.conv1d(padded, weight.reshape(H * D, 1, taps).to(x.dtype), groups=H * D)[..., kept]
    return y.reshape(B, H, D, N).permute(0, 1, 3, 2).contiguous()  # (B, H, N, D) in its own layout


def _gate_per_channel(g: torch.Tensor | None, shape) -> torch.Tensor | None:
    if g is None or g.dim() == 4:
        return g
    return g[..., None].expand(shape)


def feature_map_fn(feature_map):
    """The feature map phi: a name in FEATURE_MAPS or a callable (B, H, N, D) -> (B, H, N, F), such as
    a `LearnedFeatureMap`."""
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable (a LearnedFeatureMap), "
                             f"got {feature_map!r}")
        return FEATURE_MAPS[feature_map]
    if not callable(feature_map):
        raise TypeError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable (a LearnedFeatureMap), "
                        f"got {type(feature_map).__name__}")
    return feature_map


def check_lawcat_args(q, k, causal, g, conv_q, conv_k, feature_map) -> None:
    if not causal:
        raise ValueError("lawcat is causal only: its causal conv and gated state run along the sequence order; "
                         "call it with causal=True")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"lawcat needs q and k of one length, got q length {q.shape[2]} and k length {k.shape[2]}")
    feature_map_fn(feature_map)
    B, Hq, N, D = q.shape
    Hk = k.shape[1]
    for name, weight, heads in (("conv_q", conv_q, Hq), ("conv_k", conv_k, Hk)):
        if weight is not None:
            check_tensor(name, weight, shape=(heads, D, None), like=q, dtype=_FLOATS, finite=True)
            if weight.shape[-1] < 1:
                raise ValueError(f"{name} must hold at least one tap, got shape {tuple(weight.shape)}")
    if g is not None:
        check_tensor("g", g, shape=(B, Hk, N) if g.dim() == 3 else (B, Hk, N, D), like=q, dtype=_FLOATS)
        _linear.check_log_gates("g", g)


def lawcat(q, k, v, *, causal: bool, scale: float, backend: str, feature_map: str = "elu1", eps: float = 1e-6,
           chunk_size=None, g=None, conv_q=None, conv_k=None, pack=None):
    """q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hk, N, Dv); g (B, Hk, N) or (B, Hk, N, D) log gates <= 0
    per kv head (None = no decay); conv_q (Hq, D, r + 1), conv_k (Hk, D, r + 1) depthwise causal kernels
    (None = identity); feature_map a name or a callable shared by q and k (a LearnedFeatureMap is per
    head, so with GQA it needs Hq == Hk). `scale` is unused: it cancels in the normalised output.
    `pack`: the sequences of a packed call, each convolved and summed from its own start."""
    check_lawcat_args(q, k, causal, g, conv_q, conv_k, feature_map)
    _linear.check_one_recurrence(pack)
    eps = check_positive("eps", eps)
    phi = feature_map_fn(feature_map)
    lengths = None if pack is None else pack.q_lengths
    phi_q = phi(causal_depthwise_conv(at_least_fp32(q), conv_q, lengths))  # features in fp32 at least
    phi_k = phi(causal_depthwise_conv(at_least_fp32(k), conv_k, lengths))
    return _linear.linear_attention(phi_q, phi_k, v, g=_gate_per_channel(g, k.shape), scale=1.0, causal=True,
                                    backend=backend, normalize=True, eps=eps, chunk_size=chunk_size, pack=pack)


class LAWCATState(NamedTuple):
    """Decoding state: the normalised linear-attention state (S, z) and the last r raw q / k tokens
    that the causal convs still need."""

    S: torch.Tensor            # (B, H, D, Dv) fp32
    z: torch.Tensor            # (B, H, D) fp32
    q_window: torch.Tensor     # (B, H, r_q, D)
    k_window: torch.Tensor     # (B, H, r_k, D)


def _conv_step(x_t, window, weight):
    """Conv output at the newest token and the window of the last r raw tokens after it."""
    if weight is None:
        return x_t, window
    taps = torch.cat([window, x_t], dim=2)                              # (B, H, r + 1, D)
    y_t = (taps * weight.permute(0, 2, 1).to(x_t.dtype)).sum(2, keepdim=True)
    return y_t, taps[:, :, 1:]


def _empty_window(x_t, weight):
    r = 0 if weight is None else weight.shape[-1] - 1
    return x_t.new_zeros(*x_t.shape[:2], r, x_t.shape[-1])


def step(q_t, k_t, v_t, state=None, *, g_t=None, conv_q=None, conv_k=None, feature_map: str = "elu1",
         eps: float = 1e-6):
    """One decoding step: q_t, k_t (B, H, 1, D), v_t (B, H, 1, Dv), g_t (B, H, 1) or (B, H, 1, D);
    state a LAWCATState or None. Returns (o_t (B, H, 1, Dv), LAWCATState)."""
    check_lawcat_args(q_t, k_t, True, g_t, conv_q, conv_k, feature_map)
    if state is None:
        state = LAWCATState(None, None, _empty_window(q_t, conv_q), _empty_window(k_t, conv_k))
    q_conv, q_window = _conv_step(q_t, state.q_window, conv_q)
    k_conv, k_window = _conv_step(k_t, state.k_window, conv_k)
    phi = feature_map_fn(feature_map)
    linear_state = None if state.S is None else (state.S, state.z)
    out, (S, z) = _linear.step(phi(q_conv), phi(k_conv), v_t, linear_state, scale=1.0,
                               g_t=_gate_per_channel(g_t, k_t.shape), normalize=True, eps=eps)
    return out, LAWCATState(S, z, q_window, k_window)


class LearnedFeatureMap(torch.nn.Module):
    """A learned feature map shared by q and k: phi(x) = activation(x W_h + b_h) per head h, x (B, H, N, D)
    -> (B, H, N, D), W (H, D, D) initialised to the identity and b (H, D) to 0, so that it starts as the
    fixed map `activation` ("elu1" keeps features positive, as the normaliser needs)."""

    def __init__(self, num_heads: int, head_dim: int, activation: str = "elu1"):
        super().__init__()
        if activation not in FEATURE_MAPS:
            raise ValueError(f"activation must be one of {sorted(FEATURE_MAPS)}, got {activation!r}")
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, D, _ = self.weight.shape
        if x.dim() != 4 or x.shape[1] != H or x.shape[-1] != D:
            raise ValueError(f"LearnedFeatureMap: x must be (B, {H}, N, {D}), got shape {tuple(x.shape)}")
        projected = torch.einsum("bhnd,hdf->bhnf", x, self.weight.to(x.dtype)) + self.bias[:, None].to(x.dtype)
        return FEATURE_MAPS[self.activation](projected)


class LAWCATAdapter(torch.nn.Module):
    """The learned parts LAWCAT adds to an attention layer: depthwise causal conv kernels for q
    (num_heads, D, kernel_size) and k (num_kv_heads, D, kernel_size), initialised to the identity (last
    tap 1), a per-kv-head forget gate computed from k, g = logsigmoid(k . w_h + b_h) (B, Hk, N),
    initialised to w = 0, b = 3 (a = 0.95), and with `learned_feature_map` a `LearnedFeatureMap` shared
    by q and k (identity-initialised: it starts as "elu1"; per head, so it needs num_kv_heads ==
    num_heads). `adapter(q, k)` returns the keyword arguments of `lawcat`: conv_q, conv_k, g (and
    feature_map). num_kv_heads None means num_heads (no GQA)."""

    def __init__(self, num_heads: int, head_dim: int, kernel_size: int = 4, gate_bias: float = 3.0,
                 learned_feature_map: bool = False, num_kv_heads: int | None = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if learned_feature_map and num_kv_heads != num_heads:
            raise ValueError(f"learned_feature_map is one map per head shared by q and k, so it needs "
                             f"num_kv_heads == num_heads, got {num_kv_heads} and {num_heads}")
        identity = torch.zeros(head_dim, kernel_size)
        identity[..., -1] = 1.0
        self.conv_q = torch.nn.Parameter(identity.repeat(num_heads, 1, 1))
        self.conv_k = torch.nn.Parameter(identity.repeat(num_kv_heads, 1, 1))
        self.gate_weight = torch.nn.Parameter(torch.zeros(num_kv_heads, head_dim))
        self.gate_bias = torch.nn.Parameter(torch.full((num_kv_heads,), gate_bias))
        self.feature_map = LearnedFeatureMap(num_heads, head_dim) if learned_feature_map else None

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> dict:
        H, D = self.gate_weight.shape
        if k.dim() != 4 or k.shape[1] != H or k.shape[-1] != D:
            raise ValueError(f"k must be (B, {H}, N, {D}), got shape {tuple(k.shape)}")
        logits = torch.einsum("bhnd,hd->bhn", k, self.gate_weight.to(k.dtype)) + self.gate_bias[:, None].to(k.dtype)
        inputs = {"conv_q": self.conv_q, "conv_k": self.conv_k, "g": F.logsigmoid(logits)}
        return inputs if self.feature_map is None else {**inputs, "feature_map": self.feature_map}


def example_kwargs(q, k, v, *, causal):
    adapter = LAWCATAdapter(q.shape[1], q.shape[-1], num_kv_heads=k.shape[1]).to(q.device)
    with torch.no_grad():
        adapter.conv_q.add_(0.1 * torch.randn_like(adapter.conv_q))
        adapter.conv_k.add_(0.1 * torch.randn_like(adapter.conv_k))
        return {name: t.detach() for name, t in adapter(q, k).items()}
