"""Run any attnzoo method inside a HuggingFace transformers model.

    import attnzoo
    attnzoo.patch(model, "xattention", threshold=0.9)        # every attention layer
    attnzoo.patch(model, "gla", layers=range(4, 32))          # some layers; the others stay as they were
    attnzoo.unpatch(model)
    with attnzoo.patched(model, "dense"): ...

How it works (see docs/patching.md):
- One function is registered with transformers' `AttentionInterface` under the name "attnzoo"
  ("attnzoo_eager" for models that ran eager attention), and the mask function of the original
  implementation under the same name in `AttentionMaskInterface`, so that padding masks are built and
  reach it. The model's attention implementation is switched to that name.
- Each patched attention module gets a `ZooLayer` submodule (`module.attnzoo`) that holds the bound
  method, its learned parts (if the method has any) and the decoding state. Modules without one (layers
  left out by `layers=`) run the original implementation.
- Padding: the mask is reduced to per-key validity, checked to be exactly "padding (+ causal) (+ a sliding
  window)", and each padded batch row runs on its unpadded tokens alone; padded query rows output zeros, or,
  under eager, what eager gives a query that sees no key. An additive float mask goes whole to dense's bias.
- Keywords: everything the model passes to its attention function is honoured (sliding_window -> window_size,
  softcap, position_bias -> bias, s_aux -> sinks), ignored as bookkeeping (BOOKKEEPING) or refused with an error
  naming it and the layer (call_options); the module's own attention call is checked at patch time
  (check_declared_keywords).

transformers is imported lazily; it is needed only when a model is patched.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn

from . import api, geometry
from .registry import REGISTRY

MIN_TRANSFORMERS = (4, 51)
ATTR = "attnzoo"  # name of the ZooLayer submodule on a patched attention module
NO_WINDOW = (geometry.UNBOUNDED, geometry.UNBOUNDED)
_IMPL_NAMES = {"sdpa": "attnzoo", "eager": "attnzoo_eager"}  # original implementation -> registered name
_MARK = "_attnzoo_original_attn_implementation"  # on the model: the implementation patch() replaced


# ----------------------------------------------------------------------------------------------------
# transformers access (lazy, version-checked)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("attnzoo.patch needs transformers >= 4.51: pip install 'attnzoo[hf]'") from e
    check_transformers_version(transformers.__version__)
    return transformers


def check_transformers_version(version: str) -> None:
    from packaging.version import Version

    if Version(version).release[:2] < MIN_TRANSFORMERS:
        raise ImportError(f"attnzoo.patch needs transformers >= 4.51 (for AttentionInterface); found {version}")


def _register_impl(name: str, original: str) -> None:
    """Register the zoo forward (and, where transformers has one, the original's mask builder) as `name`."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, _make_forward(original))
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds an eager-style float mask for custom names
        return
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])


def _set_impl(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.54
        model.set_attn_implementation(name)
    else:  # read at every forward on 4.51-4.53
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise RuntimeError(
            f"transformers did not switch {type(model).__name__} to attention implementation {name!r} "
            f"(it reports {model.config._attn_implementation!r}); this model cannot be patched"
        )


def _original_function(original: str, module: nn.Module) -> Callable:
    if original == "eager":  # each modeling file defines its own eager_attention_forward
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[original]


# ----------------------------------------------------------------------------------------------------
# finding attention layers


_USES_INTERFACE: dict[type, bool] = {}


def _uses_interface(cls: type) -> bool:
    """True for attention modules whose forward dispatches through transformers' AttentionInterface."""
    if cls not in _USES_INTERFACE:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _USES_INTERFACE[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _USES_INTERFACE[cls]


def attention_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, module) for every attention module that goes through the AttentionInterface.

    The index is the module's `layer_idx` (transformers' numbering) where it has one, else its position in
    `model.modules()` order. Cross-attention modules share their layer's index."""
    found = [m for m in model.modules() if _uses_interface(type(m))]
    return [(m.layer_idx if isinstance(getattr(m, "layer_idx", None), int) else i, m) for i, m in enumerate(found)]


def _select(model: nn.Module, layers: Iterable[int] | None) -> list[tuple[int, nn.Module]]:
    found = attention_layers(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention module that goes through transformers' AttentionInterface; "
            "attnzoo can only patch models that do"
        )
    if layers is None:
        return found
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be an iterable of ints (e.g. range(4, 32)) or None, got {type(layers).__name__}")
    wanted = list(layers)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in wanted):
        raise TypeError(f"layers must contain ints, got {wanted!r}")
    known = sorted({i for i, _ in found})
    missing = sorted(set(wanted) - set(known))
    if missing:
        raise ValueError(f"layers {missing} out of range: the model's attention layers are {known[0]}..{known[-1]}")
    wanted = set(wanted)
    return [(i, m) for i, m in found if i in wanted]


# ----------------------------------------------------------------------------------------------------
# learned parts


