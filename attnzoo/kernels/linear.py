"""Chunked (gated) linear attention in Triton, forward and backward.

The sequence is cut into chunks of BT tokens. Per (batch x head):

    state pass   h_n = diag(exp(Gam_last)) h_{n-1} + sum_i (k_i * exp(Gam_last - Gam_i))^T v_i
    output       o_j = scale * [(q_j * exp(Gam_j)) h_n + sum_{i <= j in chunk} A[j, i] v_i]
                 A[j, i] = sum_c q_j[c] k_i[c] exp(Gam_j[c] - Gam_i[c])

Gam is the cumulative log gate inside the chunk (tl.cumsum of g), so every exponent is a difference
Gam_j - Gam_i <= 0 taken in log space, never a ratio of products. With a gate the intra-chunk scores
are an element-wise (BT, BT, BK) tile in fp32; without one they are a tl.dot. Non-causal calls read
the final state for every chunk (PER_CHUNK off), skip the intra-chunk term and store no per-chunk states.

Kernels (constexpr switches GATED, CAUSAL, STORE_CHUNKS, HAS_INITIAL, HAS_DFINAL; one kernel per role):
    _states_fwd   grid (K/BK, V/BV, B*H)   h_n for every chunk and the final state
    _output_fwd   grid (V/BV, NT, B*H)     o
    _states_bwd   grid (K/BK, V/BV, B*H)   dh_n (gradient of the state after chunk n) and dh0
    _dqk_bwd      grid (K/BK, NT, B*H)     dq, dk
    _dv_bwd       grid (V/BV, NT, B*H)     dv
All tensors are contiguous (B, H, N, D) or (B, H, NT, K, V); launchers make them so.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import interpret_tile, new_output, next_pow2, triton_interpreting


@triton.jit
def _load_tile_f32(ptr, bh, rows, cols, N, D):
    """Tile (len(rows), len(cols)) of a contiguous (BH, N, D) tensor, upcast to fp32, zero outside."""
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    return tl.load(ptr + bh * N * D + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, value, bh, rows, cols, N, D):
    """Store tile (rows, cols) of a contiguous (BH, N, D) tensor, inside [0, N) x [0, D) only."""
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    tl.store(ptr + bh * N * D + rows[:, None] * D + cols[None, :], value, mask=mask)


@triton.jit
def _state_offsets(bh, chunk, NT, rows, cols, K, V, PER_CHUNK: tl.constexpr):
    """Offsets and mask of tile (rows, cols) of state `chunk` in a (BH, NT, K, V) tensor; without
    PER_CHUNK (non-causal) every chunk maps to the one state of a (BH, K, V) tensor."""
    base = bh * K * V
    if PER_CHUNK:
        base = (bh * NT + chunk) * K * V
    return base + rows[:, None] * V + cols[None, :], (rows[:, None] < K) & (cols[None, :] < V)


@triton.jit
def _load_state(states, bh, chunk, NT, rows, cols, K, V, PER_CHUNK: tl.constexpr):
    """Tile (rows, cols) of state `chunk` (see _state_offsets), zero outside (K, V)."""
    offs, mask = _state_offsets(bh, chunk, NT, rows, cols, K, V, PER_CHUNK)
    return tl.load(states + offs, mask=mask, other=0.0)


@triton.jit
def _store_state(states, value, bh, chunk, NT, rows, cols, K, V, PER_CHUNK: tl.constexpr):
    """Store tile (rows, cols) of state `chunk` (see _state_offsets), inside (K, V) only."""
    offs, mask = _state_offsets(bh, chunk, NT, rows, cols, K, V, PER_CHUNK)
    tl.store(states + offs, value, mask=mask)


@triton.jit
def _chunk_log_decay(g, bh, rows, cols, N, K, GATED: tl.constexpr):
    """(Gam (BT, BK) cumulative log gate within the chunk, Gam_last (BK,)); padded rows add 0.
    Without a gate, g is 0: Gam = 0."""
    if GATED:
        g_tile = _load_tile_f32(g, bh, rows, cols, N, K)
    else:
        g_tile = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    return tl.cumsum(g_tile, axis=0), tl.sum(g_tile, axis=0)


@triton.jit
def _decay_tile(gam, causal_mask):
    """(BT, BT, BK): exp(Gam_j - Gam_i) for i <= j, else 0 (masked before exp: no overflow)."""
    diff = gam[:, None, :] - gam[None, :, :]
    return tl.exp(tl.where(causal_mask[:, :, None], diff, float("-inf")))


@triton.jit
def _intra_scores(q_tile, k_tile, gam, causal_mask, GATED: tl.constexpr, PRECISION: tl.constexpr):
    """Partial A (BT, BT) over one key-channel block, unmasked in the ungated case."""
    if GATED:
        return tl.sum(q_tile[:, None, :] * k_tile[None, :, :] * _decay_tile(gam, causal_mask), axis=2)
    return tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION)


@triton.jit
def _states_fwd(k, v, g, h0, chunk_states, final_state, N, K, V, NT,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                HAS_INITIAL: tl.constexpr, STORE_CHUNKS: tl.constexpr, PRECISION: tl.constexpr):
    # k (BH, N, K), v (BH, N, V), g (BH, N, K) | None, h0 (BH, K, V) fp32 | None
    # -> chunk_states (BH, NT, K, V) fp32: the state before chunk n (only with STORE_CHUNKS, i.e.
    #    causal); final_state (BH, K, V) fp32
    i_k, i_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    keys, vals, t = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    h = tl.zeros([BK, BV], dtype=tl.float32)  # (BK, BV)
    if HAS_INITIAL:
        h = _load_state(h0, bh, 0, NT, keys, vals, K, V, False)
    for n in range(0, NT):
        if STORE_CHUNKS:
            _store_state(chunk_states, h, bh, n, NT, keys, vals, K, V, True)
        rows = n * BT + t
        k_tile = _load_tile_f32(k, bh, rows, keys, N, K)
        if GATED:
            gam, last = _chunk_log_decay(g, bh, rows, keys, N, K, GATED)
            k_tile = k_tile * tl.exp(last[None, :] - gam)
            h = h * tl.exp(last)[:, None]
        h += tl.dot(tl.trans(k_tile), _load_tile_f32(v, bh, rows, vals, N, V), input_precision=PRECISION)
    _store_state(final_state, h, bh, 0, NT, keys, vals, K, V, False)


@triton.jit
def _output_fwd(q, k, v, g, states, out, scale, N, K, V, NT,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    # q, k (BH, N, K), v (BH, N, V), g (BH, N, K) | None,
    # states (BH, NT, K, V) fp32 [causal] or (BH, K, V) final state [non-causal] -> out (BH, N, V) fp32
    i_v, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    vals, t = i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    rows = n * BT + t
    causal_mask = t[:, None] >= t[None, :]
    inter = tl.zeros([BT, BV], dtype=tl.float32)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        keys = kb * BK + tl.arange(0, BK)
        q_tile = _load_tile_f32(q, bh, rows, keys, N, K)
        gam, _ = _chunk_log_decay(g, bh, rows, keys, N, K, GATED)
        if CAUSAL:
            scores += _intra_scores(q_tile, _load_tile_f32(k, bh, rows, keys, N, K), gam, causal_mask, GATED, PRECISION)
        if GATED:
            q_tile = q_tile * tl.exp(gam)
        inter += tl.dot(q_tile, _load_state(states, bh, n, NT, keys, vals, K, V, CAUSAL), input_precision=PRECISION)
    if CAUSAL:
        scores = tl.where(causal_mask, scores, 0.0)
        inter += tl.dot(scores, _load_tile_f32(v, bh, rows, vals, N, V), input_precision=PRECISION)
    _store_tile(out, scale * inter, bh, rows, vals, N, V)


@triton.jit
def _states_bwd(q, g, dout, dfinal, dstates, dh0, scale, N, K, V, NT,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
                HAS_DFINAL: tl.constexpr, STORE_CHUNKS: tl.constexpr, PRECISION: tl.constexpr):
    # q (BH, N, K), g (BH, N, K) | None, dout (BH, N, V), dfinal (BH, K, V) fp32 | None
    # -> dstates (BH, NT, K, V) fp32: gradient of the state after chunk n (only with STORE_CHUNKS);
    #    dh0 (BH, K, V) fp32: gradient of the initial state = of the total state when non-causal
    i_k, i_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    keys, vals, t = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    dh = tl.zeros([BK, BV], dtype=tl.float32)  # (BK, BV)
    if HAS_DFINAL:
        dh = _load_state(dfinal, bh, 0, NT, keys, vals, K, V, False)
    for r in range(0, NT):
        n = NT - 1 - r
        if STORE_CHUNKS:
            _store_state(dstates, dh, bh, n, NT, keys, vals, K, V, True)
        rows = n * BT + t
        q_tile = _load_tile_f32(q, bh, rows, keys, N, K)
        if GATED:
            gam, last = _chunk_log_decay(g, bh, rows, keys, N, K, GATED)
            q_tile = q_tile * tl.exp(gam)
            dh = dh * tl.exp(last)[:, None]
        dh += scale * tl.dot(tl.trans(q_tile), _load_tile_f32(dout, bh, rows, vals, N, V), input_precision=PRECISION)
    _store_state(dh0, dh, bh, 0, NT, keys, vals, K, V, False)


@triton.jit
def _dqk_bwd(q, k, v, g, states, dstates, dout, dq, dk, scale, N, K, V, NT,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
             CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    # q, k (BH, N, K), v, dout (BH, N, V), g (BH, N, K) | None; states / dstates (BH, NT, K, V) fp32
    # [causal] or the final state / dh0 (BH, K, V) [non-causal] -> dq, dk (BH, N, K) fp32
    i_k, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    keys, t = i_k * BK + tl.arange(0, BK), tl.arange(0, BT)
    rows = n * BT + t
    causal_mask = t[:, None] >= t[None, :]
    d_scores = tl.zeros([BT, BT], dtype=tl.float32)
    dq_inter = tl.zeros([BT, BK], dtype=tl.float32)
    dk_inter = tl.zeros([BT, BK], dtype=tl.float32)
    for vb in range(0, tl.cdiv(V, BV)):
        vals = vb * BV + tl.arange(0, BV)
        do_tile, v_tile = _load_tile_f32(dout, bh, rows, vals, N, V), _load_tile_f32(v, bh, rows, vals, N, V)
        h_tile = _load_state(states, bh, n, NT, keys, vals, K, V, CAUSAL)  # (BK, BV)
        dh_tile = _load_state(dstates, bh, n, NT, keys, vals, K, V, CAUSAL)
        if CAUSAL:
            d_scores += tl.dot(do_tile, tl.trans(v_tile), input_precision=PRECISION)
        dq_inter += tl.dot(do_tile, tl.trans(h_tile), input_precision=PRECISION)
        dk_inter += tl.dot(v_tile, tl.trans(dh_tile), input_precision=PRECISION)
    q_tile, k_tile = _load_tile_f32(q, bh, rows, keys, N, K), _load_tile_f32(k, bh, rows, keys, N, K)
    if GATED:
        gam, last = _chunk_log_decay(g, bh, rows, keys, N, K, GATED)
        dq_inter = dq_inter * tl.exp(gam)
        dk_inter = dk_inter * tl.exp(last[None, :] - gam)
    if CAUSAL:
        d_scores = tl.where(causal_mask, d_scores, 0.0)
        if GATED:
            weighted = d_scores[:, :, None] * _decay_tile(gam, causal_mask)
            dq_inter += tl.sum(weighted * k_tile[None, :, :], axis=1)
            dk_inter += scale * tl.sum(weighted * q_tile[:, None, :], axis=0)
        else:
            dq_inter += tl.dot(d_scores, k_tile, input_precision=PRECISION)
            dk_inter += scale * tl.dot(tl.trans(d_scores), q_tile, input_precision=PRECISION)
    _store_tile(dq, scale * dq_inter, bh, rows, keys, N, K)
    _store_tile(dk, dk_inter, bh, rows, keys, N, K)


@triton.jit
def _dv_bwd(q, k, g, dstates, dout, dv, scale, N, K, V, NT,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr,
            CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    # q, k (BH, N, K), g (BH, N, K) | None, dout (BH, N, V); dstates (BH, NT, K, V) fp32 [causal] or
    # dh0 (BH, K, V) [non-causal] -> dv (BH, N, V) fp32
    i_v, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    vals, t = i_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    rows = n * BT + t
    causal_mask = t[:, None] >= t[None, :]
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    dv_tile = tl.zeros([BT, BV], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        keys = kb * BK + tl.arange(0, BK)
        q_tile, k_tile = _load_tile_f32(q, bh, rows, keys, N, K), _load_tile_f32(k, bh, rows, keys, N, K)
        gam, last = _chunk_log_decay(g, bh, rows, keys, N, K, GATED)
        if CAUSAL:
            scores += _intra_scores(q_tile, k_tile, gam, causal_mask, GATED, PRECISION)
        if GATED:
            k_tile = k_tile * tl.exp(last[None, :] - gam)
        dv_tile += tl.dot(k_tile, _load_state(dstates, bh, n, NT, keys, vals, K, V, CAUSAL), input_precision=PRECISION)
    do_tile = _load_tile_f32(dout, bh, rows, vals, N, V)
    if CAUSAL:
        scores = tl.where(causal_mask, scores, 0.0)
        dv_tile += scale * tl.dot(tl.trans(scores), do_tile, input_precision=PRECISION)
    _store_tile(dv, dv_tile, bh, rows, vals, N, V)


def _tiles(K: int, V: int, gated: bool) -> tuple[int, int]:
    """(BK, BV): one small tile under the interpreter; on CUDA up to 64, 32 key channels when gated
    (the decay tile is BT x BT x BK)."""
    if triton_interpreting():
        tile = interpret_tile()
        return tile, tile
    return min(next_pow2(K), 32 if gated else 64), min(next_pow2(V), 64)


def _dot_precision(dtype: torch.dtype) -> str:
    """Tiles are upcast to fp32 on load, so every tl.dot sees fp32 operands: exact fp32 products
    ("ieee") for fp32 inputs, tf32 (as precise as the 16-bit inputs) otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


