"""What every generation backend offers, and the errors that tell the runner whether to retry, skip or stop.

A backend turns a `CompletionRequest` (a plain completion-mode prompt, or chat messages where the backend has a
chat format) into a `CompletionResult`: text, finish reason ("stop" or "length"), token counts with each token
counted once (input, output, total = input + output; the previous version's total double-counted the input)
and, when asked, the top log-probabilities of each generated token. Critics use `label_logprobs`: the
log-probability of each answer string as the first thing the model says.

Errors are sorted by what the runner should do (the HTTP status mapping follows the OpenAI client's classes):
- `RetryableError` (429 rate limit with its Retry-After, 5xx, dropped connection, timeout, malformed response):
  retried with backoff up to a cap, then the record goes to the rejects file;
- `RequestRejected` (400/413/422 and friends: this request can never succeed): the record goes to the rejects
  file at once and the run goes on;
- `FatalBackendError` (bad credentials, unknown model, unreachable server at start, contamination): the run stops
  before more work is wasted, with a message that says what to fix.
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass, field
from typing import Any


class BackendError(Exception):
    """Base class; `reason` is a short machine-readable tag recorded in the rejects file."""

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class RetryableError(BackendError):
    """A failure that may pass on a later attempt. `retry_after` (seconds) is the server's Retry-After, if any."""

    reason = "retryable"

    def __init__(self, message: str, *, reason: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class RequestRejected(BackendError):
    """This request will never succeed (e.g. the prompt is longer than the model's context): reject the record."""

    reason = "rejected"


class FatalBackendError(BackendError):
    """Nothing will succeed until the user fixes something (credentials, model name, address, contamination)."""

    reason = "fatal"


@dataclass(frozen=True)
class CompletionRequest:
    """One generation. Exactly one of `prompt` (completion mode) and `messages` (chat mode) is set."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a CompletionRequest needs exactly one of prompt (completion mode) or messages (chat)")

    def params(self) -> dict[str, Any]:
        """The generation parameters, for provenance."""
        return {k: v for k, v in asdict(self).items() if k not in ("prompt", "messages")}


@dataclass
class CompletionResult:
    text: str
    finish_reason: str
    input_tokens: int
    output_tokens: int
    # Per generated token: {token text: log-probability} of the top alternatives (best first); None if not asked.
    top_logprobs: list[dict[str, float]] | None = None
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def usage(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "total_tokens": self.total_tokens}


@dataclass
class LabelLogprobs:
    """log P(label) per label, each summed over its spellings (e.g. "A" and " A"), and the parts that were found.

    `found[label]` maps a spelling to its log-probability; a spelling the backend did not report (absent from an
    HTTP server's top log-probabilities) is missing there. `logp[label]` is -inf when no spelling was found.
    """

    logp: dict[str, float]
    found: dict[str, dict[str, float]]
    exact: bool  # True: computed from the model itself; False: read from the first token's top-k list


def logsumexp(values: list[float]) -> float:
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


class Backend(abc.ABC):
    """A source of completions. In-process backends set `max_concurrency = 1` (one model, one request at a time)."""

    name: str = "backend"
    supports_chat: bool = False
    max_concurrency: int | None = None

    @abc.abstractmethod
    async def complete(self, request: CompletionRequest) -> CompletionResult: ...

    @abc.abstractmethod
    async def label_logprobs(self, prompt: str, spellings: dict[str, list[str]], *, top_logprobs: int) -> LabelLogprobs:
        """log P(label) as the continuation of `prompt` for each label, summed over its spellings."""

    async def label_logprobs_batch(self, prompts: list[str], spellings: dict[str, list[str]], *,
                                   top_logprobs: int) -> list[LabelLogprobs]:
        """`label_logprobs` for several prompts; in-process backends score them in batched forward passes."""
        import asyncio

        return list(await asyncio.gather(*(self.label_logprobs(p, spellings, top_logprobs=top_logprobs)
                                           for p in prompts)))

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """The generator's identity for provenance: backend, model, where it lives. Never a secret."""

    async def start(self) -> None:
        """Checks before any generation (reachability, credentials, the contamination guard's sentinels)."""
        return None

    async def aclose(self) -> None:
        """Release connections or memory."""
        return None

    def count_tokens(self, text: str) -> tuple[int, bool]:
        """(tokens in `text`, exact?). Without the model's tokenizer: an estimate of 4 UTF-8 bytes per token."""
        return math.ceil(len(text.encode("utf-8")) / 4), False