class LayerShape(NamedTuple):
    """The geometry of one attention layer, for building a method's learned parts."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int  # the kv heads the method sees: num_heads where they are repeated (see repeats_kv)
    head_dim: int
    config: Any = None  # the layer's model config, for learned parts that follow the model (RoPE)


class LayerInputs(NamedTuple):
    """What a learned part may read at each forward, for one sequence batch (padding already removed).

    q (B, Hq, N, D), k/v (B, Hk, M, D) (Hk = Hq where the method has no GQA: kv heads repeated),
    hidden (B, N, hidden_size): the attention module's input, or None where no adapter asked for it."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor | None


@dataclass(frozen=True)
class Adapter:
    """How patch() gives a method its learned parts.

    build(shape, params) -> nn.Module: one per patched layer (params: the method's bound parameters);
    inputs(module, LayerInputs) -> dict: the method's call-time inputs, computed at every forward;
    gqa: the parts take the layer's kv heads as they are (False: patch() repeats k and v to every query head,
    and builds the parts for that)."""

    build: Callable[[LayerShape, dict[str, Any]], nn.Module]
    inputs: Callable[[nn.Module, LayerInputs], dict[str, Any]]
    gqa: bool = True


_ADAPTERS: dict[str, Adapter] = {}

# Methods whose learned parts live in their own module: (module, class, build, inputs). Resolved on use,
# so that a method whose class is not written yet fails only when it is patched.
_KNOWN_ADAPTERS = {
    "seerattention": (
        "attnzoo.methods.seerattention", "AttnGate",
        lambda cls, s, p: cls(s.head_dim, s.num_heads, s.num_kv_heads, block_size=p["block_size"],
                              rope=_rotary_embedding(s.config)),
        lambda gate, x: {"gate": gate},
    ),
    "gla": (
        "attnzoo.methods.gla", "GLAGate",
        lambda cls, s, p: cls(s.hidden_size, s.num_kv_heads, s.head_dim),  # g decays each kv head's state
        lambda gate, x: {"g": gate(x.hidden)},
    ),
    "lawcat": (
        "attnzoo.methods.lawcat", "LAWCATAdapter",
        lambda cls, s, p: cls(s.num_heads, s.head_dim),
        lambda adapter, x: adapter(x.q, x.k),
    ),
    "wersa": (
        "attnzoo.methods.wersa", "WERSAGates",
        lambda cls, s, p: cls(s.hidden_size, p["levels"]),
        lambda gates, x: {"gains": gates(x.hidden)},
    ),
}


# known parts with one head count for q and k: patch() repeats the kv heads for them
_KNOWN_WITHOUT_GQA = frozenset({"lawcat"})


def register_adapter(method: str, build: Callable, inputs: Callable, *, gqa: bool = True,
                     overwrite: bool = False) -> None:
    """Give `method` learned parts when it is patched into a model (see `Adapter`)."""
    if not callable(build) or not callable(inputs):
        raise TypeError("register_adapter: build and inputs must be callable")
    if method in _ADAPTERS and not overwrite:
        raise ValueError(f"method {method!r} already has an adapter; pass overwrite=True to replace it")
    _ADAPTERS[method] = Adapter(build, inputs, gqa)


def adapter_for(method: str) -> Adapter | None:
    """The learned parts `method` gets when patched, or None if it runs with its parameters alone."""
    if method in _ADAPTERS:
        return _ADAPTERS[method]
    if method not in _KNOWN_ADAPTERS:
        return None
    module_name, class_name, build, inputs = _KNOWN_ADAPTERS[method]
    try:
        cls = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        cls = None
    if cls is None:
        raise NotImplementedError(
            f"patching {method!r} needs its learned parts {module_name}.{class_name}, which does not exist yet"
        )
    return Adapter(lambda shape, params: build(cls, shape, params), inputs, gqa=method not in _KNOWN_WITHOUT_GQA)


def repeats_kv(method: api.Method, adapter: Adapter | None) -> bool:
    """Whether patch() repeats k and v to every query head for `method`: it has no GQA, or its parts do not."""
    return not method.info.supports.gqa or (adapter is not None and not adapter.gqa)


def _layer_shape(module: nn.Module) -> LayerShape:
    config = module.config
    heads = config.num_attention_heads
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    return LayerShape(
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim or config.hidden_size // heads,
        config=config,
    )


