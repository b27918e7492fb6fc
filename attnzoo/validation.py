"""Input checks at the API boundary, shared by every method.

Every error names the argument, what it got and what was expected, so that a wrong call fails
before any kernel runs and never returns a silently wrong result.
"""

from __future__ import annotations

import torch

from .registry import MethodInfo

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def check_qkv(q, k, v, *, info: MethodInfo) -> None:
    """Validate q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) against the method's `supports`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (batch, heads, seqlen, head_dim), got shape {tuple(t.shape)}")
    sup = info.supports
    for name, t in (("q", q), ("k", k), ("v", v)):
        dtype_name = _DTYPE_NAMES.get(t.dtype)
        if dtype_name not in sup.dtypes:
            raise TypeError(f"{name} has dtype {t.dtype}; method {info.name!r} supports {', '.join(sup.dtypes)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")

    (B, Hq, N, D), (Bk, Hk, M, Dk), (Bv, Hv, Mv, Dv) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {Bv} (shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})")
    if B < 1:
        raise ValueError(f"batch size must be >= 1, got q shape {tuple(q.shape)}")
    if Hk != Hv:
        raise ValueError(f"k and v must have the same number of heads, got k {Hk} and v {Hv}")
    if Hq < 1 or Hk < 1 or Hq % Hk != 0:
        raise ValueError(f"query heads must be a multiple of key/value heads (GQA), got q heads {Hq}, k heads {Hk}")
    if Hq != Hk and not sup.gqa:
        raise ValueError(f"method {info.name!r} does not support grouped-query attention: q heads {Hq} != k heads {Hk}")
    if M != Mv:
        raise ValueError(f"k and v must have the same sequence length, got k {M} and v {Mv}")
    if N < 1:
        raise ValueError(f"q sequence length must be >= 1, got shape {tuple(q.shape)}")
    if M < 1:
        raise ValueError(f"k/v sequence length must be >= 1, got shape {tuple(k.shape)}")
    if D != Dk:
        raise ValueError(f"q and k head dims must match, got q {D} and k {Dk}")
    lo, hi = sup.head_dims
    if not lo <= D <= hi:
        raise ValueError(f"q/k head dim must be in [{lo}, {hi}] for method {info.name!r}, got {D}")
    if not lo <= Dv <= hi:
        raise ValueError(f"v head dim must be in [{lo}, {hi}] for method {info.name!r}, got {Dv}")


def check_causal(causal, *, info: MethodInfo) -> bool:
    """The validated `causal` flag (check_bool), which the method must support."""
    causal = check_bool("causal", causal)
    sup = info.supports
    if causal and not sup.causal:
        why = f": {sup.causal_note}" if sup.causal_note else ""
        raise ValueError(f"method {info.name!r} is non-causal only; call it with causal=False{why}")
    if not causal and not sup.non_causal:
        why = f": {sup.non_causal_note}" if sup.non_causal_note else ""
        raise ValueError(f"method {info.name!r} is causal only; call it with causal=True{why}")
    return causal


# ---------------------------------------------------------------------------------------------------
# Scalars: one helper per kind, used by every method for its parameters. Numbers may come as Python,
# numpy or 0-d tensor scalars; bools are never numbers; every error names the argument and its value.
# ---------------------------------------------------------------------------------------------------


_SYMBOLIC = (torch.SymBool, torch.SymInt, torch.SymFloat)  # numbers of shapes under torch.compile
_INTS = (int, torch.SymInt)
_REALS = (int, float, torch.SymInt, torch.SymFloat)


def _scalar(value):
    """A 0-d tensor or a numpy scalar as the Python scalar it holds; anything else unchanged. Python and
    symbolic numbers return first: torch.compile traces this without a graph break."""
    if isinstance(value, (bool, int, float) + _SYMBOLIC):
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 and value.device.type != "meta" else value
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()
    return value


def check_bool(name: str, value) -> bool:
    """A flag: True or False (numpy bools too), never a truthy string or number."""
    value = _scalar(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r} (use True or False)")
    return value


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """An integer in [low, high] (either bound optional); floats, even 2.0, are refused."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, _INTS):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {_bounds(low, high)}, got {value}")
    return value


def check_real(name: str, value, *, low: float | None = None, low_open: bool = False, high: float | None = None,
               what: str = "a float") -> float:
    """A finite real number (an int or a float) in [low, high] ((low, high] with `low_open`), either
    bound optional; `what` names the expected value in the type error."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, _REALS):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if not value - value == 0:  # NaN and +-inf (torch.compile traces this for a SymFloat, not isfinite)
        raise ValueError(f"{name} must be finite, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        finite = "" if low is not None and high is not None else "finite "
        raise ValueError(f"{name} must be a {finite}float {_bounds(low, high, low_open=low_open)}, got {value}")
    return float(value)


def _bounds(low, high, *, low_open: bool = False) -> str:
    """'in [low, high]' ('(low, high]' with low_open), '>= low' or '<= high', for the bounds given."""
    def text(x):
        return f"{x:g}" if isinstance(x, float) else str(x)

    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{text(low)}, {text(high)}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {text(low)}"
    return f"<= {text(high)}"


def check_positive(name: str, value) -> float:
    """A finite number > 0 (an eps, a bandwidth, a temperature)."""
    return check_real(name, value, low=0.0, low_open=True)


def check_choice(name: str, value, choices) -> str:
    """One of the strings `choices`."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {type(value).__name__} "
                        f"{value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_power_of_two(name: str, value, *, low: int = 1) -> int:
    """An int power of two >= low (a block size, a stride)."""
    value = check_int(name, value)
    if value < low or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {low}, got {value}")
    return value


