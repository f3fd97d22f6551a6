"""Grouping runs into cells (one configuration, several seeds) and the statistics of each cell.

A run's parameters are its Hydra overrides plus the config.yaml keys that differ between runs and that no
override explains (so runs without an overrides file, or sweeps merged from different base configs, still
separate). A key that some configs lack (a setting added after those runs were made) separates only the runs that
have it, and a key that the overrides determine (a group option's values) is not a parameter of its own. Keys
never compared, in overrides or configs: the seed keys and everything under `resume`, `paths`, `logger`, `tags`,
`hydra` (they change where a run writes, not what it learns). The cell label shows
only the parameters that vary between cells; the ones shared by all runs are reported once as common
parameters.

Statistics use the completed runs only (status "completed"); failed and interrupted runs are counted beside
them. std is the sample standard deviation over seeds (ddof=1), nan for a single seed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from groundthink.reporting.runs import CompareError, Run

IGNORED_CONFIG_PREFIXES = ("resume", "paths", "logger", "tags", "hydra")
# Validation metrics tabulated per cell (final and best; best = the highest accuracy, the lowest loss/bpb).
LOSS_METRICS = ("val/loss", "val/bpb", "val/acc")
BASE_LABEL = "(base)"


@dataclass
class Cell:
    params: dict[str, str]
    runs: list[Run]
    label: str = ""
    stats: dict[str, float] = field(default_factory=dict)
    ratio: float = math.nan
    verdict: str = "n/a"
    best_of: dict[str, Any] | None = None  # set by select_best_of: the chosen value of the collapsed key

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.status == "completed"]

    @property
    def n_failed(self) -> int:
        return sum(r.failed for r in self.runs)

    @property
    def n_interrupted(self) -> int:
        return sum(r.status == "interrupted" for r in self.runs)

    @property
    def status(self) -> str:
        """"completed", "failed", or a count per status such as "2 completed, 1 failed"."""
        counts: dict[str, int] = {}
        for r in self.runs:
            what = "failed" if r.failed else r.status
            counts[what] = counts.get(what, 0) + 1
        if len(counts) == 1:
            return next(iter(counts))
        order = {"completed": 0, "failed": 1, "interrupted": 2, "running": 3}
        return ", ".join(f"{counts[w]} {w}" for w in sorted(counts, key=lambda w: (order.get(w, 4), w)))

    @property
    def errors(self) -> list[str]:
        """First line of each distinct error of this cell's failed runs."""
        out: list[str] = []
        for r in self.runs:
            if r.failed:
                first = (r.error or "failed (no error message recorded)").strip().splitlines()
                line = first[0] if first else "failed (no error message recorded)"
                if line not in out:
                    out.append(line)
        return out


def value_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def sort_value(text: str | None) -> tuple:
    if text is None:
        return (0, 0.0, "")
    value = parse_value(text)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), text)
    # text in natural order: the numbers inside it compare as numbers (T64_kv4 before T64_kv16)
    natural = tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text)))
    return (2, 0.0, natural)


def _ignored(key: str, seed_keys: tuple[str, ...]) -> bool:
    return key in seed_keys or any(key == p or key.startswith(p + ".") for p in IGNORED_CONFIG_PREFIXES)


def run_params(runs: list[Run], seed_keys: tuple[str, ...]) -> list[dict[str, str]]:
    """Each run's parameters: overrides (seed keys dropped) + the config keys that differ and that no
    override explains."""
    override_keys = {k for r in runs for k in (r.overrides or {})}
    params = [{k: v for k, v in (r.overrides or {}).items() if not _ignored(k, seed_keys)} for r in runs]
    configs = [r.config for r in runs if r.config is not None]
    if len(configs) > 1:
        all_keys = sorted({k for c in configs for k in c})
        diff_keys = []
        for key in all_keys:
            if _ignored(key, seed_keys) or any(key == o or key.startswith(o + ".") for o in override_keys):
                continue
            # a run whose config lacks the key predates that setting: it is compared on the keys it has
            values = {value_string(c[key]) for c in configs if key in c}
            if len(values) > 1 and not _follows_overrides(key, runs, params):
                diff_keys.append(key)
        for p, r in zip(params, runs):
            if r.config is not None:
                p.update({k: value_string(r.config[k]) for k in diff_keys if k in r.config})
    return params


