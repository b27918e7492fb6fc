"""Writing a sweep down: bench.csv, bench.json and the summary table printed at the end.

Both files carry a header: device, versions, the command, how times were taken. In the CSV it is a
block of `# key: value` lines above the column names (`pandas.read_csv(path, comment="#")`).
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch

import attnzoo

from .sweep import COLUMNS, SweepResult

CSV_NAME = "bench.csv"
JSON_NAME = "bench.json"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def header(device: torch.device, command: str, timing_note: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "timing": timing_note,
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "attnzoo": attnzoo.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "flash_attn": _version("flash-attn"),
        "fla": _version("fla-core"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "config": config,
    }


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(path: Path, head: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        for key, value in head.items():
            if key != "config":
                f.write(f"# {key}: {value}\n")
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_csv_cell(row.get(column)) for column in COLUMNS])


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, head: dict[str, Any], result: SweepResult) -> None:
    rows = [{key: _json_safe(row.get(key)) for key in COLUMNS} for row in result.rows]
    document = {"header": head, "columns": list(COLUMNS), "rows": rows, "skipped": result.skipped}
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


SUMMARY_COLUMNS = (
    ("method", "<", lambda r: r["method"]),
    ("mode", "<", lambda r: r["mode"]),
    ("input", "<", lambda r: r["input"]),
    ("causal", "<", lambda r: str(r["causal"])),
    ("N", ">", lambda r: str(r["seqlen"])),
    ("D", ">", lambda r: str(r["head_dim"])),
    ("time ms", ">", lambda r: _fmt(r["time_ms"], ".3f")),
    ("speedup", ">", lambda r: _fmt(r["speedup_vs_dense"], ".2f")),
    ("TFLOP/s eff", ">", lambda r: _fmt(r["tflops_dense_equiv"], ".3g")),
    ("density", ">", lambda r: _fmt(r["density"], ".3f")),
    ("est. share", ">", lambda r: _fmt(r["estimator_share"], ".2f")),
    ("rel err", ">", lambda r: _fmt(r["rel_err_vs_dense"], ".2e")),
)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Rows at the largest N of the sweep, one line each, aligned."""
    if not rows:
        return "no rows were measured"
    largest = max(r["seqlen"] for r in rows)
    shown = [r for r in rows if r["seqlen"] == largest]
    cells = [[get(r) for _, _, get in SUMMARY_COLUMNS] for r in shown]
    names = [name for name, _, _ in SUMMARY_COLUMNS]
    widths = [max(len(c) for c in column) for column in zip(names, *cells)]
    aligns = [align for _, align, _ in SUMMARY_COLUMNS]

    def line(values):
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths))

    return "\n".join([line(names), line("-" * w for w in widths)] + [line(c) for c in cells])


def print_summary(result: SweepResult, head: dict[str, Any], files: list[Path], stream=None) -> None:
    stream = stream or sys.stdout
    rows = result.rows
    largest = max((r["seqlen"] for r in rows), default=0)
    print(f"\nattnzoo bench on {head['device']}: {len(rows)} rows, {len(result.skipped)} skipped", file=stream)
    print(f"timing: {head['timing']}", file=stream)
    print(f"rows at N = {largest} (all rows in the CSV):\n", file=stream)
    print(summary_table(rows), file=stream)
    reasons = dict.fromkeys(f"{s['method']} ({s['mode']}): {s['reason']}" for s in result.skipped)
    if reasons:
        print("\nskipped:\n  " + "\n  ".join(reasons), file=stream)
    print("\nwrote " + ", ".join(str(f) for f in files), file=stream)
