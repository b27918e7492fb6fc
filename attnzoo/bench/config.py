"""What a sweep runs: command-line flags and YAML files turned into one `SweepConfig`.

Precedence, lowest first: built-in defaults (the `--quick` preset when there is no CUDA device) <
the `--quick` preset < `--config FILE.yaml` < flags given on the command line. Every key of the
YAML file has the flag's name with `_` for `-` (`head_dims: [64, 128]`), plus `params:` (method ->
parameters bound with `attnzoo.get`).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

MODES = ("fwd", "fwd+bwd")
INPUT_KINDS = ("random", "structured")
DTYPES = ("float16", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "triton", "torch")


class ConfigError(ValueError):
    """A flag or YAML value that cannot describe a sweep; the message says which and why."""


@dataclass(frozen=True)
class SweepConfig:
    methods: tuple[str, ...] = ("all",)
    seqlens: tuple[int, ...] = (1024, 2048, 4096, 8192)
    head_dims: tuple[int, ...] = (64, 128)
    causal: tuple[bool, ...] = (True,)
    dtypes: tuple[str, ...] = ("auto",)
    modes: tuple[str, ...] = MODES
    batch: tuple[int, ...] = (1,)
    heads: tuple[int, ...] = (16,)
    kv_heads: int | None = None
    inputs: tuple[str, ...] = INPUT_KINDS
    baselines: tuple[str, ...] = ("auto",)
    device: str = "auto"
    backend: str = "auto"
    repeats: int = 10
    warmup: int = 2
    seed: int = 0
    out: str = "bench-out"
    plots: bool = True
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The --quick preset: tiny CPU shapes so that the first command of the README runs anywhere in
# well under a minute, even with every registry method in the sweep.
QUICK = {
    "seqlens": (128, 256),
    "head_dims": (64,),
    "causal": (True,),
    "dtypes": ("float32",),
    "batch": (1,),
    "heads": (2,),
    "inputs": ("structured",),
    "device": "cpu",
    "repeats": 2,
    "warmup": 0,  # the untimed first forward (its output is checked against dense) is the warm-up
}

_FIELD_NAMES = tuple(f.name for f in fields(SweepConfig))


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _int_at_least(name: str, value, low: int) -> int:
    try:
        parsed = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or parsed < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return parsed


def _ints(name: str, values) -> tuple[int, ...]:
    if not values:
        raise ConfigError(f"{name} needs at least one value")
    return tuple(_int_at_least(name, v, 1) for v in values)


def _choices(name: str, values, allowed: tuple[str, ...]) -> tuple[str, ...]:
    parsed = tuple(str(v) for v in values)
    bad = [v for v in parsed if v not in allowed]
    if not parsed or bad:
        raise ConfigError(f"{name}: {', '.join(bad) or 'nothing given'}; choose from {', '.join(allowed)}")
    return parsed


def _one_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    return _choices(name, [value], allowed)[0]


def _as_list(value) -> list:
    if isinstance(value, str):
        return _comma_list(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _bools(name: str, values) -> tuple[bool, ...]:
    parsed = tuple(values)
    if not parsed or not all(isinstance(v, bool) for v in parsed):
        raise ConfigError(f"{name} must be true and/or false, got {values!r}")
    return parsed


def _params(value) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(p, dict) for p in value.values()):
        raise ConfigError(f"params must map method names to {{parameter: value}}, got {value!r}")
    return {str(name): dict(p) for name, p in value.items()}


def normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """Check and convert raw values (from YAML or flags) into `SweepConfig` field values."""
    unknown = sorted(set(raw) - set(_FIELD_NAMES))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(_FIELD_NAMES)}")
    converters = {
        "methods": lambda v: tuple(str(m) for m in _as_list(v)),
        "seqlens": lambda v: _ints("seqlens", _as_list(v)),
        "head_dims": lambda v: _ints("head_dims", _as_list(v)),
        "causal": lambda v: _bools("causal", _as_list(v)),
        "dtypes": lambda v: _choices("dtypes", _as_list(v), DTYPES + ("auto",)),
        "modes": lambda v: _choices("modes", _as_list(v), MODES),
        "batch": lambda v: _ints("batch", _as_list(v)),
        "heads": lambda v: _ints("heads", _as_list(v)),
        "kv_heads": lambda v: None if v is None else _int_at_least("kv_heads", v, 1),
        "inputs": lambda v: _choices("inputs", _as_list(v), INPUT_KINDS),
        "baselines": lambda v: tuple(str(b) for b in _as_list(v)),
        "device": lambda v: _one_choice("device", v, DEVICES),
        "backend": lambda v: _one_choice("backend", v, BACKENDS),
        "repeats": lambda v: _int_at_least("repeats", v, 1),
        "warmup": lambda v: _int_at_least("warmup", v, 0),
        "seed": lambda v: _int_at_least("seed", v, 0),
        "out": str,
        "plots": lambda v: _bools("plots", [v])[0],
        "params": _params,
    }
    return {key: converters[key](value) for key, value in raw.items()}


def load_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(raw).__name__}")
    return normalise(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnzoo bench",
        description="Time attnzoo methods and baselines over a sweep of shapes; write CSV, JSON and PNG plots.",
        epilog="Quick check that runs anywhere (CPU, tiny shapes, < 1 minute): attnzoo bench --quick",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny CPU sweep of every method (the README's first command)")
    add("--config", metavar="FILE.yaml", help="read settings from a YAML file (flags given here win)")
    add("--methods", help="comma list of registry methods, or 'all' (default)")
    add("--seqlens", help="comma list of sequence lengths N (= M)")
    add("--head-dims", help="comma list of head dims D (= Dv)")
    add("--causal", action=argparse.BooleanOptionalAction, default=None,
        help="causal attention (default) or --no-causal; YAML may ask for both")
    add("--dtype", dest="dtypes", help=f"comma list of {', '.join(DTYPES)} (auto: bfloat16 on CUDA, float32 on CPU)")
    add("--modes", help="comma list of fwd, fwd+bwd")
    add("--batch", help="comma list of batch sizes")
    add("--heads", help="comma list of query head counts")
    add("--kv-heads", help="key/value heads (GQA); default: as many as query heads")
    add("--inputs", help="comma list of random, structured (locality + heavy hitters)")
    add("--baselines", help="comma list of sdpa_flash, sdpa_efficient, flash_attn, fla_gla; "
                            "'auto' (those installed) or 'none'")
    add("--device", help="auto (CUDA if available), cpu or cuda")
    add("--backend", help="auto (triton on CUDA, torch on CPU), triton or torch")
    add("--repeats", help="timed calls per measurement on CPU (CUDA uses triton.testing.do_bench)")
    add("--warmup", help="untimed calls before timing on CPU")
    add("--seed", help="seed of the generated inputs")
    add("--out", metavar="DIR", help="directory for bench.csv, bench.json and the plots (default bench-out)")
    add("--no-plots", dest="plots", action="store_const", const=False, help="write no PNG plots")
    return parser


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    given = {key: value for key, value in vars(args).items() if value is not None}
    given.pop("quick", None)
    given.pop("config", None)
    if "causal" in given:
        given["causal"] = [given["causal"]]
    return normalise(given)


def resolve(args: argparse.Namespace, *, cuda_available: bool) -> SweepConfig:
    """Defaults < --quick < --config < explicit flags. Without CUDA the defaults are the --quick
    preset's tiny CPU shapes, so that a bare `attnzoo bench` finishes anywhere."""
    settings: dict[str, Any] = {}
    if args.quick or not cuda_available:
        settings.update(QUICK)
    if args.config:
        settings.update(load_yaml(args.config))
    settings.update(_flag_values(args))
    config = SweepConfig(**settings)
    if config.kv_heads is not None and any(h % config.kv_heads for h in config.heads):
        raise ConfigError(f"every --heads value must be a multiple of --kv-heads {config.kv_heads}, got {config.heads}")
    return config
