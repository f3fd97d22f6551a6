"""Any OpenAI-compatible HTTP server through the official `openai` client: vLLM, llama.cpp's server, OpenAI,
Gemini's compatible endpoint, `groundthink-serve`.

Completion mode uses `/v1/completions` (the prompt is sent as it is: no template is added by us); chat mode uses
`/v1/chat/completions` with the messages. The key is read from the environment variable named by `api_key_env`
when the backend is built and handed to the client only: it is never stored in a config, a record, a manifest
or a log line (`describe()` names the variable, not its value).

The client's own retries are off (`max_retries=0`): the runner retries with tenacity so that Retry-After, the
attempt cap and the rejects file are ours. Client exceptions are mapped to the runner's three kinds (see
backends/base.py): 429 -> RetryableError with the server's `retry-after-ms` / `Retry-After` (seconds or an HTTP
date); 408/409/5xx, dropped connections, timeouts and bodies that are not the expected JSON -> RetryableError;
401/403 and 404 (unknown model) -> FatalBackendError; other 4xx -> RequestRejected.
"""

from __future__ import annotations

import json
import math
import os
import time
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from groundthink.datagen.backends.base import (
    Backend,
    CompletionRequest,
    CompletionResult,
    FatalBackendError,
    LabelLogprobs,
    RequestRejected,
    RetryableError,
    logsumexp,
)

