"""seerattention - learned block gate (Gao et al., SeerAttention, arXiv 2410.13276).

1. Score every (query block, key block) pair: an `AttnGate` (block-pooled q and k through small
   per-head linear maps, RoPE at block positions, block-causal softmax; the official gate layouts,
   `load_official_gates` loads their weights), a tensor of scores, or without a gate the oracle: the
   block max-pooled attention map (`block_attention_target`).
2. Select: blocks scoring at least `threshold`, or the top ceil(topk_ratio * admissible) of each row
   (neither given: threshold DEFAULT_THRESHOLD, the official README's prefill setting); the diagonal
   blocks and the last `last_blocks_dense` query-block rows are always kept.
3. Run the block-sparse flash kernel on the chosen blocks (gradients to q, k, v).

Training (self-distillation, base model frozen): `block_attention_target(q, k, block_size, causal)`
is the row-normalised block max-pooled softmax map, and `gate_loss(gate.logits(q, k), target)` the
KL divergence the gate minimises (averaged over every element by default, as the official
`torch.nn.KLDivLoss()`). Blocks are per query head; `block_size` is the query and key block.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from ..block_mask import BlockMask
from ..geometry import block_geometry, num_blocks
from ..ops.block_target import block_max_probs
from ..ops.dispatch import resolve
from ..ops.flash import flash_attention, ran_blocks
from ..validation import (check_bool, check_finite, check_int, check_optional, check_power_of_two, check_real,
                          check_softcap, check_tensor, check_window)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_THRESHOLD = 5e-4  # the official README's prefill example ("typical range 5e-4 ~ 5e-3")
POOLS = ("max", "min", "avg")  # the official AttnGate's pooling kinds, in its class names' order
LOSS_REDUCTIONS = ("mean", "sum", "rows")


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------


def seerattention(q, k, v, *, causal: bool, scale: float, backend: str, gate=None, threshold=None, topk_ratio=None,
                  block_size: int = 64, last_blocks_dense: int = 2, window_size=(-1, -1), softcap: float = 0.0,
                  return_block_mask: bool = False, pack=None):
    """Block-sparse attention over the blocks a gate (or the oracle map) chooses.

    q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) -> out (B, Hq, N, Dv), and the `BlockMask`
    (B, Hq, nQB, nKB) with `return_block_mask`. `gate`: None (oracle scores), an `AttnGate` (or any
    callable gate(q, k, causal=...)), or scores (B|1, Hq|1, nQB, nKB). `pack`: the sequences of a packed
    call, each scored and selected on its own grid (gate scores: the pack's grid (S, Hq|1, ...)),
    then one attention launch."""
    threshold, topk_ratio, block_size, last_blocks_dense = _check_selection(threshold, topk_ratio, block_size,
                                                                            last_blocks_dense)
    window, softcap = check_window(window_size), check_softcap(softcap)
    return_block_mask = check_bool("return_block_mask", return_block_mask)
    lengths = (q.shape[2], k.shape[2]) if pack is None else (pack.q_lengths, pack.k_lengths)
    scores = block_scores(q, k, gate, block_size=block_size, causal=causal, scale=scale, backend=backend, pack=pack)
    keep = select_blocks(scores, *lengths, block_size=block_size, causal=causal, threshold=threshold,
                         topk_ratio=topk_ratio, last_blocks_dense=last_blocks_dense)
    block_mask = BlockMask(keep, block_size)
    out, _ = flash_attention(q, k, v, scale=scale, causal=causal, window_size=window, softcap=softcap,
                             block_mask=block_mask, backend=backend, pack=pack)
    if return_block_mask:
        return out, ran_blocks(block_mask, q, k, causal=causal, window=window, pack=pack)
    return out


def block_scores(q, k, gate, *, block_size: int, causal: bool, scale: float, backend: str,
                 pack=None) -> torch.Tensor:
    """Scores (B|1, Hq|1, nQB, nKB) that rank the blocks: the gate's probabilities or the oracle map.
    For a pack: (S, Hq|1, nQB, nKB) over the longest sequences' grid (a gate module scores each
    sequence on its own; given scores are the pack's grid, ceil(max_seqlen / block_size) blocks)."""
    B, Hq, N, _ = q.shape
    M = k.shape[2]
    if pack is None:
        shape = ((1, B), (1, Hq), num_blocks(N, block_size), num_blocks(M, block_size))
    else:
        shape = (len(pack), (1, Hq), num_blocks(pack.max_q, block_size), num_blocks(pack.max_k, block_size))
    with torch.no_grad():
        if gate is None:
            return block_attention_target(q, k, block_size, causal, scale=scale, backend=backend, pack=pack)
        if isinstance(gate, torch.Tensor):
            check_tensor("gate", gate, shape=shape, like=q, dtype=_FLOATS)
            check_finite("gate", gate, allow_inf=True)  # scores rank blocks: -inf never wins
            if pack is not None:  # the grid the kernels walk: that of the longest sequences
                gate = gate[..., :num_blocks(max(pack.q_lengths), block_size), :num_blocks(max(pack.k_lengths),
                                                                                           block_size)]
            return gate
        if pack is not None:
            return _per_sequence_gate(q, k, gate, block_size=block_size, causal=causal, scale=scale,
                                      backend=backend, pack=pack)
        if not callable(gate):
            raise TypeError(f"gate must be None, an AttnGate (a callable gate(q, k, causal=...)) or a tensor of "
                            f"block scores, got {type(gate).__name__}")
        gate_block = getattr(gate, "block_size", block_size)
        if gate_block != block_size:
            raise ValueError(f"gate has block_size={gate_block} but the call uses block_size={block_size}; "
                             f"they must match")
        scores = gate(q, k, causal=causal)
        check_tensor("gate(q, k)", scores, shape=shape, like=q, dtype=_FLOATS)
        return scores


def _per_sequence_gate(q, k, gate, *, block_size: int, causal: bool, scale: float, backend: str, pack):
    """A gate module's scores for each sequence of a pack, in the pack's grid (0 past each sequence)."""
    grid = q.new_zeros(len(pack), q.shape[1], num_blocks(max(pack.q_lengths), block_size),
                       num_blocks(max(pack.k_lengths), block_size), dtype=torch.float32)
    for s, (n, m) in enumerate(zip(pack.q_lengths, pack.k_lengths)):
        if n and m:
            own = block_scores(q[:, :, pack.q_span(s)], k[:, :, pack.k_span(s)], gate, block_size=block_size,
                               causal=causal, scale=scale, backend=backend)
            grid[s, :, :own.shape[2], :own.shape[3]] = own[0]
    return grid


def select_blocks(scores: torch.Tensor, n, m, *, block_size: int, causal: bool, threshold=None,
                  topk_ratio=None, last_blocks_dense: int = 2) -> torch.Tensor:
    """Bool (B|1, H|1, nQB, nKB): blocks scoring >= `threshold` or in each row's top
    ceil(topk_ratio * admissible), plus the diagonal blocks and the last `last_blocks_dense` rows,
    restricted to the admissible blocks (those holding a visible key). Neither threshold nor topk_ratio:
    threshold DEFAULT_THRESHOLD. For a pack, n and m are the per-sequence lengths and scores the pack's
    grid (S, H|1, nQB, nKB): every rule applies to each sequence's own grid."""
    admissible, _ = block_geometry(n, m, block_size, block_size, causal=causal, device=scores.device)
    if threshold is None and topk_ratio is None:
        threshold = DEFAULT_THRESHOLD
    if threshold is not None:
        keep = scores >= threshold
    else:
        keep = _top_blocks(scores, admissible, topk_ratio)
    keep = keep | diagonal_blocks(n, m, block_size, causal=causal, device=scores.device)
    if last_blocks_dense > 0:  # the last rows of each sequence's own grid
        rows = torch.arange(keep.shape[-2], device=scores.device)[:, None]
        if isinstance(n, (tuple, list)):
            n_qb = torch.tensor([num_blocks(x, block_size) for x in n], device=scores.device)[:, None, None, None]
        else:
            n_qb = num_blocks(n, block_size)
        keep = keep | (rows >= n_qb - last_blocks_dense)
    return keep & admissible


def _top_blocks(scores: torch.Tensor, admissible: torch.Tensor, topk_ratio: float) -> torch.Tensor:
    """Each row's ceil(topk_ratio * admissible count) highest-scoring admissible blocks (ties: lower index)."""
    count = admissible.sum(dim=-1, dtype=torch.float64)  # (nQB,), for a pack (S, 1, nQB)
    # ratio * count may land a rounding error above an integer (0.3 * 10); do not let that add a block
    wanted = torch.ceil(topk_ratio * count - 1e-9).clamp(min=1).minimum(count)
    ranked = scores.float().masked_fill(~admissible, -math.inf)
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    position = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                                .expand_as(order))  # rank of every block in its row
    return position < wanted[..., None]


