"""Context-parallel forms of the linear methods: state passing across the chunks, in sequence order.

Each rank turns its shard into the method's features (identity, Taylor, conv + ELU, wavelets +
random features) exactly as on one device, then for each of its chunks computes the state its
tokens leave when starting from zero, and the chunk's total log decay:

    S_c = sum_t exp(G_end - G_t) k_t^T [v_t, 1]        a_c = G_end     (G = cumulative log gate)

One all_gather gives every rank every chunk's (S_c, a_c). Causal: chunk c starts from
h_c = exp(a_{c-1}) h_{c-1} + S_{c-1} (h_0 = the user's initial state or 0); non-causal: from the
sum of the other chunks' states. The chunk then runs on the linear op with initial_state = h_c, so
its output equals the single-device one; gradients flow back through the gathered states (the
gather's backward sums every rank's gradient for a chunk's state on the rank that owns it).
LAWCAT's causal convolution reads the last r raw q / k tokens of the previous chunk (a halo,
gathered the same way); WERSA's Haar filter stays inside blocks of 2**levels tokens, so chunks
must be multiples of that size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..methods import at_least_fp32
from ..methods import based as _based
from ..methods import gla as _gla
from ..methods import lawcat as _lawcat
from ..methods import wersa as _wersa
from ..ops.linear import linear_attention
from ..validation import check_bool, check_positive, check_tensor
from .layout import Layout, all_gather, chunks_in_order


class ChunkInputs(NamedTuple):
    """One chunk's inputs to the linear op."""

    q: torch.Tensor  # (B, H, c, F) features
    k: torch.Tensor  # (B, H, c, F)
    v: torch.Tensor  # (B, H, c, V)
    g: torch.Tensor | None  # (B, H, c, F) log forget gates


def _chunked(layout: Layout, q, k, v, g=None) -> list[ChunkInputs]:
    gates = [None] * len(layout.chunk_ids()) if g is None else layout.local_chunks(g)
    return [ChunkInputs(*parts) for parts in zip(*(layout.local_chunks(x) for x in (q, k, v)), gates)]


def _chunk_state(chunk: ChunkInputs, normalize: bool) -> torch.Tensor:
    """(B, H, F, V' + 1) fp32: the state S_c (columns :V', V' = V + 1 with the normaliser column) and
    the chunk's log decay a_c per key channel (last column; 0 without gates)."""
    values = chunk.v.float()
    if normalize:
        values = torch.cat([values, torch.ones_like(values[..., :1])], dim=-1)
    keys = chunk.k.float()
    log_decay = keys.new_zeros(keys.shape[:2] + keys.shape[-1:])  # (B, H, F)
    if chunk.g is not None:
        cumulative = chunk.g.float().cumsum(dim=2)
        log_decay = cumulative[:, :, -1]
        keys = keys * (log_decay[:, :, None] - cumulative).exp()
    state = keys.transpose(-1, -2) @ values
    return torch.cat([state, log_decay[..., None]], dim=-1)


def _prefix_states(states: torch.Tensor, log_decays: torch.Tensor, initial) -> torch.Tensor:
    """(C + 1, ...): the state before each chunk and after the last (causal); states (C, B, H, F, V'),
    log_decays (C, B, H, F)."""
    h = torch.zeros_like(states[0]) if initial is None else initial
    prefix = [h]
    for state, log_decay in zip(states, log_decays):
        h = log_decay.exp()[..., None] * h + state
        prefix.append(h)
    return torch.stack(prefix)


def _other_states(states: torch.Tensor, chunk: int) -> torch.Tensor:
    """The sum of every chunk's state but `chunk`'s (non-causal)."""
    others = (torch.arange(states.shape[0], device=states.device) != chunk).to(states.dtype)
    return torch.einsum("c,c...->...", others, states)


def _user_state(packed: torch.Tensor, normalize: bool):
    """Packed (B, H, F, V[+1]) -> the linear op's initial_state form: S, or (S, z) when normalised."""
    packed = packed.contiguous()
    return (packed[..., :-1], packed[..., -1]) if normalize else packed


def state_passing(chunks: list[ChunkInputs], layout: Layout, *, causal: bool, normalize: bool,
                  initial_state=None, **op) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The local output (B, H, n, V) (chunks in shard order) and, when causal, the packed state after
    the whole sequence. `op`: scale, backend, eps, chunk_size of the linear op."""
    local = torch.stack([_chunk_state(c, normalize) for c in chunks])  # (slots, B, H, F, V' + 1)
    everyone = chunks_in_order(all_gather(local, layout), layout)  # (C, B, H, F, V' + 1)
    states, log_decays = everyone[..., :-1], everyone[..., -1]
    mine = layout.chunk_ids()
    if causal:  # read from the stacked prefix, so that every rank's graph reaches the gather
        prefix = _prefix_states(states, log_decays, initial_state)
        starts, final = [prefix[c] for c in mine], prefix[-1]
    else:
        starts, final = [_other_states(states, c) for c in mine], None
    outs = [linear_attention(c.q, c.k, c.v, g=c.g, causal=causal, normalize=normalize,
                             initial_state=_user_state(h, normalize), **op)
            for c, h in zip(chunks, starts)]
    return torch.cat(outs, dim=2), final


def gla(q, k, v, *, causal, scale, backend, layout, chunk_size=None, g=None, initial_state=None,
        output_final_state=False):
    """`g` is sharded like q; `initial_state` (the sequence's) is the same on every rank, and the
    final state returned with `output_final_state` is the sequence's, on every rank."""
    _gla.check_gla_inputs(q, causal, g, k.shape[2])
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(*q.shape[:2], q.shape[-1], v.shape[-1]), like=q,
                     dtype=torch.float32)
    out, final = state_passing(_chunked(layout, q, k, v, g), layout, causal=True, normalize=False,
                               initial_state=initial_state, scale=scale, backend=backend, chunk_size=chunk_size)
    return (out, final) if output_final_state else out