def chunk_linear_fwd(q, k, v, g, initial_state, *, scale: float, causal: bool, chunk_size: int):
    """q, k (B, H, N, K); v (B, H, N, V); g (B, H, N, K) | None; initial_state (B, H, K, V) | None.
    Returns out (B, H, N, V) fp32, chunk_states (B, H, NT, K, V) fp32 (None when non-causal: every
    chunk reads the final state) and the final state (B, H, K, V) fp32."""
    B, H, N, K = q.shape
    V = v.shape[-1]
    q, k, v, g = _flat(q), _flat(k), _flat(v), _flat(g)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    n_chunks = triton.cdiv(N, chunk_size)
    BK, BV = _tiles(K, V, g is not None)
    chunk_states = new_output((B, H, n_chunks, K, V), torch.float32, q.device) if causal else None
    final = new_output((B, H, K, V), torch.float32, q.device)
    out = new_output((B, H, N, V), torch.float32, q.device)
    common = dict(BT=chunk_size, BK=BK, BV=BV, GATED=g is not None, PRECISION=_dot_precision(q.dtype))
    _states_fwd[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
        k, v, g, h0, chunk_states, final, N, K, V, n_chunks, HAS_INITIAL=h0 is not None, STORE_CHUNKS=causal,
        **common)
    _output_fwd[(triton.cdiv(V, BV), n_chunks, B * H)](
        q, k, v, g, chunk_states if causal else final, out, scale, N, K, V, n_chunks, CAUSAL=causal, **common)
    return out, chunk_states, final