def _follows_overrides(key: str, runs: list[Run], params: list[dict[str, str]]) -> bool:
    """True when the runs' overrides determine the key's value (e.g. data.num_kv_pairs under `mqar_cell=T64_kv4`, a
    group option): runs with the same overrides never differ in it, so it separates no cells and is not a label."""
    if not any(params):
        return False
    seen: dict[tuple, str] = {}
    for p, r in zip(params, runs):
        if r.config is None or key not in r.config:
            continue
        value = value_string(r.config[key])
        if seen.setdefault(tuple(sorted(p.items())), value) != value:
            return False
    return True


def group_cells(runs: list[Run], seed_keys: tuple[str, ...] = ("seed",)) -> tuple[list[Cell], dict[str, str]]:
    """(cells in sorted order, parameters common to every run)."""
    if not runs:
        raise CompareError("no runs to compare")
    params = run_params(runs, seed_keys)
    all_keys = sorted({k for p in params for k in p})
    varying = [k for k in all_keys if len({p.get(k) for p in params}) > 1]
    common = {k: params[0][k] for k in all_keys if k not in varying}
    groups: dict[tuple, Cell] = {}
    for p, r in zip(params, runs):
        key = tuple((k, p.get(k)) for k in varying)
        if key not in groups:
            groups[key] = Cell(params=dict(p), runs=[])
        groups[key].runs.append(r)
    ordered = sorted(groups.items(), key=lambda item: [sort_value(v) for _, v in item[0]])
    cells = []
    for key, cell in ordered:
        cell.label = ",".join(f"{k}={v}" for k, v in key if v is not None) or BASE_LABEL
        cell.stats = cell_stats(cell)
        cells.append(cell)
    return cells, common


def varying_axes(cells: list[Cell]) -> list[str]:
    """Parameter keys that take two or more values across cells (the swept axes)."""
    keys = sorted({k for c in cells for k in c.params})
    return [k for k in keys if len({c.params.get(k) for c in cells}) > 1]


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=np.float64)
    mean = float(np.mean(arr))
    std = float(np.std(arr, ddof=1)) if len(arr) > 1 else math.nan
    return mean, std


def cell_stats(cell: Cell) -> dict[str, float]:
    ok = cell.completed
    stats: dict[str, float] = {}
    for metric in LOSS_METRICS:
        for which in ("final", "best"):
            values = [getattr(r, which)(metric) for r in ok]
            mean, std = mean_std(values)
            stats[f"{which}_{metric}_mean"] = mean
            stats[f"{which}_{metric}_std"] = std
    tps = [r.tokens_per_s() for r in ok]
    stats["tokens_per_s_mean"], stats["tokens_per_s_std"] = mean_std([v for v in tps if math.isfinite(v)])
    params = [r.num_params() for r in cell.runs if math.isfinite(r.num_params())]
    stats["num_params"] = float(np.mean(params)) if params else math.nan
    stats["num_params_varies"] = float(len(set(params)) > 1)
    states = [r.state_size() for r in cell.runs if math.isfinite(r.state_size())]
    stats["state_size"] = float(np.mean(states)) if states else math.nan
    stats["gates_pass"] = float(sum(r.gate_verdict == "PASS" for r in cell.runs))
    stats["gates_fail"] = float(sum(r.gate_verdict == "FAIL" for r in cell.runs))
    for key in eval_keys(cell.runs):  # groundthink-eval results: mean ± std over the runs that have them
        stats[f"{key}_mean"], stats[f"{key}_std"] = mean_std([r.evals[key] for r in ok if key in r.evals])
    return stats


