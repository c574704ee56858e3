"""A Gemini-compatible HTTP server on 127.0.0.1 for testing the real google-genai client.

Serves ``POST /{version}/models/{model}:generateContent`` with the REST response shape
(``candidates[].content.parts[].text``, ``finishReason``, ``usageMetadata``, ``modelVersion``) and
the REST error shape (``{"error": {"code", "message", "status"}}``). Replies follow a script of
actions; when the script runs out, ``default`` is used. Hangs wait on a stop event with a hard
cap, so ``stop()`` always returns promptly.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_PATH = re.compile(r"^/(?P<version>v1(?:beta|alpha)?)/models/(?P<model>[^/:]+):generateContent$")
_STATUS = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
           503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


@dataclasses.dataclass
class Action:
    kind: str  # "text" | "error" | "raw" | "hang" | "empty"
    status: int = 200
    text: str = ""
    seconds: float = 0.0
    prompt_tokens: int = 1000
    output_tokens: int = 200


def reply(text: str, prompt_tokens: int = 1000, output_tokens: int = 200,
          delay_s: float = 0.0) -> Action:
    return Action("text", text=text, seconds=delay_s, prompt_tokens=prompt_tokens,
                  output_tokens=output_tokens)


def error(status: int) -> Action:
    return Action("error", status=status)


def hang(seconds: float) -> Action:
    return Action("hang", seconds=seconds)


def empty_candidates() -> Action:
    return Action("empty")


def response_json(action: Action, model: str) -> dict[str, Any]:
    usage = {"promptTokenCount": action.prompt_tokens, "candidatesTokenCount": action.output_tokens,
             "totalTokenCount": action.prompt_tokens + action.output_tokens}
    if action.kind == "empty":
        return {"candidates": [], "usageMetadata": {"promptTokenCount": action.prompt_tokens,
                                                    "totalTokenCount": action.prompt_tokens},
                "modelVersion": model}
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": action.text}]},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": usage, "modelVersion": model, "responseId": "fake-response"}


class FakeGeminiServer:
    MAX_HANG_S = 10.0

    def __init__(self, default: Action | None = None):
        self.script: collections.deque[Action] = collections.deque()
        self.default = default or error(500)
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def push(self, *actions: Action) -> None:
        with self._lock:
            self.script.extend(actions)

    def _next(self) -> Action:
        with self._lock:
            return self.script.popleft() if self.script else self.default

    def start(self) -> "FakeGeminiServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeGeminiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: str) -> None:
                data = body.encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); nothing to do

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length) if length else b""
                match = _PATH.match(self.path)
                with server._lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers),
                                            "body": json.loads(raw or b"{}")})
                if not match:
                    self._send(404, json.dumps({"error": {"code": 404, "message": "not found",
                                                          "status": "NOT_FOUND"}}))
                    return
                action = server._next()
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._act(action, match.group("model"))
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _act(self, action: Action, model: str) -> None:
                if action.kind == "hang":
                    server._stop.wait(min(action.seconds, server.MAX_HANG_S))
                    self.close_connection = True
                    return
                if action.kind == "error":
                    body = {"error": {"code": action.status, "message": f"fake error {action.status}",
                                      "status": _STATUS.get(action.status, "UNKNOWN")}}
                    self._send(action.status, json.dumps(body))
                    return
                if action.kind == "raw":
                    self._send(action.status, action.text)
                    return
                if action.seconds:  # a slow but successful reply
                    server._stop.wait(min(action.seconds, server.MAX_HANG_S))
                self._send(200, json.dumps(response_json(action, model)))

        return Handler
