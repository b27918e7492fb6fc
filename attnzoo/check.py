"""`attnzoo check`: run every registered method once on small random inputs and compare it with
its float64 oracle (`attnzoo.reference.exact_output`), on the best device and backend available here.

What each method is compared with:
- the oracle of its own definition, given the parameters and extra inputs it received;
- sparse methods: masked softmax attention over the blocks the method returned;
- a third-party method without an oracle: dense attention if its family is exact, the masked
  reference if it is sparse and returns its blocks, else nothing ("ok (no reference)").

Inputs are small (q (2, 4, N, D), N = 128 on CPU) and freed after each method, so that the whole
check stays well under 1 GB of memory; `based` runs at head dim 16 (its Taylor features are
1 + D + D(D+1)/2 wide, and it is meant for small q/k dims).
"""

from __future__ import annotations

import gc
import inspect
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from . import reference
from .api import get
from .ops.dispatch import resolve as resolve_backend
from .registry import info as method_info
from .registry import list_methods

_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
_HEAD_DIM = {"based": 16}  # methods meant for small q/k dims


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
    seconds: float | None = None  # the whole check of this method: inputs, call and oracle


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _inputs(info, device: torch.device, seed: int):
    """Small random q, k, v the method supports: GQA where it can, a head dim in its range."""
    dtype = torch.bfloat16 if device.type == "cuda" and "bfloat16" in info.supports.dtypes else torch.float32
    lo, hi = info.supports.head_dims
    head_dim = min(max(_HEAD_DIM.get(info.name, 64), lo), hi)
    kv_heads = 2 if info.supports.gqa else 4
    n = 256 if device.type == "cuda" else 128
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, n, head_dim, generator=gen).to(device=device, dtype=dtype)
               for h in (4, kv_heads, kv_heads))
    return q, k, v


def _example_kwargs(module):
    """A method module's optional `example_kwargs(q, k, v, *, causal)`, or None."""
    hook = getattr(module, "example_kwargs", None)
    return hook if inspect.isfunction(hook) else None


def _expected(info, q, k, v, causal, kwargs, block_mask):
    """The float64 oracle output, or None when there is none."""
    scale = q.shape[-1] ** -0.5
    blocks = None if block_mask is None else (block_mask.to_dense(), block_mask.block_size)
    if info.name in reference.known_methods():
        params = {**info.params, **{key: value for key, value in kwargs.items() if key in info.params}}
        inputs = {key: value for key, value in kwargs.items() if key not in info.params}
        return reference.exact_output(info.name, q, k, v, causal=causal, scale=scale, params=params, inputs=inputs,
                                      block_mask=blocks)
    if info.family == "exact":
        return reference.exact_output("dense", q, k, v, causal=causal, scale=scale, params={}, inputs={})
    if info.family == "sparse" and blocks is not None:
        return reference.exact_output("block_sparse", q, k, v, causal=causal, scale=scale, params={}, inputs={},
                                      block_mask=blocks)
    return None


def check_method(name: str, device: torch.device, seed: int = 0) -> CheckRow:
    start = time.perf_counter()
    row = _check_method(name, device, seed)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row.seconds = time.perf_counter() - start
    return row


def _check_method(name: str, device: torch.device, seed: int) -> CheckRow:
    info = method_info(name)
    causal = info.supports.causal
    try:
        module = info.load_module()
        q, k, v = _inputs(info, device, seed)
        example_kwargs = _example_kwargs(module)
        kwargs = example_kwargs(q, k, v, causal=causal) if example_kwargs else {}
        backend = resolve_backend("auto", device, info.supports.backends, name)
    except Exception as err:  # a method that cannot even start is reported, not fatal to the table
        return CheckRow(name, info.family, device.type, "-", "-", "-", None, None, f"FAIL: {type(err).__name__}: {err}")

    shape = f"q{tuple(q.shape)} kv{tuple(k.shape)}"
    dtype_name = str(q.dtype).replace("torch.", "")
    fn = get(name)
    wants_mask = "return_block_mask" in info.supports.outputs
    try:
        with torch.no_grad():
            start = time.perf_counter()
            result = fn(q, k, v, causal=causal, **kwargs, **({"return_block_mask": True} if wants_mask else {}))
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed_ms = (time.perf_counter() - start) * 1e3
            out, block_mask = result if wants_mask else (result, None)
            if isinstance(out, tuple):  # methods that also return a state
                out = out[0]
            expected = _expected(info, q, k, v, causal, kwargs, block_mask)
    except Exception as err:
        return CheckRow(name, info.family, device.type, backend, shape, dtype_name, None, None,
                        f"FAIL: {type(err).__name__}: {err}")

    if not torch.isfinite(out).all():
        return CheckRow(name, info.family, device.type, backend, shape, dtype_name, None, elapsed_ms,
                        "FAIL: non-finite output")
    if expected is None:
        return CheckRow(name, info.family, device.type, backend, shape, dtype_name, None, elapsed_ms,
                        "ok (no reference)")
    error = (out.double() - expected.to(out.device)).abs().max().item()
    tolerance = _TOLERANCE[q.dtype]
    status = "ok" if error <= tolerance else f"FAIL: max error {error:.2e} > {tolerance:.0e}"
    return CheckRow(name, info.family, device.type, backend, shape, dtype_name, error, elapsed_ms, status)


def progress_line(row: CheckRow) -> str:
    """One line per checked method: method, backend, error, seconds, status."""
    error = "-" if row.max_error is None else f"{row.max_error:.2e}"
    seconds = "-" if row.seconds is None else f"{row.seconds:.1f} s"
    return f"  checked {row.method} ({row.backend}): max error {error}, {seconds}: {row.status}"


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


def iter_rows(methods: list[str] | None = None, device: str | None = None, seed: int = 0) -> Iterator[CheckRow]:
    """Check the methods one at a time, yielding each row as soon as its method is done."""
    target = _pick_device(device)
    for name in methods or list_methods():
        yield check_method(name, target, seed)


def run(methods: list[str] | None = None, device: str | None = None, seed: int = 0) -> list[CheckRow]:
    return list(iter_rows(methods, device, seed))
