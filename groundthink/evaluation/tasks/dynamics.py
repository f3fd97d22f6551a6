"""`dynamics`: phase shifts in a run's training curves, as change points with the size of the change.

Reads the run's metrics.csv (no model): val/loss, train/loss and every diag/ column present (state entropy,
gradient ratios and norms, ...), or the `columns` listed. Each series is segmented by binary segmentation
with a least-squares (mean-shift) cost: the split that most reduces the summed squared deviation from the segment
means is kept when the reduction exceeds penalty x sigma^2 x ln(n), sigma estimated robustly from the first
differences (median absolute deviation / 0.6745 / sqrt 2, which a smooth trend barely inflates); segments
have at least `min_size` points; at most `max_changes` per series, the largest reductions first.
A change is reported at the first step of the new segment with its size = mean of the segment after minus mean
of the segment before (and relative to the before mean). A steadily falling loss shows as a few downward steps;
a phase shift (a plateau that suddenly breaks, a state entropy that collapses) as one large change.
Results: changes.json and changes.csv (column, step, size, relative), dynamics.png (val/loss or the first
column, with the change points); scalars n_changes (all columns), val_loss_n_changes,
val_loss_first_change_step, val_loss_largest_drop, largest_relative_change.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundthink.evaluation.tasks.base import EvalError, EvalTask, plot, register_task, write_csv, write_json


@dataclass
class DynamicsSettings:
    columns: list[str] = field(default_factory=list)  # empty = val/loss, train/loss and every diag/ column
    penalty: float = 3.0
    min_size: int = 3
    max_changes: int = 5


def _sse(prefix: list[float], prefix2: list[float], a: int, b: int) -> float:
    n = b - a
    total = prefix[b] - prefix[a]
    return (prefix2[b] - prefix2[a]) - total * total / n


def change_points(values: list[float], *, penalty: float, min_size: int, max_changes: int) -> list[int]:
    """Indices where a new segment starts (binary segmentation, mean-shift cost; see the module docstring)."""
    n = len(values)
    if n < 2 * min_size:
        return []
    diffs = [b - a for a, b in zip(values[:-1], values[1:])]
    med = statistics.median(diffs)
    sigma = statistics.median(abs(d - med) for d in diffs) / 0.6745 / math.sqrt(2)
    if sigma <= 0:
        sigma = (statistics.pstdev(values) or 1e-12) * 1e-3
    threshold = penalty * sigma * sigma * math.log(n)
    prefix, prefix2 = [0.0], [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
        prefix2.append(prefix2[-1] + v * v)
    found: list[int] = []
    segments = [(0, n)]
    while segments and len(found) < max_changes:
        best = None
        for a, b in segments:
            whole = _sse(prefix, prefix2, a, b)
            for k in range(a + min_size, b - min_size + 1):
                gain = whole - _sse(prefix, prefix2, a, k) - _sse(prefix, prefix2, k, b)
                if best is None or gain > best[0]:
                    best = (gain, a, k, b)
        if best is None or best[0] <= threshold:
            break
        _, a, k, b = best
        found.append(k)
        segments.remove((a, b))
        segments += [(a, k), (k, b)]
    return sorted(found)


@register_task("dynamics")
class DynamicsTask(EvalTask):
    Settings = DynamicsSettings
    needs_model = False
    description = "change points in the run's training curves (val loss, state entropy, gradient ratios)"

    def check(self, loaded: Any, s: DynamicsSettings) -> None:
        if loaded.run_dir is None or not (loaded.run_dir / "metrics.csv").is_file():
            raise EvalError("the dynamics task reads the run's metrics.csv: pass the run folder, not a lone "
                            "checkpoint file")
        if s.min_size < 1 or s.max_changes < 1 or s.penalty <= 0:
            raise EvalError("eval.tasks.dynamics: min_size and max_changes must be >= 1 and penalty > 0")

    def run(self, loaded: Any, s: DynamicsSettings, out_dir: Path, progress) -> dict[str, float]:
        from groundthink.training.metrics_file import read_metrics_csv

        series = read_metrics_csv(loaded.run_dir / "metrics.csv")
        columns = list(s.columns) or [c for c in series if c in ("val/loss", "train/loss") or c.startswith("diag/")]
        missing = [c for c in columns if c not in series]
        if missing:
            raise EvalError(f"eval.tasks.dynamics.columns: {missing} not in the run's metrics.csv")
        changes: dict[str, list[dict[str, float]]] = {}
        bar = progress(len(columns), "dynamics")
        for column in columns:
            points = [(st, v) for st, v in series[column] if math.isfinite(v)]
            steps, values = [p[0] for p in points], [p[1] for p in points]
            cps = change_points(values, penalty=s.penalty, min_size=s.min_size, max_changes=s.max_changes)
            bounds = [0, *cps, len(values)]
            found = []
            for i, k in enumerate(cps):
                before = statistics.fmean(values[bounds[i]:k])
                after = statistics.fmean(values[k:bounds[i + 2]])
                found.append({"step": steps[k], "size": after - before, "before": before, "after": after,
                              "relative": (after - before) / abs(before) if before else math.nan})
            changes[column] = found
            bar.update(1)
        bar.close()
        write_json(out_dir / "changes.json", {"settings": vars(s), "changes": changes})
        write_csv(out_dir / "changes.csv", [{"column": c, **ch} for c, found in changes.items() for ch in found])
        shown = "val/loss" if "val/loss" in changes else (columns[0] if columns else None)
        if shown:
            pts = [(st, v) for st, v in series[shown] if math.isfinite(v)]
            plot(out_dir / "dynamics.png", {shown: ([p[0] for p in pts], [p[1] for p in pts])},
                 title=f"{shown}: change points", xlabel="step", ylabel=shown,
                 vlines=[c["step"] for c in changes[shown]])
        val = changes.get("val/loss", [])
        rel = [abs(c["relative"]) for found in changes.values() for c in found if math.isfinite(c["relative"])]
        return {"n_changes": float(sum(len(f) for f in changes.values())), "columns": float(len(columns)),
                "val_loss_n_changes": float(len(val)),
                "val_loss_first_change_step": float(val[0]["step"]) if val else math.nan,
                "val_loss_largest_drop": min((c["size"] for c in val), default=math.nan),
                "largest_relative_change": max(rel, default=math.nan)}