def _rotary_embedding(config) -> nn.Module | None:
    """The model's RoPE (theta and rope scaling from its config) as a cos/sin provider rotary(x,
    position_ids), for SeerAttention's gate: a LlamaRotaryEmbedding on the layer's config (the model's
    own for Llama-family configs). None where the config has no single RoPE for all layers (no RoPE,
    or one per layer type as in Gemma 3)."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:
        return None
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config=config)


# ----------------------------------------------------------------------------------------------------
# the per-layer runtime


class ZooLayer(nn.Module):
    """What patch() attaches to one attention module: the method, its learned parts, decoding state."""

    def __init__(self, method: api.Method, *, backend: str, adapter: Adapter | None, shape: LayerShape,
                 where: str):
        super().__init__()
        self.method = method
        self.backend = backend
        self.where = where  # how errors name the layer (see _where)
        family = method.info.family
        self.dense_for_one_query = family == "sparse"  # a single decoding query has nothing to skip
        self.repeats_kv = repeats_kv(method, adapter)
        self.keeps_queries = family == "linear"  # decoding recomputes over the cached sequence
        self.adapter_inputs = adapter.inputs if adapter else None
        self.adapter = adapter.build(shape, dict(method.params)) if adapter else None
        self.enabled = True  # False inside original_attention()
        self.hidden: torch.Tensor | None = None  # the attention module's input of the current forward
        # (q, hidden, keys): the queries (and hidden states) seen so far, and the first and last key
        # they went with, which identify the cached sequence they belong to
        self.history: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None

    def capture(self, module, args, kwargs) -> None:
        """Forward pre-hook on the attention module: keep its hidden states for the learned parts."""
        self.hidden = kwargs.get("hidden_states", args[0] if args else None)

    def forward(self, q, k, v, mask, *, causal: bool, scale: float | None, options: dict[str, Any]) -> torch.Tensor:
        """q (B, Hq, N, D), k/v (B, Hk, M, D), HF's mask and the call options the model's keywords asked for
        (`call_options`) -> (B, Hq, N, Dv)."""
        hidden, self.hidden = self.hidden, None
        options = dict(options)
        packed = packed_sequences(options, mask, q.shape[2], causal=causal)
        if packed is not None:
            return self._attend_packed(q, k, v, hidden, mask, causal, scale, options, packed)
        bias = options.pop("bias", None)  # (B|1, H|1, N|1, M): sliced with the queries and keys
        if is_additive(mask):  # eager adds the mask to the scores: so does the method, as its bias
            _check_carrier(self.method.name, "an additive attention_mask", HONOURED["position_bias"], self.where)
            bias = mask if bias is None else bias + mask
            mask, causal = None, False  # the mask holds the causal (and window) structure itself
            options.pop("window_size", None)
        n, m = q.shape[2], k.shape[2]
        used = self._used_keys(mask, n, m, causal)
        if used < m:
            k, v, m = k[:, :, :used], v[:, :, :used], used
            mask = mask[..., :used] if mask is not None else None
            bias = bias[..., :used] if bias is not None else None
        declared_window = options.pop("window_size", NO_WINDOW)
        try:
            valid, causal, window = mask_geometry(mask, n, m, causal=causal, window=declared_window)
        except NotImplementedError as e:
            raise NotImplementedError(f"{self.where}: {e}") from None
        call = self._call(causal, scale, window, options)
        if causal and self.keeps_queries:
            q, hidden = self._with_history(q, k, hidden, m)
        if valid is None:
            out = self._attend(q, k, v, hidden, bias, call)
        else:
            out = self._attend_rows(q, k, v, hidden, bias, valid, call)
        return out[:, :, -n:]

    @staticmethod
    def _used_keys(mask, n: int, m: int, causal: bool) -> int:
        """How many of the m key slots the queries use: fewer than m only for a pre-allocated (static) cache."""
        if causal and mask is None and 1 < n < m:
            return n  # only a static cache's prefill gets here: sdpa would align top-left, so keys >= n are unused
        if not (causal and mask is not None and n < m):
            return m
        used = used_key_slots(mask, m)
        if used < n:
            raise NotImplementedError(f"the mask lets {n} queries see only {used} keys; not a KV cache layout")
        return used  # the queries are the last slots in use

    def _call(self, causal: bool, scale: float | None, window, options: dict[str, Any]) -> dict[str, Any]:
        """The method's call keywords: the layer's window combined with one bound to the method
        (`patch(..., window_size=...)`), the model's other options, softcap checked against a bound one."""
        params = self.method.params
        left, right = window
        if "window_size" in params:
            options["window_size"] = tighter_window(params["window_size"], window)
        elif left >= 0 or (right >= 0 and not causal):
            raise NotImplementedError(
                f"{self.where} attends within a sliding window {tuple(window)}, which method {self.method.name!r} "
                "cannot apply (it has no window_size): patch with 'dense'"
            )
        bound_softcap = params.get("softcap")
        if options.get("softcap") and bound_softcap and bound_softcap != options["softcap"]:
            raise ValueError(
                f"softcap={bound_softcap} was bound to {self.method.name!r}, but {self.where} applies softcap "
                f"{options['softcap']}; patch without softcap to keep the model's"
            )
        return {"causal": causal, "scale": scale, **options}

    def _with_history(self, q, k, hidden, m: int):
        """Linear methods recompute over the whole cached sequence: prepend the queries seen before.
        The kept queries must belong to the cached keys: same length, and the same first and last key."""
        n = q.shape[2]
        if n < m:
            past = self.history
            if past is None or past[0].shape[2] != m - n or past[0].shape[0] != q.shape[0]:
                raise RuntimeError(
                    f"{self.method.name!r} needs the queries of the {m - n} cached tokens, but this layer kept "
                    f"{0 if past is None else past[0].shape[2]}; run the prompt through the patched model in eval mode "
                    "(e.g. model.generate) rather than a cache built by another attention implementation"
                )
            if not torch.equal(past[2], k[:, :, [0, m - n - 1]]):
                raise RuntimeError(
                    f"{self.method.name!r} kept the queries of another sequence than the one in this KV cache (an "
                    "unrelated forward ran in between); rerun the prompt through the patched model to rebuild both"
                )
            q = torch.cat([past[0], q], dim=2)
            hidden = torch.cat([past[1], hidden], dim=1) if hidden is not None else None
        if not self.training:
            self.history = (q.detach(), hidden.detach() if hidden is not None else None, k[:, :, [0, -1]].detach())
        return q, hidden

    def _attend_packed(self, q, k, v, hidden, mask, causal: bool, scale, options: dict[str, Any],
                       packed: dict[str, Any]):
        """A padding-free batch: one row holding the sequences end to end, each attended alone through
        the method's packed call (docs/varlen.md). The mask, if any, must be exactly that block-diagonal
        pattern: anything more (padding inside the pack) is refused rather than ignored."""
        n, m = q.shape[2], k.shape[2]
        if q.shape[0] != 1 or n != m:
            raise NotImplementedError(f"{self.where}: packed sequences need one batch row and no KV cache, got "
                                      f"q {tuple(q.shape)} and k {tuple(k.shape)}")
        window = options.pop("window_size", NO_WINDOW)
        bias = options.pop("bias", None)
        call = {**self._call(causal, scale, window, options), **packed}
        if mask is not None and not _is_packed_mask(mask, packed["cu_seqlens_q"], causal=causal,
                                                     window=call.get("window_size", window)):
            raise NotImplementedError(f"{self.where}: a packed batch whose attention mask is not exactly its "
                                      "sequences' block-diagonal pattern (padding inside a pack?); pass either a "
                                      "pack or a padded batch")
        return self._attend(q, k, v, hidden, bias, call)

    def _attend_rows(self, q, k, v, hidden, bias, valid, call: dict[str, Any]):
        """One batch row at a time on its valid tokens. Queries are the last n of the m key positions
        (self-attention, with or without a cache), and those at padded positions output zeros; only
        non-causal cross-attention (n != m) keeps every query."""
        n, m = q.shape[2], k.shape[2]
        self_attention = call["causal"] or n == m
        left, right = call.get("window_size", NO_WINDOW)
        windowed = left >= 0 or (right >= 0 and not call["causal"])  # a causal right side is the diagonal anyway
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        for b in range(q.shape[0]):
            keys = valid[b].nonzero().squeeze(1)
            queries = valid[b, m - n:].nonzero().squeeze(1) if self_attention else torch.arange(n, device=q.device)
            if keys.numel() == 0 or queries.numel() == 0:
                continue
            if windowed and int(keys[-1] - keys[0]) + 1 != keys.numel():
                raise NotImplementedError(
                    f"{self.where}: batch row {b} has padding between its tokens, which would shift its sliding "
                    "window; pad on one side only (left padding for generation)"
                )
            row_hidden = hidden[b : b + 1, queries] if hidden is not None else None
            out[b : b + 1, :, queries] = self._attend(
                q[b : b + 1, :, queries], k[b : b + 1, :, keys], v[b : b + 1, :, keys], row_hidden,
                _row_bias(bias, b, queries, keys), call,
            )
        return out

    def _attend(self, q, k, v, hidden, bias, call: dict[str, Any]):
        fn = api.get("dense") if self.dense_for_one_query and q.shape[2] == 1 else self.method
        if q.shape[1] != k.shape[1] and (self.repeats_kv if fn is self.method else not fn.info.supports.gqa):
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        inputs = {} if bias is None else {"bias": bias}
        if fn is self.method and self.adapter is not None:
            inputs.update(self.adapter_inputs(self.adapter, LayerInputs(q, k, v, hidden)))
        try:
            return fn(q, k, v, backend=self.backend, **call, **inputs)
        except (TypeError, ValueError, NotImplementedError) as e:  # what the method cannot do in this layer
            raise type(e)(f"{self.where}: {e}") from e