def select_best_of(cells: list[Cell], key: str, metric: str) -> list[Cell]:
    """Cells that differ only in `key` (e.g. optim.lr) collapse into the one with the best mean final `metric`
    (highest accuracy, lowest loss); the chosen cell keeps its runs and statistics, drops `key` from its parameters
    and records `best_of` = {key, value, candidates: {value: mean}}. A cell without `key` passes through."""
    from groundthink.training.metrics_file import higher_is_better

    if not any(key in c.params for c in cells):
        raise CompareError(f"--best-of {key}: no cell varies {key}; the swept keys are "
                           f"{', '.join(varying_axes(cells)) or '(none)'}")
    sign = -1.0 if higher_is_better(metric) else 1.0
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        rest = tuple(sorted((k, v) for k, v in c.params.items() if k != key))
        groups.setdefault(rest, []).append(c)
    chosen = []
    for members in groups.values():
        scored = [(c.stats.get(f"final_{metric}_mean", math.nan), c) for c in members]
        finite = [(sign * v, i) for i, (v, _) in enumerate(scored) if math.isfinite(v)]
        best = members[min(finite)[1]] if finite else members[0]
        value = best.params.get(key)
        best.best_of = {"key": key, "value": value,
                        "candidates": {c.params.get(key): v for v, c in scored}}
        best.params = {k: v for k, v in best.params.items() if k != key}
        keys = _label_keys(cells, key)
        best.label = ",".join(f"{k}={v}" for k, v in sorted(best.params.items()) if k in keys) or BASE_LABEL
        chosen.append(best)
    return chosen


def _label_keys(cells: list[Cell], dropped: str) -> set[str]:
    return {k for k in varying_axes(cells) if k != dropped}


def eval_keys(runs: list[Run]) -> list[str]:
    """Every groundthink-eval scalar some run has (eval/<task>/<key>), sorted."""
    return sorted({k for r in runs for k in r.evals})


_SPLIT_ITEMS = re.compile(r"[,\s]+(?=[+~]*[\w.\-/]+=)")


def find_baseline(cells: list[Cell], spec: str | None) -> Cell:
    """The baseline cell: by exact label, or by `key=value[,key=value]` items that select exactly one cell.
    Without a spec: the cell without parameters if there is one, else the first cell."""
    if spec is None:
        return next((c for c in cells if c.label == BASE_LABEL), cells[0])
    spec = spec.strip()
    for c in cells:
        if c.label == spec:
            return c
    wanted = {}
    for item in _SPLIT_ITEMS.split(spec):
        key, sep, value = item.partition("=")
        if not sep:
            raise CompareError(f"--baseline {spec!r}: {item!r} is not key=value. Give a cell label "
                               f"from the table or key=value items, e.g. {cells[0].label!r}.")
        wanted[key.lstrip("+~").strip()] = parse_value(value.strip())
    matches = [c for c in cells
               if all(k in c.params and parse_value(c.params[k]) == v for k, v in wanted.items())]
    labels = ", ".join(repr(c.label) for c in cells)
    if not matches:
        raise CompareError(f"--baseline {spec!r} matches no cell; the cells are: {labels}")
    if len(matches) > 1:
        raise CompareError(f"--baseline {spec!r} matches {len(matches)} cells "
                           f"({', '.join(repr(c.label) for c in matches)}); add keys to pick one")
    return matches[0]


def apply_baseline(cells: list[Cell], baseline: Cell, within_percent: float) -> None:
    """G3.6 rule: PASS when a cell's mean final val/loss <= baseline's mean final val/loss * (1 + within/100).
    One-sided: being better than the baseline always passes. n/a when either mean is not a finite number."""
    if not within_percent >= 0:
        raise CompareError(f"--within {within_percent}: must be a percentage >= 0 (e.g. 20)")
    base = baseline.stats["final_val/loss_mean"]
    for c in cells:
        mean = c.stats["final_val/loss_mean"]
        if not (math.isfinite(mean) and math.isfinite(base) and base > 0):
            c.ratio, c.verdict = math.nan, "n/a"
            continue
        c.ratio = mean / base
        if c is baseline:
            c.verdict = "baseline"
        else:
            c.verdict = "PASS" if c.ratio <= 1.0 + within_percent / 100.0 else "FAIL"
