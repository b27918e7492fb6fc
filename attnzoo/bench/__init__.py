"""`attnzoo bench`: time attnzoo methods and baselines over a sweep of shapes.

    attnzoo bench --quick                       # tiny CPU sweep of every method, < 30 s
    attnzoo bench --config benchmarks/configs/gpu_full.yaml --out benchmarks/results/h100

Writes bench.csv (plain CSV, one row per measurement), bench.json (the rows, skipped runs, notes and a
header with device, versions, command and config) and three PNG plots into --out, shows a progress
bar, and prints a summary table. matplotlib and tqdm are optional: without them the plots are skipped
(with a message) and progress is printed as lines. See docs/benchmarking.md for every column.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from . import report, timing
from .config import ConfigError, build_parser, resolve
from .sweep import Sweep, resolve_device

__all__ = ["main"]


def _write_plots(rows, out_dir: Path, device_note: str) -> list[Path]:
    try:
        from .plots import write_plots

        return write_plots(rows, out_dir, device_note)
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install 'attnzoo[bench]')", file=sys.stderr)
        return []


def _run(argv: list[str]) -> int:
    config = resolve(build_parser().parse_args(argv), cuda_available=torch.cuda.is_available())
    device = resolve_device(config.device)
    sweep = Sweep(config, device)
    result = sweep.run()
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timing_note = timing.describe(device, warmup=config.warmup, repeats=config.repeats, sample_ms=config.sample_ms)
    head = report.header(device, "attnzoo bench " + shlex.join(argv), timing_note, config.to_dict())
    csv_path, json_path = out_dir / report.CSV_NAME, out_dir / report.JSON_NAME
    report.write_csv(csv_path, result.rows)
    report.write_json(json_path, head, result)
    device_note = head["device"] + (" (CPU timings, not GPU performance)" if device.type == "cpu" else "")
    plots = _write_plots(result.rows, out_dir, device_note) if config.plots else []
    report.print_summary(result, head, [csv_path, json_path, *plots])
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `attnzoo bench` with `argv` (default: sys.argv[1:]); return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except ConfigError as err:
        print(f"attnzoo bench: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # argparse: --help (0) or a malformed flag (2)
        return exit_.code if isinstance(exit_.code, int) else 2
