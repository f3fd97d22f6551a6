"""`groundthink-serve <run>`: an OpenAI-compatible completions endpoint over a trained GroundThink run.

    groundthink-serve outputs/default/<run> --port 8000
    curl http://127.0.0.1:8000/v1/completions -d '{"model": "<run id>", "prompt": "Once", "max_tokens": 16}'

Endpoints (the OpenAI API's shapes, as vLLM and llama.cpp's server also give them):
- `GET /v1/models`: the one model served (its name: --model-name, default the run id).
- `POST /v1/completions`: `prompt` (a string, a list of strings, or token ids), `max_tokens` (default 16),
  `temperature`, `top_p`, `top_k` (an extension vLLM also takes), `stop`, `seed`, `n`, `logprobs` (0-20, or up to
  --max-logprobs:
  the chosen token's log-probability plus that many alternatives per token, with `tokens`, `token_logprobs`,
  `top_logprobs`, `text_offset`), `echo` (the prompt comes back in front, with its tokens' log-probabilities
  when logprobs is set; with max_tokens 0 this scores a text), `stream` (server-sent events); `usage` counts
  each token once (prompt tokens once per prompt, however large n is) and `finish_reason` is "stop" or "length".
- `POST /v1/chat/completions`: messages rendered the way GroundThink's SFT data is (`<|role|>content<|end|>`
  per turn, then `<|assistant|>`), generation stops at `<|end|>`; `logprobs` + `top_logprobs`, streaming.
- `GET /health`.

Built on the standard library's threaded HTTP server: no framework is needed for a handful of JSON routes, and
it adds no dependency. Requests share one model; the engine serialises model calls token by token, so
concurrent requests interleave. It binds 127.0.0.1 unless --host says otherwise. Log-probabilities are those
of the model's own distribution (see groundthink/generation.py), whatever the sampling settings.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_LOGPROBS = 20  # OpenAI's limit; --max-logprobs raises it (vLLM's max_logprobs does the same)
MAX_N = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise APIError(400, f"'{name}' must be {names}, got {value!r}", param=name)
    return value


class Service:
    """The endpoints' logic, independent of HTTP (unit-testable)."""

    def __init__(self, engine, *, model_name: str, max_tokens_limit: int = 16384, owner: str = "groundthink",
                 end_of_turn_id: int | None = None, describe: dict[str, Any] | None = None,
                 max_logprobs: int = MAX_LOGPROBS) -> None:
        self.engine = engine
        self.max_logprobs = max_logprobs
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.owner = owner
        self.end_of_turn_id = end_of_turn_id
        self.describe = describe or {}
        self.created = int(time.time())

    # ----- shared ----------------------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": self.owner, "groundthink": self.describe}]}

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _sampling(self, body: dict[str, Any], *, max_key: str = "max_tokens", logprobs: int | None, stop_ids=()):
        from groundthink.generation import GenerationError, SamplingParams

        for unsupported in ("frequency_penalty", "presence_penalty"):
            if body.get(unsupported) not in (None, 0, 0.0):
                raise APIError(400, f"'{unsupported}' is not supported by groundthink-serve", param=unsupported)
        if body.get("logit_bias"):
            raise APIError(400, "'logit_bias' is not supported by groundthink-serve", param="logit_bias")
        max_tokens = _get(body, max_key, int, None)
        if max_tokens is None and max_key == "max_completion_tokens":
            max_tokens = _get(body, "max_tokens", int, None)
        if max_tokens is None:
            max_tokens = 16 if max_key == "max_tokens" else 256
        if max_tokens > self.max_tokens_limit:
            raise APIError(400, f"'max_tokens'={max_tokens} is above this server's limit {self.max_tokens_limit} "
                                f"(--max-tokens-limit)", param="max_tokens")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=_get(body, "temperature", float, 1.0),
                top_p=_get(body, "top_p", float, 1.0), top_k=_get(body, "top_k", int, None),
                seed=_get(body, "seed", int, None), stop=tuple(s for s in stop if s), stop_token_ids=tuple(stop_ids),
                logprobs=logprobs,
            ).validate(self.engine.lm.vocab_size)
        except GenerationError as exc:
            raise APIError(400, str(exc)) from None

    def _n(self, body: dict[str, Any]) -> int:
        n = _get(body, "n", int, 1)
        if not 1 <= n <= MAX_N:
            raise APIError(400, f"'n'={n} must be between 1 and {MAX_N}", param="n")
        return n

    @staticmethod
    def _seeded(params, index: int):
        from dataclasses import replace

        return params if params.seed is None or index == 0 else replace(params, seed=params.seed + index)

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # ----- /v1/completions ---------------------------------------------------------------------------------------
    def _prompts(self, body: dict[str, Any]) -> list[str | list[int]]:
        prompt = body.get("prompt")
        if prompt is None:
            raise APIError(400, "'prompt' is required", param="prompt")
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            return list(prompt)
        raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_model(body)
        logprobs = _get(body, "logprobs", int, None)
        if logprobs is not None and not 0 <= logprobs <= self.max_logprobs:
            raise APIError(400, f"'logprobs'={logprobs} must be between 0 and {self.max_logprobs} "
                                f"(--max-logprobs)", param="logprobs")
        params = self._sampling(body, logprobs=logprobs)
        echo = _get(body, "echo", bool, False)
        n = self._n(body)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for prompt in self._prompts(body):
            try:
                ids = self.engine.encode_prompt(prompt)
            except ValueError as exc:
                raise APIError(400, str(exc), param="prompt") from None
            prompt_tokens += len(ids)
            echoed = self._echo(ids, logprobs) if echo else None
            for i in range(n):
                if params.max_tokens == 0:
                    text, finish, gen_lp, n_gen = "", "length", [], 0
                else:
                    done = self.engine.stream(ids, self._seeded(params, i)).drain()
                    text, finish, gen_lp, n_gen = done.text, done.finish_reason, done.logprobs, done.completion_tokens
                completion_tokens += n_gen
                choice: dict[str, Any] = {"index": len(choices), "text": text, "finish_reason": finish,
                                          "logprobs": None}
                if echo:
                    choice["text"] = echoed["text"] + text
                if logprobs is not None:
                    choice["logprobs"] = self._completion_logprobs(gen_lp or [], echoed)
                choices.append(choice)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(prompt_tokens, completion_tokens)}

    def _echo(self, ids: list[int], logprobs: int | None) -> dict[str, Any]:
        lm = self.engine.lm
        entries = []
        if logprobs is not None:
            _, per_token = self.engine.prompt_logprobs(ids, top_n=logprobs)
            entries = per_token
        return {"text": lm.decode(ids), "ids": ids, "entries": entries}

    def _completion_logprobs(self, generated, echoed: dict[str, Any] | None) -> dict[str, Any]:
        lm = self.engine.lm
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = 0
        if echoed is not None:
            for token_id, entry in zip(echoed["ids"], echoed["entries"] or [None] * len(echoed["ids"])):
                text = lm.token_text(token_id)
                tokens.append(text)
                token_logprobs.append(None if entry is None else entry.logprob)
                top.append(None if entry is None else {t.token: t.logprob for t in entry.top})
                offsets.append(offset)
                offset += len(lm.decode([token_id]))
        for item in generated:
            tokens.append(item.token)
            token_logprobs.append(item.logprob)
            top.append({t.token: t.logprob for t in item.top})
            offsets.append(offset)
            offset += len(lm.decode([item.token_id]))
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    # ----- /v1/chat/completions ----------------------------------------------------------------------------------
    def _chat_prompt(self, body: dict[str, Any]) -> list[int]:
        from groundthink.data.corpus import render_chat
        from groundthink.data.errors import DataError
        from groundthink.data.tokenizer import ROLE_TOKENS

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        tokenizer = self.engine.lm.tokenizer
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str) and any(t in content for t in tokenizer.control_ids):
                raise APIError(400, f"messages[{i}].content contains a control token; it would open a turn the "
                                    f"caller did not write", param="messages")
        try:
            text = render_chat(messages, where="messages")
        except (DataError, AttributeError) as exc:
            raise APIError(400, str(exc), param="messages") from None
        return self.engine.encode_prompt(f"{text}\n{ROLE_TOKENS['assistant']}")

    def chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_model(body)
        ids = self._chat_prompt(body)
        want = _get(body, "logprobs", bool, False)
        top_n = _get(body, "top_logprobs", int, 0) if want else None
        if top_n is not None and not 0 <= top_n <= self.max_logprobs:
            raise APIError(400, f"'top_logprobs'={top_n} must be between 0 and {self.max_logprobs} "
                                f"(--max-logprobs)", param="top_logprobs")
        stop_ids = (self.end_of_turn_id,) if self.end_of_turn_id is not None else ()
        params = self._sampling(body, max_key="max_completion_tokens", logprobs=top_n, stop_ids=stop_ids)
        n = self._n(body)
        choices, completion_tokens = [], 0
        for i in range(n):
            done = self.engine.stream(ids, self._seeded(params, i)).drain()
            completion_tokens += done.completion_tokens
            choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": done.text},
                                      "finish_reason": done.finish_reason, "logprobs": None}
            if want:
                choice["logprobs"] = {"content": [self._chat_logprob(item) for item in done.logprobs or []]}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": self._usage(len(ids), completion_tokens)}

    @staticmethod
    def _chat_logprob(item) -> dict[str, Any]:
        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {**entry(item.token, item.logprob), "top_logprobs": [entry(t.token, t.logprob) for t in item.top]}

    # ----- streaming -----------------------------------------------------------------------------------------------
    def stream_events(self, path: str, body: dict[str, Any]):
        """Server-sent event payloads (dicts) for a `stream: true` request, n = 1."""
        self._check_model(body)
        if self._n(body) != 1:
            raise APIError(400, "'n' must be 1 when 'stream' is true", param="n")
        chat = path.endswith("/chat/completions")
        if chat:
            ids = self._chat_prompt(body)
            stop_ids = (self.end_of_turn_id,) if self.end_of_turn_id is not None else ()
            params = self._sampling(body, max_key="max_completion_tokens", logprobs=None, stop_ids=stop_ids)
        else:
            prompts = self._prompts(body)
            if len(prompts) != 1:
                raise APIError(400, "streaming takes one prompt", param="prompt")
            ids = self.engine.encode_prompt(prompts[0])
            params = self._sampling(body, logprobs=None)
        stream = self.engine.stream(ids, params)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            return {"id": ident, "object": obj, "created": int(time.time()), "model": self.model_name,
                    "choices": [choice]}

        for event in stream:
            if event.text:
                yield chunk(event.text, None)
        done = stream.completion
        final = chunk("", done.finish_reason)
        final["usage"] = self._usage(done.prompt_tokens, done.completion_tokens)
        yield final


