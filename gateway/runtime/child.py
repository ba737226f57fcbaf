"""The consumers' own process (`python -m gateway consumer-process`, started by the gateway: see
gateway/runtime/apart.py for the link): runs the consumers as in one process, tells the gateway
their status, metrics and derived events, and ends when its stdin closes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector

from gateway.config import Settings
from gateway.log import Store
from gateway.metrics import Metrics
from gateway.runtime import ConsumerError, Router, load_consumers
from gateway.runtime.apart import LINE_LIMIT, METRICS_EVERY_S, STATUS_EVERY_S, encode_line, metric_families
from gateway.tasks import stop_task

log = logging.getLogger(__name__)


class _Link:
    """The child's side of the pipe pair."""

    def __init__(self, router: Router, metrics: Metrics) -> None:
        self.router = router
        self.metrics = metrics
        self.broker_up = True
        self._out: asyncio.WriteTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> asyncio.StreamReader:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        # The link keeps stdout's pipe for itself; whatever a consumer prints goes to stderr.
        link = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        self._out, _ = await loop.connect_write_pipe(asyncio.Protocol, link)
        return reader

    def send(self, message: dict[str, Any]) -> None:
        if self._out is not None and not self._out.is_closing():
            self._out.write(encode_line(message))

    def grew(self) -> None:
        """A consumer appended derived events: wake the others here, and the gateway's live views."""
        self.router.log_grew()
        self.send({"grew": True})

    def take(self, message: dict[str, Any]) -> None:
        if "new" in message:
            types = message["new"]
            self.router.notify(set(types) if types is not None else None)
        if "broker" in message:
            self.broker_up = bool(message["broker"])
        if "reload" in message and message["reload"] in self.router.runners:
            self._spawn(self.router.runners[message["reload"]].reload())
        if "retry" in message:
            request, name, dead_letter_id = message["retry"]
            self._spawn(self._retry(int(request), str(name), int(dead_letter_id)))

    def _spawn(self, coro: Any) -> None:  # noqa: ANN401 - a coroutine
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry(self, request: int, name: str, dead_letter_id: int) -> None:
        error: str | None = None
        try:
            await self.router.get(name).retry_parked(dead_letter_id)
        except ConsumerError as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("consumer %s: retrying parked event %d failed", name, dead_letter_id)
            error = f"{type(exc).__name__}: {exc}"
        self.send({"retried": [request, error]})

    async def report(self) -> None:
        last_status: dict[str, Any] = {}
        metrics_due = 0.0
        while True:
            status = {n: [r.position, r.failing, r.last_error] for n, r in self.router.runners.items()}
            if status != last_status:
                self.send({"status": status})
                last_status = status
            if time.monotonic() >= metrics_due:
                self.send({"metrics": metric_families(self.metrics.handled_here)})
                metrics_due = time.monotonic() + METRICS_EVERY_S
            await asyncio.sleep(STATUS_EVERY_S)


async def serve(settings: Settings) -> int:
    """The child: run the consumers until stdin closes (or SIGTERM); returns the exit code."""
    with contextlib.suppress(OSError):
        os.nice(settings.consumer_nice)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the gateway stops us
    store = Store(settings.database_url, idle_in_transaction_s=settings.idle_in_transaction_s)
    metrics = Metrics(CollectorRegistry(), handled_elsewhere=True)  # handled_here: what it reports
    ProcessCollector(namespace="iotgw_consumers", registry=metrics.handled_here)
    router = Router(
        store,
        metrics,
        load_consumers(settings.consumer_names, settings),
        # Commits in this gateway wake us through the link; other instances' only by polling.
        poll_s=min(settings.consumer_poll_s, 0.2) if settings.clustered else settings.consumer_poll_s,
        instance=settings.instance_name,
        lease_s=settings.lease_s,
        handler_timeout_s=settings.consumer_timeout_s or None,
        stall_s=settings.consumer_stall_s,
    )
    link = _Link(router, metrics)
    for runner in router.runners.values():
        runner.on_log_grew = link.grew
    for runner in router.runners.values():
        if hasattr(runner.consumer, "broker_connected"):
            runner.consumer.broker_connected = lambda: link.broker_up
    reader = await link.open()
    await router.start()
    link.send({"ready": True})
    reporter = asyncio.create_task(link.report(), name="iotgw-consumer-report")
    stopping = asyncio.create_task(stop.wait())
    try:
        while True:
            line = asyncio.create_task(reader.readline())
            await asyncio.wait({line, stopping}, return_when="FIRST_COMPLETED")
            if not line.done() or not (data := line.result()):
                line.cancel()
                break  # SIGTERM, or the gateway closed our stdin (it stopped, or died)
            try:
                link.take(json.loads(data))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("unreadable line from the gateway (%s): %.200r", exc, data)
    finally:
        await stop_task(reporter)
        await router.stop()
        link.send({"status": {n: [r.position, r.failing, r.last_error] for n, r in router.runners.items()}})
        store.close()
    return 0
