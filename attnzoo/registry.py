"""The method registry: `registry.yaml` plus whatever third parties `register()`.

The YAML is read once, on first use. A method's module is imported only when that method is
asked for, so `import attnzoo` stays fast and a broken optional dependency breaks one method,
not the package.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Mapping

import yaml

FAMILIES = ("exact", "sparse", "linear")
ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Supports:
    """What a method can do. The API checks every call against this before running it."""

    causal: bool = True
    non_causal: bool = True
    gqa: bool = True
    backward: bool = False
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")
    head_dims: tuple[int, int] = (16, 256)
    outputs: tuple[str, ...] = ()
    backends: tuple[str, ...] = ("torch",)
    causal_note: str = ""  # why a non-causal-only method cannot be causal (shown in the error)
    non_causal_note: str = ""  # why a causal-only method cannot be non-causal

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "Supports":
        raw = dict(raw or {})
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"supports: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        for key in ("dtypes", "outputs", "backends"):
            if key in raw:
                raw[key] = tuple(raw[key])
        if "head_dims" in raw:
            raw["head_dims"] = tuple(int(d) for d in raw["head_dims"])
        return cls(**raw)


@dataclass(frozen=True)
class MethodInfo:
    """One registry entry. `params` maps each method parameter to its default."""

    name: str
    family: str
    paper: str
    url: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    supports: Supports = field(default_factory=Supports)
    fn_path: str = ""
    _fn: Callable | None = field(default=None, repr=False, compare=False)

    def load(self) -> Callable:
        """Import and return the method's function (cached by the registry)."""
        if self._fn is not None:
            return self._fn
        module_name, _, attr = self.fn_path.partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr)

    def load_module(self):
        """The module that holds the method (for `example_kwargs` and the decoding `step`), or None."""
        if self._fn is not None:
            return importlib.import_module(self._fn.__module__)
        return importlib.import_module(self.fn_path.partition(":")[0])


def _info_from_yaml(name: str, raw: Mapping[str, Any]) -> MethodInfo:
    family = raw.get("family")
    if family not in FAMILIES:
        raise ValueError(f"registry.yaml: method {name!r} has family {family!r}; expected one of {FAMILIES}")
    if ":" not in raw.get("fn", ""):
        raise ValueError(f"registry.yaml: method {name!r} needs fn: 'module:function', got {raw.get('fn')!r}")
    params = dict(raw.get("params") or {})
    for key, value in params.items():
        if isinstance(value, list):  # YAML has no tuples; window_size etc. are tuples in Python
            params[key] = tuple(value)
    return MethodInfo(
        name=name,
        family=family,
        paper=str(raw.get("paper", "")),
        url=str(raw.get("url", "")),
        params=params,
        inputs=tuple(raw.get("inputs") or ()),
        supports=Supports.from_dict(raw.get("supports")),
        fn_path=raw["fn"],
    )


class Registry:
    """Name -> MethodInfo, loaded lazily from the packaged registry.yaml."""

    def __init__(self) -> None:
        self._methods: dict[str, MethodInfo] | None = None
        self._functions: dict[str, Callable] = {}
        self._lock = threading.Lock()

    def _entries(self) -> dict[str, MethodInfo]:
        if self._methods is None:
            with self._lock:
                if self._methods is None:
                    text = resources.files("attnzoo").joinpath("registry.yaml").read_text()
                    raw = yaml.safe_load(text) or {}
                    self._methods = {name: _info_from_yaml(name, entry) for name, entry in raw.items()}
        return self._methods

    def names(self) -> list[str]:
        return sorted(self._entries())

    def info(self, name: str) -> MethodInfo:
        if not isinstance(name, str):
            raise TypeError(f"method name must be a str, got {type(name).__name__}")
        entries = self._entries()
        if name not in entries:
            raise KeyError(f"unknown attention method {name!r}; known methods: {', '.join(sorted(entries))}")
        return entries[name]

    def function(self, name: str) -> Callable:
        if name not in self._functions:
            self._functions[name] = self.info(name).load()
        return self._functions[name]

    def add(self, info: MethodInfo, *, overwrite: bool) -> None:
        entries = self._entries()
        if info.name in entries and not overwrite:
            raise ValueError(f"method {info.name!r} is already registered; pass overwrite=True to replace it")
        entries[info.name] = info
        self._functions.pop(info.name, None)


REGISTRY = Registry()


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return REGISTRY.names()


def info(name: str) -> MethodInfo:
    """The registry entry of `name`: family, paper, parameters with defaults, what it supports."""
    return REGISTRY.info(name)


def register(
    name: str,
    fn: Callable,
    *,
    family: str,
    paper: str = "",
    url: str = "",
    params: Mapping[str, Any] | None = None,
    inputs: tuple[str, ...] | list[str] = (),
    supports: Mapping[str, Any] | Supports | None = None,
    overwrite: bool = False,
) -> MethodInfo:
    """Add a third-party method to the zoo.

    `fn(q, k, v, *, causal, scale, backend, **params)` must follow the layout of every method
    (see DESIGN.md). `params` lists its keyword parameters with their defaults; `supports` says what
    the API may send it (see `Supports`).
    """
    if not callable(fn):
        raise TypeError(f"register: fn must be callable, got {type(fn).__name__}")
    if family not in FAMILIES:
        raise ValueError(f"register: family must be one of {FAMILIES}, got {family!r}")
    if not isinstance(supports, Supports):
        supports = Supports.from_dict(supports)
    method = MethodInfo(
        name=name,
        family=family,
        paper=paper,
        url=url,
        params=dict(params or {}),
        inputs=tuple(inputs),
        supports=supports,
        fn_path=f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', '?')}",
        _fn=fn,
    )
    REGISTRY.add(method, overwrite=overwrite)
    return method