def make_handler(service: Service):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "groundthink-serve"

        def log_message(self, fmt: str, *args) -> None:
            if os.environ.get("GROUNDTHINK_SERVE_LOG"):
                super().log_message(fmt, *args)

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path in ("/v1/models", "/models"):
                self._json(200, service.models())
            elif path == "/health":
                self._json(200, {"status": "ok", "model": service.model_name})
            else:
                self._json(404, APIError(404, f"no route GET {path}", kind="not_found").body())

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            try:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError as exc:
                    raise APIError(400, f"the request body is not valid JSON ({exc})") from None
                if not isinstance(body, dict):
                    raise APIError(400, "the request body must be a JSON object")
                if path not in ("/v1/completions", "/v1/chat/completions"):
                    raise APIError(404, f"no route POST {path}", kind="not_found")
                if body.get("stream"):
                    self._stream(path, body)
                    return
                handler = service.chat_completions if path.endswith("/chat/completions") else service.completions
                self._json(200, handler(body))
            except APIError as exc:
                self._json(exc.status, exc.body())
            except Exception as exc:  # noqa: BLE001 - a bug answers 500 with its message instead of a dropped socket
                self._json(500, APIError(500, f"{type(exc).__name__}: {exc}", kind="server_error").body())

        def _stream(self, path: str, body: dict[str, Any]) -> None:
            events = service.stream_events(path, body)
            first = next(events)  # errors in the request surface here, before any header is sent
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for payload in _chain(first, events):
                    self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                    self.wfile.flush()
            except Exception as exc:  # noqa: BLE001 - headers are gone: report in-band, then end the stream
                self.wfile.write(f"data: {json.dumps(APIError(500, str(exc), kind='server_error').body())}\n\n"
                                 .encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def _chain(first, rest):
    yield first
    yield from rest


def build_service(run_path: str, *, device: str = "cpu", dtype: str | None = None, model_name: str | None = None,
                  max_tokens_limit: int = 16384, max_logprobs: int = MAX_LOGPROBS) -> Service:
    import torch

    import groundthink
    from groundthink.data.tokenizer import END_OF_TURN_TOKEN
    from groundthink.generation import GenerationEngine

    loaded = groundthink.load(run_path, device=device, dtype=getattr(torch, dtype) if dtype else None)
    if loaded.tokenizer is None:
        raise groundthink.LoadError(f"{run_path}: this run has no tokenizer (token-level synthetic data), so it "
                                    f"cannot serve text")
    engine = GenerationEngine.from_run(loaded)
    name = model_name or loaded.run_id or loaded.checkpoint.stem
    describe = {"checkpoint": str(loaded.checkpoint), "checkpoint_sha256": loaded.checkpoint_sha256,
                "step": loaded.step, "params": loaded.model.num_params(), "tokenizer": loaded.tokenizer.kind}
    return Service(engine, model_name=name, max_tokens_limit=max_tokens_limit, max_logprobs=max_logprobs,
                   end_of_turn_id=loaded.tokenizer.control_ids[END_OF_TURN_TOKEN], describe=describe)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="groundthink-serve", description="An OpenAI-compatible completions "
                                     "endpoint over a GroundThink run (see groundthink/serve.py).")
    parser.add_argument("run", help="a run folder (newest good checkpoint) or a checkpoint file")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 = any free port; the URL is printed)")
    parser.add_argument("--model-name", help="the model name clients send (default: the run id)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as saved)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--max-tokens-limit", type=int, default=16384, help="largest max_tokens a request may ask")
    parser.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS,
                        help=f"most alternatives per token a request may ask (default {MAX_LOGPROBS}, as OpenAI)")
    args = parser.parse_args(argv)

    import groundthink

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        service = build_service(args.run, device=args.device, dtype=args.dtype, model_name=args.model_name,
                                max_tokens_limit=args.max_tokens_limit, max_logprobs=args.max_logprobs)
    except (groundthink.LoadError, AttributeError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(service))
    except OSError as exc:
        print(f"Error: cannot listen on {args.host}:{args.port} ({exc}); choose another --port (0 = any free one)",
              file=sys.stderr)
        raise SystemExit(1) from None
    server.daemon_threads = True
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}, reachable from other machines; there is no authentication",
              file=sys.stderr)

    def stop(signum, frame) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"groundthink-serve: model '{service.model_name}' ({service.describe['checkpoint']}) on "
          f"http://{host}:{port}/v1  (Ctrl+C stops)", flush=True)
    server.serve_forever()
    server.server_close()
    print("groundthink-serve: stopped", flush=True)


if __name__ == "__main__":
    main()
