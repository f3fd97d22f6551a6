"""What the two in-process backends (a GroundThink run, a Hugging Face causal LM) share: the generation engine,
the contamination guard with its sentinels at start, one request at a time in a worker thread.

Requests run through `groundthink.generation.GenerationEngine` (the same sampling, stop handling, token counts
and log-probabilities for both model kinds). The model is not thread-safe and a CPU has no spare cores for a
second copy, so `max_concurrency = 1`: asynchronous concurrency helps HTTP backends, not these. Critic scores
are exact: log P(spelling | prompt) from the model's own logits, each label's spellings summed.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from groundthink.datagen.backends.base import (
    Backend,
    CompletionRequest,
    CompletionResult,
    FatalBackendError,
    LabelLogprobs,
    RequestRejected,
    logsumexp,
)
from groundthink.datagen.guard import TokenGuard, run_sentinels


class InProcessBackend(Backend):
    max_concurrency = 1

    def __init__(self, engine, guard: TokenGuard, *, sentinels: list[str], sentinel_tokens: int,
                 guard_enabled: bool = True, context_length: int | None = None) -> None:
        from groundthink.generation import GenerationError, SamplingParams

        self._SamplingParams = SamplingParams
        self._GenerationError = GenerationError
        self.engine = engine
        self.guard = guard
        self.sentinels = list(sentinels)
        self.sentinel_tokens = int(sentinel_tokens)
        self.guard_enabled = bool(guard_enabled)
        self.context_length = context_length
        self._lock = threading.Lock()

    # ----- start: sentinels ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.guard_enabled:
            await asyncio.to_thread(self._sentinels)

    def _sentinels(self) -> None:
        lm = self.engine.lm

        def greedy(ids: list[int]) -> list[int]:
            params = self._SamplingParams(max_tokens=self.sentinel_tokens, temperature=0.0, ignore_eos=True)
            return self.engine.stream(ids, params).drain().token_ids

        run_sentinels(self.guard, self.sentinels, encode=self.encode_completion_prompt, encode_plain=lm.encode,
                      decode=lm.decode, continue_greedy=greedy)

    def guard_report(self) -> dict[str, Any]:
        return {"enabled": self.guard_enabled, "forbidden_ids": len(self.guard.forbidden),
                "sentinels": self.guard.checks}

    # ----- prompts ---------------------------------------------------------------------------------------
    def encode_completion_prompt(self, text: str) -> list[int]:
        return self.engine.lm.encode(text)

    def check_prompt(self, text: str, where: str) -> list[int]:
        """Encode a completion-mode prompt and refuse it if it holds a forbidden token (ContaminationError)."""
        ids = self.encode_completion_prompt(text)
        self.guard.check_ids(ids, where)
        return ids

    def chat_ids(self, messages) -> tuple[list[int], tuple[int, ...]]:
        raise RequestRejected(f"the {self.name} backend runs in completion mode only; use a completion-mode "
                              f"prompt (pipeline.format=completion)", reason="chat_unsupported")

    def count_tokens(self, text: str) -> tuple[int, bool]:
        return len(self.engine.lm.encode(text)), True

    # ----- requests ----------------------------------------------------------------------------------------
    async def complete(self, request: CompletionRequest) -> CompletionResult:
        return await asyncio.to_thread(self._complete, request)

    def _complete(self, request: CompletionRequest) -> CompletionResult:
        stop_ids: tuple[int, ...] = ()
        if request.messages is not None:
            ids, stop_ids = self.chat_ids(request.messages)
        else:
            ids = self.check_prompt(request.prompt, "prompt")
        if self.context_length is not None and len(ids) + request.max_tokens > self.context_length:
            raise RequestRejected(
                f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the model's context of "
                f"{self.context_length} tokens", reason="context_length")
        try:
            params = self._SamplingParams(
                max_tokens=request.max_tokens, temperature=request.temperature, top_k=request.top_k,
                top_p=request.top_p, seed=request.seed, stop=request.stop, stop_token_ids=stop_ids,
                logprobs=request.logprobs)
            with self._lock:
                done = self.engine.stream(ids, params).drain()
        except self._GenerationError as exc:
            raise RequestRejected(str(exc), reason="bad_request") from None
        top = None
        if done.logprobs is not None:
            top = []
            for item in done.logprobs:
                row = {t.token: t.logprob for t in item.top}
                row.setdefault(item.token, item.logprob)
                top.append(row)
        return CompletionResult(text=done.text, finish_reason=done.finish_reason, input_tokens=done.prompt_tokens,
                                output_tokens=done.completion_tokens, top_logprobs=top,
                                model=self.describe().get("model"))

    async def label_logprobs(self, prompt: str, spellings: dict[str, list[str]], *, top_logprobs: int) -> LabelLogprobs:
        return (await asyncio.to_thread(self._label_logprobs, [prompt], spellings))[0]

    async def label_logprobs_batch(self, prompts: list[str], spellings: dict[str, list[str]], *,
                                   top_logprobs: int) -> list[LabelLogprobs]:
        return await asyncio.to_thread(self._label_logprobs, list(prompts), spellings)

    def _label_logprobs(self, prompts: list[str], spellings: dict[str, list[str]]) -> list[LabelLogprobs]:
        for i, prompt in enumerate(prompts):
            self.check_prompt(prompt, f"critic prompt {i}")
        forms = [s for group in spellings.values() for s in group]
        with self._lock:
            scores = self.engine.score_pairs([(p, f) for p in prompts for f in forms])
        out = []
        for i in range(len(prompts)):
            by_form = dict(zip(forms, scores[i * len(forms):(i + 1) * len(forms)]))
            found = {label: {s: by_form[s] for s in group} for label, group in spellings.items()}
            out.append(LabelLogprobs(logp={label: logsumexp(list(p.values())) for label, p in found.items()},
                                     found=found, exact=True))
        return out


def set_threads(num_threads: int | None) -> None:
    if num_threads:
        import torch

        torch.set_num_threads(int(num_threads))


def fatal_load_error(what: str, exc: Exception) -> FatalBackendError:
    return FatalBackendError(f"cannot load {what}: {exc}", reason="load_failed")
