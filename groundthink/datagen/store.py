"""Exactly-once JSONL: records keyed by a stable id, appended with fsync, a torn last line repaired on open.

How "kill -9 at any moment, restart, exactly one valid record per id" holds:
- One writer: a lock file (`flock`) per output folder refuses a second process; the OS drops the lock when a
  process dies, even by SIGKILL, so a restart never waits for a dead holder.
- A record is appended only once its work is done, as one line written with a single `os.write` on an O_APPEND
  descriptor and then `fsync`ed. A kill before the write loses only in-flight work (redone on restart); a kill
  during it leaves at most one torn, newline-less last line.
- On open every file is scanned: a last line without its newline, or that does not parse, is the torn one and is
  cut off (its bytes are reported); an unparsable line anywhere else, or an id seen twice, is corruption that this
  writer never produces, so it is refused with the file and line rather than silently "fixed".
- Done ids are the ids of valid lines; the runner skips them.

Records go to shards `<stem>-00000.jsonl`, `<stem>-00001.jsonl`, ... of at most `shard_size` records each (a
pilot of 100 fills the first; the same command with the full count appends the rest into further shards).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class StoreError(RuntimeError):
    """An output file or folder that cannot be used as it is; the message names it and says what to do."""


@dataclass
class Repair:
    path: str
    torn_bytes: int


def _scan(path: Path, id_key: str | None) -> tuple[list[dict[str, Any]], Repair | None]:
    """Parse a JSONL file, cutting a torn last line off the file; return (records, repair or None)."""
    data = path.read_bytes()
    if not data:
        return [], None
    lines = data.split(b"\n")
    # data ending in "\n" splits into [..., b""]: every line is complete. Otherwise the last piece is torn.
    complete, tail = lines[:-1], lines[-1]
    records: list[dict[str, Any]] = []
    bad_last = False
    for number, raw in enumerate(complete, start=1):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or (id_key is not None and not isinstance(record.get(id_key), str)):
                raise ValueError(f"not an object with a string {id_key!r}")
        except ValueError as exc:
            if number == len(complete) and not tail:
                bad_last = True  # a complete-looking last line that does not parse: torn as well
                break
            raise StoreError(
                f"{path}:{number} is not a valid record ({exc}). Only the last line can be torn by a kill; this one "
                f"is in the middle, so the file was edited or written by something else. Move the file away, or "
                f"delete that line, and run the same command again"
            ) from None
        records.append(record)
    torn = len(tail) + (len(complete[-1]) + 1 if bad_last else 0)
    if torn:
        keep = len(data) - torn
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return records, Repair(str(path), torn)
    return records, None


class AppendLog:
    """One JSONL file opened for durable appends (O_APPEND, one write per line, fsync)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lines = 0

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.lines += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ShardedStore:
    """Records with unique ids in `<directory>/<stem>-NNNNN.jsonl` shards of at most `shard_size` lines."""

    def __init__(self, directory: str | Path, stem: str, *, shard_size: int = 5000, id_key: str = "id") -> None:
        if shard_size < 1:
            raise StoreError(f"shard_size={shard_size} must be >= 1")
        self.directory = Path(directory)
        self.stem = stem
        self.shard_size = int(shard_size)
        self.id_key = id_key
        self.done: set[str] = set()
        self.repairs: list[Repair] = []
        self._current: AppendLog | None = None
        self._current_count = 0
        self._next_index = 0

    def shards(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.stem}-[0-9][0-9][0-9][0-9][0-9].jsonl"))

    def open(self) -> ShardedStore:
        self.directory.mkdir(parents=True, exist_ok=True)
        last_count = 0
        for shard in self.shards():
            records, repair = _scan(shard, self.id_key)
            if repair is not None:
                self.repairs.append(repair)
            for number, record in enumerate(records, start=1):
                rid = record[self.id_key]
                if rid in self.done:
                    raise StoreError(
                        f"{shard}:{number}: id {rid!r} is already in an earlier line; this writer never writes an "
                        f"id twice, so two processes wrote here or the files were merged by hand. Remove the "
                        f"duplicate line and run again"
                    )
                self.done.add(rid)
            last_count = len(records)
            self._next_index = int(shard.stem.rsplit("-", 1)[1]) + 1
        if self._next_index and last_count < self.shard_size:
            self._next_index -= 1  # keep appending to the last shard until it is full
            self._current_count = last_count
        return self

    def records(self) -> Iterator[dict[str, Any]]:
        """Every stored record, shard by shard, in file order."""
        for shard in self.shards():
            with open(shard, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)

    def append(self, record: dict[str, Any]) -> None:
        rid = record.get(self.id_key)
        if not isinstance(rid, str):
            raise StoreError(f"a record needs a string {self.id_key!r}, got {rid!r}")
        if rid in self.done:
            raise StoreError(f"id {rid!r} is already stored in {self.directory}; it must not be written twice")
        if self._current is None or self._current_count >= self.shard_size:
            if self._current is not None:
                self._current.close()
                self._next_index += 1
                self._current_count = 0
            path = self.directory / f"{self.stem}-{self._next_index:05d}.jsonl"
            self._current = AppendLog(path)
        self._current.append(record)
        self._current_count += 1
        self.done.add(rid)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


class RejectsLog:
    """`rejects.jsonl`: one line per record given up in an invocation (id, phase, reason, error, attempts, time).

    A log, not a set: a rejected id is not done, so the next invocation tries it again, and if it fails again it is
    logged again. Its torn last line is repaired like the records'.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.repair: Repair | None = None
        self.entries: list[dict[str, Any]] = []
        self._log: AppendLog | None = None

    def open(self) -> RejectsLog:
        if self.path.exists():
            self.entries, self.repair = _scan(self.path, None)
        self._log = AppendLog(self.path)
        return self

    def append(self, entry: dict[str, Any]) -> None:
        assert self._log is not None, "open() first"
        self._log.append(entry)
        self.entries.append(entry)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class RunLock:
    """An exclusive lock on an output folder for the life of this process (released by the OS if it dies)."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / ".lock"
        self._fd = -1

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = -1
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreError(
                    f"{self.path.parent} is being written by another groundthink-datagen process (pid {holder}); "
                    f"wait for it to finish or stop it, or choose another name= for this run"
                ) from None
            raise
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        return self

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
