"""PNG plots of a comparison (matplotlib, Agg backend, imported only when plotting).

- `val_loss.png`: validation loss vs step, one colour per cell: the mean over the cell's completed seeds at
  the steps every seed logged, with a band of ± one std (a single seed: its line); failed runs as thin
  dotted lines. A curve of fewer than two points is drawn with markers (a line through one point is
  invisible); a plot that would show nothing is not written, and the caller says so.
- `axis_<key>.png`: mean final validation loss (or the chosen metric, e.g. val/acc) along one swept axis (x = the
  axis values, numeric axes on a numeric scale), one line per combination of the other axes, error bars = std over
  seeds.
- `<metric>_vs_state_size.png`: the metric against the model's recurrent state size (elements, log scale), one line
  per value of the layer pattern (or of the first swept axis that does not change the state), one panel per value
  of the remaining task axes (e.g. data.num_kv_pairs): Zoology's accuracy-vs-state plot.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from groundthink.reporting.cells import Cell, parse_value, sort_value

VAL_LOSS = "val/loss"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def axis_filename(key: str) -> str:
    return "axis_" + re.sub(r"[^A-Za-z0-9_.=-]+", "-", key) + ".png"


def plot_val_loss(cells: list[Cell], path: Path, metric: str = VAL_LOSS) -> Path | None:
    """None when no run logged `metric`."""
    if not any(r.series.get(metric) for c in cells for r in c.runs):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, cell in enumerate(cells):
        color = colors[i % len(colors)]
        curves = [dict(r.series[metric]) for r in cell.completed if r.series.get(metric)]
        if curves:
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if steps:
                values = np.array([[c[s] for s in steps] for c in curves], dtype=np.float64)
                mean = values.mean(axis=0)
                ax.plot(steps, mean, color=color, label=f"{cell.label} (n={len(curves)})",
                        marker="o" if len(steps) < 2 else None)
                if len(curves) > 1:
                    std = values.std(axis=0, ddof=1)
                    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        for r in cell.runs:
            if r.failed and r.series.get(metric):
                s, v = zip(*r.series[metric])
                ax.plot(s, v, color=color, linestyle=":", linewidth=1, marker="x" if len(s) < 2 else None,
                        label=f"failed: {Path(r.name).name}")
    if not ax.lines:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs step (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_axis(cells: list[Cell], key: str, axes: list[str], path: Path, metric: str = VAL_LOSS) -> Path | None:
    """None when no cell along this axis has a finite mean final `metric`."""
    others = [a for a in axes if a != key]
    x_texts = sorted({c.params.get(key) for c in cells}, key=sort_value)
    numeric = all(isinstance(parse_value(t), (int, float)) and not isinstance(parse_value(t), bool)
                  for t in x_texts if t is not None) and None not in x_texts

    def x_of(text: str | None) -> float:
        return float(parse_value(text)) if numeric else float(x_texts.index(text))

    lines: dict[tuple, list[Cell]] = {}
    for c in cells:
        lines.setdefault(tuple(c.params.get(a) for a in others), []).append(c)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for combo in sorted(lines, key=lambda t: [sort_value(v) for v in t]):
        points = sorted(lines[combo], key=lambda c: sort_value(c.params.get(key)))
        xs, ys, es = [], [], []
        for c in points:
            mean, std = c.stats[f"final_{metric}_mean"], c.stats[f"final_{metric}_std"]
            if math.isfinite(mean):
                xs.append(x_of(c.params.get(key)))
                ys.append(mean)
                es.append(std if math.isfinite(std) else 0.0)
        if not xs:
            continue
        label = ",".join(f"{a}={v}" for a, v in zip(others, combo) if v is not None) or "all"
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if not numeric:
        ax.set_xticks(range(len(x_texts)), [t if t is not None else "(default)" for t in x_texts])
    ax.set_xlabel(key)
    ax.set_ylabel(f"final {metric} (mean ± std over seeds)")
    ax.set_title(f"final {metric} along {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# Axes that change the model's state size (x of the state-size plot) and the task axes (one panel each).
_SIZE_KEYS = ("model.d_model", "model.n_layers", "model.mixers.", "sweep.state")
_TASK_KEYS = ("mqar_cell", "data.num_kv_pairs", "data.seq_len", "data.distances")


def plot_vs_state_size(cells: list[Cell], axes: list[str], path: Path, metric: str = VAL_LOSS) -> Path | None:
    """The mean final `metric` of each cell against its state size; None when no cell has both."""
    points = [c for c in cells if math.isfinite(c.stats.get("state_size", math.nan))
              and math.isfinite(c.stats.get(f"final_{metric}_mean", math.nan))]
    if not points:
        return None
    panel_keys = [a for a in axes if a.startswith(_TASK_KEYS)]
    series_keys = [a for a in axes if a not in panel_keys and not a.startswith(_SIZE_KEYS) and a != "optim.lr"]
    panels: dict[tuple, list[Cell]] = {}
    for c in points:
        panels.setdefault(tuple(c.params.get(a) for a in panel_keys), []).append(c)
    plt = _pyplot()
    order = sorted(panels, key=lambda t: [sort_value(v) for v in t])
    fig, axs = plt.subplots(1, len(order), figsize=(4.2 * len(order) + 2, 4.2), squeeze=False, sharey=True)
    for ax, panel in zip(axs[0], order):
        lines: dict[tuple, list[Cell]] = {}
        for c in panels[panel]:
            lines.setdefault(tuple(c.params.get(a) for a in series_keys), []).append(c)
        for combo in sorted(lines, key=lambda t: [sort_value(v) for v in t]):
            pts = sorted(lines[combo], key=lambda c: c.stats["state_size"])
            xs = [c.stats["state_size"] for c in pts]
            ys = [c.stats[f"final_{metric}_mean"] for c in pts]
            es = [c.stats[f"final_{metric}_std"] if math.isfinite(c.stats[f"final_{metric}_std"]) else 0.0
                  for c in pts]
            label = ",".join(f"{a}={v}" for a, v in zip(series_keys, combo) if v is not None) or "all"
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("state size (elements per sequence, log)")
        ax.set_title(",".join(f"{a}={v}" for a, v in zip(panel_keys, panel)) or f"{metric} vs state size",
                     fontsize="medium")
        ax.grid(alpha=0.3)
    axs[0][0].set_ylabel(f"final {metric}")
    axs[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
