"""The shared entry of the linear-attention family (gla, based, lawcat, wersa).

A method turns q and k into features (identity, Taylor, conv + ELU, wavelets + random features) and
calls `linear_attention`, which runs the chunked kernel of the chosen backend through one
autograd.Function:

    causal:      S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t
    non-causal:  o_t = scale * q_t S_N                         (no gate)
    normalised:  o_t is divided by scale * q_t . z_t + eps, with z the same recurrence on k_t alone.

The normaliser z is carried as one more value column of the state: the kernel runs on [v, 1], so
S[..., :V] is the state and S[..., V] is z. Its gradient is then exact by construction.

`backend` is "triton" (the kernels, attnzoo/kernels/linear.py), "torch" (their twin,
attnzoo/torch_impl/linear.py, same signatures) or "fla" (fla's `chunk_gla`, CUDA only: gated,
unnormalised, causal calls). Decoding: `step(q_t, k_t, v_t, state)` advances the same recurrence by
one token in O(1); `attnzoo.linear_state(name)` returns a method's step function.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._env import interpret_tile, triton_interpreting
from ..geometry import Pack
from ..validation import check_int, check_tensor
from .dispatch import implementation

_STATE_DTYPE = torch.float32


def default_chunk_size(gated: bool, backend: str) -> int:
    """Tokens per chunk: small under the interpreter (tests cross many chunks) and for gated Triton
    tiles (the per-channel decay tile is C x C x BK in registers); 64 otherwise."""
    if backend == "triton" and triton_interpreting():
        return interpret_tile()
    return 16 if gated and backend == "triton" else 64


def check_chunk_size(chunk_size) -> int:
    """The chunk is also the kernels' register tile (C x C scores, C x C x BK gated decays), so it is
    bounded: a power of two in [16, 128]."""
    chunk_size = check_int("chunk_size", chunk_size, low=16, high=128)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two in [16, 128] (or None for the default), got {chunk_size!r}")
    return chunk_size


def check_log_gates(name: str, g: torch.Tensor) -> None:
    """Log forget gates must be finite and <= 0. (A forget gate of exactly 0, log 0 = -inf, would make
    the chunked form's exp(G_t - G_s) a NaN; a large negative value such as -60 forgets as well.)
    Values are not read on the meta device. Under torch.compile the check is an assertion inside the
    graph (RuntimeError naming `name`, no graph break); eagerly a ValueError with the values' range."""
    if g.device.type == "meta":
        return
    valid = (torch.isfinite(g) & (g <= 0)).all()
    if torch.compiler.is_compiling():
        torch._assert_async(valid, f"{name} holds log forget gates and must be finite and <= 0")
        return
    if not bool(valid):
        raise ValueError(f"{name} holds log forget gates and must be finite and <= 0; got values from "
                         f"{g.min().item():.3g} to {g.max().item():.3g} (for a gate that forgets everything "
                         "use a large negative value such as -60, not -inf)")


def check_one_recurrence(pack: Pack | None) -> None:
    """A pack for linear attention: the queries and keys of every sequence are the same tokens."""
    if pack is not None and pack.q_starts != pack.k_starts:
        raise ValueError(f"linear attention runs one recurrence per sequence: a pack needs cu_seqlens_q == "
                         f"cu_seqlens_k, got {list(pack.q_starts)} and {list(pack.k_starts)}")


def _gate_grad(q, k, dq, dk, final_state, dfinal, seqlens=None):
    """dg from dq, dk: everything depends on the cumulative gate G through q_t exp(G_t), k_s exp(-G_s)
    and exp(G_N) on the final state, so dL/dG_t = q_t dq_t - k_t dk_t (+ sum_v S_N dS_N at t = N - 1),
    and dg_t = sum_{r >= t} dL/dG_r. With GQA the gate is a kv head's: q_t dq_t sums its query heads.
    In a pack (`seqlens`, S + 1 offsets) each sequence is its own: its final state enters at its last
    token, and the sums stop at its end."""
    B, Hk = k.shape[:2]
    dcum = (q.to(dq.dtype) * dq).unflatten(1, (Hk, -1)).sum(2) - k.to(dk.dtype) * dk  # a kv head's query heads
    final_term = (final_state * dfinal).sum(-1)  # (B | S, Hk, K)
    if seqlens is None:
        dcum[:, :, -1] += final_term
        return dcum.flip(2).cumsum(2).flip(2)
    ends = torch.tensor(seqlens[1:], device=k.device)
    nonempty = ends > torch.tensor(seqlens[:-1], device=k.device)
    dcum[0, :, ends[nonempty] - 1] += final_term[nonempty].transpose(0, 1)
    # sums from t to the end of t's sequence: suffix sums of the pack (in fp64, so that the difference of
    # two long sums keeps the short one exact) minus the suffix from the next sequence on
    suffix = torch.nn.functional.pad(dcum.double().flip(2).cumsum(2).flip(2), (0, 0, 0, 1))
    token_end = torch.repeat_interleave(ends, torch.diff(torch.tensor(seqlens, device=k.device)))
    return (suffix[:, :, :-1] - suffix[:, :, token_end]).to(dcum.dtype)


class _ChunkedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, causal, chunk_size, backend, seqlens):
        impl = implementation("linear", backend)
        out, chunk_states, final = impl.chunk_linear_fwd(q, k, v, g, initial_state, scale=scale, causal=causal,
                                                         chunk_size=chunk_size, seqlens=seqlens)
        ctx.save_for_backward(q, k, v, g, chunk_states, final)
        ctx.config = dict(scale=scale, causal=causal, chunk_size=chunk_size, seqlens=seqlens)
        ctx.impl = impl
        return out, final

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable: a second derivative raises
    def backward(ctx, dout, dfinal):
        q, k, v, g, chunk_states, final = ctx.saved_tensors
        dq, dk, dv, dh0 = ctx.impl.chunk_linear_bwd(q, k, v, g, chunk_states, final, dout, dfinal, **ctx.config)
        dg = (_gate_grad(q, k, dq, dk, final, dfinal, ctx.config["seqlens"]).to(g.dtype) if ctx.needs_input_grad[3]
              else None)
        dh0 = dh0 if ctx.needs_input_grad[4] else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0, None, None, None, None, None


