"""Environment switches read at call time, shared by the kernels, the twins and the ops (a leaf module:
it imports nothing of attnzoo).

- TRITON_INTERPRET=1: Triton kernels run on CPU tensors under the Triton interpreter.
- ATTNZOO_INTERPRET_TILE (default 16): the one tile size used under the interpreter.
- ATTNZOO_POISON=1: kernel and twin outputs start as NaN, so an element nobody writes shows.
"""

from __future__ import annotations

import os


def triton_interpreting() -> bool:
    """True when Triton kernels run under the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpret_tile() -> int:
    return int(os.environ.get("ATTNZOO_INTERPRET_TILE", "16"))


def poisoning() -> bool:
    return os.environ.get("ATTNZOO_POISON", "0") == "1"