def diagonal_blocks(n, m, block_size: int, *, causal: bool, device=None) -> torch.Tensor:
    """Bool (nQB, nKB): the key blocks holding each query's diagonal key i + (M - N) (bottom-right
    aligned; clamped at key 0 when not causal), so every query that can see a key sees one. A query
    block's diagonal keys are consecutive, so its blocks are one run; built from shapes alone (no
    data-dependent indexing: it runs on the meta device and under torch.compile). For a pack (n, m the
    per-sequence lengths): (S, 1, nQB, nKB) over the longest sequences' grid."""
    if not isinstance(n, (tuple, list)):
        return _diagonal_blocks(n, m, num_blocks(n, block_size), num_blocks(m, block_size), block_size, causal,
                                device)
    n_t, m_t = (torch.tensor(x, device=device)[:, None, None, None] for x in (n, m))
    return _diagonal_blocks(n_t, m_t, num_blocks(max(n), block_size), num_blocks(max(m), block_size), block_size,
                            causal, device)


def _diagonal_blocks(n, m, n_qb: int, n_kb: int, block_size: int, causal: bool, device) -> torch.Tensor:
    first_query = torch.arange(n_qb, device=device)[:, None] * block_size  # (nQB, 1)
    first_diag = first_query + (m - n)
    last_diag = torch.clamp(first_query + block_size, max=n) - 1 + (m - n)
    seen = last_diag >= 0 if causal else True  # causal queries before the first key have no diagonal key
    first_diag, last_diag = first_diag.clamp(min=0), last_diag.clamp(min=0)  # both stay <= M - 1
    key = torch.arange(n_kb, device=device)[None, :]  # (1, nKB)
    return (key >= first_diag // block_size) & (key <= last_diag // block_size) & seen


def _check_selection(threshold, topk_ratio, block_size, last_blocks_dense) -> tuple:
    """The validated (threshold, topk_ratio, block_size, last_blocks_dense); numbers may be Python,
    numpy or 0-d tensor scalars."""
    if threshold is not None and topk_ratio is not None:
        raise ValueError(f"seerattention selects blocks by at most one of threshold (keep gate probability >= "
                         f"threshold) or topk_ratio (keep that share of each row; neither: threshold "
                         f"{DEFAULT_THRESHOLD}); got threshold={threshold!r}, topk_ratio={topk_ratio!r}")
    threshold = check_optional(check_real, "threshold", threshold, low=0.0, high=1.0)
    topk_ratio = check_optional(check_real, "topk_ratio", topk_ratio, low=0.0, low_open=True, high=1.0)
    last_blocks_dense = check_int("last_blocks_dense", last_blocks_dense, low=0)
    return threshold, topk_ratio, _check_block_size(block_size), last_blocks_dense


def _check_block_size(block_size) -> int:
    """SeerAttention's one block size (queries and keys): a power of two >= 16."""
    return check_power_of_two("block_size", block_size, low=16)


# ---------------------------------------------------------------------------------------------------
# Distillation target and loss
# ---------------------------------------------------------------------------------------------------


def block_attention_target(q: torch.Tensor, k: torch.Tensor, block_size: int, causal: bool, *, scale=None, lse=None,
                           backend: str = "auto", pack=None) -> torch.Tensor:
    """The gate's training target (B, Hq, nQB, nKB) fp32: the softmax(scale q k^T) map max-pooled over
    (block x block) tiles, each row normalised to sum 1 (rows that see no key: 0). No gradient.

    Two passes, never N x M: the flash forward for each row's logsumexp (pass `lse` (B, Hq, N) when
    the caller already has it), then a pass that turns every score tile into probabilities and pools.
    q (B, Hq, N, D), k (B, Hk, M, D); scale defaults to D ** -0.5; causal is bottom-right aligned.
    `pack` (attnzoo.geometry.Pack): every sequence's map at once, (S, Hq, nQB, nKB) over the longest
    sequences' grid, two kernel launches for the whole pack."""
    _check_block_size(block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve(backend, q.device, ("triton", "torch"), "block_attention_target")
    if lse is not None:
        check_tensor("lse", lse, shape=tuple(q.shape[:3]), like=q, dtype=torch.float32)
    with torch.no_grad():
        if lse is None:
            values = k[..., :1]  # the forward needs some v; a 1-wide view of k costs next to nothing
            _, lse = flash_attention(q, k, values, scale=scale, causal=causal, backend=backend, pack=pack)
        pooled = block_max_probs(q, k, lse, scale=scale, causal=causal, block_size=block_size, backend=backend,
                                 pack=pack)
        return pooled / pooled.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def gate_loss(gate_logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The KL divergence of softmax(gate_logits) from target, elementwise target * (log target -
    log_softmax(gate_logits)), reduced by `reduction`: "mean" over every element (the official
    `torch.nn.KLDivLoss()` default), "sum", or "rows": summed over key blocks and averaged over the rows
    that have a target (rows with none, e.g. causal queries before the first key, are skipped).
    gate_logits may hold -inf at inadmissible blocks, where the target is 0. Both (..., nQB, nKB).
    (The official training also drops the first quarter of the query-block rows: slice before.)"""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    live = target.sum(dim=-1, keepdim=True) > 0
    logits = gate_logits if gate_logits.dtype == torch.float64 else gate_logits.float()
    log_probs = torch.log_softmax(logits.masked_fill(~live, 0.0), dim=-1)
    kl = torch.xlogy(target, target) - target * log_probs.masked_fill(target == 0, 0.0)
    if reduction == "mean":
        return kl.sum() / kl.numel()
    if reduction == "sum":
        return kl.sum()
    return kl.sum() / live.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------------


class AttnGate(torch.nn.Module):
    """SeerAttention's prefill gate: block probabilities (B, Hq, nQB, nKB) from (pre-RoPE) q and k, in
    the layouts of the official `AttnGate` (SeerAttention, seer_attn/prefill_sparse/attn_gate.py).

    q is pooled per block by `q_pooling`, k by `k_pooling` (kinds "max", "min", "avg", concatenated in
    the order given; a ragged last block pools its valid tokens). With a q projection, per-head linear
    maps without bias take them to `hidden` dims: q_proj (Hq, |q_pooling| D, hidden), k_proj
    (Hk, |k_pooling| D, hidden). Without one the pooled q is the gate query as it is (one q pool and
    hidden == head_dim) and k_proj (Hq, |k_pooling| D, hidden) maps each query head's kv head. `q_proj`
    None decides as the official does: a q projection unless Q uses one pool and hidden == head_dim
    (so none for the released Qavg gates on D = 128); True always (the official force_double).
    RoPE at each block's first token position (queries bottom-right aligned: query i sits at
    position i + M - N), from `rope`: a cos/sin provider rope(x, position_ids (1, L)) -> (cos, sin),
    each (1, L, R) with R <= hidden rotated rotate-half style (the rest passes), such as the model's
    HF rotary embedding module (its theta and rope_scaling); None: rotate-half RoPE with base
    `rope_base`. kv heads are repeated over their query group; logits qg kg^T / sqrt(hidden) with
    inadmissible (future) blocks at -inf; softmax over key blocks, so future blocks get exactly 0 and
    rows sum to 1 (rows with no admissible block are all 0).
    """

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int, hidden: int = 128, block_size: int = 64,
                 rope_base: float = 10000.0, *, q_pooling=("avg",), k_pooling=("max", "min", "avg"), q_proj=None,
                 rope=None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if hidden % 2:
            raise ValueError(f"hidden must be even (RoPE rotates pairs), got {hidden}")
        _check_block_size(block_size)
        if q_proj is not None and not isinstance(q_proj, bool):
            raise TypeError(f"q_proj must be None (the official rule), True or False, got {q_proj!r}")
        if rope is not None and not callable(rope):
            raise TypeError(f"rope must be None or a cos/sin provider rope(x, position_ids), got {type(rope).__name__}")
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        self.hidden, self.block_size, self.rope_base = hidden, block_size, rope_base
        self.q_pooling, self.k_pooling = _check_pooling("q_pooling", q_pooling), _check_pooling("k_pooling", k_pooling)
        q_width, k_width = len(self.q_pooling) * head_dim, len(self.k_pooling) * head_dim
        project_q = (len(self.q_pooling) > 1 or hidden != head_dim) if q_proj is None else q_proj
        if not project_q and q_width != hidden:
            raise ValueError(f"q_proj=False uses the pooled q as the gate query: it needs one q pool and hidden == "
                             f"head_dim, got q_pooling={self.q_pooling}, hidden={hidden}, head_dim={head_dim}")
        self.q_proj = torch.nn.Parameter(torch.empty(num_heads, q_width, hidden)) if project_q else None
        self.k_proj = torch.nn.Parameter(torch.empty(num_kv_heads if project_q else num_heads, k_width, hidden))
        self.rope = Rotary(hidden, rope_base) if rope is None else rope
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.q_proj is not None:
            torch.nn.init.normal_(self.q_proj, std=self.q_proj.shape[1] ** -0.5)
        torch.nn.init.normal_(self.k_proj, std=self.k_proj.shape[1] ** -0.5)

    def logits(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
        """Gate logits (B, Hq, nQB, nKB), -inf at blocks holding no visible key (feed to `gate_loss`)."""
        self._check_inputs(q, k)
        N, M = q.shape[2], k.shape[2]
        group = self.num_heads // self.num_kv_heads
        dtype = self.k_proj.dtype
        gate_q = pool_blocks(q.to(dtype), self.block_size, self.q_pooling)  # (B, Hq, nQB, |q_pooling| D)
        if self.q_proj is not None:
            gate_q = torch.einsum("bhnd,hde->bhne", gate_q, self.q_proj)  # (B, Hq, nQB, hidden)
        pooled_k = pool_blocks(k.to(dtype), self.block_size, self.k_pooling)  # (B, Hk, nKB, |k_pooling| D)
        if self.k_proj.shape[0] != self.num_kv_heads:  # one k projection per query head
            pooled_k = pooled_k.repeat_interleave(group, dim=1)
        gate_k = torch.einsum("bhnd,hde->bhne", pooled_k, self.k_proj)  # (B, Hk or Hq, nKB, hidden)
        block_starts_q = torch.arange(gate_q.shape[2], device=q.device) * self.block_size + (M - N)
        block_starts_k = torch.arange(gate_k.shape[2], device=q.device) * self.block_size
        gate_q = self._rotate(gate_q, block_starts_q)
        gate_k = self._rotate(gate_k, block_starts_k).repeat_interleave(self.num_heads // gate_k.shape[1], dim=1)
        logits = gate_q @ gate_k.transpose(-1, -2) / math.sqrt(self.hidden)  # (B, Hq, nQB, nKB)
        admissible, _ = block_geometry(N, M, self.block_size, self.block_size, causal=causal, device=q.device)
        return logits.masked_fill(~admissible, -math.inf)

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
        """Block probabilities (B, Hq, nQB, nKB): rows sum to 1, future blocks exactly 0."""
        logits = self.logits(q, k, causal=causal)
        live = torch.isfinite(logits).any(dim=-1, keepdim=True)
        return torch.softmax(logits.masked_fill(~live, 0.0), dim=-1) * live

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE of x (B, H, L, hidden) at token `positions` (L,), cos/sin from the provider."""
        cos, sin = self.rope(x, positions[None])
        rotated = cos.shape[-1]
        if cos.shape[-2] != x.shape[2] or rotated > x.shape[-1] or rotated % 2:
            raise ValueError(f"rope returned cos of shape {tuple(cos.shape)}; expected (1, {x.shape[2]}, R) with "
                             f"an even R <= hidden ({x.shape[-1]})")
        return apply_rotary(x, cos[:, None].to(x.dtype), sin[:, None].to(x.dtype))

    def _check_inputs(self, q, k) -> None:
        for name, t, heads in (("q", q, self.num_heads), ("k", k, self.num_kv_heads)):
            if t.dim() != 4 or t.shape[1] != heads or t.shape[-1] != self.head_dim:
                raise ValueError(f"AttnGate: {name} must have shape (B, {heads}, L, {self.head_dim}), "
                                 f"got {tuple(t.shape)}")


def _check_pooling(name: str, kinds) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(POOLS):
        raise ValueError(f"{name} must be distinct kinds out of {POOLS}, at least one, got {kinds!r}")
    return kinds


def official_gate(gate_type: str, head_dim: int, num_heads: int, num_kv_heads: int, *, hidden: int = 128,
                  block_size: int = 64, force_double: bool = False, rope=None) -> AttnGate:
    """The AttnGate of an official gate type (`seerattn_gate_type`, e.g. "Qavg_Kmaxminavg", the
    official default): its poolings, and its q-projection rule (`force_double` forces one)."""
    match = re.fullmatch(r"Q((?:max|min|avg)+)_K((?:max|min|avg)+)", gate_type) if isinstance(gate_type, str) else None
    if match is None:
        raise ValueError(f"gate_type must name poolings as the official classes do, e.g. 'Qavg_Kmaxminavg', "
                         f"got {gate_type!r}")
    q_pooling, k_pooling = (tuple(re.findall("max|min|avg", part)) for part in match.groups())
    return AttnGate(head_dim, num_heads, num_kv_heads, hidden=hidden, block_size=block_size, q_pooling=q_pooling,
                    k_pooling=k_pooling, q_proj=True if force_double else None, rope=rope)


_OFFICIAL_WEIGHTS = {"mask_linear_q.weight": "q_proj", "mask_linear_k.weight": "k_proj"}


def load_official_gates(gates: torch.nn.Module, state_dict: dict) -> None:
    """Copy official SeerAttention gate weights into attnzoo gates, in place.

    `state_dict` holds the official names: `<prefix>mask_linear_q.weight` (absent in the layouts
    without a q projection) and `<prefix>mask_linear_k.weight`, (heads, in, hidden) as attnzoo's
    q_proj / k_proj; the released `attn_gate_weights.pth` keys them
    `model.layers.<i>.self_attn.attn_gate.`. `gates` is one AttnGate (the state dict then holds one
    gate, any prefix) or a module holding AttnGates, such as a model patched with seerattention: each
    gate takes the weights of the `layers.<i>` in its own module name. Raises ValueError for a key that
    is no gate weight, a gate without weights (or weights without a gate) and a layout or shape that
    does not match (build the gates with `official_gate` or AttnGate's q_proj / pooling options)."""
    by_layer: dict = {}
    for key, tensor in state_dict.items():
        name = next((n for n in _OFFICIAL_WEIGHTS if key == n or key.endswith("." + n)), None)
        if name is None:
            raise ValueError(f"state_dict key {key!r} is not an official gate weight (expected names ending in "
                             f"{sorted(_OFFICIAL_WEIGHTS)})")
        by_layer.setdefault(_layer_of(key), {})[_OFFICIAL_WEIGHTS[name]] = tensor
    if isinstance(gates, AttnGate):
        if len(by_layer) != 1:
            raise ValueError(f"one AttnGate takes one gate's weights, the state_dict holds {len(by_layer)} "
                             f"(layers {sorted(by_layer, key=str)})")
        targets = {next(iter(by_layer)): gates}
    else:
        targets = {_layer_of(name + "."): m for name, m in gates.named_modules() if isinstance(m, AttnGate)}
    if set(targets) != set(by_layer):
        raise ValueError(f"gates and state_dict do not pair up: gates at layers {sorted(targets, key=str)}, "
                         f"weights for layers {sorted(by_layer, key=str)}")
    for layer, gate in targets.items():
        _load_gate(gate, by_layer[layer], layer)


def _layer_of(name: str):
    """The i of `layers.<i>.` in a module or parameter name, or None."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _load_gate(gate: AttnGate, weights: dict, layer) -> None:
    for attr in ("q_proj", "k_proj"):
        param, tensor = getattr(gate, attr), weights.get(attr)
        if (param is None) != (tensor is None):
            raise ValueError(f"layer {layer}: the gate {'has no' if param is None else 'has a'} {attr} but the "
                             f"state_dict {'has' if tensor is not None else 'has none'} (mask_linear_"
                             f"{attr[0]}.weight); build the gate in the official layout (official_gate)")
        if param is None:
            continue
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"layer {layer}: mask_linear_{attr[0]}.weight has shape {tuple(tensor.shape)}, the gate's "
                             f"{attr} {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)


def pool_blocks(x: torch.Tensor, block_size: int, kinds: tuple[str, ...]) -> torch.Tensor:
    """x (B, H, L, D) -> (B, H, ceil(L / block), D * len(kinds)): per block of `block_size` tokens the
    "avg", "max" or "min" over its valid tokens, concatenated in the order of `kinds`."""
    B, H, L, D = x.shape
    n_blocks = num_blocks(L, block_size)
    valid = (torch.arange(n_blocks * block_size, device=x.device) < L).reshape(n_blocks, block_size, 1)
    blocks = F.pad(x, (0, 0, 0, n_blocks * block_size - L)).reshape(B, H, n_blocks, block_size, D)
    pools = {
        "avg": lambda: blocks.sum(dim=3) / valid.sum(dim=1),
        "max": lambda: blocks.masked_fill(~valid, -math.inf).amax(dim=3),
        "min": lambda: blocks.masked_fill(~valid, math.inf).amin(dim=3),
    }
    return torch.cat([pools[kind]() for kind in kinds], dim=-1)


class Rotary:
    """The default cos/sin provider: rotate-half RoPE over `dim` dims, frequencies base^(-2i/dim).
    rotary(x, position_ids (1, L)) -> (cos, sin) (1, L, dim) in x's dtype (angles in float64: positions
    are large), the call and layout of an HF rotary embedding module."""

    def __init__(self, dim: int, base: float):
        self.dim, self.base = dim, base

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor):
        half = self.dim // 2
        inv_freq = self.base ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
        angles = position_ids.to(torch.float64)[..., None] * inv_freq  # (1, L, dim / 2)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first R = cos.shape[-1] dims of x (..., L, E) (the rest passes):
    x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) for the halves x1, x2 of those R dims."""
    rotated, rest = x[..., :cos.shape[-1]], x[..., cos.shape[-1]:]
    x1, x2 = rotated.chunk(2, dim=-1)
    return torch.cat([rotated * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)


# ---------------------------------------------------------------------------------------------------
# attnzoo check hooks
# ---------------------------------------------------------------------------------------------------


def example_kwargs(q, k, v, *, causal: bool) -> dict:
    """Oracle scores, half of each row's admissible blocks."""
    return {"topk_ratio": 0.5}

