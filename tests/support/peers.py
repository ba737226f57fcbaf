"""Small real HTTP servers standing for receivers (webhooks, PagerDuty, Alertmanager consumers)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gateway.cli.broker import free_port

PD_KEY = "R0123456789abcdef0123456789abcde"  # an integration key: 32 characters


class Hooks(ThreadingHTTPServer):
    """Records every request; answers 503 to the first `fail_first` of them, or `always` to all
    (with a short reason as the body), after `delay_s`."""

    daemon_threads = True

    def __init__(self, port: int, fail_first: int, always: int | None = None, delay_s: float = 0.0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_first = fail_first
        self.always = always
        self.delay_s = delay_s
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def ok(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["code"] == 200]


@contextmanager
def serving(fail_first: int = 0, always: int | None = None, delay_s: float = 0.0) -> Iterator[Hooks]:
    """A receiver on a free port, in a thread, for the duration of the block."""
    server = Hooks(free_port(), fail_first=fail_first, always=always, delay_s=delay_s)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: Hooks

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        body = json.loads(raw)
        server = self.server
        if server.delay_s:
            time.sleep(server.delay_s)
        with server.lock:
            code = 503 if len(server.requests) < server.fail_first else 200
            code = server.always or code
            server.requests.append(
                {"path": self.path, "key": self.headers.get("Idempotency-Key"), "body": body, "code": code,
                 "headers": dict(self.headers), "raw": raw}
            )  # fmt: skip
        answer = b"" if code < 400 else f"refused: answer {code}".encode()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the sender timed out meanwhile
            self.send_response(code)
            if 300 <= code < 400:
                self.send_header("Location", "http://127.0.0.1:9/moved")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet test output
