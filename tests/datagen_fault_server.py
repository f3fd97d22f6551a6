"""A fault-injecting OpenAI-compatible test server (127.0.0.1, ephemeral port) for the datagen tests and benchmark.

Requests are keyed by the `[[marker]]`s in the prompt: the user text's marker, then "." and the system prompt's
marker when there is one, e.g. "[[p017]] ..." under the system prompt "[[treatment]] ..." is key "p017.treatment"
(the record id the responses pipeline gives it). A plan maps a key to the actions of its attempts, counted per key
for the life of the server; attempts past the end of the list repeat the last action if it is a content defect,
else answer normally:

    ok         200, a normal completion (finish_reason "stop")
    429        429 with Retry-After (retry_after_s)     429-bare   429 without Retry-After
    500        500 with an error body                   drop       the connection closed without an answer
    malformed  200 with a body that is not valid JSON   hang       no answer for hang_s (the client times out)
    length     200, text cut short, finish_reason "length" (a content defect: every attempt)
    empty      200, text "", finish_reason "stop" (a content defect: every attempt)

Every request waits `latency_s` first (a fixed per-request latency, so client concurrency matters). With
`api_key` set, a request without "Authorization: Bearer <api_key>" gets 401.

    python -m tests.datagen_fault_server --latency 0.05     # serves until Ctrl+C, prints its base URL
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTENT_DEFECTS = ("length", "empty")
_MARKER = re.compile(r"\[\[([\w.-]+)\]\]")


def request_key(body: dict[str, Any]) -> str:
    if "messages" in body:
        user = " ".join(m.get("content", "") for m in body["messages"] if m.get("role") == "user")
        system = " ".join(m.get("content", "") for m in body["messages"] if m.get("role") == "system")
    else:
        user, system = str(body.get("prompt", "")), ""
    u, s = _MARKER.search(user), _MARKER.search(system)
    key = u.group(1) if u else "unmarked"
    return f"{key}.{s.group(1)}" if s else key


def answer_text(key: str) -> str:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    n = 8 + sum(map(ord, key)) % 12
    return f"Answer for {key}: " + " ".join(words[(i * 7 + len(key)) % len(words)] for i in range(n)) + "."


class FaultServer:
    def __init__(self, *, plan: dict[str, list[str]] | None = None, latency_s: float = 0.0,
                 retry_after_s: float = 0.05, hang_s: float = 2.0, api_key: str | None = None,
                 model: str = "fault-model") -> None:
        self.plan = plan or {}
        self.latency_s = latency_s
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.api_key = api_key
        self.model = model
        self.attempts: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []  # (key, action) per request, in arrival order
        self.in_flight = 0  # requests being answered right now, and the most there ever were at once
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def action(self, key: str) -> str:
        with self._lock:
            n = self.attempts.get(key, 0)
            self.attempts[key] = n + 1
            actions = self.plan.get(key, [])
            if n < len(actions):
                action = actions[n]
            elif actions and actions[-1] in CONTENT_DEFECTS:
                action = actions[-1]
            else:
                action = "ok"
            self.log.append((key, action))
            return action

    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None, raw: bytes | None = None):
                body = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self) -> bool:
                if server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return True
                self._send(401, {"error": {"message": "invalid api key", "type": "auth"}})
                return False

            def do_GET(self) -> None:
                if not self._authorised():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self._authorised():
                    return
                chat = self.path.rstrip("/").endswith("/chat/completions")
                if not chat and not self.path.rstrip("/").endswith("/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                key = request_key(body)
                action = server.action(key)
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.latency_s:
                        time.sleep(server.latency_s)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                if action == "429":
                    self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                               {"Retry-After": f"{server.retry_after_s}"})
                elif action == "429-bare":
                    self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}})
                elif action == "500":
                    self._send(500, {"error": {"message": "internal error", "type": "server"}})
                elif action == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                elif action == "malformed":
                    self._send(200, None, raw=b'{"id": "cmpl-x", "choices": [{"text": "tru')
                else:
                    if action == "hang":
                        time.sleep(server.hang_s)
                    text, finish = answer_text(key), "stop"
                    if action == "length":
                        text, finish = " ".join(text.split()[:4]), "length"
                    elif action == "empty":
                        text = ""
                    prompt = json.dumps(body.get("messages") if chat else body.get("prompt", ""))
                    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                             "total_tokens": len(prompt.split()) + len(text.split())}
                    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                              if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
                    self._send(200, {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion",
                                     "created": int(time.time()), "model": server.model, "choices": [choice],
                                     "usage": usage})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    server = FaultServer(latency_s=args.latency)
    print(server.start(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