def based(q, k, v, *, causal, scale, backend, layout, use_norm=True, eps=1e-6, chunk_size=None):
    _based._check_lengths(q, k)
    use_norm, eps = check_bool("use_norm", use_norm), check_positive("eps", eps)
    phi_q, phi_k = _based._features(q, k, scale)
    out, _ = state_passing(_chunked(layout, phi_q, phi_k, v), layout, causal=causal, normalize=use_norm,
                           scale=1.0, backend=backend, eps=eps, chunk_size=chunk_size)
    return out


def _conv_with_halo(x: torch.Tensor, weight, layout: Layout) -> torch.Tensor:
    """LAWCAT's causal depthwise conv of the local shard x (B, H, n, D): each chunk reads the last r
    raw tokens of the chunk before it (zeros before the sequence)."""
    if weight is None or weight.shape[-1] == 1:
        return _lawcat.causal_depthwise_conv(x, weight)
    reach = weight.shape[-1] - 1
    pieces = layout.local_chunks(x)
    if reach > pieces[0].shape[2]:
        raise ValueError(f"lawcat's conv reaches {reach} tokens back, more than one chunk of {pieces[0].shape[2]} "
                         f"tokens over world size {layout.world}; use fewer ranks or a shorter kernel")
    tails = chunks_in_order(all_gather(torch.stack([p[:, :, -reach:] for p in pieces]), layout), layout)
    before = torch.cat([torch.zeros_like(tails[:1]), tails])  # before[c]: the tail of chunk c - 1
    halos = [before[c] for c in layout.chunk_ids()]
    return torch.cat([_lawcat.causal_depthwise_conv(torch.cat([halo, piece], dim=2), weight)[:, :, reach:]
                      for halo, piece in zip(halos, pieces)], dim=2)


def lawcat(q, k, v, *, causal, scale, backend, layout, feature_map="elu1", eps=1e-6, chunk_size=None, g=None,
           conv_q=None, conv_k=None):
    """`g` (B, H, n) or (B, H, n, D) is sharded like q; conv_q, conv_k are the (unsharded) kernels."""
    _lawcat.check_lawcat_args(q, k, causal, g, conv_q, conv_k, feature_map)
    eps = check_positive("eps", eps)
    phi = _lawcat.feature_map_fn(feature_map)
    phi_q = phi(_conv_with_halo(at_least_fp32(q), conv_q, layout))  # features in fp32 at least, as on one device
    phi_k = phi(_conv_with_halo(at_least_fp32(k), conv_k, layout))
    out, _ = state_passing(_chunked(layout, phi_q, phi_k, v, _lawcat._gate_per_channel(g, q.shape)), layout,
                           causal=True, normalize=True, scale=1.0, backend=backend, eps=eps, chunk_size=chunk_size)
    return out


def _is_power_of_two(x: int) -> bool:
    return x & (x - 1) == 0


def _check_wersa_chunks(n: int, layout: Layout, levels: int, gains) -> None:
    """The Haar filter stays inside aligned blocks of 2**levels tokens; a gains series (B, N, L+1) is
    resampled along the padded length, which matches shard by shard only for power-of-two lengths."""
    if gains is None:
        return
    chunk = layout.chunk_length(n, "q/k/v")
    if chunk % (1 << levels):
        raise ValueError(f"wersa's {levels}-level Haar transform mixes blocks of {1 << levels} tokens; length {n} "
                         f"over world size {layout.world} gives chunks of {chunk}, not a multiple of {1 << levels}")
    local = n // layout.world
    if gains.dim() == 3 and not (_is_power_of_two(n) and _is_power_of_two(local)):
        raise ValueError(f"wersa with a gains series (B, N, levels + 1) needs power-of-two lengths under context "
                         f"parallelism; got length {n} over world size {layout.world} (shards of {local})")


def wersa(q, k, v, *, causal, scale, backend, layout, levels=2, num_features=256, gains=None, seed=0, chunk_size=None):
    """`gains` (L+1,) is the same on every rank; a series (B, N, L+1) is sharded along dim 1."""
    levels, num_features, seed = _wersa.check_wersa_args(q, k, causal, levels, num_features, gains, seed)
    _check_wersa_chunks(q.shape[2] * layout.world, layout, levels, gains)
    filtered_q, filtered_k = (_wersa.wavelet_filter(at_least_fp32(x), levels, gains) for x in (q, k))
    omega = _wersa.wersa_omega(q.shape[-1], num_features, seed, dtype=filtered_q.dtype, device=q.device)
    phi_q, phi_k = (_wersa.random_features(x, omega) for x in (filtered_q, filtered_k))
    out, _ = state_passing(_chunked(layout, phi_q, phi_k, v), layout, causal=False, normalize=True, scale=1.0,
                           backend=backend, eps=_wersa._EPS, chunk_size=chunk_size)
    return out


LINEAR_METHODS = {f.__name__: f for f in (gla, based, lawcat, wersa)}
