"""Everything the sweep times: attnzoo methods (from the registry, one contender per parameter-grid point)
and outside baselines.

A contender answers, for a case: can it run it (`skip_reason`, None when it can), and how (`bind`: a
`Bound` with a forward of q, k, v in attnzoo's (B, H, N, D) layout and the extra inputs it was given,
made by `method_inputs`). A registry method runs with its registry defaults overridden by the grid
point, nothing else, and records at the call the parameters and the backend it really received.
Baselines with another native layout take transposed views, as a (B, H, N, D) caller would.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.registry import REGISTRY

from . import method_inputs
from .config import ConfigError


@dataclass(frozen=True)
class Case:
    """One comparison: every row timed on it shares these, so rows compare like with like."""

    input: str
    dtype: str
    causal: bool
    batch: int
    heads: int
    kv_heads: int
    seqlen: int
    head_dim: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


Forward = Callable[..., Any]
CPU_BACKENDS = {"auto": "torch"}  # what --backend asks for on CPU: timing never runs the Triton interpreter


@dataclass
class Bound:
    """A contender ready to run on one case: `forward(q, k, v, **flags)` and the extra inputs it passes."""

    forward: Forward
    inputs: dict[str, Any] = field(default_factory=dict)


def params_json(params: dict[str, Any]) -> str:
    """Parameters as compact, sorted JSON (tuples as lists, anything else JSON lacks as its str)."""
    return json.dumps(params, sort_keys=True, default=str)


class ZooMethod:
    """A registry method at one point of its parameter grid (`params_set`: the parameters the config
    set; the rest keep their registry defaults)."""

    kind = "attnzoo"

    def __init__(self, name: str, params_set: dict[str, Any] | None = None, requested_backend: str = "auto"):
        self.name = name
        self.params_set = dict(params_set or {})
        self.requested_backend = requested_backend
        self.info = attnzoo.info(name)
        self.received: dict[str, Any] | None = None  # parameters of the last call, as the method got them
        self.ran_backend: str | None = None  # backend of the last call
        unknown = sorted(set(self.params_set) - set(self.info.params))
        if unknown:
            raise ConfigError(f"params: method {name!r} has no parameter(s) {', '.join(unknown)}; "
                              f"it takes {', '.join(sorted(self.info.params)) or 'none'}")

    def _record(self, q, k, v, *, causal, scale, backend, **kwargs):
        """The registry function, called through attnzoo's API; notes what it receives."""
        self.received = {name: kwargs[name] for name in self.info.params if name in kwargs}
        self.ran_backend = backend
        return REGISTRY.function(self.name)(q, k, v, causal=causal, scale=scale, backend=backend, **kwargs)

    @functools.cached_property
    def method(self) -> attnzoo.Method:
        """The callable `attnzoo.get(name, **params_set)` would give, calling through `_record`. Its
        module is imported here, so a method whose import fails is skipped (with the error)."""
        REGISTRY.function(self.name)
        return attnzoo.Method(self.info, self._record, self.params_set)

    @property
    def family(self) -> str:
        return self.info.family

    @property
    def exact_as(self) -> str:
        """The registry name whose exact definition this contender computes."""
        return self.name

    @property
    def label(self) -> str:
        shown = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in self.params_set.items())
        return f"{self.name} {shown}" if shown else self.name

    @property
    def supports_backward(self) -> bool:
        return self.info.supports.backward

    @property
    def returns_block_mask(self) -> bool:
        return "return_block_mask" in self.info.supports.outputs

    def _backend_to_ask(self, device: torch.device) -> str:
        """On CPU the PyTorch implementation (the Triton interpreter is for tests, not for timing). A
        forced backend the method lacks makes its first call raise: it is skipped with that error."""
        if device.type == "cpu":
            return CPU_BACKENDS.get(self.requested_backend, self.requested_backend)
        return self.requested_backend

    def skip_reason(self, case: Case, device: torch.device) -> str | None:
        supports = self.info.supports
        low, high = supports.head_dims
        if case.causal and not supports.causal:
            return "non-causal only"
        if not case.causal and not supports.non_causal:
            return "causal only"
        if case.dtype not in supports.dtypes:
            return f"no {case.dtype} (supports {', '.join(supports.dtypes)})"
        if not low <= case.head_dim <= high:
            return f"head dim {case.head_dim} outside [{low}, {high}]"
        if case.heads != case.kv_heads and not supports.gqa:
            return "no grouped-query attention"
        return None

    def bind(self, q, k, v, case: Case, device: torch.device, seed: int) -> Bound:
        method, backend = self.method, self._backend_to_ask(device)
        inputs = method_inputs.build(self.name, q, k, v, causal=case.causal, params=method.params, seed=seed)

        def forward(q, k, v, **flags):  # flags (return_block_mask, a block_mask of its own) win
            return method(q, k, v, causal=case.causal, backend=backend, **{**inputs, **flags})

        return Bound(forward, inputs)

    def backend(self, device: torch.device) -> str | None:
        return self.ran_backend