_FATAL_STATUS = (401, 403, 404)
_RETRY_STATUS = (408, 409, 425, 429)


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta seconds, fractional allowed, or HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def redact_url(url: str) -> str:
    """The URL without user:password and without a query string (where keys sometimes travel)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        mode: str = "completion",
        request_timeout_s: float = 120.0,
        allow_missing_key: bool = False,
    ) -> None:
        import openai

        if mode not in ("completion", "chat"):
            raise ValueError(f"backend.mode={mode!r}: allowed completion (/v1/completions) or chat "
                             f"(/v1/chat/completions)")
        if not model:
            raise ValueError("backend.model is empty: name the model the server serves (see its /v1/models)")
        key = os.environ.get(api_key_env) if api_key_env else None
        if not key:
            if not allow_missing_key:
                raise FatalBackendError(
                    f"the environment variable {api_key_env} (backend.api_key_env) is not set: export the API key "
                    f"there (for a local server without keys set backend.allow_missing_key=true)"
                )
            key = "EMPTY"
        self._openai = openai
        self.base_url = base_url
        self.model = model
        self.mode = mode
        self.api_key_env = api_key_env
        self.supports_chat = mode == "chat"
        # The client's default pool (1000 connections) is far above any concurrency setting used here.
        self._client = openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=request_timeout_s)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model, "base_url": redact_url(self.base_url),
                "mode": self.mode, "api_key_env": self.api_key_env}

    async def start(self) -> None:
        try:
            page = await self._client.models.list()
        except Exception as exc:  # noqa: BLE001 - mapped to a message below
            err = self._map(exc)
            if isinstance(err, RequestRejected) or getattr(err, "status", None) == 404:
                return  # some compatible servers have no /models; the first request will tell
            raise FatalBackendError(
                f"backend at {redact_url(self.base_url)} did not answer /models ({err}); check backend.base_url, "
                f"that the server is running, and the key in ${self.api_key_env}"
            ) from None
        names = [m.id for m in getattr(page, "data", None) or []]
        if names and self.model not in names:
            raise FatalBackendError(
                f"backend.model={self.model!r} is not served at {redact_url(self.base_url)}; it serves: "
                f"{', '.join(names[:10])}"
            )

    async def aclose(self) -> None:
        await self._client.close()

    def _map(self, exc: Exception) -> Exception:
        openai = self._openai
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            message = _error_message(exc)
            if status == 429:
                return RetryableError(f"HTTP 429 rate limited: {message}", reason="rate_limited",
                                      retry_after=parse_retry_after(exc.response.headers))
            if status in _RETRY_STATUS or status >= 500:
                return RetryableError(f"HTTP {status}: {message}", reason=f"http_{status}",
                                      retry_after=parse_retry_after(exc.response.headers))
            if status in (401, 403):
                return FatalBackendError(f"HTTP {status} from {redact_url(self.base_url)}: {message}; check the key "
                                         f"in ${self.api_key_env}", reason=f"http_{status}")
            if status == 404:
                err = FatalBackendError(f"HTTP 404 from {redact_url(self.base_url)}: {message}; check "
                                        f"backend.base_url (usually ends in /v1) and backend.model",
                                        reason="http_404")
                err.status = 404
                return err
            return RequestRejected(f"HTTP {status}: {message}", reason=f"http_{status}")
        if isinstance(exc, openai.APITimeoutError):
            return RetryableError("request timed out (backend.request_timeout_s)", reason="timeout")
        if isinstance(exc, openai.APIConnectionError):
            return RetryableError(f"connection failed or dropped: {exc.__cause__ or exc}", reason="connection")
        if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError, UnicodeDecodeError)):
            return RetryableError(f"malformed response body: {exc}", reason="malformed_response")
        return exc

    async def _call(self, **kwargs) -> Any:
        try:
            if self.mode == "chat":
                return await self._client.chat.completions.create(model=self.model, **kwargs)
            return await self._client.completions.create(model=self.model, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every client error is mapped to the runner's kinds
            mapped = self._map(exc)
            if mapped is exc:
                raise
            raise mapped from None

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        kwargs: dict[str, Any] = {"max_tokens": request.max_tokens, "temperature": request.temperature,
                                  "top_p": request.top_p}
        if request.stop:
            kwargs["stop"] = list(request.stop)
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.top_k is not None:
            kwargs["extra_body"] = {"top_k": request.top_k}  # vLLM, llama.cpp and groundthink-serve accept it
        if self.mode == "chat":
            if request.messages is None:
                raise RequestRejected("backend.mode=chat needs chat messages, got a completion-mode prompt")
            kwargs["messages"] = [{"role": r, "content": c} for r, c in request.messages]
            if request.logprobs is not None:
                kwargs["logprobs"] = True
                kwargs["top_logprobs"] = request.logprobs
        else:
            if request.prompt is None:
                raise RequestRejected("backend.mode=completion needs a prompt, got chat messages")
            kwargs["prompt"] = request.prompt
            if request.logprobs is not None:
                kwargs["logprobs"] = request.logprobs
        response = await self._call(**kwargs)
        return self._result(response, want_logprobs=request.logprobs is not None)

    def _result(self, response: Any, *, want_logprobs: bool) -> CompletionResult:
        choices = getattr(response, "choices", None)
        if not choices:
            raise RetryableError("malformed response: no choices", reason="malformed_response")
        choice = choices[0]
        if self.mode == "chat":
            message = getattr(choice, "message", None)
            text = getattr(message, "content", None)
        else:
            text = getattr(choice, "text", None)
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise RetryableError("malformed response: the choice has no text", reason="malformed_response")
        finish = getattr(choice, "finish_reason", None)
        if not finish:
            raise RetryableError("malformed response: the choice has no finish_reason", reason="malformed_response")
        usage = getattr(response, "usage", None)
        input_tokens = getattr(usage, "prompt_tokens", None)
        output_tokens = getattr(usage, "completion_tokens", None)
        if input_tokens is None or output_tokens is None:
            raise RetryableError("malformed response: no usage token counts", reason="malformed_response")
        top = _top_logprobs(choice, self.mode) if want_logprobs else None
        return CompletionResult(text=text, finish_reason=str(finish), input_tokens=int(input_tokens),
                                output_tokens=int(output_tokens), top_logprobs=top,
                                model=getattr(response, "model", None))

    async def label_logprobs(self, prompt: str, spellings: dict[str, list[str]], *, top_logprobs: int) -> LabelLogprobs:
        if self.mode == "chat":
            request = CompletionRequest(messages=(("user", prompt),), max_tokens=1, temperature=0.0,
                                        logprobs=top_logprobs)
        else:
            request = CompletionRequest(prompt=prompt, max_tokens=1, temperature=0.0, logprobs=top_logprobs)
        result = await self.complete(request)
        if not result.top_logprobs:
            raise RetryableError("malformed response: no top log-probabilities were returned for the critic "
                                 "(does the server support logprobs?)", reason="malformed_response")
        first = result.top_logprobs[0]
        found = {label: {s: first[s] for s in forms if s in first} for label, forms in spellings.items()}
        logp = {label: logsumexp(list(parts.values())) for label, parts in found.items()}
        return LabelLogprobs(logp=logp, found=found, exact=False)


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(getattr(exc, "message", exc))[:300]


def _top_logprobs(choice: Any, mode: str) -> list[dict[str, float]] | None:
    logprobs = getattr(choice, "logprobs", None)
    if logprobs is None:
        return None
    if mode == "chat":
        content = getattr(logprobs, "content", None) or []
        out = []
        for item in content:
            entries = {t.token: float(t.logprob) for t in (getattr(item, "top_logprobs", None) or [])}
            entries.setdefault(item.token, float(item.logprob))
            out.append(entries)
        return out
    top = getattr(logprobs, "top_logprobs", None)
    tokens = getattr(logprobs, "tokens", None) or []
    token_logprobs = getattr(logprobs, "token_logprobs", None) or []
    if top is None:
        return [{t: float(lp)} for t, lp in zip(tokens, token_logprobs) if lp is not None]
    out = []
    for i, entries in enumerate(top):
        row = {str(k): float(v) for k, v in (entries or {}).items()}
        if i < len(tokens) and i < len(token_logprobs) and token_logprobs[i] is not None:
            row.setdefault(tokens[i], float(token_logprobs[i]))
        out.append(row)
    return out