def packed_sequences(options: dict[str, Any], mask, n: int, *, causal: bool) -> dict[str, Any] | None:
    """The packed-call keywords of a padding-free batch, popped from `options`, or None for an ordinary batch.

    transformers' flash keywords (cu_seq_lens_q/k, max_length_q/k) say so themselves. Without them, a batch
    is packed where transformers made it so: position_ids (1, n) counting each sequence up from 0
    (DataCollatorWithFlattening) and a mask that is exactly those sequences' block-diagonal pattern (what
    transformers builds from such positions when there is no cache; with a cache it builds a plain causal
    mask, the batch is one sequence, and so it is here)."""
    positions = options.pop(PACKED_BY_POSITIONS, None)
    given = {name: options.pop(name) for name in PACKED_KEYWORDS.values() if name in options}
    if given:
        return given
    cu = _sequence_starts(positions, n)
    if cu is None or mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    window = options.get("window_size", NO_WINDOW)
    return {"cu_seqlens_q": cu, "cu_seqlens_k": cu} if _is_packed_mask(mask, cu, causal=causal, window=window) else None


def _sequence_starts(positions, n: int) -> torch.Tensor | None:
    """cu_seqlens (S + 1,) int32 of position_ids (1, n) that count each of S >= 2 sequences up from 0."""
    if not isinstance(positions, torch.Tensor) or positions.shape != (1, n) or n < 2:
        return None
    row = positions[0].long()
    starts = (row == 0).nonzero().squeeze(1)
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None
    token = torch.arange(n, device=row.device)
    if not torch.equal(row, token - starts[torch.searchsorted(starts, token, right=True) - 1]):
        return None
    return torch.cat([starts, starts.new_tensor([n])]).to(torch.int32)


