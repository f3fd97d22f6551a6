"""Finding and reading run folders (the layout written by `groundthink-train`, see the README).

A run folder holds config.yaml, summary.json, metrics.csv (wide: `step`, then one column per metric, empty
where not logged), optionally gates.json and groundthink-eval's eval/<task>/result.json, and under Hydra a
`.hydra/overrides.yaml`. A folder with `.hydra/` but no summary.json is a job that died before it could write
one; it is reported as failed, like a run whose summary says `"status": "failed"`.

Only the standard library and yaml are used here, so the CLI starts fast (no torch, no Lightning).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from groundthink.training.metrics_file import MetricsFileError, higher_is_better
from groundthink.training.metrics_file import read_metrics_csv as _read_metrics

RUN_MARKERS = ("config.yaml", "summary.json", "metrics.csv")
RUN_DIR_HELP = (
    "a run folder contains config.yaml, summary.json and metrics.csv (a Hydra job folder also has "
    ".hydra/overrides.yaml); a sweep folder contains such run folders, e.g. <sweep>/0_model.alpha=0.5/"
)


class CompareError(RuntimeError):
    """A user-facing problem with the inputs of a comparison; the message says what and where."""


@dataclass
class Run:
    """One training run as read from its folder (or from W&B)."""

    path: str
    name: str
    status: str
    error: str | None = None
    overrides: dict[str, str] | None = None
    config: dict[str, Any] | None = None
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    gate: str | None = None
    gate_verdict: str | None = None
    gates: dict[str, Any] | None = None  # the run's gates.json, when it has one
    evals: dict[str, float] = field(default_factory=dict)  # groundthink-eval scalars: {"eval/lm/ppl_carried": ...}

    @property
    def failed(self) -> bool:
        return self.status not in ("completed", "interrupted", "running")

    def final(self, metric: str) -> float:
        """The last logged value (nan included: a diverged run reports nan); else summary's `final`."""
        s = self.series.get(metric)
        if s:
            return s[-1][1]
        return _as_float(self.summary.get("final", {}).get(metric))

    def best(self, metric: str) -> float:
        """The best finite logged value (the largest for accuracies, else the smallest); summary's `best` if no
        series."""
        s = self.series.get(metric)
        if s:
            finite = [v for _, v in s if math.isfinite(v)]
            return (max if higher_is_better(metric) else min)(finite) if finite else math.nan
        return _as_float(self.summary.get("best", {}).get(metric))

    def state_size(self) -> float:
        """Recurrent state of the whole model in elements per batch lane (summary.json's `state_size`, which the
        mixers report themselves; attention counts its KV cache at the run's sequence length)."""
        record = self.summary.get("state_size")
        return _as_float(record.get("total") if isinstance(record, dict) else record)

    def tokens_per_s(self) -> float:
        """The run's throughput as summary.json records it (training-step time only, the one definition:
        groundthink.training.callbacks.Throughput); the mean of the logged perf/tokens_per_s windows for a run
        without a summary value (e.g. read from W&B)."""
        value = _as_float(self.summary.get("tokens_per_s"))
        if math.isfinite(value):
            return value
        finite = [v for _, v in self.series.get("perf/tokens_per_s", []) if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan

    def num_params(self) -> float:
        return _as_float(self.summary.get("num_params"))


def _as_float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def is_run_dir(path: Path) -> bool:
    return any((path / m).is_file() for m in RUN_MARKERS) or (path / ".hydra").is_dir()


def discover_runs(root: str | os.PathLike) -> list[Path]:
    """Run folders at or under `root`; hidden folders and a run folder's own subfolders are not searched."""
    root = Path(root)
    if not root.exists():
        raise CompareError(f"{root}: no such file or folder. Pass a run folder or a sweep folder "
                           f"({RUN_DIR_HELP}).")
    if not root.is_dir():
        raise CompareError(f"{root} is a file; pass the folder that contains it ({RUN_DIR_HELP}).")
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    if not found:
        raise CompareError(f"no runs found under {root}: {RUN_DIR_HELP}.")
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    parts: list[Any] = []
    for part in path.parts:
        head = part.split("_", 1)[0]
        parts.append((0, int(head), part) if head.isdigit() else (1, 0, part))
    return parts


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} (groundthink.training.metrics_file, the one reader), its errors as
    CompareError."""
    try:
        return _read_metrics(path)
    except MetricsFileError as exc:
        raise CompareError(str(exc)) from None


def read_overrides(path: Path) -> dict[str, str] | None:
    """`.hydra/overrides.yaml` as {key: value string}; `+`/`++`/`~` prefixes are dropped from the key."""
    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return None
    try:
        items = yaml.safe_load(file.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError) as exc:
        raise CompareError(f"cannot read {file}: {exc}") from None
    if not isinstance(items, list):
        raise CompareError(f"{file}: expected a YAML list of 'key=value' strings, got {type(items).__name__}")
    return parse_override_list(items)


def parse_override_list(items: list[Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        text = str(item)
        key, sep, value = text.partition("=")
        key = key.lstrip("+~").strip()
        if key:
            out[key] = value.strip() if sep else ""
    return out


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to {"a.b.c": leaf}; lists are leaves (compared as a whole)."""
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in config.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def load_run(path: Path, root: Path) -> Run:
    """Read one run folder. Missing pieces and an unreadable metrics.csv make the run failed (with a warning)
    instead of stopping the whole report; an unreadable config.yaml or gates.json raises CompareError."""
    try:
        name = str(path.relative_to(root)) if path != root else path.name
    except ValueError:
        name = path.name
    summary: dict[str, Any] = {}
    summary_file = path / "summary.json"
    status, error = "failed", None
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            error = f"summary.json unreadable: {exc}"
        else:
            status = str(summary.get("status") or "failed")
            error = summary.get("error")
    else:
        error = "no summary.json: the job died before finishing (see its train.log / Hydra log)"
    config = None
    config_file = path / "config.yaml"
    if config_file.is_file():
        try:
            config = flatten(yaml.safe_load(config_file.read_text(encoding="utf-8")) or {})
        except (OSError, yaml.YAMLError) as exc:
            raise CompareError(f"cannot read {config_file}: {exc}") from None
    metrics_file = path / "metrics.csv"
    series: dict[str, list[tuple[int, float]]] = {}
    if metrics_file.is_file():
        try:
            series = read_metrics_csv(metrics_file)
        except CompareError as exc:
            print(f"warning: {exc}; this run is reported as failed", file=sys.stderr)
            status, error = "failed", f"metrics.csv unreadable: {exc}"
    gate = gate_verdict = gates = None
    gates_file = path / "gates.json"
    if gates_file.is_file():
        try:
            gates = json.loads(gates_file.read_text(encoding="utf-8"))
            gate, gate_verdict = gates.get("gate"), str(gates.get("verdict", "")).upper() or None
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise CompareError(f"cannot read {gates_file}: {exc}") from None
    return Run(path=str(path), name=name, status=status, error=error, overrides=read_overrides(path),
               config=config, series=series, summary=summary, gate=gate, gate_verdict=gate_verdict, gates=gates,
               evals=read_eval_results(path))


def read_eval_results(path: Path) -> dict[str, float]:
    """The scalars of every `<run>/eval/<task>/result.json` written by groundthink-eval ({} when none); an
    unreadable file is skipped with a warning."""
    out: dict[str, float] = {}
    for file in sorted(path.glob("eval/*/result.json")):
        try:
            metrics = json.loads(file.read_text(encoding="utf-8")).get("metrics") or {}
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            print(f"warning: {file} unreadable ({exc}); its eval columns are left empty", file=sys.stderr)
            continue
        out.update({str(k): _as_float(v) for k, v in metrics.items()})
    return out


def load_runs(paths: list[str | os.PathLike]) -> list[Run]:
    runs: list[Run] = []
    seen: set[str] = set()
    for p in paths:
        root = Path(p)
        for run_dir in discover_runs(root):
            key = str(run_dir.resolve())
            if key not in seen:
                seen.add(key)
                runs.append(load_run(run_dir, root))
    return runs
