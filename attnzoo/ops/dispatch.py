"""Which implementation runs a call: Triton kernels, the PyTorch twin, or fla. Only attnzoo/ops/ looks at
backend names: the API resolves the requested one here, and each op turns it into its implementation.

- CUDA tensors: the Triton kernels.
- CPU tensors with TRITON_INTERPRET=1 in the environment (set before triton is imported): the same
  Triton kernels under the Triton interpreter (slow; for tests on small shapes).
- CPU tensors otherwise: the PyTorch implementation of the same algorithm.
`backend="triton" | "torch" | "fla"` forces one; a forced backend that cannot run raises.
"""

from __future__ import annotations

import importlib
import importlib.util
import types

import torch

from .._env import serialised, triton_interpreting
from ..torch_impl import block_target as twin_block_target
from ..torch_impl import flash as twin_flash
from ..torch_impl import linear as twin_linear
from ..torch_impl import scoring as twin_scoring

BACKENDS = ("auto", "triton", "torch", "fla")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def can_run(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether `backend` can run on `device`, and if not, why."""
    if backend == "torch":
        return True, ""
    if not triton_available():
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and triton_interpreting():
        if backend == "fla":
            return False, "fla's kernels need CUDA (they do not run under the Triton interpreter)"
        return True, ""
    return False, (
        f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is "
        f"imported; got tensors on {device}"
    )


def resolve(backend: str, device: torch.device, supported: tuple[str, ...], method: str) -> str:
    """Turn the requested backend into the one that runs, or raise if a forced one cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for candidate in ("triton", "torch"):
            if candidate in supported and can_run(candidate, device)[0]:
                return candidate
        for candidate in supported:
            if can_run(candidate, device)[0]:
                return candidate
        raise ValueError(f"method {method!r} has no backend that runs on {device} (it has {', '.join(supported)})")
    if backend not in supported:
        raise ValueError(f"method {method!r} has no {backend!r} backend; it has {', '.join(supported)}")
    ok, why = can_run(backend, device)
    if not ok:
        raise ValueError(f"backend={backend!r} cannot run method {method!r}: {why}")
    return backend


_PACKAGES = {"triton": "attnzoo.kernels", "torch": "attnzoo.torch_impl"}
# (op, backend) -> what implements it. The twins are pure torch and cheap to import, so they are here from
# the start: torch.compile then finds the twin by a dict lookup instead of an import (an import inside
# the traced region is a graph break). A Triton module joins on first use.
_IMPLEMENTATIONS: dict[tuple[str, str], object] = {
    ("block_target", "torch"): twin_block_target, ("flash", "torch"): twin_flash,
    ("linear", "torch"): twin_linear, ("scoring", "torch"): twin_scoring,
}


def implementation(op: str, backend: str):
    """What implements `op` for `backend`: attnzoo/kernels/<op>.py (Triton) or its twin
    attnzoo/torch_impl/<op>.py; both follow one signature. The Triton module is imported on first use
    and its public functions come `serialised` (one interpreted launch at a time, see attnzoo/_env.py)."""
    if backend not in _PACKAGES:
        raise ValueError(f"the {op} op has backends 'triton' and 'torch', not {backend!r}")
    found = _IMPLEMENTATIONS.get((op, backend))
    if found is None:
        found = _launchers(importlib.import_module(f"{_PACKAGES[backend]}.{op}"))
        _IMPLEMENTATIONS[(op, backend)] = found
    return found


def _launchers(module) -> types.SimpleNamespace:
    """The public functions of a Triton op module, each wrapped in `serialised`."""
    public = {name: serialised(fn) for name, fn in vars(module).items()
              if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", None) == module.__name__}
    return types.SimpleNamespace(**public)