def _is_packed_mask(mask: torch.Tensor, cu_seqlens: torch.Tensor, *, causal: bool, window=NO_WINDOW) -> bool:
    """Whether the mask lets each query see exactly its own sequence's keys (causal, within `window`
    (left, right) where those apply): what the packed call computes."""
    n = mask.shape[-2]
    if mask.shape[-1] < n:
        return False
    sequence = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=mask.device),
                                       (cu_seqlens[1:] - cu_seqlens[:-1]).to(mask.device))  # (n,)
    i, j = torch.arange(n, device=mask.device)[:, None], torch.arange(n, device=mask.device)[None, :]
    left, right = window
    expected = (sequence[:, None] == sequence[None, :]) & ((j <= i) if causal else True)
    expected = expected & ((i - j <= left) if left >= 0 else True) & ((j - i <= right) if right >= 0 else True)
    return bool((_attended(mask[..., :n]) == expected).all())


def _row_bias(bias: torch.Tensor | None, b: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """Batch row b of a (B|1, H|1, N|1, M|1) bias, at the given query and key positions (broadcast dims kept)."""
    if bias is None:
        return None
    row = bias[b if bias.shape[0] > 1 else 0][None]
    row = row[:, :, queries] if row.shape[2] > 1 else row
    return row[..., keys] if row.shape[3] > 1 else row


def tighter_window(a, b) -> tuple[int, int]:
    """The intersection of two (left, right) windows, -1 = unbounded side."""
    return tuple(int(y) if x < 0 else int(x) if y < 0 else int(min(x, y)) for x, y in zip(a, b))


def used_key_slots(mask: torch.Tensor, m: int) -> int:
    """How many of the m key slots are in use: a pre-allocated (static) KV cache hands over all its
    slots, and those past the last key any query may attend are empty."""
    seen = _attended(mask[..., :m]).any(dim=2).any(dim=1).any(dim=0).nonzero()
    return int(seen.max()) + 1 if seen.numel() else m


def mask_geometry(mask, n: int, m: int, *, causal: bool, window=NO_WINDOW):
    """(valid, causal, window) of the attention `mask` asks for, valid as in `key_validity`.

    The layer's own (causal, window) when the mask is padding over them; otherwise the band the mask itself
    draws (a model that applies its sliding window through the mask alone, a module that does not say whether
    it is causal), verified to be exactly that band over padding. Anything else raises."""
    try:
        return key_validity(mask, n, m, causal=causal, window=window), causal, window
    except NotImplementedError:
        if mask is None or mask.dim() != 4:
            raise
        causal, window = _drawn_band(mask[..., :m], n, m)
        return key_validity(mask, n, m, causal=causal, window=window), causal, window


def _drawn_band(mask: torch.Tensor, n: int, m: int) -> tuple[bool, tuple[int, int]]:
    """(causal, (left, right)): the narrowest window (geometry's convention) holding every pair the mask attends."""
    attend = (mask if mask.dtype == torch.bool else _float_mask_to_bool(mask)).any(dim=1).any(dim=0).expand(n, m)
    rows, cols = torch.arange(n, device=mask.device)[:, None], torch.arange(m, device=mask.device)[None, :]
    offsets = (cols - rows - (m - n))[attend]
    if offsets.numel() == 0:
        return False, NO_WINDOW
    left, right = -int(offsets.min()), int(offsets.max())
    if left < 0 or right < 0:  # the diagonal outside the band: no window draws that
        return False, NO_WINDOW
    causal = right == 0 and n > 1
    return causal, (left if left < m - 1 else -1, right if right < n - 1 and not causal else -1)


def key_validity(mask, n: int, m: int, *, causal: bool, window=NO_WINDOW) -> torch.Tensor | None:
    """(B, M) bool, True where a key may be attended, or None when every key may be.

    `mask` is what transformers passes to the attention function: None, a bool (B, 1|H, N, M') mask
    (True = attend) or an eager-style float mask (0 = attend, dtype-min = not). Anything that is not
    "key padding (+ bottom-right causal) (+ the layer's `window`, (left, right) as in `geometry`)" raises:
    other windows, packed sequences and custom masks would otherwise be silently ignored."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise NotImplementedError(
            f"attnzoo needs a 4D attention mask (sdpa- or eager-style), got {type(mask).__name__} "
            f"{tuple(getattr(mask, 'shape', ()))}"
        )
    mask = mask[..., :m]
    attend = mask if mask.dtype == torch.bool else _float_mask_to_bool(mask)
    valid = attend.any(dim=2).any(dim=1)
    rows, cols = torch.arange(n, device=mask.device)[:, None], torch.arange(m, device=mask.device)[None, :]
    expected = valid[:, None, None, :] & geometry.visible(rows, cols, n, m, geometry.causal_window(causal, window))
    rows_seen = attend.any(dim=-1, keepdim=True)  # fully masked rows are padded queries
    if not ((attend == expected) | ~rows_seen).all():
        raise NotImplementedError(
            f"the attention mask is not a padding mask (+ causal, + window {tuple(window)}): attnzoo methods take "
            "per-key padding over a causal or sliding-window band only, so packed-sequence and other custom 4D "
            "masks are not supported"
        )
    return None if valid.all() else valid


def _attended(mask: torch.Tensor) -> torch.Tensor:
    """Bool, True where a bool mask or an eager-style float mask (additive values included) lets a query attend."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def is_additive(mask) -> bool:
    """True for a float mask with values other than 0 (attend) and dtype-min (not): an additive bias."""
    return isinstance(mask, torch.Tensor) and mask.is_floating_point() and bool(
        ((mask != 0) & _attended(mask)).any()
    )


def _float_mask_to_bool(mask: torch.Tensor) -> torch.Tensor:
    attend = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not (attend | blocked).all():
        raise NotImplementedError("the attention mask carries an additive bias; attnzoo methods take padding only")
    return attend


def _make_forward(original: str) -> Callable:
    """The function transformers calls for every attention layer while the model is patched."""

    def attnzoo_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = getattr(module, ATTR, None)
        if layer is None or not layer.enabled:  # a layer left out of `layers=`, or inside original_attention()
            if layer is not None:
                layer.hidden = None
            return _original_function(original, module)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        causal = kwargs.pop("is_causal", None)
        causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
        options = call_options(layer.method, {"dropout": dropout, **kwargs}, layer.where)
        out = layer(query, key, value, attention_mask, causal=causal, scale=scaling, options=options)
        if original == "eager" and attention_mask is not None and "sinks" not in options:
            out = as_eager_for_blind_queries(out, attention_mask, value)
        return out.transpose(1, 2).contiguous(), None

    return attnzoo_attention


def as_eager_for_blind_queries(out: torch.Tensor, mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`out` with the queries that see no key (left padding) set to what eager attention gives them: the
    softmax of equal logits (each score plus the dtype minimum), i.e. the mean of all values. Later layers that
    read padded positions (recurrent ones in hybrid models) then see what they would unpatched. (sdpa gives
    such queries zeros, as patching does; with attention sinks eager gives zeros too: the sink takes the row.)"""
    blind = ~_attended(mask[..., : v.shape[2]]).any(dim=-1, keepdim=True)  # (B, 1|H, N, 1)
    if not blind.any():
        return out
    mean = v.mean(dim=2, keepdim=True).repeat_interleave(out.shape[1] // v.shape[1], dim=1)  # (B, Hq, 1, Dv)
    return torch.where(blind, mean.to(out.dtype), out)


# ----------------------------------------------------------------------------------------------------
# the attention function's keywords: each one is honoured, ignored as bookkeeping, or refused

# Keywords that cannot change the attention output: ignored (docs/patching.md lists them).
BOOKKEEPING = frozenset({
    "position_ids",  # positions are already in q and k; restarting ones mark a packed batch (PACKED_BY_POSITIONS)
    "cache_position", "use_cache", "past_key_values", "past_key_value", "cache",  # k and v are already updated
    "output_hidden_states", "output_router_logits", "return_dict", "num_items_in_batch",
    "deterministic",  # flash-attn's deterministic backward
    "encoder_hidden_states", "encoder_attention_mask",  # already in k, v and the mask of a cross-attention
})

# Keywords harmless only when off (None, 0, False): any other value is refused, with what to do instead.
MUST_BE_OFF = {
    "dropout": "call model.eval() or set the model's attention dropout to 0",
    "output_attentions": "attnzoo methods return no attention weights; unpatch the model to get them",
    "seq_idx": "a state-space layer's sequence index: not an attention argument attnzoo knows",
}

# Padding-free batches (transformers' DataCollatorWithFlattening): its flash keywords name the method's
# packed-call keywords (docs/varlen.md); without them, position_ids that restart at 0 mark the sequences.
PACKED_KEYWORDS = {"cu_seq_lens_q": "cu_seqlens_q", "cu_seq_lens_k": "cu_seqlens_k",
                   "max_length_q": "max_seqlen_q", "max_length_k": "max_seqlen_k"}
PACKED_BY_POSITIONS = "position_ids"


class Honoured(NamedTuple):
    """A keyword patching passes on: the method parameter or input that takes it, value -> call options, and
    the methods known to give that carrier the model's meaning (None: any method that has it)."""

    carrier: str
    options: Callable[[Any], dict[str, Any]]
    methods: tuple[str, ...] | None = None


def _sliding_window(size) -> dict[str, Any]:
    # transformers' sliding_window=W: a causal query sees the last W keys, itself included; a bidirectional
    # one the keys less than W away (its flash path passes window_size=(W - 1, W - 1) as well)
    return {"window_size": (int(size) - 1, int(size) - 1)}


HONOURED = {
    "sliding_window": Honoured("window_size", _sliding_window),
    "softcap": Honoured("softcap", lambda cap: {"softcap": float(cap)}),
    # T5 family: an exact additive (B|1, H, N, M) bias (flashbias's `bias` is factored to a rank: not exact)
    "position_bias": Honoured("bias", lambda bias: {"bias": bias}, ("dense",)),
    # gpt-oss: one sink logit per query head, exp(s) joins each row's softmax denominator
    "s_aux": Honoured("sinks", lambda sinks: {"sinks": sinks}, ("dense",)),
    "sinks": Honoured("sinks", lambda sinks: {"sinks": sinks}, ("dense",)),
}

AT_FORWARD = object()  # a keyword's value that is known only when the model runs (see check_declared_keywords)


def call_options(method: api.Method, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """The method's call options for the keywords a model passes to its attention function; raises for any
    keyword the method cannot honour, naming it and the layer (`where`)."""
    options = {}
    for name, value in kwargs.items():
        if value is AT_FORWARD or value is None:
            if name in PACKED_KEYWORDS or name == PACKED_BY_POSITIONS:
                continue
        elif name in PACKED_KEYWORDS:
            options[PACKED_KEYWORDS[name]] = value.to(torch.int32) if isinstance(value, torch.Tensor) else int(value)
            continue
        elif name == PACKED_BY_POSITIONS:
            options[PACKED_BY_POSITIONS] = value
            continue
        if name in BOOKKEEPING:
            continue
        if name in MUST_BE_OFF:
            if value is not AT_FORWARD and _is_on(value):
                raise ValueError(f"{where} passes {name}={_show(value)} to its attention: {MUST_BE_OFF[name]}")
            continue
        if name not in HONOURED:
            raise NotImplementedError(
                f"{where} passes {name}={_show(value)} to its attention, an argument attnzoo patching does not "
                "know: refused, since ignoring it may change the result"
            )
        if _is_on(value):
            _check_carrier(method.name, name, HONOURED[name], where)
            if value is not AT_FORWARD:
                options.update(HONOURED[name].options(value))
    return options


def _carries(method: str, keyword: Honoured) -> bool:
    info = REGISTRY.info(method)
    fits = keyword.methods is None or method in keyword.methods
    return fits and (keyword.carrier in info.params or keyword.carrier in info.inputs)


def _check_carrier(method: str, name: str, keyword: Honoured, where: str) -> None:
    if _carries(method, keyword):
        return
    takers = [m for m in REGISTRY.names() if _carries(m, keyword)]
    instead = f"patch with {' or '.join(map(repr, takers))}" if takers else "no attnzoo method takes it yet"
    raise NotImplementedError(
        f"{where} passes {name} to its attention, but method {method!r} has no {keyword.carrier!r} that honours "
        f"it: {instead}"
    )


def _is_on(value) -> bool:
    """False for a keyword left off (None, 0, False), True otherwise (AT_FORWARD included)."""
    return value is not None and not (isinstance(value, (bool, int, float)) and value == 0)


def _show(value) -> str:
    if value is AT_FORWARD:
        return "(a value computed at each forward)"
    return f"(a tensor of shape {tuple(value.shape)})" if isinstance(value, torch.Tensor) else repr(value)


# keywords the zoo forward takes itself (as positionals or is_causal)
_WRAPPER_ARGUMENTS = frozenset({"query", "key", "value", "attention_mask", "scaling", "is_causal"})
_DECLARED: dict[type, dict[str, ast.expr]] = {}


def check_declared_keywords(method: api.Method, module: nn.Module, where: str) -> None:
    """At patch time, refuse what the module's own attention call (in its forward's source) will pass and the
    method cannot honour: values that read only the module's attributes (`sliding_window=self.sliding_window`,
    `softcap=self.config.attn_logit_softcapping`) are checked as they are now; the others (T5's
    `position_bias=position_bias`) by whether the method could take them at all."""
    for name, expr in _declared_keywords(type(module)).items():
        if name not in _WRAPPER_ARGUMENTS:
            call_options(method, {name: _static_value(expr, module)}, where)


def _declared_keywords(cls: type) -> dict[str, ast.expr]:
    """Keyword -> value expression, for the `attention_interface(...)` call in cls.forward."""
    if cls not in _DECLARED:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
        except (OSError, TypeError, SyntaxError):
            tree = ast.Module(body=[], type_ignores=[])
        _DECLARED[cls] = {
            keyword.arg: keyword.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "attention_interface"
            for keyword in node.keywords
            if keyword.arg is not None
        }
    return _DECLARED[cls]


def _static_value(expr: ast.expr, module: nn.Module):
    """The value of `expr` if it reads only constants and the module's attributes (`self.a.b`,
    `getattr(self.a, "b", default)`), else AT_FORWARD."""
    if isinstance(expr, ast.Constant):
        return expr.value
    if isinstance(expr, ast.Name) and expr.id == "self":
        return module
    if isinstance(expr, ast.Attribute):
        owner = _static_value(expr.value, module)
        return AT_FORWARD if owner is AT_FORWARD else getattr(owner, expr.attr, AT_FORWARD)
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "getattr" \
            and len(expr.args) in (2, 3) and not expr.keywords:
        values = [_static_value(arg, module) for arg in expr.args]
        if any(value is AT_FORWARD for value in values) or not isinstance(values[1], str):
            return AT_FORWARD
        return getattr(values[0], values[1], *values[2:])
    return AT_FORWARD


# ----------------------------------------------------------------------------------------------------
# public entry points


def patch(model: nn.Module, method: str, *, layers: Iterable[int] | None = None, backend: str = "auto",
          **params) -> nn.Module:
    """Make `model`'s attention layers (all, or those in `layers`) run the attnzoo method `method`.

    `params` are the method's parameters (see `attnzoo.info(method)`); `backend` is passed to every call.
    Methods with learned parts get them as `module.attnzoo.adapter` on each patched layer (see
    `trainable_parameters`). Returns the model, patched in place."""
    _transformers()
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    if method not in REGISTRY.names():
        raise ValueError(f"method {method!r} is not an attnzoo method; known methods: {', '.join(REGISTRY.names())}")
    if hasattr(model, _MARK):
        raise ValueError("model is already patched; call attnzoo.unpatch(model) first")
    original = model.config._attn_implementation
    if original not in _IMPL_NAMES:
        raise ValueError(
            f"attnzoo patches models running 'sdpa' or 'eager' attention, this one runs {original!r}; "
            "call model.set_attn_implementation('sdpa') first"
        )
    bound = api.get(method, **params)
    selected = [(module, _where(model, index, module)) for index, module in _select(model, layers)]
    adapter = adapter_for(method)
    for module, where in selected:
        if getattr(module, "is_causal", True) and not bound.info.supports.causal:
            raise ValueError(f"method {method!r} is non-causal only, but {where} is causal")
        if not getattr(module, "is_causal", True) and not bound.info.supports.non_causal:
            raise ValueError(f"method {method!r} is causal only, but {where} is not causal")
        check_declared_keywords(bound, module, where)
    name = _IMPL_NAMES[original]
    _register_impl(name, original)
    setattr(model, _MARK, original)
    try:
        for module, where in selected:
            _attach(module, bound, backend, adapter, where)
        _set_impl(model, name)
    except Exception:
        unpatch(model)
        raise
    return model


def _where(model: nn.Module, index: int, module: nn.Module) -> str:
    """How errors name a layer: model type, layer index, attention class."""
    return f"{getattr(model.config, 'model_type', type(model).__name__)} layer {index} ({type(module).__name__})"


def _attach(module: nn.Module, method: api.Method, backend: str, adapter: Adapter | None, where: str) -> None:
    shape = _layer_shape(module)
    if repeats_kv(method, adapter):
        shape = shape._replace(num_kv_heads=shape.num_heads)
    layer = ZooLayer(method, backend=backend, adapter=adapter, shape=shape, where=where)
    layer.train(module.training)
    reference = next(module.parameters(), None)
    if reference is not None:
        layer.to(device=reference.device, dtype=reference.dtype)
    module.add_module(ATTR, layer)
    if layer.adapter is not None:
        layer.hook = module.register_forward_pre_hook(layer.capture, with_kwargs=True)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: remove the added layers and parts, and restore the original attention implementation."""
    if not hasattr(model, _MARK):
        raise ValueError("model is not patched by attnzoo")
    for _, module in attention_layers(model):
        layer = getattr(module, ATTR, None)
        if layer is None:
            continue
        if hasattr(layer, "hook"):
            layer.hook.remove()
        delattr(module, ATTR)
    _set_impl(model, getattr(model, _MARK))
    delattr(model, _MARK)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, method: str, **kwargs):
    """`with attnzoo.patched(model, "dense"): ...` patches for the block and unpatches after it."""
    patch(model, method, **kwargs)
    try:
        yield model
    finally:
        unpatch(model)


@contextlib.contextmanager
def original_attention(model: nn.Module):
    """Run the original attention in the patched layers for the block (learned parts kept), e.g. to record
    a teacher's layer outputs for distillation."""
    layers = [m.attnzoo for _, m in attention_layers(model) if isinstance(getattr(m, ATTR, None), ZooLayer)]
    if not layers:
        raise ValueError("model is not patched by attnzoo")
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters patch() added (the methods' learned parts), e.g. to distill them."""
    return [p for _, module in attention_layers(model)
            if isinstance(getattr(module, ATTR, None), ZooLayer)
            for p in getattr(module, ATTR).parameters()]
