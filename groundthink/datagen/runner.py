"""The async runner: bounded concurrency, retries with backoff, rejects, progress, clean stop on a signal.

A phase is a list of tasks with stable ids. Ids already in the phase's store are skipped; the rest go to
`concurrency` workers that call the backend through `Attempts.call`, which retries `RetryableError`s with
tenacity: a 429's Retry-After is honoured (capped by `retry.max_retry_after_s`), anything else backs off
exponentially with full jitter (`wait_random_exponential(initial_wait_s, max_wait_s)`), at most
`retry.max_attempts` attempts. A record that still fails, or whose request can never succeed (`RequestRejected`),
is written to the rejects file with its reason and the run goes on; a `FatalBackendError`, or
`abort_after_failures` failures in a row, stops the run (no point hammering a dead server for hours). An optional
requests-per-minute limit spaces attempts out before the server has to say 429.

SIGINT/SIGTERM cancel the in-flight requests (their records were not written, so they are redone on restart) and
the invocation ends as "interrupted" with the command to resume. Appends are synchronous calls on the event
loop's thread, so a cancellation can never tear a record.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential
from tenacity.wait import wait_base

from groundthink.datagen.backends.base import BackendError, FatalBackendError, RequestRejected, RetryableError
from groundthink.datagen.store import RejectsLog, ShardedStore


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int = 6
    initial_wait_s: float = 1.0
    max_wait_s: float = 60.0
    max_retry_after_s: float = 600.0
    rpm: float | None = None  # client-side requests-per-minute limit (None = none)
    abort_after_failures: int = 50

    def validate(self) -> RetrySettings:
        if self.max_attempts < 1:
            raise ValueError(f"retry.max_attempts={self.max_attempts} must be >= 1")
        if self.initial_wait_s < 0 or self.max_wait_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("retry.initial_wait_s, retry.max_wait_s and retry.max_retry_after_s must be >= 0")
        if self.rpm is not None and self.rpm <= 0:
            raise ValueError(f"retry.rpm={self.rpm} must be > 0, or null for no client-side limit")
        if self.abort_after_failures < 1:
            raise ValueError(f"retry.abort_after_failures={self.abort_after_failures} must be >= 1")
        return self


class WaitRetryAfterOrBackoff(wait_base):
    """Wait what the server's Retry-After says (capped), else exponential backoff with full jitter."""

    def __init__(self, settings: RetrySettings) -> None:
        self.settings = settings
        self.backoff = wait_random_exponential(multiplier=settings.initial_wait_s, max=settings.max_wait_s)

    def __call__(self, retry_state) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), self.settings.max_retry_after_s)
        return self.backoff(retry_state)


class RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart (shared by every worker)."""

    def __init__(self, rpm: float | None) -> None:
        self.interval = 60.0 / rpm if rpm else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            wait = max(0.0, self._next - now)
            self._next = max(now, self._next) + self.interval
        if wait:
            await asyncio.sleep(wait)


@dataclass
class PhaseStats:
    phase: str
    total: int
    skipped: int = 0  # already done before this invocation
    written: int = 0
    rejected: int = 0
    retries: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    status: str = "completed"  # completed | interrupted | aborted

    @property
    def records_per_s(self) -> float:
        return self.written / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "total": self.total, "skipped_done": self.skipped, "written": self.written,
                "rejected": self.rejected, "retries": self.retries, "retry_reasons": dict(self.retry_reasons),
                "wall_s": round(self.wall_s, 3), "records_per_s": round(self.records_per_s, 3),
                "status": self.status}


class Attempts:
    """Per task: runs backend calls with the retry policy and counts attempts (all calls of the task together)."""

    def __init__(self, settings: RetrySettings, limiter: RateLimiter, stats: PhaseStats) -> None:
        self.settings = settings
        self.limiter = limiter
        self.stats = stats
        self.count = 0

    async def call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        def count_retry(retry_state) -> None:
            exc = retry_state.outcome.exception()
            self.stats.retries += 1
            reason = getattr(exc, "reason", type(exc).__name__)
            self.stats.retry_reasons[reason] = self.stats.retry_reasons.get(reason, 0) + 1

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=WaitRetryAfterOrBackoff(self.settings),
            retry=retry_if_exception_type(RetryableError),
            before_sleep=count_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self.limiter.acquire()
                self.count += 1
                return await fn()
        raise AssertionError("unreachable: tenacity either returns or re-raises")


class Progress:
    """done / total, rate, ETA and failures on stderr: redrawn in place on a terminal, a line every `every_s`
    seconds otherwise (logs, CI)."""

    def __init__(self, label: str, total: int, already: int, *, every_s: float = 5.0, stream=None) -> None:
        self.label = label
        self.total = total
        self.already = already
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._last = 0.0

    def line(self, stats: PhaseStats) -> str:
        done = self.already + stats.written
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = stats.written / elapsed
        remaining = max(self.total - done - stats.rejected, 0)
        eta = _hms(remaining / rate) if rate > 0 else "?"
        pct = 100.0 * done / self.total if self.total else 100.0
        width = 24
        filled = int(width * done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        return (f"[{self.label}] |{bar}| {done}/{self.total} ({pct:.1f}%) {rate:.2f} rec/s ETA {eta} "
                f"| failures: {stats.rejected} rejected, {stats.retries} retries")

    def update(self, stats: PhaseStats, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if force or now - self._last >= 0.2:
                self._last = now
                self.stream.write("\r" + self.line(stats))
                self.stream.flush()
        elif force or now - self._last >= self.every_s:
            self._last = now
            self.stream.write(self.line(stats) + "\n")
            self.stream.flush()

    def close(self, stats: PhaseStats) -> None:
        self.update(stats, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Task:
    """One unit of work. A batch task (critics on an in-process model) covers several record ids and returns one
    record per id; a single task returns one record."""

    id: str
    payload: Any = None
    ids: list[str] | None = None

    @property
    def record_ids(self) -> list[str]:
        return self.ids if self.ids is not None else [self.id]


Work = Callable[[Task, Attempts], Awaitable[dict[str, Any] | list[dict[str, Any]]]]


async def run_phase(
    phase: str,
    tasks: list[Task],
    work: Work,
    store: ShardedStore,
    rejects: RejectsLog,
    *,
    concurrency: int,
    retry: RetrySettings,
    progress_every_s: float = 5.0,
    stop: asyncio.Event | None = None,
) -> PhaseStats:
    """Run `work` for every task with an id not yet in `store`, appending each returned record to it.

    Batch tasks must be formed from pending ids only (a restart re-forms them from what is still missing).
    """
    pending = [t for t in tasks if not all(i in store.done for i in t.record_ids)]
    total = sum(len(t.record_ids) for t in tasks)
    stats = PhaseStats(phase=phase, total=total, skipped=total - sum(len(t.record_ids) for t in pending))
    progress = Progress(phase, total, stats.skipped, every_s=progress_every_s)
    if not pending:
        progress.close(stats)
        return stats
    stop = stop or asyncio.Event()
    limiter = RateLimiter(retry.rpm)
    queue: asyncio.Queue[Task] = asyncio.Queue()
    for task in pending:
        queue.put_nowait(task)
    failures_in_a_row = 0
    fatal: list[BaseException] = []
    started = time.monotonic()

    def reject(task: Task, attempts: Attempts, exc: BaseException, reason: str) -> None:
        for rid in task.record_ids:
            rejects.append({"id": rid, "phase": phase, "reason": reason, "error": str(exc)[:500],
                            "attempts": attempts.count, "time_utc": utc_now()})
            stats.rejected += 1

    async def worker() -> None:
        nonlocal failures_in_a_row
        while not stop.is_set() and not fatal:
            try:
                task = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            attempts = Attempts(retry, limiter, stats)
            try:
                record = await work(task, attempts)
            except FatalBackendError as exc:
                fatal.append(exc)
                stop.set()
                return
            except RetryableError as exc:
                reject(task, attempts, exc, f"gave_up:{exc.reason}")
                failures_in_a_row += 1
            except (RequestRejected, BackendError) as exc:
                reject(task, attempts, exc, exc.reason)
                failures_in_a_row += 1
            except Exception as exc:  # noqa: BLE001 - one record's bug must not lose hours of others' work
                traceback.print_exc(file=sys.stderr)
                reject(task, attempts, exc, f"internal_error:{type(exc).__name__}")
                failures_in_a_row += 1
            else:
                for item in record if isinstance(record, list) else [record]:
                    if item["id"] not in store.done:
                        store.append(item)
                        stats.written += 1
                failures_in_a_row = 0
            if failures_in_a_row >= retry.abort_after_failures:
                fatal.append(FatalBackendError(
                    f"{failures_in_a_row} records in a row failed (last: {rejects.entries[-1]['reason']}: "
                    f"{rejects.entries[-1]['error']}); stopping instead of failing every record. See "
                    f"{rejects.path} (retry.abort_after_failures)"))
                stop.set()
                return
            progress.update(stats)

    loop = asyncio.get_running_loop()
    interrupted: list[int] = []

    def on_signal(signum: int) -> None:
        interrupted.append(signum)
        stop.set()
        for w in workers:
            w.cancel()

    workers = [asyncio.create_task(worker()) for _ in range(max(1, min(concurrency, len(pending))))]
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await asyncio.gather(*workers, return_exceptions=True)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        stats.wall_s = time.monotonic() - started
        progress.close(stats)
    if fatal:
        stats.status = "aborted"
        raise PhaseAborted(stats, fatal[0])
    if interrupted:
        stats.status = "interrupted"
        raise PhaseInterrupted(stats, interrupted[0])
    return stats


class PhaseAborted(Exception):
    def __init__(self, stats: PhaseStats, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.stats = stats
        self.cause = cause


class PhaseInterrupted(Exception):
    def __init__(self, stats: PhaseStats, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.stats = stats
        self.signum = signum