def _with_ones_column(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _pack_state(state, normalize: bool, shape: tuple, like: torch.Tensor):
    """User state -> kernel state (B, H, F, V[+1]) fp32. Normalised methods take (S, z)."""
    if state is None:
        return None
    B, H, F, V = shape
    if normalize:
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise TypeError(f"initial_state of a normalised method must be a pair (S (B, H, F, V), z (B, H, F)), "
                            f"got {type(state).__name__}")
        S, z = state
        check_tensor("initial_state[0]", S, shape=(B, H, F, V), like=like, dtype=_STATE_DTYPE, finite=True)
        check_tensor("initial_state[1]", z, shape=(B, H, F), like=like, dtype=_STATE_DTYPE, finite=True)
        return torch.cat([S, z[..., None]], dim=-1)
    check_tensor("initial_state", state, shape=(B, H, F, V), like=like, dtype=_STATE_DTYPE, finite=True)
    return state


def _unpack_state(state: torch.Tensor, normalize: bool):
    return (state[..., :-1], state[..., -1]) if normalize else state


def _normalized(out: torch.Tensor, eps: float) -> torch.Tensor:
    return out[..., :-1] / (out[..., -1:] + eps)


def linear_attention(q, k, v, *, scale: float, causal: bool, backend: str, g=None, normalize: bool = False,
                     eps: float = 1e-6, initial_state=None, output_final_state: bool = False,
                     chunk_size: int | None = None, pack: Pack | None = None):
    """Chunked linear attention on features q (B, Hq, N, F), k (B, Hk, N, F) and values v (B, Hk, N, V),
    Hq a multiple of Hk (GQA: a kv head's k, v, gate and state serve its Hq / Hk query heads).

    g (B, Hk, N, F) log forget gates (causal only); initial_state (B, Hk, F, V) fp32, or (S, z) when
    `normalize`. Returns out (B, H, N, V) in v's dtype, and with `output_final_state` also the final
    state (same form as initial_state). backend is "triton" or "torch".

    `pack`: None, or where the sequences of a pack lie (attnzoo.geometry.Pack, B = 1, the same offsets
    for queries and keys: fla's cu_seqlens): every sequence starts from its own initial state
    (S, Hk, F, V) and ends in its own final state; one kernel launch per pass serves the pack.
    """
    if not causal and g is not None:
        raise ValueError("g (a forget gate) needs causal=True: a non-causal sum has no order to decay along")
    if backend == "fla":
        if normalize or not causal or chunk_size is not None:
            raise ValueError("backend='fla' runs fla's chunk_gla: causal, unnormalised, default chunk size only")
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"backend='fla' runs fla's chunk_gla, which takes one k/v head per query head; got "
                             f"{q.shape[1]} query heads and {k.shape[1]} kv heads (use backend='triton' for GQA)")
        if pack is not None:
            raise ValueError("backend='fla' takes no packed sequences here; use backend='triton' for a pack")
        return _fla_chunk_gla(q, k, v, g, scale, initial_state, output_final_state)
    check_one_recurrence(pack)
    gated = g is not None
    chunk_size = default_chunk_size(gated, backend) if chunk_size is None else check_chunk_size(chunk_size)
    states = k.shape[0] if pack is None else len(pack)  # one state per batch entry / sequence
    h0 = _pack_state(initial_state, normalize, (states, k.shape[1], k.shape[-1], v.shape[-1]), q)
    values = _with_ones_column(v) if normalize else v
    seqlens = None if pack is None else pack.q_starts
    out, final = _ChunkedLinear.apply(q, k, values, g, h0, scale, causal, chunk_size, backend, seqlens)
    out = (_normalized(out, eps) if normalize else out).to(v.dtype)
    return (out, _unpack_state(final, normalize)) if output_final_state else out


