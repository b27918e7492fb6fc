"""PNG plots of a sweep (matplotlib, imported only here and only when plotting).

Every figure has one panel per (mode, input, dtype, causal, B, H, D), so every point in a panel is a
like-for-like comparison; the figure title names the device, each panel its dtype and shape. Points
whose timing is noisy (interquartile range > 20 % of the median) are drawn hollow.

- time_vs_seqlen.png: time vs N per contender (method and parameters), log-log, with the timing
  samples' interquartile range as error bars.
- speedup_vs_density.png: speedup over dense vs the density each sparse method chose; one colour
  per N, one marker per method; the dashed line is the ideal 1/density.
- error_vs_speedup.png: err_vs_dense vs speedup at the largest N with errors, for the contenders
  that approximate softmax attention (sparse methods, dense and the exact baselines; never linear
  methods or flashbias). Each method's parameter-grid points are joined into its own curve, labelled
  with their parameters; the dashed grey line is the Pareto front over all of them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .report import params_text

PANEL_KEYS = ("mode", "input", "dtype", "causal", "batch", "heads", "head_dim")
ERROR_FLOOR = 1e-9  # errors of exactly 0 are drawn here on the log axis
NAMES = ("time_vs_seqlen.png", "speedup_vs_density.png", "error_vs_speedup.png")
MARKERS = "os^Dv<>pP*hX"


def _label(row: dict[str, Any]) -> str:
    shown = params_text(row["params_set"])
    return f"{row['method']} {shown}" if shown else row["method"]


def _panel_title(key: tuple) -> str:
    mode, kind, dtype, causal, batch, heads, head_dim = key
    flag = "causal" if causal else "non-causal"
    return f"{mode} | {kind} inputs | {dtype} | {flag} | B={batch} H={heads} D={head_dim}"


def _panels(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[tuple(row[k] for k in PANEL_KEYS)].append(row)
    return dict(sorted(grouped.items(), key=lambda item: str(item[0])))


def _figure(n_panels: int, title: str):
    from matplotlib.figure import Figure

    cols = min(2, max(1, n_panels))
    nrows = max(1, -(-n_panels // cols))
    figure = Figure(figsize=(7.5 * cols, 5.2 * nrows), layout="constrained")
    axes = figure.subplots(nrows, cols, squeeze=False).ravel().tolist()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    figure.suptitle(title)
    return figure, axes


def _colors(labels) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab20"]  # pairs of a dark and a light tone: all dark tones first
    return {label: palette((2 * i) % 20 + (i // 10) % 2) for i, label in enumerate(sorted(set(labels)))}


def _log_axis(axis, which: str, *, plain: bool = True) -> None:
    """Make `which` ("x" or "y") a log axis, called once the data is drawn. plain: ticks written as plain
    numbers (0.2, 5, 100) at 1, 2 and 5 times each power of ten, or at every integer multiple when the
    data spans less than a decade; else ticks at powers of ten in scientific notation."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    getattr(axis, f"set_{which}scale")("log")
    target = getattr(axis, f"{which}axis")
    if plain:
        low, high = getattr(axis, f"get_{which}lim")()
        subs = (1.0, 2.0, 5.0) if math.log10(high / low) > 1.0 else tuple(float(i) for i in range(1, 10))
        target.set_major_locator(LogLocator(base=10, subs=subs))
        target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    else:
        target.set_major_locator(LogLocator(base=10, numticks=12))
    target.set_minor_formatter(NullFormatter())