def grid_points(grid: dict[str, tuple]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order given: {a: (1, 2), b: (3,)} ->
    [{a: 1, b: 3}, {a: 2, b: 3}]. No grid is one point, the registry defaults."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def _as_registry_value(info, name: str, value):
    """YAML lists are tuples in the registry (window_size): a grid of a list-valued parameter must be
    a list of lists, and each point becomes a tuple."""
    if not isinstance(info.params.get(name), tuple):
        return value
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"params: {info.name}.{name} takes a list (default {list(info.params[name])}); give "
                          f"its values as a list of lists, e.g. {name}: [{list(info.params[name])}], got {value!r}")
    return tuple(value)


def zoo_contenders(name: str, grid: dict[str, tuple], backend: str) -> list[ZooMethod]:
    """One contender per point of `name`'s parameter grid."""
    info = attnzoo.info(name)
    points = grid_points(grid)
    return [ZooMethod(name, {k: _as_registry_value(info, k, v) for k, v in point.items()}, backend)
            for point in points]


@dataclass
class Baseline:
    """An outside implementation, timed in the same run on the same inputs."""

    name: str
    family: str
    make: Callable[[Case, dict[str, Any]], Forward]
    available: Callable[[Case, torch.device], str | None]
    exact_as: str = "dense"  # the registry method whose exact definition it computes
    inputs_of: str | None = None  # the registry method whose extra inputs it takes (fla_gla: gla's gate)
    supports_backward: bool = True
    returns_block_mask: bool = False
    kind = "baseline"
    params_set: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name

    @property
    def received(self) -> dict[str, Any]:
        return {}

    def backend(self, device: torch.device) -> str:
        return self.name

    def skip_reason(self, case: Case, device: torch.device) -> str | None:
        return self.available(case, device)

    def bind(self, q, k, v, case: Case, device: torch.device, seed: int) -> Bound:
        inputs = {} if self.inputs_of is None else method_inputs.build(
            self.inputs_of, q, k, v, causal=case.causal, params={}, seed=seed)
        return Bound(self.make(case, inputs), inputs)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _sdpa(sdp_backend_name: str) -> Callable[[Case, dict], Forward]:
    def make(case: Case, inputs: dict) -> Forward:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdp_backend = getattr(SDPBackend, sdp_backend_name)
        gqa = case.heads != case.kv_heads

        def forward(q, k, v):
            with sdpa_kernel(sdp_backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)

        return forward

    return make


def _flash_attn(case: Case, inputs: dict) -> Forward:
    from flash_attn import flash_attn_func

    def forward(q, k, v):  # flash-attn's layout is (B, N, H, D)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=case.causal)
        return out.transpose(1, 2)

    return forward


def _fla_gla(case: Case, inputs: dict) -> Forward:
    from fla.ops.gla import chunk_gla

    gate = inputs["g"].transpose(1, 2)  # the gate attnzoo's gla gets, in fla's (B, T, H, D) layout

    def forward(q, k, v):
        out, _ = chunk_gla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate)
        return out.transpose(1, 2)

    return forward


def _needs(*, cuda: bool = False, module: str | None = None, causal_only: bool = False,
           half_only: bool = False, mha_only: bool = False) -> Callable[[Case, torch.device], str | None]:
    def available(case: Case, device: torch.device) -> str | None:
        if module and not _installed(module):
            return f"{module} is not installed"
        if cuda and device.type != "cuda":
            return "needs CUDA"
        if causal_only and not case.causal:
            return "causal only"
        if half_only and case.dtype not in ("float16", "bfloat16"):
            return "float16/bfloat16 only"
        if mha_only and case.heads != case.kv_heads:
            return "no grouped-query attention"
        return None

    return available


BASELINES = {
    "sdpa_flash": lambda: Baseline("sdpa_flash", "exact", _sdpa("FLASH_ATTENTION"), _needs()),
    "sdpa_efficient": lambda: Baseline("sdpa_efficient", "exact", _sdpa("EFFICIENT_ATTENTION"), _needs(cuda=True)),
    "flash_attn": lambda: Baseline("flash_attn", "exact", _flash_attn,
                                   _needs(cuda=True, module="flash_attn", half_only=True)),
    "fla_gla": lambda: Baseline("fla_gla", "linear", _fla_gla,
                                _needs(cuda=True, module="fla", causal_only=True, half_only=True, mha_only=True),
                                exact_as="gla", inputs_of="gla"),
}


def baselines(names: tuple[str, ...], device: torch.device) -> list[Baseline]:
    """The baselines asked for; 'auto' = those that are installed and run on `device`."""
    if names == ("none",):
        return []
    if names == ("auto",):
        probe = Case("random", "bfloat16", True, 1, 1, 1, 1, 64)
        chosen = [make() for make in BASELINES.values()]
        return [b for b in chosen if b.available(probe, device) is None]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}, auto, none")
    return [BASELINES[name]() for name in names]
