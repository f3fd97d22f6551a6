"""`generation`: stream `tokens` tokens from the model (groundthink.generation.GenerationEngine: carried state,
every token fed alone) and sample the process's resident memory along the way.

For recurrent layers the state is a fixed size, so memory must stay flat; attention layers keep only their
window's keys and values. Resident memory (VmRSS from /proc/self/status, the whole process) is read every
`sample_every` tokens. rss_growth = (RSS at the end - RSS at `reference` tokens) / RSS at `reference`, with
reference = 1024 tokens (or tokens/8 for shorter runs), i.e. the growth from 1k to 8k tokens at the defaults.
tokens_per_s is the whole stream's rate (the prompt's prefill included; it is short). End-of-text does not stop
the stream (ignore_eos), so exactly `tokens` tokens are produced. Results: generation.csv (tokens, seconds,
rss_mb), generation.png; scalars tokens_per_s, rss_mb_reference, rss_mb_end, rss_growth, tokens.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groundthink.evaluation.tasks.base import (
    EvalError,
    EvalTask,
    check_positive,
    need_tokenizer,
    plot,
    register_task,
    write_csv,
)


@dataclass
class GenerationSettings:
    tokens: int = 8192
    prompt: str = "Once upon a time"
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    sample_every: int = 256  # tokens between resident-memory samples


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc; psutil elsewhere; nan without either)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return float("nan")
    return psutil.Process().memory_info().rss / 2**20


@register_task("generation")
class GenerationTask(EvalTask):
    Settings = GenerationSettings
    description = "streamed generation: tokens/s and resident-memory growth"

    def check(self, loaded: Any, s: GenerationSettings) -> None:
        need_tokenizer(loaded, "generation")
        check_positive("generation", tokens=s.tokens, sample_every=s.sample_every)
        if s.tokens < 16:
            raise EvalError(f"eval.tasks.generation.tokens={s.tokens}: at least 16 to measure a rate and memory")
        if s.temperature < 0:
            raise EvalError(f"eval.tasks.generation.temperature={s.temperature}: must be >= 0")

    def run(self, loaded: Any, s: GenerationSettings, out_dir: Path, progress) -> dict[str, float]:
        from groundthink.generation import GenerationEngine, SamplingParams

        engine = GenerationEngine.from_run(loaded)
        params = SamplingParams(max_tokens=s.tokens, temperature=s.temperature, top_k=s.top_k, seed=s.seed,
                                ignore_eos=True)
        reference = 1024 if s.tokens >= 2048 else max(1, s.tokens // 8)
        gc.collect()
        rows = [{"tokens": 0, "seconds": 0.0, "rss_mb": rss_mb()}]
        bar = progress(s.tokens, "generation")
        started = time.perf_counter()
        n = 0
        ref_rss = None
        for _event in engine.stream(s.prompt, params):
            n += 1
            if n % s.sample_every == 0 or n == reference or n == s.tokens:
                rows.append({"tokens": n, "seconds": time.perf_counter() - started, "rss_mb": rss_mb()})
                if n == reference:
                    ref_rss = rows[-1]["rss_mb"]
                bar.update(n - bar.n)
        seconds = time.perf_counter() - started
        bar.close()
        if rows[-1]["tokens"] != n:
            rows.append({"tokens": n, "seconds": seconds, "rss_mb": rss_mb()})
        ref_rss = ref_rss if ref_rss is not None else rows[0]["rss_mb"]
        write_csv(out_dir / "generation.csv", rows)
        plot(out_dir / "generation.png", {"resident memory": ([r["tokens"] for r in rows],
                                                              [r["rss_mb"] for r in rows])},
             title=f"streaming generation: {n / seconds:.0f} tokens/s", xlabel="tokens generated",
             ylabel="RSS (MiB)", vlines=[reference])
        end = rows[-1]["rss_mb"]
        return {"tokens": float(n), "tokens_per_s": n / seconds, "reference_tokens": float(reference),
                "rss_mb_reference": ref_rss, "rss_mb_end": end, "rss_growth": (end - ref_rss) / ref_rss}