def _seqlen_axis(axis, seqlens) -> None:
    """Log x axis labelled at the sequence lengths themselves (256, 512, ...)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ticks = sorted(set(seqlens))
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [str(n) for n in ticks])
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_minor_formatter(NullFormatter())


def _face(row: dict[str, Any], color):
    return "none" if row.get("noisy") else color


def _empty(path: Path, title: str, message: str):
    figure, (axis,) = _figure(1, title)
    axis.text(0.5, 0.5, message, ha="center", va="center", transform=axis.transAxes)
    axis.set_axis_off()
    figure.savefig(path, dpi=100)
    return figure


def _figure_legend(figure, axes) -> None:
    """One legend for the whole figure, outside the panels (colours mean the same in every panel)."""
    entries: dict[str, Any] = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    figure.legend(list(entries.values()), list(entries), loc="outside right center", fontsize="small")


def _noisy_note(rows) -> str:
    return "\nhollow markers: noisy timing (IQR > 20% of the median)" if any(r.get("noisy") for r in rows) else ""


def plot_time_vs_seqlen(rows, path: Path, device_note: str):
    """Write the PNG to `path`; return the matplotlib Figure."""
    title = f"time vs sequence length on {device_note}"
    panels = _panels(rows)
    if not panels:
        return _empty(path, title, "no rows were measured")
    colors = _colors(_label(r) for r in rows)
    figure, axes = _figure(len(panels), title + _noisy_note(rows))
    for axis, (key, panel_rows) in zip(axes, panels.items()):
        by_label: dict[str, list] = defaultdict(list)
        for row in panel_rows:
            by_label[_label(row)].append(row)
        for label, series in sorted(by_label.items()):
            series.sort(key=lambda r: r["seqlen"])
            xs, ys = [r["seqlen"] for r in series], [r["time_ms"] for r in series]
            spread = [[r["time_ms"] - (r["time_q1_ms"] or r["time_ms"]) for r in series],
                      [(r["time_q3_ms"] or r["time_ms"]) - r["time_ms"] for r in series]]
            axis.errorbar(xs, ys, yerr=spread, color=colors[label], label=label, capsize=2, linewidth=1)
            for row in series:
                axis.scatter(row["seqlen"], row["time_ms"], color=colors[label], facecolor=_face(row, colors[label]),
                             zorder=3)
        _seqlen_axis(axis, [row["seqlen"] for row in panel_rows])
        _log_axis(axis, "y")
        axis.set(xlabel="sequence length N", ylabel="time per call (ms, median; bars: IQR)", title=_panel_title(key))
    _figure_legend(figure, axes)
    figure.savefig(path, dpi=100)
    return figure


def _legend_handles(markers: dict[str, str], seqlen_colors: dict[int, Any]):
    from matplotlib.lines import Line2D

    methods = [Line2D([], [], linestyle="", marker=m, color="black", label=name) for name, m in markers.items()]
    lengths = [Line2D([], [], linestyle="", marker="o", color=c, label=f"N={n}") for n, c in seqlen_colors.items()]
    return methods + lengths


def plot_speedup_vs_density(rows, path: Path, device_note: str):
    """Write the PNG to `path`; return the matplotlib Figure."""
    sparse = [r for r in rows if r["family"] == "sparse" and r["density"] and r["speedup_vs_dense"]]
    title = f"speedup over dense vs density on {device_note}"
    if not sparse:
        return _empty(path, title, "no sparse method rows in this sweep")
    from matplotlib import colormaps

    seqlens = sorted({r["seqlen"] for r in sparse})
    shades = colormaps["viridis"]
    seqlen_colors = {n: shades(0.85 * i / max(1, len(seqlens) - 1)) for i, n in enumerate(seqlens)}
    markers = {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(sorted({r["method"] for r in sparse}))}
    panels = _panels(sparse)
    figure, axes = _figure(len(panels), title + _noisy_note(sparse))
    for axis, (key, panel_rows) in zip(axes, panels.items()):
        for row in panel_rows:
            color = seqlen_colors[row["seqlen"]]
            axis.scatter(row["density"], row["speedup_vs_dense"], marker=markers[row["method"]], color=color,
                         facecolor=_face(row, color), s=40, zorder=3)
        low = min(r["density"] for r in panel_rows)
        axis.plot([low, 1.0], [1 / low, 1.0], linestyle="--", color="gray", label="ideal 1/density")
        axis.axhline(1.0, color="black", linewidth=0.8)
        _log_axis(axis, "x")
        _log_axis(axis, "y")
        axis.set(xlabel="density (fraction of dense's blocks computed)", ylabel="speedup over dense",
                 title=_panel_title(key))
        present = {n: c for n, c in seqlen_colors.items() if any(r["seqlen"] == n for r in panel_rows)}
        used = {m: k for m, k in markers.items() if any(r["method"] == m for r in panel_rows)}
        axis.legend(handles=[*_legend_handles(used, present), *axis.get_lines()[:1]], fontsize="x-small")
    figure.savefig(path, dpi=100)
    return figure


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speedup, error) points that no other point beats on both (faster and more accurate),
    ordered by speedup."""
    front, best_error = [], float("inf")
    for speedup, error in sorted(points, key=lambda p: (-p[0], p[1])):
        if error < best_error:
            front.append((speedup, error))
            best_error = error
    return sorted(front)