def chunk_linear_bwd(q, k, v, g, chunk_states, final_state, do, dfinal, *, scale: float, causal: bool,
                     chunk_size: int):
    """Gradients (dq, dk, dv, dh0), all fp32, of `chunk_linear_fwd` for do (B, H, N, V) and dfinal
    (B, H, K, V) | None."""
    B, H, N, K = q.shape
    V = v.shape[-1]
    q, k, v, g, do = _flat(q), _flat(k), _flat(v), _flat(g), _flat(do)
    dfinal = None if dfinal is None else dfinal.float().contiguous()
    n_chunks = triton.cdiv(N, chunk_size)
    BK, BV = _tiles(K, V, g is not None)
    dstates = new_output((B, H, n_chunks, K, V), torch.float32, q.device) if causal else None
    dh0 = new_output((B, H, K, V), torch.float32, q.device)
    dq, dk = (new_output((B, H, N, K), torch.float32, q.device) for _ in range(2))
    dv = new_output((B, H, N, V), torch.float32, q.device)
    common = dict(BT=chunk_size, BK=BK, BV=BV, GATED=g is not None, PRECISION=_dot_precision(q.dtype))
    _states_bwd[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
        q, g, do, dfinal, dstates, dh0, scale, N, K, V, n_chunks, HAS_DFINAL=dfinal is not None, STORE_CHUNKS=causal,
        **common)
    states, dstates = (chunk_states, dstates) if causal else (final_state, dh0)
    _dqk_bwd[(triton.cdiv(K, BK), n_chunks, B * H)](
        q, k, v, g, states, dstates, do, dq, dk, scale, N, K, V, n_chunks, CAUSAL=causal, **common)
    _dv_bwd[(triton.cdiv(V, BV), n_chunks, B * H)](
        q, k, g, dstates, do, dv, scale, N, K, V, n_chunks, CAUSAL=causal, **common)
    return dq, dk, dv, dh0
