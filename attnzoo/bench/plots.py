"""PNG plots of a sweep (matplotlib, imported only here and only when plotting).

- time_vs_seqlen.png: time vs N per method, log-log, one panel per (mode, input, dtype, causal,
  batch, heads, D), so every line in a panel is a like-for-like comparison.
- speedup_vs_density.png: speedup over dense vs the density each sparse method chose, with the
  ideal 1/density line.
- error_vs_speedup.png: relative error vs speedup at the largest N, with the Pareto front (the
  points no other point beats on both).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

PANEL_KEYS = ("mode", "input", "dtype", "causal", "batch", "heads", "head_dim")
ERROR_FLOOR = 1e-7  # errors of exactly 0 (dense itself) are drawn here on the log axis
NAMES = ("time_vs_seqlen.png", "speedup_vs_density.png", "error_vs_speedup.png")


def _label(row: dict[str, Any]) -> str:
    return row["method"] + ("" if row["params"] in ("{}", "") else " " + row["params"])


def _panel_title(key: tuple) -> str:
    mode, kind, dtype, causal, batch, heads, head_dim = key
    return f"{mode}, {kind}, {dtype}, {'causal' if causal else 'non-causal'}, B={batch} H={heads} D={head_dim}"


def _panels(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[tuple(row[k] for k in PANEL_KEYS)].append(row)
    return dict(sorted(grouped.items(), key=lambda item: str(item[0])))


def _figure(n_panels: int, title: str):
    from matplotlib.figure import Figure

    cols = min(2, max(1, n_panels))
    nrows = max(1, -(-n_panels // cols))
    figure = Figure(figsize=(6.5 * cols, 4.5 * nrows), layout="constrained")
    axes = figure.subplots(nrows, cols, squeeze=False).ravel().tolist()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    figure.suptitle(title)
    return figure, axes


def _colors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from matplotlib import colormaps

    labels = sorted({_label(r) for r in rows})
    palette = colormaps["tab20"]  # pairs of a dark and a light tone: all dark tones first
    return {label: palette((2 * i) % 20 + (i // 10) % 2) for i, label in enumerate(labels)}


def _plain_log_ticks(axis, seqlens) -> None:
    """Log x axis labelled at the sequence lengths themselves (256, 512, ...) rather than 10^k."""
    from matplotlib.ticker import NullFormatter

    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted(set(seqlens)), [str(n) for n in sorted(set(seqlens))])
    axis.xaxis.set_minor_formatter(NullFormatter())


def _empty(path: Path, title: str, message: str) -> None:
    figure, (axis,) = _figure(1, title)
    axis.text(0.5, 0.5, message, ha="center", va="center", transform=axis.transAxes)
    axis.set_axis_off()
    figure.savefig(path, dpi=100)


def plot_time_vs_seqlen(rows, path: Path, device_note: str) -> None:
    panels = _panels(rows)
    if not panels:
        return _empty(path, "time vs N", "no rows were measured")
    colors = _colors(rows)
    figure, axes = _figure(len(panels), f"time vs sequence length ({device_note})")
    for axis, (key, panel_rows) in zip(axes, panels.items()):
        by_method: dict[str, list] = defaultdict(list)
        for row in panel_rows:
            by_method[_label(row)].append((row["seqlen"], row["time_ms"]))
        for label, points in sorted(by_method.items()):
            xs, ys = zip(*sorted(points))
            axis.plot(xs, ys, marker="o", label=label, color=colors[label])
        _plain_log_ticks(axis, [row["seqlen"] for row in panel_rows])
        axis.set(yscale="log", xlabel="sequence length N", ylabel="time (ms)", title=_panel_title(key))
        axis.legend(fontsize="small")
    figure.savefig(path, dpi=100)


def plot_speedup_vs_density(rows, path: Path, device_note: str) -> None:
    sparse = [r for r in rows if r["family"] == "sparse" and r["density"] and r["speedup_vs_dense"]]
    title = f"speedup over dense vs density ({device_note})"
    if not sparse:
        return _empty(path, title, "no sparse method rows in this sweep")
    colors = _colors(sparse)
    modes = sorted({r["mode"] for r in sparse})
    figure, axes = _figure(len(modes), title)
    for axis, mode in zip(axes, modes):
        mode_rows = [r for r in sparse if r["mode"] == mode]
        for label in sorted({_label(r) for r in mode_rows}):
            points = [(r["density"], r["speedup_vs_dense"]) for r in mode_rows if _label(r) == label]
            axis.scatter(*zip(*points), label=label, color=colors[label])
        low = min(r["density"] for r in mode_rows)
        axis.plot([low, 1.0], [1 / low, 1.0], linestyle="--", color="gray", label="ideal (1/density)")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set(xscale="log", yscale="log", xlabel="density (fraction of dense blocks computed)",
                 ylabel="speedup over dense", title=mode)
        axis.legend(fontsize="small")
    figure.savefig(path, dpi=100)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speedup, error) points that no other point beats on both (faster and more accurate),
    ordered by speedup."""
    front, best_error = [], float("inf")
    for speedup, error in sorted(points, key=lambda p: (-p[0], p[1])):
        if error < best_error:
            front.append((speedup, error))
            best_error = error
    return sorted(front)


def plot_error_vs_speedup(rows, path: Path, device_note: str) -> None:
    from matplotlib.ticker import NullFormatter

    largest = max((r["seqlen"] for r in rows), default=None)
    at_largest = [r for r in rows
                  if r["seqlen"] == largest and r["speedup_vs_dense"] and r["rel_err_vs_dense"] is not None]
    title = f"error vs speedup at N = {largest} ({device_note}); error 0 drawn at {ERROR_FLOOR:g}"
    panels = _panels(at_largest)
    if not panels:
        return _empty(path, title, "no rows with a speedup and an error")
    colors = _colors(at_largest)
    figure, axes = _figure(len(panels), title)
    for axis, (key, panel_rows) in zip(axes, panels.items()):
        points = []
        for row in panel_rows:
            point = (row["speedup_vs_dense"], max(row["rel_err_vs_dense"], ERROR_FLOOR))
            axis.scatter(*point, label=_label(row), color=colors[_label(row)])
            points.append(point)
        front = pareto_front(points)
        axis.plot(*zip(*front), linestyle="--", color="gray", label="Pareto front")
        axis.set(xscale="log", yscale="log", xlabel="speedup over dense", ylabel="relative error vs dense",
                 title=_panel_title(key))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.legend(fontsize="small")
    figure.savefig(path, dpi=100)


def write_plots(rows: list[dict[str, Any]], out_dir: Path, device_note: str) -> list[Path]:
    """Write the three PNGs; return their paths."""
    paths = [out_dir / name for name in NAMES]
    for plot, path in zip((plot_time_vs_seqlen, plot_speedup_vs_density, plot_error_vs_speedup), paths):
        plot(rows, path, device_note)
    return paths
