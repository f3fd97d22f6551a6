"""The Lightning logger that writes the run folder's wide `metrics.csv` (format: groundthink/training/metrics_file.py).

The file only ever grows by whole lines appended at its end, or is replaced whole (a temporary file renamed over
it), so no kill, full disk or write error can damage a row that is already on disk:
- metrics logged for a step merge into that step's row in memory; the row is appended once a later step is
  logged (it is then complete), or when `flush()` is called (the checkpoint callback flushes before it writes a
  checkpoint, and `finalize` at the end of a run);
- a change to a row already on disk, or a new metric (a new column), rewrites the file atomically;
- a failed write is reported once as a warning and retried at the next flush; training goes on (a full disk then
  stops the run at its next checkpoint, with the rows written so far intact).
On resume, `CSVMetricsLogger(run_dir, resume_step=S)` keeps the rows with step <= S and the columns they use, so
the file of a resumed run equals the file of an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from groundthink.training.metrics_file import METRICS_FILE, format_value, read_table

log = logging.getLogger(__name__)


class CSVMetricsLogger(Logger):
    """Wide metrics.csv in `run_dir` (see the module docstring). `log_hyperparams` is a no-op: the resolved
    config is the run folder's config.yaml."""

    def __init__(
        self, run_dir: str | os.PathLike, resume_step: int | None = None, filename: str = METRICS_FILE
    ) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename
        self.columns: list[str] = []
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self._disk_columns: list[str] | None = None
        self._on_disk = 0  # rows[:_on_disk] are in the file as it is
        self._rewrite_needed = False
        self._warned = False
        if resume_step is not None and self.path.exists():
            columns, rows = read_table(self.path)
            kept = [(s, r) for s, r in rows if s <= resume_step]
            used = {k for _, r in kept for k in r}
            self.columns = [c for c in columns if c in used]
            self.rows = kept
            self._rewrite_needed = True
            if rank_zero_only.rank == 0:
                self.flush()

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
        step = int(step if step is not None else (self.rows[-1][0] if self.rows else 0))
        values = {k: v for k, v in metrics.items() if k != "step"}
        self.columns += [k for k in values if k not in self.columns]
        index = next((i for i in range(len(self.rows) - 1, -1, -1) if self.rows[i][0] <= step), None)
        if index is not None and self.rows[index][0] == step:
            self.rows[index][1].update(values)
            touched = index
        else:
            touched = 0 if index is None else index + 1
            self.rows.insert(touched, (step, dict(values)))
        if touched < self._on_disk:
            self._rewrite_needed = True
        if touched == len(self.rows) - 1 and touched > 0:
            self._write(upto=len(self.rows) - 1)  # the rows before this step are complete

    @rank_zero_only
    def save(self) -> None:
        """Lightning calls this after every log call; rows are written as they complete (module docstring)."""
        return None

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()

    def flush(self) -> None:
        """Write every row, the newest included (rank 0 only: another rank's logger holds no rows, and under
        data parallelism the checkpoint callback flushes on every rank)."""
        if rank_zero_only.rank != 0:
            return
        self._write(upto=len(self.rows))

    def _write(self, upto: int) -> None:
        try:
            if self._rewrite_needed or self._disk_columns != self.columns:
                self._rewrite(upto)
            elif upto > self._on_disk:
                data = "".join(self._line(s, r) for s, r in self.rows[self._on_disk:upto]).encode("utf-8")
                self._rewrite_needed = True  # until the append is known to be whole
                with open(self.path, "ab") as f:
                    f.write(data)
                self._on_disk = upto
                self._rewrite_needed = False
        except OSError as exc:
            if not self._warned:
                log.warning("could not write %s (%s); its rows are kept in memory and written at the next flush",
                            self.path, exc)
                self._warned = True

    def _line(self, step: int, row: Mapping[str, Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([step, *(format_value(row.get(c)) for c in self.columns)])
        return buf.getvalue()

    def _rewrite(self, upto: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(["step", *self.columns])
        data = buf.getvalue() + "".join(self._line(s, r) for s, r in self.rows[:upto])
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._disk_columns = list(self.columns)
        self._on_disk = upto
        self._rewrite_needed = False