def _error_rows(rows) -> tuple[list[dict[str, Any]], int | None]:
    """Rows with a speedup and an err_vs_dense at the largest N where there are any."""
    usable = [r for r in rows if r["speedup_vs_dense"] and r["err_vs_dense"] is not None]
    largest = max((r["seqlen"] for r in usable), default=None)
    return [r for r in usable if r["seqlen"] == largest], largest


def _varying(series) -> list[str]:
    """Labels of a method's grid points naming only the parameters that change between them."""
    grids = [json.loads(r["params_set"] or "{}") for r in series]
    keys = [k for k in grids[0] if len({json.dumps(g.get(k)) for g in grids}) > 1]
    return [" ".join(f"{k}={json.dumps(g.get(k))}" for k in keys) for g in grids]


def _method_curve(axis, series, color) -> list[tuple[float, float]]:
    """One method's grid points joined in grid order (its error/speedup curve), each labelled with the
    parameters that change along it."""
    points = [(r["speedup_vs_dense"], max(r["err_vs_dense"], ERROR_FLOOR)) for r in series]
    axis.plot(*zip(*points), color=color, marker="", linewidth=1.2, label=series[0]["method"])
    for row, point, text in zip(series, points, _varying(series)):
        axis.scatter(*point, color=color, facecolor=_face(row, color), s=40, zorder=3)
        if text:
            axis.annotate(text, point, textcoords="offset points", xytext=(4, 4), fontsize="x-small", color=color)
    return points


def plot_error_vs_speedup(rows, path: Path, device_note: str):
    """Write the PNG to `path`; return the matplotlib Figure."""
    at_largest, largest = _error_rows(rows)
    title = (f"error vs dense (float64) against speedup at N = {largest} on {device_note}\n"
             "sparse methods and exact softmax attention only: linear methods and flashbias compute another "
             "function (their err_vs_exact is in bench.csv)")
    panels = _panels(at_largest)
    if not panels:
        return _empty(path, title, "no rows with a speedup and an err_vs_dense")
    colors = _colors(r["method"] for r in at_largest)
    figure, axes = _figure(len(panels), title + _noisy_note(at_largest))
    for axis, (key, panel_rows) in zip(axes, panels.items()):
        by_method: dict[str, list] = defaultdict(list)
        for row in panel_rows:
            by_method[row["method"]].append(row)
        points = [point for method, series in sorted(by_method.items())
                  for point in _method_curve(axis, series, colors[method])]
        axis.plot(*zip(*pareto_front(points)), linestyle="--", color="gray", linewidth=2, alpha=0.6,
                  label="Pareto front", zorder=1)
        _log_axis(axis, "x")
        _log_axis(axis, "y", plain=False)
        axis.set(xlabel="speedup over dense", ylabel="relative error vs dense (err_vs_dense)", title=_panel_title(key))
    _figure_legend(figure, axes)
    figure.savefig(path, dpi=100)
    return figure


def write_plots(rows: list[dict[str, Any]], out_dir: Path, device_note: str) -> list[Path]:
    """Write the three PNGs; return their paths."""
    paths = [out_dir / name for name in NAMES]
    for plot, path in zip((plot_time_vs_seqlen, plot_speedup_vs_density, plot_error_vs_speedup), paths):
        plot(rows, path, device_note)
    return paths
