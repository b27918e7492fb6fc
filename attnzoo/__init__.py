"""attnzoo: sparse, linear and exact attention methods behind one API.

    import attnzoo
    out = attnzoo.get("dense")(q, k, v, causal=True)      # q (B, Hq, N, D), k/v (B, Hk, M, D)
"""

from .api import Method, attention, get
from .registry import MethodInfo, info, list_methods, register

__version__ = "0.1.0"

__all__ = ["Method", "MethodInfo", "attention", "get", "info", "list_methods", "register", "__version__"]
