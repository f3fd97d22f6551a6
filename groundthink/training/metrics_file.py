"""The run folder's `metrics.csv`, read and formatted with the standard library only (the comparison CLI reads it
without importing torch or Lightning; groundthink/training/metrics_logger.py writes it).

The table is wide: column `step` (1-based optimizer steps), then one column per metric, empty where a metric was
not logged at that step. A last line without its newline (cut off by a kill or a full disk mid-write) is ignored.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.csv"


def higher_is_better(metric: str) -> bool:
    """Accuracies and rewards improve upwards (val/acc, eval/mqar/acc_mean); losses, perplexities, bits per byte
    and everything else downwards."""
    return metric.rsplit("/", 1)[-1].startswith(("acc", "reward"))


class MetricsFileError(ValueError):
    """metrics.csv cannot be read; the message names the file, the line and the column."""


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def read_table(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, dict[str, float]]]]:
    """(metric columns, [(step, {metric: value})]) with empty cells left out and 'nan' kept as nan."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsFileError(f"cannot read {path}: {exc}") from None
    if text and not text.endswith("\n"):  # the last line was cut off by a kill mid-write: drop it
        text = text[: text.rfind("\n") + 1]
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise MetricsFileError(f"cannot read {path}: {exc}") from None
    if not lines or not lines[0] or lines[0][0] != "step":
        got = repr(lines[0][:1]) if lines and lines[0] else "an empty file"
        raise MetricsFileError(f"{path} is not a GroundThink metrics file: its first column must be 'step', got {got}")
    columns = lines[0][1:]
    rows = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        try:
            step = int(float(line[0]))
        except ValueError:
            raise MetricsFileError(f"{path}, line {line_no}: step {line[0]!r} is not a number") from None
        values = {}
        for column, cell in zip(columns, line[1:]):
            if cell == "":
                continue
            try:
                values[column] = float(cell)
            except ValueError:
                raise MetricsFileError(f"{path}, line {line_no}, column {column!r}: {cell!r} is not a number") from None
        rows.append((step, values))
    return columns, rows


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} in file order, empty cells skipped, 'nan' kept as nan."""
    columns, rows = read_table(path)
    series: dict[str, list[tuple[int, float]]] = {c: [] for c in columns}
    for step, values in rows:
        for column, value in values.items():
            series[column].append((step, value))
    return series
