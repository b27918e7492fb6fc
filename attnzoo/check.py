"""`attnzoo check`: run every registered method once on small random inputs and compare it with
its float64 reference, on the best device and backend available here.

What each family is compared with:
- exact: the dense float64 reference (or the method module's own `reference`, e.g. with a bias);
- sparse: the dense float64 reference masked with the blocks the method returned;
- linear: the method module's own float64 `reference` (recurrent form), when it has one.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from . import backend as _backend
from . import reference
from .api import get
from .registry import info as method_info
from .registry import list_methods

_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass
class CheckRow:
    method: str
    family: str
    device: str
    backend: str
    shape: str
    dtype: str
    max_error: float | None
    time_ms: float | None
    status: str  # "ok", "FAIL: ...", "skip: ..."


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _inputs(info, device: torch.device, seed: int):
    """Small random q, k, v the method supports: GQA where it can, a head dim in its range."""
    dtype = torch.bfloat16 if device.type == "cuda" and "bfloat16" in info.supports.dtypes else torch.float32
    lo, hi = info.supports.head_dims
    head_dim = min(max(64, lo), hi)
    kv_heads = 2 if info.supports.gqa else 4
    n = 256 if device.type == "cuda" else 128
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, n, head_dim, generator=gen).to(device=device, dtype=dtype)
               for h in (4, kv_heads, kv_heads))
    return q, k, v


def _module_hook(module, name: str):
    """A method module's optional function `name` (example_kwargs, reference), or None."""
    hook = getattr(module, name, None)
    return hook if inspect.isfunction(hook) else None


def _expected(info, module, q, k, v, causal, kwargs, block_mask):
    """The float64 reference output, or None when the method has none."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5
    own_reference = _module_hook(module, "reference")
    if own_reference is not None:
        return own_reference(q64, k64, v64, causal=causal, scale=scale, **{**info.params, **kwargs})
    if info.family == "exact":
        return reference.attention(q64, k64, v64, causal=causal, scale=scale)
    if info.family == "sparse" and block_mask is not None:
        mask = reference.expand_block_mask(block_mask.to_dense(), q.shape[2], k.shape[2], *block_mask.block_size)
        return reference.attention(q64, k64, v64, causal=causal, scale=scale, mask=mask)
    return None


def check_method(name: str, device: torch.device, seed: int = 0) -> CheckRow:
    info = method_info(name)
    causal = info.supports.causal
    try:
        module = info.load_module()
        q, k, v = _inputs(info, device, seed)
        example_kwargs = _module_hook(module, "example_kwargs")
        kwargs = example_kwargs(q, k, v, causal=causal) if example_kwargs else {}
        backend = _backend.resolve("auto", device, info.supports.backends, name)
    except Exception as err:  # a method that cannot even start is reported, not fatal to the table
        return CheckRow(name, info.family, device.type, "-", "-", "-", None, None, f"FAIL: {type(err).__name__}: {err}")

    shape = f"q{tuple(q.shape)} kv{tuple(k.shape)}"
    dtype_name = str(q.dtype).replace("torch.", "")
    fn = get(name)
    wants_mask = "return_block_mask" in info.supports.outputs
    try:
        start = time.perf_counter()
        result = fn(q, k, v, causal=causal, **kwargs, **({"return_block_mask": True} if wants_mask else {}))
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        out, block_mask = result if wants_mask else (result, None)
        if isinstance(out, tuple):  # methods that also return a state
            out = out[0]
        expected = _expected(info, module, q, k, v, causal, kwargs, block_mask)
    except Exception as err:
        return CheckRow(name, info.family, device.type, backend, shape, dtype_name, None, None,
                        f"FAIL: {type(err).__name__}: {err}")

    if not torch.isfinite(out).all():
        return CheckRow(name, info.family, device.type, backend, shape, dtype_name, None, elapsed_ms,
                        "FAIL: non-finite output")
    if expected is None:
        return CheckRow(name, info.family, device.type, backend, shape, dtype_name, None, elapsed_ms,
                        "ok (no reference)")
    error = (out.double() - expected).abs().max().item()
    tolerance = _TOLERANCE[q.dtype]
    status = "ok" if error <= tolerance else f"FAIL: max error {error:.2e} > {tolerance:.0e}"
    return CheckRow(name, info.family, device.type, backend, shape, dtype_name, error, elapsed_ms, status)


def format_table(rows: list[CheckRow]) -> str:
    header = ("method", "family", "device", "backend", "shape", "dtype", "max error", "time (ms)", "status")
    lines = [header] + [
        (r.method, r.family, r.device, r.backend, r.shape, r.dtype,
         "-" if r.max_error is None else f"{r.max_error:.2e}",
         "-" if r.time_ms is None else f"{r.time_ms:.1f}", r.status)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def run(methods: list[str] | None = None, device: str | None = None, seed: int = 0) -> list[CheckRow]:
    target = _pick_device(device)
    return [check_method(name, target, seed) for name in (methods or list_methods())]
