"""One consumer's runner: its task and thread, the wake/poll loop, ticks, batches read from its
cursor and committed with it, and its lease. Failures, operations and status are its other parts
(`failures`, `operations`, `status`).

Over 400 lines: the loop, the lease and the cursor steps read and set the same timing state
(wake-ups, lingering, the idle cursor write, catching up after a replay) at every step; cut
further, each part would pass all of it back and forth."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from gateway.core.clock import utcnow
from gateway.core.events import Event
from gateway.errors import StoreError
from gateway.log import (
    LOG_GREW,
    REPLAYING,
    ConsumerCursorRow,
    EventRow,
    Store,
    batch_end,
    read_events,
    replaying,
)
from gateway.logs import QuietLog
from gateway.metrics import Metrics
from gateway.runtime.contract import Consumer, matches
from gateway.runtime.failures import Poison, RunnerFailures
from gateway.runtime.leases import Hold, Lease, LeaseLostError
from gateway.runtime.loop import WakeLoop
from gateway.runtime.operations import RunnerOperations
from gateway.runtime.state import Elsewhere
from gateway.runtime.status import RunnerStatus
from gateway.tasks import stop_task

log = logging.getLogger("gateway.runtime")  # one logger name for the runtime, as operators know it


CURSOR_IDLE_WRITE_S = 5.0  # how long a cursor may trail in the database when nothing matched


class ConsumerRunner(RunnerFailures, RunnerOperations, RunnerStatus):
    """Runs one consumer: wake on new events, handle batches, retry, park, pause, replay."""

    def __init__(  # noqa: PLR0913
        self,
        consumer: Consumer,
        store: Store,
        metrics: Metrics,
        *,
        poll_s: float = 1.0,
        instance: str = "default",
        lease_s: float = 10.0,
        handler_timeout_s: float | None = None,
        stall_s: float = 60.0,
    ) -> None:
        self.consumer = consumer
        self.name = consumer.name
        # Runs on one instance of a cluster at a time: the one holding this lease.
        self.lease = Lease(f"consumer:{consumer.name}", instance, lease_s)
        self.store = store
        self.metrics = metrics
        self.max_attempts = int(getattr(consumer, "max_attempts", 5))
        self.batch_size = int(getattr(consumer, "batch_size", 500))
        self.retry_base_s = float(getattr(consumer, "retry_base_s", 0.05))
        self.linger_s = float(getattr(consumer, "linger_s", 0.05))
        # The gateway's setting (IOTGW_CONSUMER_TIMEOUT_S), when given, wins over the consumer's own.
        self.handler_timeout_s = handler_timeout_s or float(getattr(consumer, "handler_timeout_s", 30.0))
        # Events waiting and the cursor still for this long: the status says "stalled", and why.
        self.stall_s = stall_s
        self._seen: tuple[int, float] = (-1, time.monotonic())  # (position, when it was first seen)
        self._wanted: dict[str, bool] = {}  # event type -> matches the consumer's patterns
        self._span: Callable[[Session, int, int], None] | None = getattr(consumer, "handle_span", None)
        # Consumers whose conditions become true by the passing of time get ticks, in their thread.
        self._tick: Callable[[Session, datetime], None] | None = getattr(consumer, "tick", None)
        self.tick_s = float(getattr(consumer, "tick_s", 1.0))
        # A replay rebuilds such a consumer's state from nothing, its timer included (_replay_time).
        self._rebuilds = bool(getattr(consumer, "replay_resets_state", False))
        # A consumer may bring its own clock for ticks (tests run escalations in simulated time).
        self._clock: Callable[[], datetime] = getattr(consumer, "clock", None) or utcnow
        # Called (in the event loop) after a commit of this consumer appended events to the log.
        self.on_log_grew: Callable[[], None] | None = None
        # Standby: the consumer runs in another process of this gateway (see `Router.elsewhere`);
        # operations here write the database, then `elsewhere` has that process act on them.
        self.elsewhere: Elsewhere | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._caught_up = False
        self._cursor_written = 0.0
        self._stored: tuple[int, datetime | None] | None = None  # the cursor row as this runner last wrote or read it
        self.position = 0
        self.paused = False
        self.failing = False
        self.last_error: str | None = None
        self.wakeloop = WakeLoop(f"consumer {self.name}", poll_s)
        self._task: asyncio.Task[None] | None = None
        # Its own thread: a slow or stuck handler holds up this consumer only.
        self._executor = self._new_executor()
        # Bumped when a hung handler's thread is abandoned: that thread must never commit.
        self._generation = 0
        self._inflight: tuple[Event | None, int] = (None, 0)  # (first event, last position) of the batch in hand
        self._single_until = 0  # after a failed batch, go event by event up to this position
        self._replay_until = 0  # events up to here are handled again after a replay (REPLAYING)
        self._attempts = 0
        self._quiet = QuietLog(log, every_s=10.0)

    async def start(self) -> None:
        """Take the consumer on (unless another instance holds it) and start the task."""
        self._loop = asyncio.get_running_loop()
        if self.elsewhere is not None:
            await self._call(self._prepare)  # for the API's use of the consumer (the roster, say)
            return
        await self._call(self._hold)
        self._task = asyncio.create_task(self._forever(self._run), name=f"iotgw-consumer-{self.name}")
        if self._tick is not None:
            self._ticker = asyncio.create_task(self._forever(self._run_ticks), name=f"iotgw-ticks-{self.name}")

    async def stop(self) -> None:
        """Stop after the batch in hand (its commit is atomic, so stopping mid-way loses nothing)."""
        for task in (self._task, self._ticker):
            await stop_task(task)
        try:
            await asyncio.wait_for(self._call(self._flush_cursor), self.handler_timeout_s)
        except (StoreError, LeaseLostError, TimeoutError) as exc:
            log.warning("consumer %s: cursor not saved on stop (it resumes a little earlier): %r", self.name, exc)
            self._executor.shutdown(wait=False, cancel_futures=True)  # a hung handler must not hold up a stop
            return
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _new_executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"iotgw-consumer-{self.name}")

    def notify(self, types: Collection[str] | None = None) -> None:
        """New events were committed (of these `types`, when the committer knows them).

        A consumer is not woken for events it does not read: the alert-dispatch consumer has no
        business with a commit of sensor readings. Its cursor then moves on at its next wake-up
        (the slow poll at the latest), past events it would have skipped anyway."""
        if types is not None and self._span is None and not any(self._wants(t) for t in types):
            return
        self.wakeloop.wake()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:  # noqa: ANN401
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                # Not this task's cancellation: the call was waiting in a thread that was abandoned
                # (a hung handler or tick) and dropped with it. A database problem, to retry.
                msg = "the consumer's thread was replaced after a call that hung; retrying"
                raise StoreError(msg) from None
            raise

    async def _forever(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the runner's loops, and start it again should it ever end: a consumer that
        cannot progress must recover by itself once the cause is gone."""
        while True:
            try:
                await loop()
            except Exception:
                log.exception("consumer %s: its loop ended; starting it again in 1 s", self.name)
            await asyncio.sleep(1.0)

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        await self.wakeloop.run(self._drain, begin=self._begin)

    async def _begin(self) -> bool:
        """On a wake-up: hold the lease, then let a few commits pile up (fewer, larger batches
        cost ingestion less)."""
        try:
            held = await self._call(self._hold)
        except StoreError as exc:
            self._store_failed(exc)
            raise
        if not held:
            return False  # another instance runs this consumer; ask again at the next poll
        await asyncio.sleep(self.linger_s)
        return True

    async def _drain(self) -> bool:
        """One batch; whether there may be more at once."""
        if self.paused:
            return False
        try:
            handled = await self._step()
        except StoreError as exc:
            self._store_failed(exc)
            raise
        if self.failing and (self.last_error or "").startswith("database: "):
            log.info("consumer %s: the database answers again", self.name)
            self.failing, self.last_error = False, None
        return handled > 0

    def _store_failed(self, exc: StoreError) -> None:
        # The consumer cannot go on: said as failing at once (not "running" with an error beside it).
        self.failing = True
        self.last_error = f"database: {exc}"[:500]

    async def _run_ticks(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            # While catching up a backlog, "now" is far ahead of the events in hand: a tick
            # would see every device as silent. Ticks wait until the consumer is current.
            # Nor during a replay: the replay's own batches step the timer through the events' times.
            if self.paused or not self._caught_up or not self.lease.held or self._replay_until:
                continue
            try:
                await asyncio.wait_for(self._call(self._tick_once), self.handler_timeout_s)
            except LeaseLostError:
                self.wakeloop.wake()  # the consumer's loop takes it on again, or leaves it to its new holder
            except TimeoutError:
                self._abandon_thread()
                self.failing = True
                self.last_error = f"tick did not return within {self.handler_timeout_s:g} s"
                self._quiet.warn("tick", "consumer %s: %s; its thread is abandoned", self.name, self.last_error)
            except Exception as exc:
                self.metrics.consumer_failures.labels(self.name).inc()
                self._quiet.warn("tick", "consumer %s: tick failed: %s", self.name, exc)

    def _tick_once(self) -> None:
        assert self._tick is not None  # noqa: S101
        self._check_lease()
        generation = self._generation
        with self.store.session(consumer=True) as tx:
            self._tick(tx, self._clock())
            if generation != self._generation:
                tx.rollback()  # timed out meanwhile: the consumer went on without this thread
                return
            self.lease.fence(tx)
            tx.commit()
            self._committed(tx)

    def _committed(self, tx: Session) -> None:
        """After a commit (in the consumer's thread): if it appended to the log, say so."""
        if tx.info.pop(LOG_GREW, False) and self.on_log_grew is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_log_grew)

    async def _step(self) -> int:
        single = self.position < self._single_until
        started = time.perf_counter()
        try:
            handled, matched = await asyncio.wait_for(
                self._call(self._handle_next, 1 if single else self.batch_size), self.handler_timeout_s
            )
        except Poison as poison:
            await self._failed(poison, single=single)
            return 1
        except TimeoutError:
            first, last = self._inflight
            self._abandon_thread()
            cause = TimeoutError(f"handler did not return within {self.handler_timeout_s:g} s")
            if first is None:
                raise StoreError(str(cause)) from None  # stuck before the handler: retried as a database problem
            await self._failed(Poison(first, cause, last), single=single)
            return 1
        if matched:
            self.metrics.consumer_handler_seconds.labels(self.name).observe(time.perf_counter() - started)
            self.metrics.consumer_events.labels(self.name).inc(matched)
        self._caught_up = handled == 0
        if handled:
            if self.failing or self.last_error:
                log.info("consumer %s recovered at position %d", self.name, self.position)
            # Progress: an earlier error (a hung tick, the database) no longer describes it.
            self.failing, self._attempts, self.last_error = False, 0, None
        return int(handled)

    # -- in the consumer's thread ------------------------------------------------------------

    def _hold(self) -> bool:
        """Whether the consumer runs here: its lease renewed when due, or taken when free (with
        its cursor, read in the same transaction)."""
        held = self.lease.hold(self._session, self._load_cursor)
        if held is Hold.TAKEN:
            # The failure bookkeeping (_single_until, _attempts) stays: a thread abandoned on a hung
            # event leads here too, and that event must still be parked after max_attempts.
            self._caught_up = False
            self._prepare()
            log.info("consumer %s runs on %s from position %d", self.name, self.lease.owner, self.position)
        return bool(held)

    def _session(self) -> AbstractContextManager[Session]:
        return self.store.session(consumer=True)

    def _load_cursor(self, tx: Session) -> None:
        row = tx.get(ConsumerCursorRow, self.name)
        if row is None:
            row = ConsumerCursorRow(name=self.name, position=0, paused=False, updated_at=utcnow())
            tx.add(row)
        # Batches that wrote nothing leave the stored cursor behind (see _handle_next): if the
        # row is still as this runner last wrote it, nobody moved it and memory is right.
        stored = (row.position, row.updated_at)  # updated_at: aware UTC (UTCDateTime)
        self.position = max(self.position, row.position) if stored == self._stored else row.position
        self.paused = row.paused
        self._replay_until = row.replay_until or 0
        self._stored = stored

    def _prepare(self) -> None:
        forget = getattr(self.consumer, "forget", None)
        if forget is not None:
            forget()
        prepare = getattr(self.consumer, "prepare", None)
        if prepare is not None:
            with self.store.session(consumer=True) as tx:
                prepare(tx)

    async def reload(self) -> None:
        """Something changed the consumer's cursor or state in the database: take it on afresh."""

        def let_go() -> None:
            self.lease.epoch = None  # the next batch takes the lease again, and reads the cursor row

        await self._call(let_go)
        self.wakeloop.wake()

    def _handle_next(self, limit: int) -> tuple[int, int]:
        """Handle the next `limit` events after the cursor; returns (positions covered, events handled).

        Only events of the consumer's types are read; a consumer with `handle_span` is also
        told the whole span, to aggregate in SQL what it would not want to read row by row.
        Runs in the consumer's thread, like every change of `self.position`.
        """
        self._check_lease()
        generation = self._generation
        with self.store.session(consumer=True) as tx:
            after = self.position
            upto = batch_end(tx, after, limit)
            if upto is not None and after < self._replay_until:
                # A batch lies wholly before the replay's end, or wholly after it.
                upto = min(upto, self._replay_until)
                tx.info[REPLAYING] = True
            if upto is None:
                if self._stored is not None and self._stored[0] < self.position:
                    self._write_cursor(tx, self.position)  # caught up: the stored cursor catches up too
                    tx.commit()
                    self._cursor_written = time.monotonic()
                return 0, 0
            mine = [e for e in read_events(tx, after, upto, self.consumer.types) if self._wants(e.type)]
            self._inflight = (mine[0] if mine else None, upto)
            try:
                if self._span is not None:
                    self._span(tx, after, upto)
                if mine:
                    self.consumer.handle(mine, tx)
                if replaying(tx):
                    self._replay_time(tx, after, upto)
            except Exception as exc:
                tx.rollback()
                culprit = mine[0] if mine else read_events(tx, after, upto)[0]
                raise Poison(culprit, exc, upto) from exc
            if generation != self._generation:
                tx.rollback()  # timed out meanwhile: the consumer went on without this thread
                return 0, 0
            now = time.monotonic()
            # A batch that wrote nothing leaves the stored cursor trailing for a few seconds:
            # after a restart that costs a re-read of events that changed nothing, nothing more.
            # On SQLite it then takes no write lock at all: the consumers' cursor-only commits
            # (most of the alert engine's under a stream of ordinary readings) kept ingestion's
            # writer waiting for SQLite's one write lock.
            ends_replay = 0 < self._replay_until <= upto
            if self._wrote(tx, mine) or ends_replay or now - self._cursor_written >= CURSOR_IDLE_WRITE_S:
                self._write_cursor(tx, upto)
                tx.commit()
                self._committed(tx)
                self._cursor_written = now
            else:
                tx.commit()  # nothing to write; what the consumer keeps in memory follows commits
            self.position = upto
            return upto - after, len(mine)

    def _replay_time(self, tx: Session, after: int, upto: int) -> None:
        """During a replay, time passes as the log says: the timer steps to the time the batch's
        last event was received (the gateway's clock, which the timer read the first time;
        device clocks may run ahead). What falls due after the replay, the consumer's own timer
        finds on its first tick (the alert engine then tells new from rebuilt: `AlertEngine.tick`).
        (A consumer that keeps its state through a replay keeps its timer's doings too.)"""
        if self._tick is None or not self._rebuilds:
            return
        last = tx.exec(
            select(func.max(EventRow.received_at)).where(col(EventRow.id) > after, col(EventRow.id) <= upto)
        ).one()
        if last is not None:
            self._tick(tx, last)

    def _wrote(self, tx: Session, mine: Sequence[Event]) -> bool:
        """Whether handling the batch changed anything in `tx` (then its cursor commits with it)."""
        if tx.new or tx.dirty or tx.deleted or tx.info.get(LOG_GREW):
            return True
        conn = tx.connection()
        if conn.dialect.name != "sqlite":
            return bool(mine) or self._span is not None  # no way to tell: as if it had
        # SQLite's driver opens a transaction at the first write statement, not before.
        return bool(getattr(conn.connection.dbapi_connection, "in_transaction", True))

    def _check_lease(self) -> None:
        """Before handling anything: a consumer whose lease is not held (an operation asked for a
        reload, or a thread was abandoned) must take it on again first, not handle and roll back."""
        if not self.lease.held:
            msg = f"consumer {self.name} is to be taken on again"
            raise LeaseLostError(msg)

    def _wants(self, event_type: str) -> bool:
        wanted = self._wanted.get(event_type)
        if wanted is None:
            wanted = self._wanted[event_type] = matches(self.consumer.types, event_type)
        return wanted

    def _write_cursor(self, tx: Session, position: int, *, fenced: bool = True) -> None:
        """Set the cursor in `tx`; `fenced`: only while this instance holds the consumer's lease."""
        cursor = tx.get(ConsumerCursorRow, self.name)  # read before the fence: a shorter write
        if fenced:
            self.lease.fence(tx)
        if cursor is None:  # an operation from an instance that never held the consumer
            cursor = ConsumerCursorRow(name=self.name, position=0, paused=False)
        cursor.position = position
        cursor.updated_at = utcnow()
        if cursor.replay_until is not None and position >= cursor.replay_until:
            cursor.replay_until = None  # the replay is over: events from here are new
            self._replay_until = 0
        self._stored = (position, cursor.updated_at)
        tx.add(cursor)

    def _flush_cursor(self) -> None:
        """On stop: save the cursor and give the lease up, so another instance may take over at once."""
        if not self.lease.held:
            return
        with self.store.session(consumer=True) as tx:
            self._write_cursor(tx, self.position)
            self.lease.release(tx)
            tx.commit()
