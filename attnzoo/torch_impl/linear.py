"""Chunked (gated) linear attention in PyTorch: the CPU backend of attnzoo/kernels/linear.py.

Same algorithm and signatures as the Triton launchers. The sequence is cut into chunks of C tokens;
each chunk combines a masked quadratic form inside the chunk with the state carried from the chunks
before it. Decay is per key channel in log space: with Gam the cumulative log gate inside a chunk,
every factor is exp(Gam_j - Gam_i) or exp(Gam_last - Gam_i) with a non-positive exponent, never a
ratio of products.

Shapes: q (B, Hq, N, K); k (B, Hk, N, K); v (B, Hk, N, V); g (B, Hk, N, K) log gates or None;
states (B, Hk, K, V) fp32; chunk_states (B, Hk, NT, K, V) = the state before each chunk. GQA: inside,
query-side tensors are folded to (B * Hk, G, N, .) and kv-side ones to (B * Hk, 1, N, .), so a kv head
broadcasts over its G query heads and is never repeated; kv-side gradients sum over the G axis.
Non-causal (g None): every token reads the state after the last token.
Causal isolation: a NaN / inf value at token t never reaches the rows before it in its chunk
(`_intra_values`), as in the kernel.
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
    """A[j, i] = sum_c q_j[c] k_i[c] exp(Gam_j[c] - Gam_i[c]) for i <= j, else 0: (B, H, C, C). (Masked
    after the product: a NaN key times a zero decay is NaN.)"""
    if gam is None:
        return (q @ k.transpose(-1, -2)).masked_fill(~causal_mask, 0.0)
    return torch.einsum("bhjc,bhic,bhjic->bhji", q, k, _pair_decay(gam, causal_mask)).masked_fill(~causal_mask, 0.0)


def _intra_values(scores, v):
    """scores (B, G, C, C) (causally masked) @ v (B, 1, C, V) with v's NaN / inf kept out of the earlier
    rows: they enter as 0, and every (j, c) with a non-finite v[i, c] at i <= j is NaN."""
    finite = torch.isfinite(v)
    out = scores @ v.masked_fill(~finite, 0.0)
    return out.masked_fill((~finite).cumsum(dim=2) > 0, float("nan"))


def _grouped(x: torch.Tensor | None, kv_heads: int) -> torch.Tensor | None:
    """(B, H, ...) -> (B * Hk, H / Hk, ...): a kv head's query heads (or, H = Hk, the kv head itself)."""
    return None if x is None else x.reshape(-1, x.shape[1] // kv_heads, *x.shape[2:])


def _ungrouped(x: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Inverse of `_grouped`: (B * Hk, G, ...) -> (B, Hk * G, ...)."""
    return None if x is None else x.reshape(batch, -1, *x.shape[2:])


def chunk_linear_fwd(q, k, v, g, initial_state, *, scale: float, causal: bool, chunk_size: int, seqlens=None):
    """Returns out (B, Hq, N, V) in the accumulation dtype, chunk_states (B, Hk, NT, K, V) (None when
    non-causal: every chunk reads the final state) and the final state (B, Hk, K, V). `seqlens`: None,
    or a pack's S + 1 token offsets (B = 1): each sequence runs on its own (`_packed_fwd`), with
    initial and final states (S, Hk, K, V) and its chunks' states one after the other."""
    if seqlens is not None:
        return _packed_fwd(q, k, v, g, initial_state, scale=scale, causal=causal, chunk_size=chunk_size,
                           seqlens=seqlens)
    B, Hk = k.shape[:2]
    acc = _accum_dtype(q.dtype)
    q = _grouped(q.to(acc), Hk)
    k, v, g, initial_state = (_grouped(None if x is None else x.to(acc), Hk) for x in (k, v, g, initial_state))
    out, chunk_states, state = _forward(q, k, v, g, initial_state, scale, causal, chunk_size)
    return _ungrouped(out, B), _ungrouped(chunk_states, B), _ungrouped(state, B)


def _forward(q, k, v, g, state, scale, causal, chunk_size):
    """chunk_linear_fwd on grouped tensors: q (BHk, G, N, K), k, v, g, state (BHk, 1, ...)."""
    BHk, G, N, K = q.shape
    V = v.shape[-1]
    n_chunks = -(-N // chunk_size)
    state = q.new_zeros(BHk, 1, K, V) if state is None else state.clone()
    chunk_states = q.new_empty(BHk, 1, n_chunks, K, V) if causal else None
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
    out = q.new_empty(BHk, G, n_chunks * chunk_size, V)
    for n in range(n_chunks):
        rows = slice(n * chunk_size, (n + 1) * chunk_size)
        gam, _ = _chunk_decay(None if g is None else _chunk(g, n, chunk_size))
        q_n = _chunk(q, n, chunk_size)
        q_hat = q_n if gam is None else q_n * gam.exp()
        if causal:
            scores = _intra_scores(q_n, _chunk(k, n, chunk_size), gam, causal_mask)
            out[:, :, rows] = scale * (q_hat @ chunk_states[:, :, n] + _intra_values(scores, _chunk(v, n, chunk_size)))
        else:
            out[:, :, rows] = scale * (q_hat @ state)
    return out[:, :, :N], chunk_states, state


def chunk_linear_bwd(q, k, v, g, chunk_states, final_state, do, dfinal, *, scale: float, causal: bool,
                     chunk_size: int, seqlens=None):
    """Gradients (dq (B, Hq, N, K), dk, dv, dh0 (per kv head)) of `chunk_linear_fwd` given do
    (B, Hq, N, V) and dfinal (B, Hk, K, V) or None. dh0 is the gradient of the initial state; dg is
    derived from dq and dk by the caller. `seqlens` as chunk_linear_fwd's."""
    if seqlens is not None:
        return _packed_bwd(q, k, v, g, chunk_states, final_state, do, dfinal, scale=scale, causal=causal,
                           chunk_size=chunk_size, seqlens=seqlens)
    B, Hk = k.shape[:2]
    acc = _accum_dtype(q.dtype)
    q, do = (_grouped(x.to(acc), Hk) for x in (q, do))
    k, v, g, chunk_states, final_state, dfinal = (_grouped(None if x is None else x.to(acc), Hk)
                                                  for x in (k, v, g, chunk_states, final_state, dfinal))
    grads = _backward(q, k, v, g, chunk_states, final_state, do, dfinal, scale, causal, chunk_size)
    return tuple(_ungrouped(x, B) for x in grads)


def _backward(q, k, v, g, chunk_states, final_state, do, dfinal, scale, causal, chunk_size):
    """chunk_linear_bwd on grouped tensors (see _forward); kv-side gradients sum the group axis."""
    BHk, G, N, K = q.shape
    dstate = torch.zeros_like(final_state) if dfinal is None else dfinal.clone()
    if not causal:
        dstate = dstate + scale * (q.transpose(-1, -2) @ do).sum(1, keepdim=True)
        return scale * do @ final_state.transpose(-1, -2), v @ dstate.transpose(-1, -2), k @ dstate, dstate
    n_chunks = chunk_states.shape[2]
    causal_mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    dq = q.new_empty(BHk, G, n_chunks * chunk_size, K)
    dk, dv = (x.new_empty(BHk, 1, n_chunks * chunk_size, x.shape[-1]) for x in (k, v))
    for n in reversed(range(n_chunks)):
        rows = slice(n * chunk_size, (n + 1) * chunk_size)
        q_n, k_n, v_n, do_n = (_chunk(x, n, chunk_size) for x in (q, k, v, do))
        gam, last = _chunk_decay(None if g is None else _chunk(g, n, chunk_size))
        q_decay = 1.0 if gam is None else gam.exp()                        # exp(Gam_j)
        k_decay = 1.0 if gam is None else (last[:, :, None] - gam).exp()   # exp(Gam_last - Gam_i)
        d_scores = (do_n @ v_n.transpose(-1, -2)).masked_fill(~causal_mask, 0.0)  # (BHk, G, C, C)
        dq_inter = (do_n @ chunk_states[:, :, n].transpose(-1, -2)) * q_decay
        dk_inter = (v_n @ dstate.transpose(-1, -2)) * k_decay
        if gam is None:
            dq_intra, dk_intra = d_scores @ k_n, d_scores.transpose(-1, -2) @ q_n
        else:
            weighted = d_scores[..., None] * _pair_decay(gam, causal_mask)   # (BHk, G, C, C, K)
            dq_intra = torch.einsum("bhjic,bhic->bhjc", weighted, k_n)
            dk_intra = torch.einsum("bhjic,bhjc->bhic", weighted, q_n)
        dq[:, :, rows] = scale * (dq_inter + dq_intra)
        dk[:, :, rows] = dk_inter + scale * dk_intra.sum(1, keepdim=True)
        scores = _intra_scores(q_n, k_n, gam, causal_mask)
        dv[:, :, rows] = scale * (scores.transpose(-1, -2) @ do_n).sum(1, keepdim=True) + (k_n * k_decay) @ dstate
        if gam is not None:
            dstate = last.exp()[..., None] * dstate
        dstate = dstate + scale * ((q_n * q_decay).transpose(-1, -2) @ do_n).sum(1, keepdim=True)
    return dq[:, :, :N], dk[:, :, :N], dv[:, :, :N], dstate


# ---------------------------------------------------------------------------------------------------
# Packs: one sequence at a time, on views (the kernels run them in one launch per pass)
# ---------------------------------------------------------------------------------------------------


def _pieces(seqlens, chunk_size: int):
    """(sequence, its tokens, its chunks in the pack's chunk states) of every sequence of a pack."""
    first_chunk = 0
    for s, (start, stop) in enumerate(zip(seqlens, seqlens[1:])):
        chunks = -(-(stop - start) // chunk_size)
        yield s, slice(start, stop), slice(first_chunk, first_chunk + chunks)
        first_chunk += chunks


def _packed_fwd(q, k, v, g, initial_state, *, scale, causal, chunk_size, seqlens):
    acc = _accum_dtype(q.dtype)
    S, Hk, K, V = len(seqlens) - 1, k.shape[1], k.shape[-1], v.shape[-1]
    n_chunks = sum(-(-(b - a) // chunk_size) for a, b in zip(seqlens, seqlens[1:]))
    out = q.new_zeros(*q.shape[:3], V, dtype=acc)
    chunk_states = q.new_zeros(1, Hk, n_chunks, K, V, dtype=acc) if causal else None
    final = q.new_zeros(S, Hk, K, V, dtype=acc) if initial_state is None else initial_state.to(acc).clone()
    for s, tokens, chunks in _pieces(seqlens, chunk_size):
        if tokens.stop == tokens.start:
            continue
        state = None if initial_state is None else initial_state[s:s + 1]
        out[:, :, tokens], states_s, final[s:s + 1] = chunk_linear_fwd(
            q[:, :, tokens], k[:, :, tokens], v[:, :, tokens], None if g is None else g[:, :, tokens], state,
            scale=scale, causal=causal, chunk_size=chunk_size)
        if causal:
            chunk_states[:, :, chunks] = states_s
    return out, chunk_states, final


def _packed_bwd(q, k, v, g, chunk_states, final_state, do, dfinal, *, scale, causal, chunk_size, seqlens):
    acc = _accum_dtype(q.dtype)
    dq, dk, dv = (x.new_zeros(x.shape, dtype=acc) for x in (q, k, v))
    dh0 = torch.zeros_like(final_state, dtype=acc) if dfinal is None else dfinal.to(acc).clone()
    for s, tokens, chunks in _pieces(seqlens, chunk_size):
        if tokens.stop == tokens.start:
            continue
        dq[:, :, tokens], dk[:, :, tokens], dv[:, :, tokens], dh0[s:s + 1] = chunk_linear_bwd(
            q[:, :, tokens], k[:, :, tokens], v[:, :, tokens], None if g is None else g[:, :, tokens],
            chunk_states[:, :, chunks] if causal else None, final_state[s:s + 1], do[:, :, tokens],
            None if dfinal is None else dfinal[s:s + 1], scale=scale, causal=causal, chunk_size=chunk_size)
    return dq, dk, dv, dh0
