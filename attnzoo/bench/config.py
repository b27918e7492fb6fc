"""What a sweep runs: command-line flags and YAML files turned into one `SweepConfig`.

Precedence, lowest first: built-in defaults (the `--quick` preset when there is no CUDA device) <
the `--quick` preset < `--config FILE.yaml` < flags given on the command line. Every key of the
YAML file has the flag's name with `_` for `-` (`head_dims: [64, 128]`), plus `params:` (method ->
parameter -> value, or a list of values: a grid, one row per value; `--param` on the command line).
Method parameters merge per (method, parameter) across the layers instead of replacing each other.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

MODES = ("fwd", "fwd+bwd")
INPUT_KINDS = ("random", "structured", "minilm")
DTYPES = ("float16", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "triton", "torch", "fla")


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
    sample_ms: float = 50.0
    seed: int = 0
    out: str = "bench-out"
    plots: bool = True
    params: dict[str, dict[str, tuple]] = field(default_factory=dict)  # method -> parameter -> grid values

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The --quick preset: tiny CPU shapes so that the first command of the README runs anywhere in
# under 30 seconds on 2 cores, with every registry method, synthetic and real (MiniLM) inputs, and
# one parameter grid to show the error/speedup trade-off.
QUICK = {
    "seqlens": (128, 256),
    "head_dims": (64,),
    "causal": (True,),
    "dtypes": ("float32",),
    "batch": (1,),
    "heads": (2,),
    "inputs": ("structured", "minilm"),
    "device": "cpu",
    "repeats": 4,
    "warmup": 1,
    "sample_ms": 4.0,
    "params": {"xattention": {"threshold": (0.8, 0.9, 0.95), "block_size": (32,)},
               "seerattention": {"topk_ratio": (0.5,), "block_size": (32,)}},
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


def _positive_float(name: str, value) -> float:
    try:
        parsed = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number > 0, got {value!r}") from None
    if isinstance(value, bool) or not parsed > 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")
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


def _grid(values) -> tuple:
    """A parameter's values to sweep: a list is a grid (one row per value), anything else one value."""
    return tuple(values) if isinstance(values, (list, tuple)) else (values,)


def _params(value) -> dict[str, dict[str, tuple]]:
    if not isinstance(value, dict) or not all(isinstance(p, dict) for p in value.values()):
        raise ConfigError(f"params must map method names to {{parameter: value or [values]}}, got {value!r}")
    empty = [f"{method}.{name}" for method, p in value.items() for name, v in p.items() if _grid(v) == ()]
    if empty:
        raise ConfigError(f"params: {', '.join(empty)} has an empty list of values; give at least one")
    return {str(method): {str(name): _grid(v) for name, v in p.items()} for method, p in value.items()}


def parse_param_flag(text: str) -> dict[str, dict[str, tuple]]:
    """`--param METHOD.PARAM=V1,V2` -> {METHOD: {PARAM: (V1, V2)}}; each value is read as YAML, so
    `0.9` is a float, `null` None and `[64,0]` a list (a list-valued parameter's value)."""
    target, sep, values = text.partition("=")
    method, dot, name = target.strip().partition(".")
    if not (sep and dot and method and name and values.strip()):
        raise ConfigError(f"--param must look like METHOD.PARAM=VALUE[,VALUE...], got {text!r}")
    try:
        parsed = yaml.safe_load(f"[{values}]")
    except yaml.YAMLError:
        raise ConfigError(f"--param {text!r}: the values {values!r} are not a comma list of YAML values") from None
    return {method: {name: tuple(parsed)}}


def merge_params(*layers: dict[str, dict[str, tuple]]) -> dict[str, dict[str, tuple]]:
    """Later layers win per (method, parameter)."""
    merged: dict[str, dict[str, tuple]] = {}
    for layer in layers:
        for method, grid in layer.items():
            merged.setdefault(method, {}).update(grid)
    return merged


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
        "sample_ms": lambda v: _positive_float("sample_ms", v),
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
        epilog="Quick check that runs anywhere (CPU, tiny shapes, < 30 s): attnzoo bench --quick. "
               "Columns, timing and inputs: docs/benchmarking.md",
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
    add("--inputs", help="comma list of random, structured (locality + heavy hitters), "
                         "minilm (q, k, v of a real pretrained model on real text)")
    add("--baselines", help="comma list of sdpa_flash, sdpa_efficient, flash_attn, fla_gla; "
                            "'auto' (those installed) or 'none'")
    add("--device", help="auto (CUDA if available), cpu or cuda")
    add("--backend", help="auto (triton on CUDA, torch on CPU), triton, torch or fla")
    add("--repeats", help="timing rounds: each round takes one sample of every contender of a case in turn")
    add("--warmup", help="untimed calls of each contender before the rounds")
    add("--sample-ms", help="measuring time of one sample (CPU: torch.utils.benchmark block, "
                            "CUDA: triton.testing.do_bench rep)")
    add("--seed", help="seed of the generated inputs")
    add("--out", metavar="DIR", help="directory for bench.csv, bench.json and the plots (default bench-out)")
    add("--no-plots", dest="plots", action="store_const", const=False, help="write no PNG plots")
    add("--param", dest="param_flags", action="append", metavar="METHOD.PARAM=V1[,V2...]",
        help="set a method parameter; several values sweep a grid (repeatable), "
             "e.g. --param xattention.threshold=0.8,0.9,0.95 or --param dense.window_size=[64,0]")
    return parser


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    given = {key: value for key, value in vars(args).items() if value is not None}
    given.pop("quick", None)
    given.pop("config", None)
    flags = given.pop("param_flags", [])
    if "causal" in given:
        given["causal"] = [given["causal"]]
    values = normalise(given)
    if flags:
        values["params"] = merge_params(*(parse_param_flag(text) for text in flags))
    return values


def _swept_params(preset: dict[str, Any], methods: tuple[str, ...]) -> dict[str, dict[str, tuple]]:
    """A preset's parameters for the methods in the sweep (a preset never names a method you left out)."""
    return {m: grid for m, grid in preset.get("params", {}).items() if "all" in methods or m in methods}


def resolve(args: argparse.Namespace, *, cuda_available: bool) -> SweepConfig:
    """Defaults < --quick < --config < explicit flags. Without CUDA the defaults are the --quick
    preset's tiny CPU shapes, so that a bare `attnzoo bench` finishes anywhere."""
    layers = [QUICK] if args.quick or not cuda_available else []
    if args.config:
        layers.append(load_yaml(args.config))
    layers.append(_flag_values(args))
    settings: dict[str, Any] = {}
    for layer in layers:
        settings.update(layer)
    methods = settings.get("methods", SweepConfig.methods)
    settings["params"] = merge_params(*(_swept_params(layer, methods) if layer is QUICK else layer.get("params", {})
                                        for layer in layers))
    config = SweepConfig(**settings)
    if config.kv_heads is not None and any(h % config.kv_heads for h in config.heads):
        raise ConfigError(f"every --heads value must be a multiple of --kv-heads {config.kv_heads}, got {config.heads}")
    return config