def check_block_size(block_size) -> tuple[int, int]:
    """(block_q, block_k) from an int (square blocks) or a pair, each a power of two >= 16."""
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise TypeError(f"block_size must be an int or a (block_q, block_k) pair of ints, got {block_size!r}")
        return (check_power_of_two("block_size[0] (block_q)", block_size[0], low=16),
                check_power_of_two("block_size[1] (block_k)", block_size[1], low=16))
    size = check_power_of_two("block_size", block_size, low=16)
    return size, size


def check_optional(check, name: str, value, **bounds):
    """None, or `value` passed through `check(name, value, **bounds)`."""
    return None if value is None else check(name, value, **bounds)


def check_finite(name: str, t: torch.Tensor, *, allow_inf: bool = False) -> None:
    """A tensor parameter (a gate, a bias, a kernel) without NaN or inf, or without NaN only with
    `allow_inf` (a bias's -inf masks a pair). Values are not read on the meta device. Under
    torch.compile the check is an assertion inside the graph (RuntimeError naming `name`, no graph
    break); eagerly a ValueError with the count of bad entries."""
    if t.device.type == "meta":
        return
    bad = torch.isnan(t) if allow_inf else ~torch.isfinite(t)
    what = "NaN" if allow_inf else "NaN or inf"
    expected = f"{name} must be finite{' or +-inf' if allow_inf else ''}"
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{expected}, got {what} entries")
        return
    if bool(bad.any()):
        raise ValueError(f"{expected}, got a tensor with {int(bad.sum())} {what} entries of {t.numel()}")


def resolve_scale(scale, head_dim: int) -> float:
    """`scale` defaults to head_dim ** -0.5; a given one must be a finite real number."""
    if scale is None:
        return head_dim ** -0.5
    return check_real("scale", scale, what="a float or None")


def check_window(window_size) -> tuple[int, int]:
    """(left, right) with -1 meaning unbounded, as in flash-attn."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"window_size must be a (left, right) pair of ints, got {window_size!r}")
    left, right = window_size
    return check_int("window_size left", left, low=-1), check_int("window_size right", right, low=-1)


def check_softcap(softcap) -> float:
    """softcap >= 0, finite (0 disables it)."""
    return check_real("softcap", softcap, low=0.0)


def check_bias(bias, q: torch.Tensor, m: int, pack=None) -> None:
    """An additive attention bias: a float tensor of at most 4 dims broadcastable to (B, Hq, N, M),
    in float32 or q's dtype, on q's device, without NaN (-inf is allowed: it masks a pair). For a pack
    (attnzoo.geometry.Pack) only the sequences' diagonal blocks are read, so only they are checked."""
    B, Hq, N = q.shape[:3]
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor broadcastable to (B, Hq, N, M), got {type(bias).__name__}")
    target = (B, Hq, N, m)
    fits = bias.dim() <= 4 and all(got in (1, want) for got, want in zip(reversed(bias.shape), reversed(target)))
    if not fits:
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected a shape broadcastable to (B, Hq, N, M) = "
                         f"{target}")
    if bias.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"bias has dtype {bias.dtype}; expected torch.float32 or q's dtype {q.dtype}")
    if bias.device != q.device:
        raise ValueError(f"bias must be on {q.device}, got {bias.device}")
    if pack is None:
        check_finite("bias", bias, allow_inf=True)  # -inf masks a pair
        return
    full = bias[(None,) * (4 - bias.dim())]

    def part(dim: int, span: slice) -> slice:  # a broadcast dimension is read whole
        return slice(None) if full.shape[dim] == 1 else span

    blocks = [full[..., part(2, pack.q_span(s)), part(3, pack.k_span(s))].flatten()
              for s in range(len(pack)) if pack.q_lengths[s] and pack.k_lengths[s]]
    check_finite("bias", torch.cat(blocks), allow_inf=True)


def check_sinks(sinks, q: torch.Tensor) -> None:
    """Per-head sink logits: a finite float tensor (Hq,) on q's device."""
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor of shape (Hq,) = ({q.shape[1]},), got {type(sinks).__name__}")
    if tuple(sinks.shape) != (q.shape[1],) or not sinks.is_floating_point():
        raise ValueError(f"sinks has shape {tuple(sinks.shape)} and dtype {sinks.dtype}; expected a float tensor "
                         f"of shape (Hq,) = ({q.shape[1]},)")
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on {q.device}, got {sinks.device}")
    check_finite("sinks", sinks)


def check_tensor(name: str, t, *, shape: tuple, like: torch.Tensor, dtype=None, finite: bool = False) -> None:
    """Check an extra input tensor: `shape` entries may be an int, a tuple of allowed ints, or None (any);
    `finite`: refuse NaN and inf (check_finite)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape):
        raise ValueError(f"{name} must have {len(shape)} dims, got shape {tuple(t.shape)}; expected {_fmt(shape)}")
    for got, want in zip(t.shape, shape):
        allowed = (want,) if isinstance(want, int) else want
        if want is not None and got not in allowed:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {_fmt(shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {t.device}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise TypeError(f"{name} has dtype {t.dtype}; expected {dtype}")
    if finite:
        check_finite(name, t)


def _fmt(shape: tuple) -> str:
    def one(s):
        if s is None:
            return "*"
        if isinstance(s, tuple):
            return "|".join(str(x) for x in s)
        return str(s)

    return "(" + ", ".join(one(s) for s in shape) + ")"
