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
- Padding: the mask is reduced to per-key validity, checked to be exactly "padding (+ causal)", and each
  padded batch row runs on its unpadded tokens alone; padded query rows output zeros.

transformers is imported lazily; it is needed only when a model is patched.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn

from . import api, geometry
from .registry import REGISTRY

MIN_TRANSFORMERS = (4, 51)
ATTR = "attnzoo"  # name of the ZooLayer submodule on a patched attention module
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


def _select(model: nn.Module, layers: Iterable[int] | None) -> list[nn.Module]:
    found = attention_layers(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention module that goes through transformers' AttentionInterface; "
            "attnzoo can only patch models that do"
        )
    if layers is None:
        return [m for _, m in found]
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
    return [m for i, m in found if i in wanted]


# ----------------------------------------------------------------------------------------------------
# learned parts


class LayerShape(NamedTuple):
    """The geometry of one attention layer, for building a method's learned parts."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


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
    inputs(module, LayerInputs) -> dict: the method's call-time inputs, computed at every forward."""

    build: Callable[[LayerShape, dict[str, Any]], nn.Module]
    inputs: Callable[[nn.Module, LayerInputs], dict[str, Any]]


_ADAPTERS: dict[str, Adapter] = {}

# Methods whose learned parts live in their own module: (module, class, build, inputs). Resolved on use,
# so that a method whose class is not written yet fails only when it is patched.
_KNOWN_ADAPTERS = {
    "seerattention": (
        "attnzoo.methods.seerattention", "AttnGate",
        lambda cls, s, p: cls(s.head_dim, s.num_heads, s.num_kv_heads, block_size=p["block_size"]),
        lambda gate, x: {"gate": gate},
    ),
    "gla": (
        "attnzoo.methods.gla", "GLAGate",
        lambda cls, s, p: cls(s.hidden_size, s.num_heads, s.head_dim),
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


def register_adapter(method: str, build: Callable, inputs: Callable, *, overwrite: bool = False) -> None:
    """Give `method` learned parts when it is patched into a model (see `Adapter`)."""
    if not callable(build) or not callable(inputs):
        raise TypeError("register_adapter: build and inputs must be callable")
    if method in _ADAPTERS and not overwrite:
        raise ValueError(f"method {method!r} already has an adapter; pass overwrite=True to replace it")
    _ADAPTERS[method] = Adapter(build, inputs)


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
    return Adapter(lambda shape, params: build(cls, shape, params), inputs)


def _layer_shape(module: nn.Module) -> LayerShape:
    config = module.config
    heads = config.num_attention_heads
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    return LayerShape(
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim or config.hidden_size // heads,
    )


# ----------------------------------------------------------------------------------------------------
# the per-layer runtime


class ZooLayer(nn.Module):
    """What patch() attaches to one attention module: the method, its learned parts, decoding state."""

    def __init__(self, method: api.Method, *, backend: str, adapter: Adapter | None, shape: LayerShape):
        super().__init__()
        self.method = method
        self.backend = backend
        family = method.info.family
        self.dense_for_one_query = family == "sparse"  # a single decoding query has nothing to skip
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

    def forward(self, q, k, v, mask, *, causal: bool, scale: float | None) -> torch.Tensor:
        """q (B, Hq, N, D), k/v (B, Hk, M, D), HF's mask -> (B, Hq, N, Dv)."""
        hidden, self.hidden = self.hidden, None
        n, m = q.shape[2], k.shape[2]
        if causal and mask is None and 1 < n < m:
            # only a static cache's prefill gets here: sdpa would align top-left, so keys >= n are unused
            k, v, m = k[:, :, :n], v[:, :, :n], n
        if causal and mask is not None and n < m:
            used = used_key_slots(mask, m)
            if used < m:  # a pre-allocated (static) cache: the queries are the last slots in use
                if used < n:
                    raise NotImplementedError(f"the mask lets {n} queries see only {used} keys; not a KV cache layout")
                k, v, mask, m = k[:, :, :used], v[:, :, :used], mask[..., :used], used
        valid = key_validity(mask, n, m, causal=causal)
        if causal and self.keeps_queries:
            q, hidden = self._with_history(q, k, hidden, m)
        if valid is None:
            out = self._attend(q, k, v, hidden, causal, scale)
        else:
            out = self._attend_rows(q, k, v, hidden, valid, causal, scale)
        return out[:, :, -n:]

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

    def _attend_rows(self, q, k, v, hidden, valid, causal: bool, scale):
        """One batch row at a time on its valid tokens. Queries are the last n of the m key positions
        (self-attention, with or without a cache), and those at padded positions output zeros; only
        non-causal cross-attention (n != m) keeps every query."""
        n, m = q.shape[2], k.shape[2]
        self_attention = causal or n == m
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        for b in range(q.shape[0]):
            keys = valid[b].nonzero().squeeze(1)
            queries = valid[b, m - n:].nonzero().squeeze(1) if self_attention else torch.arange(n, device=q.device)
            if keys.numel() == 0 or queries.numel() == 0:
                continue
            row_hidden = hidden[b : b + 1, queries] if hidden is not None else None
            out[b : b + 1, :, queries] = self._attend(
                q[b : b + 1, :, queries], k[b : b + 1, :, keys], v[b : b + 1, :, keys], row_hidden, causal, scale
            )
        return out

    def _attend(self, q, k, v, hidden, causal: bool, scale):
        fn = api.get("dense") if self.dense_for_one_query and q.shape[2] == 1 else self.method
        if q.shape[1] != k.shape[1] and not fn.info.supports.gqa:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        inputs = {}
        if fn is self.method and self.adapter is not None:
            inputs = self.adapter_inputs(self.adapter, LayerInputs(q, k, v, hidden))
        return fn(q, k, v, causal=causal, scale=scale, backend=self.backend, **inputs)


def used_key_slots(mask: torch.Tensor, m: int) -> int:
    """How many of the m key slots are in use: a pre-allocated (static) KV cache hands over all its
    slots, and those past the last key any query may attend are empty."""
    attend = mask[..., :m]
    attend = attend if attend.dtype == torch.bool else _float_mask_to_bool(attend)
    seen = attend.any(dim=2).any(dim=1).any(dim=0).nonzero()
    return int(seen.max()) + 1 if seen.numel() else m


def key_validity(mask, n: int, m: int, *, causal: bool) -> torch.Tensor | None:
    """(B, M) bool, True where a key may be attended, or None when every key may be.

    `mask` is what transformers passes to the attention function: None, a bool (B, 1|H, N, M') mask
    (True = attend) or an eager-style float mask (0 = attend, dtype-min = not). Anything that is not
    "key padding (+ bottom-right causal)" raises: sliding windows, packed sequences and custom masks would
    otherwise be silently ignored."""
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
    expected = valid[:, None, None, :]
    if causal:
        rows, cols = torch.arange(n, device=mask.device)[:, None], torch.arange(m, device=mask.device)[None, :]
        expected = expected & geometry.visible(rows, cols, n, m, geometry.causal_window(True))
    rows_seen = attend.any(dim=-1, keepdim=True)  # fully masked rows are padded queries
    if not ((attend == expected) | ~rows_seen).all():
        raise NotImplementedError(
            "the attention mask is not a padding mask (+ causal): attnzoo methods take per-key padding only, "
            "so sliding-window, packed-sequence and custom 4D masks are not supported"
        )
    return None if valid.all() else valid


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
        _check_kwargs(layer.method, dropout, kwargs, key.shape[2])
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
        out = layer(query, key, value, attention_mask, causal=causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return attnzoo_attention


def _check_kwargs(method: api.Method, dropout: float, kwargs: dict, m: int) -> None:
    """Refuse what the model asks for and the method cannot do, instead of ignoring it."""
    if dropout:
        raise ValueError(
            f"attention dropout {dropout} is not supported by attnzoo methods: call model.eval() "
            "or set the model's attention dropout to 0"
        )
    window = kwargs.get("sliding_window")
    if window is not None and m > window:
        raise NotImplementedError(f"sliding-window attention (window {window}) is not supported by attnzoo patching")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"the model asks {method.name!r} for {name}={kwargs[name]!r}, which patching does not pass on"
            )


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
    modules = _select(model, layers)
    adapter = adapter_for(method)
    for module in modules:
        if getattr(module, "is_causal", True) and not bound.info.supports.causal:
            raise ValueError(f"method {method!r} is non-causal only, but {type(module).__name__} is causal")
        if not getattr(module, "is_causal", True) and not bound.info.supports.non_causal:
            raise ValueError(f"method {method!r} is causal only, but {type(module).__name__} is not causal")
    name = _IMPL_NAMES[original]
    _register_impl(name, original)
    setattr(model, _MARK, original)
    try:
        for module in modules:
            _attach(module, bound, backend, adapter)
        _set_impl(model, name)
    except Exception:
        unpatch(model)
        raise
    return model


def _attach(module: nn.Module, method: api.Method, backend: str, adapter: Adapter | None) -> None:
    layer = ZooLayer(method, backend=backend, adapter=adapter, shape=_layer_shape(module)).train(module.training)
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
