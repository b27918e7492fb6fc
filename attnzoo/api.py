"""The one API every method shares: `get`, `attention`, and the `Method` callable they return.

A method function is called as

    fn(q, k, v, *, causal: bool, scale: float, backend: str, **params, **inputs, **output_flags)

with q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) already validated here, `scale` resolved to
a float, `backend` resolved to the implementation that runs, every registry parameter present
(defaults filled in), and only the extra inputs / output flags the caller gave.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from . import varlen
from .ops.dispatch import resolve as resolve_backend
from .registry import REGISTRY, MethodInfo
from .validation import check_causal, check_qkv, resolve_scale

_CALL_KEYWORDS = ("causal", "scale", "backend")


class Method:
    """A registry method with some parameters bound; call it like SDPA: `fn(q, k, v, causal=True)`."""

    def __init__(self, info: MethodInfo, fn, bound: dict[str, Any]):
        self.info = info
        self._fn = fn
        self._bound = self._split_keywords(bound)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def bound(self) -> dict[str, Any]:
        """The keywords bound by `attnzoo.get(name, **bound)` (parameters and inputs)."""
        return dict(self._bound)

    @property
    def params(self) -> dict[str, Any]:
        """The method parameters this callable will use: registry defaults overridden by bound values."""
        return {**self.info.params, **{k: v for k, v in self._bound.items() if k in self.info.params}}

    def _split_keywords(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        accepted = set(self.info.params) | set(self.info.inputs) | set(self.info.supports.outputs)
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"method {self.info.name!r} got unknown parameter(s) {', '.join(unknown)}; it accepts "
                f"{', '.join(sorted(accepted) + list(_CALL_KEYWORDS)) or 'no parameters'}"
            )
        return dict(kwargs)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool | None = None,
                 scale: float | None = None, backend: str = "auto", **kwargs):
        pack = None
        if any(name in kwargs for name in varlen.PACK_KEYWORDS):  # packed sequences: docs/varlen.md
            offsets = {name: kwargs.pop(name) for name in varlen.PACK_KEYWORDS if name in kwargs}
            pack = varlen.check_pack(q, k, **offsets)
            varlen.check_packed_inputs(kwargs)
            if not varlen.runs_whole(self._fn, pack):
                return varlen.packed(self, q, k, v, pack, causal=causal, scale=scale, backend=backend, **kwargs)
        info = self.info
        if causal is None:  # the method's natural default: non-causal where it can be, like SDPA
            causal = not info.supports.non_causal
        causal = check_causal(causal, info=info)
        autocast = _autocast_device(q)
        if autocast is not None:
            q, k, v = _autocast_inputs(q, k, v, autocast, info)
        check_qkv(q, k, v, info=info)
        scale = resolve_scale(scale, q.shape[-1])
        call = {**info.params, **self._bound, **self._split_keywords(kwargs)}
        resolved = resolve_backend(backend, q.device, info.supports.backends, info.name)
        # under autocast the method computes in the dtype it was given, as it would outside
        with torch.autocast(autocast, enabled=False) if autocast else contextlib.nullcontext():
            result = self._fn(q, k, v, causal=causal, scale=scale, backend=resolved, **call,
                              **({} if pack is None else {"pack": pack}))
        return result if info.supports.backward else _without_backward(result, info.name)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._bound.items())
        return f"attnzoo.get({self.info.name!r}{', ' if shown else ''}{shown})"


class _NoBackward(torch.autograd.Function):
    """The identity, whose backward raises: what the outputs of a method registered with
    supports.backward=False pass through, so that `.backward()` fails clearly instead of returning a
    gradient the method never defined."""

    @staticmethod
    def forward(ctx, x, name):
        ctx.name = name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"method {ctx.name!r} has no backward (it is registered with supports.backward=False); "
                           f"call it under torch.no_grad() or on inputs that do not require grad")


def _without_backward(result, name: str):
    """`result` (a tensor, or a tuple holding tensors) with every tensor that requires grad passed
    through _NoBackward; anything else unchanged."""
    if isinstance(result, torch.Tensor):
        return _NoBackward.apply(result, name) if result.requires_grad else result
    if isinstance(result, tuple):
        items = [_without_backward(item, name) for item in result]
        return type(result)(*items) if hasattr(result, "_fields") else tuple(items)  # a NamedTuple keeps its type
    return result


def _autocast_device(q) -> str | None:
    """The device type of q when `torch.autocast` is enabled for it, else None."""
    if not isinstance(q, torch.Tensor):
        return None
    try:
        return q.device.type if torch.is_autocast_enabled(q.device.type) else None
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None


def _autocast_inputs(q, k, v, device: str, info: MethodInfo):
    """q, k, v in the autocast dtype of `device` (as SDPA takes them inside `torch.autocast`), where the
    method supports that dtype; unchanged otherwise."""
    dtype = torch.get_autocast_dtype(device)
    if str(dtype).removeprefix("torch.") not in info.supports.dtypes:
        return q, k, v
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in (q, k, v))


def get(name: str, **params) -> Method:
    """The method `name` as a callable with `params` bound (overriding registry defaults)."""
    info = REGISTRY.info(name)
    return Method(info, REGISTRY.function(name), params)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, method: str = "dense",
              causal: bool | None = None, scale: float | None = None, backend: str = "auto", **params):
    """One-shot form: `attention(q, k, v, method="xattention", causal=True, threshold=0.9)`."""
    return get(method)(q, k, v, causal=causal, scale=scale, backend=backend, **params)


def linear_state(name: str):
    """The decoding step function of linear method `name`: `step(q_t, k_t, v_t, state, **kwargs) ->
    (o_t, state)`, with q_t (B, H, 1, D). Start from state=None; the state is fp32."""
    info = REGISTRY.info(name)
    module = info.load_module()
    if info.family != "linear" or not hasattr(module, "step"):
        raise ValueError(f"method {name!r} has no recurrent decoding step (only causal linear methods do)")
    return module.step
