"""The router: one runner per consumer, woken by commits, standing by when the consumers run in
their own process; and `Changes`, what live views wait on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from gateway.errors import ConfigError, StoreError
from gateway.log import (
    EventRow,
    Store,
)
from gateway.metrics import Metrics
from gateway.runtime.contract import Consumer, UnknownConsumerError
from gateway.runtime.runner import ConsumerRunner
from gateway.runtime.state import Elsewhere
from gateway.runtime.status import ConsumerStatus
from gateway.tasks import stop_task

log = logging.getLogger("gateway.runtime")  # one logger name for the runtime, as operators know it


class Changes:
    """A version number that grows whenever the gateway derived something new (alerts, work orders).

    Live views (the staff page's server-sent events) wait on it instead of polling the database.
    Use from the event loop; threads go through `Router.log_grew_threadsafe`.
    """

    def __init__(self) -> None:
        self.version = 0
        self.closed = False  # the gateway is stopping: live views end their streams
        self._event = asyncio.Event()

    def bump(self) -> None:
        """Something changed: wake every waiter."""
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seen: int, timeout: float) -> bool:
        """Until the version differs from `seen` (True) or `timeout` seconds pass (False)."""
        if self.version != seen:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        return self.version != seen


class Router:
    """All consumer runners of one gateway process."""

    def __init__(  # noqa: PLR0913
        self,
        store: Store,
        metrics: Metrics,
        consumers: Sequence[Consumer],
        *,
        poll_s: float = 1.0,
        instance: str = "default",
        lease_s: float = 10.0,
        handler_timeout_s: float | None = None,
        stall_s: float = 60.0,
    ) -> None:
        names = [c.name for c in consumers]
        if len(set(names)) != len(names) or not all(names):
            msg = f"consumer names must be unique and non-empty: {names}"
            raise ConfigError(msg)
        self.store = store
        self.metrics = metrics
        self.runners = {
            c.name: ConsumerRunner(
                c,
                store,
                metrics,
                poll_s=poll_s,
                instance=instance,
                lease_s=lease_s,
                handler_timeout_s=handler_timeout_s,
                stall_s=stall_s,
            )
            for c in consumers
        }
        for runner in self.runners.values():
            runner.on_log_grew = self.log_grew
            # Series from the start (0, not absent), so dashboards and alert rules see every consumer.
            for family in (metrics.consumer_events, metrics.consumer_failures, metrics.consumer_retries,
                           metrics.consumer_parked, metrics.consumer_lag_events, metrics.consumer_lag_seconds,
                           metrics.consumer_handler_seconds, metrics.consumer_stalled):  # fmt: skip
                family.labels(runner.name)
        self.changes = Changes()
        self.elsewhere: Elsewhere | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._lag_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iotgw-router-lag")

    async def start(self, elsewhere: Elsewhere | None = None) -> None:
        """Start every consumer, each from its committed cursor; or, with `elsewhere`, stand by:
        the consumers run in that process, and this router serves the API's view and operations."""
        self._loop = asyncio.get_running_loop()
        self.elsewhere = elsewhere
        for runner in self.runners.values():
            runner.elsewhere = elsewhere
            await runner.start()
        self._lag_task = asyncio.create_task(self._refresh_lag(), name="iotgw-router-lag")

    async def stop(self) -> None:
        """Stop every consumer (and end the live views' streams)."""
        self.changes.closed = True
        self.changes.bump()
        await stop_task(self._lag_task)
        await asyncio.to_thread(self._lag_executor.shutdown, wait=True)  # its query, if one is running
        for runner in self.runners.values():
            await runner.stop()

    def notify(self, types: Collection[str] | None = None) -> None:
        """The log has grown (by events of `types`, if known): wake the consumers that read them."""
        if self.elsewhere is not None:
            self.elsewhere.notify(types)
            return
        for runner in self.runners.values():
            runner.notify(types)

    def log_grew(self) -> None:
        """The gateway appended derived events (alerts, work orders): wake consumers and live views."""
        self.notify()
        self.changes.bump()

    def log_grew_threadsafe(self) -> None:
        """`log_grew` from another thread (an API action's worker thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.log_grew)

    def get(self, name: str) -> ConsumerRunner:
        """The runner of one consumer, or `UnknownConsumerError`."""
        try:
            return self.runners[name]
        except KeyError:
            msg = f"no consumer {name!r}; running: {', '.join(self.runners) or 'none'}"
            raise UnknownConsumerError(msg) from None

    def status(self) -> list[ConsumerStatus]:
        """Every consumer's state and lag (blocking: call from a thread)."""
        try:
            with self.store.session() as tx:  # one session (and read snapshot) for them all
                head = ConsumerRunner._head(tx)  # noqa: SLF001
                head_time = tx.exec(select(EventRow.received_at).where(col(EventRow.id) == head)).first()
                return [r.status_sync(tx, head, head_time) for r in self.runners.values()]
        except SQLAlchemyError as exc:  # pragma: no cover - session() translates already
            raise StoreError(str(exc)) from exc

    async def _refresh_lag(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            try:
                await asyncio.get_running_loop().run_in_executor(self._lag_executor, self.status)
            except StoreError as exc:
                log.debug("lag refresh failed: %s", exc)
