"""A bound on the API's concurrent work, overall and per API key: reads must not starve ingest.

Every `/api` request but the event stream (long-lived and idle, it holds no work) takes a slot
of its key and one of the whole API for as long as it runs; with no slot free it is answered at
once with 429 and `Retry-After`, before any of its work is done. 200 parallel
`GET /api/events?limit=1000` from one viewer key took ingest from 11,700 to 2,200 msg/s before this
bound (bench/api_load.py measures it with and without).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from starlette.types import ASGIApp, Receive, Scope, Send

_KEY_ID = re.compile(rb"iotgw_([0-9a-f]{12})_")
UNBOUNDED = ("/api/stream",)


def _lower_priority(nice: int) -> None:
    # Linux: with a thread id, setpriority renices that thread alone. Under contention the
    # scheduler then gives the cores (and so the interpreter lock) to ingestion first.
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


def worker_threads(nice: int, workers: int = 8) -> ThreadPoolExecutor:
    """The event loop's default executor for `iotgw run`: where the API's database reads and
    response building run (asyncio.to_thread), `nice` steps below the process's priority."""
    return ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="iotgw-api", initializer=_lower_priority, initargs=(nice,)
    )


def _who(scope: Scope) -> str:
    """The key a request presents, by its public id (never the secret), else the client's address."""
    for name, value in scope.get("headers", ()):
        if name in (b"authorization", b"x-api-key"):
            m = _KEY_ID.search(value)
            if m is not None:
                return m.group(1).decode()
    client = scope.get("client")
    return f"address {client[0]}" if client else "unknown"


class ConcurrencyLimit:
    """ASGI middleware: at most `overall` API requests at once, `per_key` of them for one key."""

    def __init__(self, app: ASGIApp, *, overall: int, per_key: int, retry_after_s: int = 1) -> None:
        self.app = app
        self.overall = overall
        self.per_key = per_key
        self.retry_after = str(retry_after_s).encode()
        self.running = 0
        self._by_key: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/api/") or path.startswith(UNBOUNDED):
            await self.app(scope, receive, send)
            return
        who = _who(scope)
        # One event loop: these checks and increments cannot interleave with another request's.
        if self.running >= self.overall:
            await self._refuse(send, f"the API is answering {self.overall} requests already (IOTGW_API_MAX_CONCURRENT)")
            return
        if self._by_key[who] >= self.per_key:
            await self._refuse(
                send, f"{self.per_key} requests of this key are running already (IOTGW_API_MAX_CONCURRENT_PER_KEY)"
            )
            return
        self.running += 1
        self._by_key[who] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1
            self._by_key[who] -= 1
            if self._by_key[who] <= 0:
                del self._by_key[who]

    async def _refuse(self, send: Send, detail: str) -> None:
        body = json.dumps({"detail": f"too many requests: {detail}; retry later"}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", self.retry_after),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