def step(q_t, k_t, v_t, state, *, scale: float, g_t=None, normalize: bool = False, eps: float = 1e-6):
    """One decoding step of the causal recurrence, O(1) in the sequence length.

    q_t, k_t (B, H, 1, F); v_t (B, H, 1, V); g_t (B, H, 1, F) or None; state as in
    `linear_attention` (None = zeros). Returns (o_t (B, H, 1, V) in v's dtype, new state fp32).
    """
    B, H, _, F = k_t.shape
    V = v_t.shape[-1]
    for name, t, width in (("q_t", q_t, F), ("k_t", k_t, F), ("v_t", v_t, V)):
        check_tensor(name, t, shape=(B, H, 1, width), like=k_t)
    packed = _pack_state(state, normalize, (B, H, F, V), k_t)
    if packed is None:
        packed = torch.zeros(B, H, F, V + normalize, dtype=_STATE_DTYPE, device=k_t.device)
    values = (_with_ones_column(v_t) if normalize else v_t).float()
    if g_t is not None:
        check_tensor("g_t", g_t, shape=(B, H, 1, F), like=k_t)
        check_log_gates("g_t", g_t)
        packed = g_t.float().exp().transpose(-1, -2) * packed
    packed = packed + k_t.float().transpose(-1, -2) @ values
    out = scale * q_t.float() @ packed
    out = (_normalized(out, eps) if normalize else out).to(v_t.dtype)
    return out, _unpack_state(packed, normalize)


def _fla_chunk_gla(q, k, v, g, scale, initial_state, output_final_state):
    """fla's chunk_gla (CUDA only) on attnzoo's (B, H, N, D) layout; fla takes (B, N, H, D)."""
    from fla.ops.gla import chunk_gla

    def to_fla(x):
        return x.transpose(1, 2).contiguous()

    gate = torch.zeros_like(q) if g is None else g
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(*q.shape[:2], q.shape[-1], v.shape[-1]), like=q,
                     dtype=_STATE_DTYPE)
    out, final = chunk_gla(to_fla(q), to_fla(k), to_fla(v), to_fla(gate), scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state)
    out = out.transpose(1, 2).to(q.dtype)
    return (out, final) if output_final_state else out
