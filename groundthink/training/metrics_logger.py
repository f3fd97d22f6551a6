"""The run folder's wide `metrics.csv`: column `step`, then one column per metric, empty where not logged.

`CSVMetricsLogger` is a Lightning logger that keeps the whole table in memory (one row per step; metrics
logged at the same step merge into one row) and keeps the file in step with it cheaply:
- new rows are appended;
- an update to the last written row truncates the file at that row's offset and appends it again;
- a new metric name (a new column) or an update to an older row rewrites the file atomically (tmp +
  os.replace).
It writes after every `flush_every` log calls (default 1, so the file is always complete up to the latest
step) and at finalize. On resume, `CSVMetricsLogger(run_dir, resume_step=S)` keeps the rows with
  step <= S and drops the columns that only later rows used, so the file of a resumed run equals the file of
  an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import math
import os
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

METRICS_FILE = "metrics.csv"


def _format(value: Any) -> str:
    if value is None:
        return ""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _parse(text: str) -> int | float | None:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


class CSVMetricsLogger(Logger):
    """Wide metrics.csv in `run_dir` (see the module docstring). `log_hyperparams` is a no-op: the resolved
    config is the run folder's config.yaml."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        resume_step: int | None = None,
        flush_every: int = 1,
        filename: str = METRICS_FILE,
    ) -> None:
        super().__init__()
        if flush_every < 1:
            raise ValueError(f"flush_every={flush_every}: must be >= 1 (log calls between writes)")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename
        self.flush_every = flush_every
        self.columns: list[str] = []
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self._index: dict[int, int] = {}
        self._disk_columns: list[str] | None = None
        self._offsets: list[int] = []
        self._end_offset = 0
        self._dirty_from = 0
        self._pending = 0
        if resume_step is not None and self.path.exists():
            columns, rows = _read_table(self.path)
            kept = [(s, r) for s, r in rows if s <= resume_step]
            used = {k for _, r in kept for k, v in r.items() if v is not None}
            self.columns = [c for c in columns if c in used]
            self.rows = [(s, {k: v for k, v in r.items() if k in used and v is not None}) for s, r in kept]
            self._index = {s: i for i, (s, _) in enumerate(self.rows)}
            if rank_zero_only.rank == 0:
                self._rewrite()

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return self.run_dir.name

    @property
    def root_dir(self) -> str:
        return str(self.run_dir)

    @property
    def log_dir(self) -> str:
        return str(self.run_dir)

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        return None

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is None:
            step = self.rows[-1][0] if self.rows else 0
        step = int(step)
        values = {k: v for k, v in metrics.items() if k != "step"}
        for key in values:
            if key not in self.columns:
                self.columns.append(key)
        if step in self._index:
            i = self._index[step]
            self.rows[i][1].update(values)
            self._dirty_from = min(self._dirty_from, i)
        elif not self.rows or step > self.rows[-1][0]:
            self._index[step] = len(self.rows)
            self.rows.append((step, dict(values)))
        else:
            i = next(j for j, (s, _) in enumerate(self.rows) if s > step)
            self.rows.insert(i, (step, dict(values)))
            self._index = {s: j for j, (s, _) in enumerate(self.rows)}
            self._dirty_from = min(self._dirty_from, i)
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    @rank_zero_only
    def save(self) -> None:
        """Lightning calls this after every log call; writing follows `flush_every` instead."""
        return None

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()

    def flush(self) -> None:
        """Bring metrics.csv up to date with the in-memory table."""
        self._pending = 0
        if self._disk_columns != self.columns or self._dirty_from < len(self._offsets) - 1:
            self._rewrite()
            return
        start = self._dirty_from
        if start >= len(self.rows):
            return
        offset = self._offsets[start] if start < len(self._offsets) else self._end_offset
        lines = [self._line(s, r) for s, r in self.rows[start:]]
        with open(self.path, "r+b") as f:
            f.truncate(offset)
            f.seek(offset)
            del self._offsets[start:]
            for line in lines:
                self._offsets.append(offset)
                data = line.encode("utf-8")
                f.write(data)
                offset += len(data)
        self._end_offset = offset
        self._dirty_from = len(self.rows)

    def _line(self, step: int, row: Mapping[str, Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([step, *(_format(row.get(c)) for c in self.columns)])
        return buf.getvalue()

    def _rewrite(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(["step", *self.columns])
        header = buf.getvalue().encode("utf-8")
        offsets, chunks, offset = [], [header], len(header)
        for s, r in self.rows:
            data = self._line(s, r).encode("utf-8")
            offsets.append(offset)
            chunks.append(data)
            offset += len(data)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(b"".join(chunks))
        os.replace(tmp, self.path)
        self._disk_columns = list(self.columns)
        self._offsets = offsets
        self._end_offset = offset
        self._dirty_from = len(self.rows)


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0] != "step":
            raise ValueError(
                f"{path} is not a GroundThink metrics file: its first column must be 'step', "
                f"got {header[:1] if header else 'an empty file'}"
            )
        columns = header[1:]
        rows = []
        for line in reader:
            if not line:
                continue
            rows.append((int(line[0]), {c: _parse(v) for c, v in zip(columns, line[1:])}))
    return columns, rows


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} in file order, skipping empty cells; values are floats (nan kept)."""
    columns, rows = _read_table(Path(path))
    series: dict[str, list[tuple[int, float]]] = {c: [] for c in columns}
    for step, row in rows:
        for c in columns:
            v = row.get(c)
            if v is not None:
                series[c].append((step, float(v)))
    return series


def last_values(path: str | os.PathLike) -> dict[str, float]:
    """The last finite value of every metric in a metrics.csv (for summaries)."""
    return {
        name: next(v for _, v in reversed(s) if math.isfinite(v))
        for name, s in read_metrics_csv(path).items()
        if any(math.isfinite(v) for _, v in s)
    }
