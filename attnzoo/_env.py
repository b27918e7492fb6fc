"""Environment switches read at call time, shared by the kernels, the twins and the ops (a leaf module:
it imports nothing of attnzoo).

- TRITON_INTERPRET=1: Triton kernels run on CPU tensors under the Triton interpreter.
- ATTNZOO_INTERPRET_TILE (default 16): the one tile size used under the interpreter.
- ATTNZOO_POISON=1: kernel and twin outputs start as NaN, so an element nobody writes shows.

`INTERPRETER_LOCK` serialises interpreted launches: the Triton interpreter keeps global state (it
patches triton.language and holds one grid position), so two threads launching at once corrupt each
other. `serialised(fn)` runs fn under that lock when the interpreter is on, directly otherwise.
"""

from __future__ import annotations

import functools
import os
import threading

INTERPRETER_LOCK = threading.RLock()


def triton_interpreting() -> bool:
    """True when Triton kernels run under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpret_tile() -> int:
    return int(os.environ.get("ATTNZOO_INTERPRET_TILE", "16"))


def poisoning() -> bool:
    return os.environ.get("ATTNZOO_POISON", "0") == "1"


def serialised(fn):
    """fn, run under INTERPRETER_LOCK while TRITON_INTERPRET=1 (compiled launches need no lock)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not triton_interpreting():
            return fn(*args, **kwargs)
        with INTERPRETER_LOCK:
            return fn(*args, **kwargs)
    return run
