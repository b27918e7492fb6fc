"""Everything the sweep times: attnzoo methods (from the registry) and outside baselines.

A contender answers two questions for a case: can it run it (`skip_reason`, None when it can), and
how (`bind`: a function of q, k, v in attnzoo's (B, H, N, D) layout returning (B, H, N, Dv), with any
extra inputs the method needs already made). Baselines with another native layout take transposed
views, as a (B, H, N, D) caller would.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import backend as backends

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


@dataclass
class ZooMethod:
    """A registry method with parameters bound (registry defaults unless the config overrides)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    requested_backend: str = "auto"
    kind = "attnzoo"

    def __post_init__(self):
        self.info = attnzoo.info(self.name)
        accepted = set(self.info.params) | set(self.info.inputs)
        unknown = sorted(set(self.params) - accepted)
        if unknown:
            raise ConfigError(f"params: method {self.name!r} has no parameter(s) {', '.join(unknown)}; "
                              f"it takes {', '.join(sorted(accepted)) or 'none'}")

    @functools.cached_property
    def method(self) -> attnzoo.Method:
        """The bound callable; its module is imported here, so a method whose import fails is
        skipped by the sweep (with the error) instead of stopping it."""
        return attnzoo.get(self.name, **self.params)

    @property
    def family(self) -> str:
        return self.info.family

    @property
    def label(self) -> str:
        return self.name + (json.dumps(self.params, sort_keys=True) if self.params else "")

    @property
    def supports_backward(self) -> bool:
        return self.info.supports.backward

    @property
    def returns_block_mask(self) -> bool:
        return "return_block_mask" in self.info.supports.outputs

    def backend(self, device: torch.device) -> str:
        """The backend that runs: the requested one, else triton/torch on CUDA and torch on CPU (the
        Triton interpreter is for tests, not for timing)."""
        wanted = self.requested_backend
        if wanted == "auto" and device.type == "cpu":
            wanted = "torch"
        return backends.resolve(wanted, device, self.info.supports.backends, self.name)

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
        try:
            self.backend(device)
        except ValueError as err:
            return str(err)
        return None

    def _example_inputs(self, q, k, v, causal: bool) -> dict[str, Any]:
        module = self.info.load_module()
        make = getattr(module, "example_kwargs", None)
        return dict(make(q, k, v, causal=causal)) if make is not None else {}

    def bind(self, q, k, v, case: Case, device: torch.device) -> Forward:
        extra = self._example_inputs(q, k, v, case.causal)
        backend = self.backend(device)

        def forward(q, k, v, **flags):  # flags given at call time override the example inputs
            return self.method(q, k, v, causal=case.causal, backend=backend, **{**extra, **flags})

        return forward


@dataclass
class Baseline:
    """An outside implementation, timed in the same run on the same inputs."""

    name: str
    family: str
    make: Callable[[Case], Forward]
    available: Callable[[Case, torch.device], str | None]
    supports_backward: bool = True
    returns_block_mask: bool = False
    kind = "baseline"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name

    def backend(self, device: torch.device) -> str:
        return self.name

    def skip_reason(self, case: Case, device: torch.device) -> str | None:
        return self.available(case, device)

    def bind(self, q, k, v, case: Case, device: torch.device) -> Forward:
        return self.make(case)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _sdpa(sdp_backend_name: str) -> Callable[[Case], Forward]:
    def make(case: Case) -> Forward:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdp_backend = getattr(SDPBackend, sdp_backend_name)
        gqa = case.heads != case.kv_heads

        def forward(q, k, v):
            with sdpa_kernel(sdp_backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)

        return forward

    return make


def _flash_attn(case: Case) -> Forward:
    from flash_attn import flash_attn_func

    def forward(q, k, v):  # flash-attn's layout is (B, N, H, D)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=case.causal)
        return out.transpose(1, 2)

    return forward


def _fla_gla(case: Case) -> Forward:
    from fla.ops.gla import chunk_gla

    gates: dict[tuple, torch.Tensor] = {}

    def forward(q, k, v):  # fla's layout is (B, T, H, D); the gate is GLA's log-sigmoid forget gate
        key = (q.shape, q.device, q.dtype)
        if key not in gates:
            generator = torch.Generator(device=q.device).manual_seed(0)
            raw = torch.randn(q.transpose(1, 2).shape, generator=generator, device=q.device)
            gates[key] = (F.logsigmoid(raw) / 16).to(q.dtype)
        heads_per_kv = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(heads_per_kv, dim=1) for t in (k, v))
        out, _ = chunk_gla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gates[key])
        return out.transpose(1, 2)

    return forward


def _needs(*, cuda: bool = False, module: str | None = None, causal_only: bool = False,
           half_only: bool = False) -> Callable[[Case, torch.device], str | None]:
    def available(case: Case, device: torch.device) -> str | None:
        if module and not _installed(module):
            return f"{module} is not installed"
        if cuda and device.type != "cuda":
            return "needs CUDA"
        if causal_only and not case.causal:
            return "causal only"
        if half_only and case.dtype not in ("float16", "bfloat16"):
            return "float16/bfloat16 only"
        return None

    return available


BASELINES = {
    "sdpa_flash": lambda: Baseline("sdpa_flash", "exact", _sdpa("FLASH_ATTENTION"), _needs()),
    "sdpa_efficient": lambda: Baseline("sdpa_efficient", "exact", _sdpa("EFFICIENT_ATTENTION"), _needs(cuda=True)),
    "flash_attn": lambda: Baseline("flash_attn", "exact", _flash_attn,
                                   _needs(cuda=True, module="flash_attn", half_only=True)),
    "fla_gla": lambda: Baseline("fla_gla", "linear", _fla_gla,
                                _needs(cuda=True, module="fla", causal_only=True, half_only=True)),
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
