"""`context_parallel`: a method's callable over the local shards of one sequence spread across ranks."""

from __future__ import annotations

import inspect

import torch

from ..api import Method, get
from ..ops.dispatch import resolve as resolve_backend
from ..validation import check_causal, check_qkv, resolve_scale
from .flash_family import FLASH_METHODS
from .layout import Layout, check_zigzag
from .linear_family import LINEAR_METHODS

CONTEXT_PARALLEL_METHODS = {**FLASH_METHODS, **LINEAR_METHODS}


class ContextParallel:
    """`method` over local shards: `cp(q, k, v, causal=True, **inputs)` with q (B, Hq, n, D), k, v
    (B, Hk, m, D) this rank's shards (of global lengths N = n W, M = m W) returns this rank's shard
    of the single-device output (and the method's optional outputs, global where they are global:
    a block mask, a final state)."""

    def __init__(self, method: Method, group, zigzag: bool):
        if method.name not in CONTEXT_PARALLEL_METHODS:
            raise ValueError(f"context_parallel supports {', '.join(sorted(CONTEXT_PARALLEL_METHODS))}; "
                             f"got {method.name!r}")
        self.method, self.group, self.zigzag = method, group, check_zigzag(zigzag)
        self._run = CONTEXT_PARALLEL_METHODS[method.name]
        self._implemented = set(inspect.signature(self._run).parameters)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool | None = None,
                 scale: float | None = None, backend: str = "auto", **kwargs):
        info = self.method.info
        if causal is None:  # the method's natural default, as attnzoo.get's callable has it
            causal = not info.supports.non_causal
        causal = check_causal(causal, info=info)
        check_qkv(q, k, v, info=info)
        scale = resolve_scale(scale, q.shape[-1])
        bound = get(info.name, **{**self.method.params, **kwargs})  # raises TypeError on an unknown keyword
        params = self._implemented_params(bound.params)
        inputs = self._implemented_inputs({name: value for name, value in kwargs.items() if name not in info.params})
        backend = resolve_backend(backend, q.device, info.supports.backends, info.name)
        layout = Layout.of(self.group, self.zigzag)
        return self._run(q, k, v, causal=causal, scale=scale, backend=backend, layout=layout, **params, **inputs)

    def _implemented_params(self, params: dict) -> dict:
        """The parameters the context-parallel form takes; any other must keep its registry default."""
        defaults = self.method.info.params
        for name, value in params.items():
            if name not in self._implemented and not _is_default(value, defaults[name]):
                raise ValueError(f"context_parallel({self.method.name!r}) supports {name} only at its default "
                                 f"{defaults[name]!r}, got {name}={value!r}")
        return {name: value for name, value in params.items() if name in self._implemented}

    def _implemented_inputs(self, inputs: dict) -> dict:
        """The inputs and output flags the context-parallel form takes; any other must be None."""
        refused = sorted(name for name, value in inputs.items() if name not in self._implemented and value is not None)
        if refused:
            raise ValueError(f"context_parallel({self.method.name!r}) does not take {', '.join(refused)}")
        return {name: value for name, value in inputs.items() if name in self._implemented}

    def __repr__(self) -> str:
        return f"context_parallel({self.method!r}, zigzag={self.zigzag})"


def _is_default(value, default) -> bool:
    if isinstance(default, (list, tuple)):  # registry lists, user tuples: window_size=(-1, -1)
        return isinstance(value, (list, tuple)) and list(value) == list(default)
    return value == default


def context_parallel(name_or_method: str | Method, group=None, zigzag: bool = True, **params) -> ContextParallel:
    """The method as a callable over sequence shards laid out by `shard_sequence(x, group, zigzag)`.

    `group`: the torch.distributed process group (None = the default group); `zigzag`: the layout
    the inputs were sharded with (True: rank r holds chunks r and 2W - 1 - r of 2W, balancing causal
    work; False: contiguous chunks). `params` are bound as in `attnzoo.get`."""
    if isinstance(name_or_method, Method):
        method = get(name_or_method.name, **{**name_or_method.params, **params})
    elif isinstance(name_or_method, str):
        method = get(name_or_method, **params)
    else:
        raise TypeError(f"name_or_method must be a method name or an attnzoo.Method, "
                        f"got {type(name_or_method).__name__}")
    return ContextParallel(method, group, zigzag)
