"""What every pipeline gets (the run context) and the record fields every generated output carries.

A pipeline turns a prompt set into phases of records. Each phase has its own exactly-once store (phases/<phase>
shards, or data/ for the final chat records) and runs through `groundthink.datagen.runner.run_phase`.

Every record that holds model output carries the same provenance block (see `output_fields`):
`finish_reason`, `usage` {input_tokens, output_tokens, total_tokens} (each counted once), `runaway`,
`generator` {backend, model, where it lives, generation parameters, the prompt template's sha256},
`created_utc`, `latency_s` and `attempts`. Final records are chat JSONL for the SFT stage:
{"id", "messages": [{"role": "system"|"user"|"assistant", "content": ...}], ...the fields above}.
"""

from __future__ import annotations

import abc
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundthink.datagen.backends.base import Backend, CompletionRequest, CompletionResult
from groundthink.datagen.prompts import Prompt
from groundthink.datagen.runner import Attempts, PhaseStats, RetrySettings, Task, run_phase, utc_now
from groundthink.datagen.store import RejectsLog, ShardedStore
from groundthink.datagen.text import is_runaway

DATA_DIR = "data"
PHASES_DIR = "phases"
DATA_STEM = "data"


class PipelineError(ValueError):
    """Settings that do not fit (a system prompt over its token budget, count larger than the prompt set, ...)."""


@dataclass
class RunContext:
    out_dir: Path
    backend: Backend
    retry: RetrySettings
    concurrency: int
    shard_size: int
    seed: int
    count: int | None
    rejects: RejectsLog
    progress_every_s: float = 5.0
    stop: asyncio.Event | None = None
    stores: list[ShardedStore] = field(default_factory=list)
    generator: dict[str, Any] = field(default_factory=dict)
    finished: list[PhaseStats] = field(default_factory=list)  # phases this invocation completed, in order

    def store(self, subdir: str, stem: str) -> ShardedStore:
        """The store of `subdir/stem-*.jsonl`, opened (torn line repaired, done ids read) once per invocation."""
        for store in self.stores:
            if store.directory == self.out_dir / subdir and store.stem == stem:
                return store
        store = ShardedStore(self.out_dir / subdir, stem, shard_size=self.shard_size).open()
        for repair in store.repairs:
            print(f"repaired a torn last line in {repair.path} ({repair.torn_bytes} bytes cut; that record is "
                  f"made again)", file=sys.stderr, flush=True)
        self.stores.append(store)
        return store

    async def phase(self, name: str, tasks: list[Task], work, store: ShardedStore) -> PhaseStats:
        concurrency = self.concurrency
        if self.backend.max_concurrency is not None:
            concurrency = min(concurrency, self.backend.max_concurrency)
        stats = await run_phase(name, tasks, work, store, self.rejects, concurrency=concurrency, retry=self.retry,
                                progress_every_s=self.progress_every_s, stop=self.stop)
        self.finished.append(stats)
        return stats

    def close(self) -> None:
        for store in self.stores:
            store.close()


async def generate(ctx: RunContext, attempts: Attempts, request: CompletionRequest) -> tuple[CompletionResult, float]:
    """One backend completion with the retry policy; (result, seconds the successful attempt chain took)."""
    started = time.monotonic()
    result = await attempts.call(lambda: ctx.backend.complete(request))
    return result, time.monotonic() - started


def output_fields(ctx: RunContext, result: CompletionResult, request: CompletionRequest, *, template_sha256: str,
                  attempts: Attempts, latency_s: float, cut_at: str | None, text: str) -> dict[str, Any]:
    """The provenance and token statistics block of a record holding one model output."""
    return {
        "finish_reason": result.finish_reason,
        "usage": result.usage(),
        "runaway": is_runaway(text, cut_at),
        "cut_at": cut_at,
        "generator": {**ctx.generator, "served_model": result.model, "params": request.params(),
                      "prompt_template_sha256": template_sha256},
        "created_utc": utc_now(),
        "latency_s": round(latency_s, 4),
        "attempts": attempts.count,
    }


class Pipeline(abc.ABC):
    """Build with the pipeline's settings (conf/pipeline/<name>.yaml as a dict), the prompt set and the context."""

    name = "pipeline"

    def __init__(self, settings: dict[str, Any], prompts: list[Prompt], ctx: RunContext) -> None:
        self.settings = settings
        self.prompts = prompts
        self.ctx = ctx

    @abc.abstractmethod
    def prepare(self) -> dict[str, Any]:
        """Every check that can fail before generation starts; returns facts for the manifest."""

    @abc.abstractmethod
    async def run(self) -> list[PhaseStats]:
        """Run the phases in order; each skips what is already done."""

    def data_store(self) -> ShardedStore:
        return self.ctx.store(DATA_DIR, DATA_STEM)
