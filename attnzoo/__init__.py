"""attnzoo: sparse, linear and exact attention methods behind one API.

    import attnzoo
    out = attnzoo.get("dense")(q, k, v, causal=True)      # q (B, Hq, N, D), k/v (B, Hk, M, D)
"""

from . import masks
from .api import Method, attention, get, linear_state
from .block_mask import BlockMask
from .registry import MethodInfo, info, list_methods, register

__version__ = "0.1.0"

__all__ = ["BlockMask", "Method", "MethodInfo", "attention", "get", "info", "linear_state", "list_methods", "masks", "patch", "patched", "register",
           "unpatch", "__version__"]

_HF_EXPORTS = ("patch", "unpatch", "patched")


def __getattr__(name):
    """attnzoo.patch / unpatch / patched live in attnzoo.hf, imported on first use (transformers is optional)."""
    if name in _HF_EXPORTS:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'attnzoo' has no attribute {name!r}")
