"""Chunked (gated) linear attention in PyTorch: the CPU backend of attnzoo/kernels/linear.py.

Same algorithm and signatures as the Triton launchers. The sequence is cut into chunks of C tokens;
each chunk combines a masked quadratic form inside the chunk with the state carried from the chunks
before it. Decay is per key channel in log space: with Gam the cumulative log gate inside a chunk,
every factor is exp(Gam_j - Gam_i) or exp(Gam_last - Gam_i) with a non-positive exponent, never a
ratio of products.

Shapes: q, k (B, H, N, K); v (B, H, N, V); g (B, H, N, K) log gates or None;
states (B, H, K, V) fp32; chunk_states (B, H, NT, K, V) = the state before each chunk.
Non-causal (g None): every token reads the state after the last token.
"""

from __future__ import annotations

import torch


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk(x: torch.Tensor, n: int, chunk_size: int) -> torch.Tensor:
    """Rows [n * C, (n + 1) * C) of x (B, H, N, D), zero-padded to C rows: (B, H, C, D)."""
    piece = x[:, :, n * chunk_size:(n + 1) * chunk_size]
    pad = chunk_size - piece.shape[2]
    return torch.nn.functional.pad(piece, (0, 0, 0, pad)) if pad else piece


def _chunk_decay(g_chunk: torch.Tensor | None):
    """(Gam (B, H, C, K) cumulative log gate in the chunk, Gam_last (B, H, K)); padded rows add 0."""
    if g_chunk is None:
        return None, None
    gam = g_chunk.cumsum(dim=2)
    return gam, gam[:, :, -1]


def _pair_decay(gam, causal_mask):
    """(B, H, C, C, K): exp(Gam_j[c] - Gam_i[c]) for i <= j, else 0 (masked before exp: no overflow)."""
    log_decay = gam[:, :, :, None, :] - gam[:, :, None, :, :]
    return log_decay.masked_fill(~causal_mask[..., None], float("-inf")).exp()


def _intra_scores(q, k, gam, causal_mask):
    """A[j, i] = sum_c q_j[c] k_i[c] exp(Gam_j[c] - Gam_i[c]) for i <= j, else 0: (B, H, C, C)."""
    if gam is None:
        return (q @ k.transpose(-1, -2)).masked_fill(~causal_mask, 0.0)
    return torch.einsum("bhjc,bhic,bhjic->bhji", q, k, _pair_decay(gam, causal_mask))


def chunk_linear_fwd(q, k, v, g, initial_state, *, scale: float, causal: bool, chunk_size: int):
    """Returns out (B, H, N, V) in the accumulation dtype, chunk_states (B, H, NT, K, V) (None when
    non-causal: every chunk reads the final state) and the final state (B, H, K, V)."""
    B, H, N, K = q.shape
    V = v.shape[-1]
    acc = _accum_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    g = None if g is None else g.to(acc)
    n_chunks = -(-N // chunk_size)
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc).clone()
    chunk_states = q.new_empty(B, H, n_chunks, K, V) if causal else None
    for n in range(n_chunks):
        if causal:
            chunk_states[:, :, n] = state
        gam, last = _chunk_decay(None if g is None else _chunk(g, n, chunk_size))
        k_n, v_n = _chunk(k, n, chunk_size), _chunk(v, n, chunk_size)
        if gam is not None:
            state = last.exp()[..., None] * state
            k_n = k_n * (last[:, :, None] - gam).exp()
        state = state + k_n.transpose(-1, -2) @ v_n
    causal_mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    out = q.new_empty(B, H, n_chunks * chunk_size, V)
    for n in range(n_chunks):
        rows = slice(n * chunk_size, (n + 1) * chunk_size)
        gam, _ = _chunk_decay(None if g is None else _chunk(g, n, chunk_size))
        q_n = _chunk(q, n, chunk_size)
        q_hat = q_n if gam is None else q_n * gam.exp()
        if causal:
            scores = _intra_scores(q_n, _chunk(k, n, chunk_size), gam, causal_mask)
            out[:, :, rows] = scale * (q_hat @ chunk_states[:, :, n] + scores @ _chunk(v, n, chunk_size))
        else:
            out[:, :, rows] = scale * (q_hat @ state)
    return out[:, :, :N], chunk_states, state


def chunk_linear_bwd(q, k, v, g, chunk_states, final_state, do, dfinal, *, scale: float, causal: bool,
                     chunk_size: int):
    """Gradients (dq, dk, dv, dh0) of `chunk_linear_fwd` given do (B, H, N, V) and dfinal (B, H, K, V)
    or None. dh0 is the gradient of the initial state; dg is derived from dq and dk by the caller."""
    B, H, N, K = q.shape
    acc = _accum_dtype(q.dtype)
    q, k, v, do = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    g = None if g is None else g.to(acc)
    dstate = torch.zeros_like(final_state) if dfinal is None else dfinal.to(acc).clone()
    if not causal:
        dstate = dstate + scale * q.transpose(-1, -2) @ do
        return scale * do @ final_state.transpose(-1, -2), v @ dstate.transpose(-1, -2), k @ dstate, dstate
    n_chunks = chunk_states.shape[2]
    causal_mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    dq, dk, dv = (torch.empty(B, H, n_chunks * chunk_size, x.shape[-1], dtype=acc, device=q.device) for x in (q, k, v))
    for n in reversed(range(n_chunks)):
        rows = slice(n * chunk_size, (n + 1) * chunk_size)
        q_n, k_n, v_n, do_n = (_chunk(x, n, chunk_size) for x in (q, k, v, do))
        gam, last = _chunk_decay(None if g is None else _chunk(g, n, chunk_size))
        q_decay = 1.0 if gam is None else gam.exp()                        # exp(Gam_j)
        k_decay = 1.0 if gam is None else (last[:, :, None] - gam).exp()   # exp(Gam_last - Gam_i)
        d_scores = (do_n @ v_n.transpose(-1, -2)).masked_fill(~causal_mask, 0.0)
        dq_inter = (do_n @ chunk_states[:, :, n].transpose(-1, -2)) * q_decay
        dk_inter = (v_n @ dstate.transpose(-1, -2)) * k_decay
        if gam is None:
            dq_intra, dk_intra = d_scores @ k_n, d_scores.transpose(-1, -2) @ q_n
        else:
            weighted = d_scores[..., None] * _pair_decay(gam, causal_mask)   # (B, H, C, C, K)
            dq_intra = torch.einsum("bhjic,bhic->bhjc", weighted, k_n)
            dk_intra = torch.einsum("bhjic,bhjc->bhic", weighted, q_n)
        dq[:, :, rows] = scale * (dq_inter + dq_intra)
        dk[:, :, rows] = dk_inter + scale * dk_intra
        scores = _intra_scores(q_n, k_n, gam, causal_mask)
        dv[:, :, rows] = scale * scores.transpose(-1, -2) @ do_n + (k_n * k_decay) @ dstate
        if gam is not None:
            dstate = last.exp()[..., None] * dstate
        dstate = dstate + scale * (q_n * q_decay).transpose(-1, -2) @ do_n
    return dq[:, :, :N], dk[:, :, :N], dv[:, :, :N], dstate
