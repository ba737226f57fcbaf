"""The consumer runtime: every consumer reads the durable log from its own cursor.

One asyncio task and one worker thread per consumer. A consumer gets batches of the events it
asked for plus the database session its cursor is committed in, so its own writes and its
cursor commit together (at-least-once delivery, exactly-once effects). A consumer that raises
is retried with backoff, event by event, and an event that keeps failing is parked in
`consumer_dead_letters` so the consumer can move on. Nothing here can slow ingestion: the
router only reads the log, and each consumer waits in its own thread.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fnmatch
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import func
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from gateway.clock import utcnow
from gateway.cluster import Lease, LeaseLostError, bump_epoch, holder
from gateway.errors import ConfigError, GatewayError, ReplayRangeError, StoreError
from gateway.events import Event
from gateway.logs import QuietLog
from gateway.metrics import Metrics
from gateway.store import (
    LOG_GREW,
    REPLAYING,
    ConsumerCursorRow,
    ConsumerDeadLetterRow,
    EventRow,
    Store,
    batch_end,
    event_from_row,
    read_events,
    replaying,
)
from gateway.tasks import stop_task

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "iotgw.consumers"
CURSOR_IDLE_WRITE_S = 5.0  # how long a cursor may trail in the database when nothing matched


@runtime_checkable
class Consumer(Protocol):
    """A reader of the event log.

    `types` are patterns (`elevator.*`, `sensor.reading`, `*`). `handle` gets the matching events
    of one batch, in log order, and `tx`: write with it and the writes commit together with the
    cursor. Optional attributes (see `BaseConsumer`): `max_attempts`, `batch_size`,
    `replay_resets_state` and `reset(tx)`, `linger_s`, `retry_base_s`, and
    `handle_span(tx, after, upto)`, called for every batch with the range of positions it
    covers (after < position <= upto), for consumers that aggregate in SQL; `prepare(tx)`,
    called in the consumer's thread whenever this instance takes the consumer on (at start, or
    from another instance of a cluster), after `forget()`, which must drop whatever the consumer
    keeps in memory (the database is the truth); `tick(tx, now)` every `tick_s` once caught up,
    with `now` from the consumer's own `clock()` if it has one.
    """

    name: str
    types: tuple[str, ...]

    def handle(self, events: Sequence[Event], tx: Session) -> None:
        """Handle one batch; raise to have it retried."""


class BaseConsumer(abc.ABC):
    """Defaults for a consumer; subclass and set `name`, `types` and `handle`."""

    name = ""
    types: tuple[str, ...] = ("*",)
    max_attempts = 5  # attempts per event before it is parked
    retry_base_s = 0.05  # first retry waits up to this, doubling each attempt (full jitter, 30 s cap)
    linger_s = 0.05  # after a wake-up, wait this long for more events (larger batches, less contention)
    handler_timeout_s = 30.0  # a batch (or tick) not done by then counts as failed; its thread is abandoned
    batch_size = 500
    replay_resets_state = False  # True: a replay starts from scratch, after reset(tx)
    # Whether the gateway holds its broker session now, set by the runtime where that is known
    # (None: unknown). A consumer that judges devices by their silence asks it first.
    broker_connected: Callable[[], bool] | None = None

    def reset(self, tx: Session) -> None:  # noqa: B027 - an optional hook; most consumers keep no state
        """Forget all derived state (called before a full replay when replay_resets_state)."""

    def configure(self, settings: Any) -> None:  # noqa: ANN401, B027 - an optional hook
        """Take what the consumer needs from the gateway's settings (called once, after __init__)."""

    @abc.abstractmethod
    def handle(self, events: Sequence[Event], tx: Session) -> None:
        """Handle one batch of matching events (every consumer must say what it does)."""


class ConsumerError(GatewayError):
    """An operation on a consumer could not be done (unknown name, bad replay point...)."""


class UnknownConsumerError(ConsumerError):
    """No consumer of that name is running."""


def available_consumers() -> dict[str, Callable[[], Any]]:
    """Loaders of the consumer classes registered under the `iotgw.consumers` entry point group."""
    found: dict[str, Callable[[], Any]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.load
    return found


def load_consumers(names: Sequence[str], settings: Any = None) -> list[Consumer]:  # noqa: ANN401 - Settings
    """Instantiate the named consumers (`*` = every registered one); `configure(settings)` if they have it."""
    registry = available_consumers()
    wanted = sorted(registry) if "*" in names else list(dict.fromkeys(names))
    missing = [n for n in wanted if n not in registry]
    if missing:
        msg = f"unknown consumer(s) {', '.join(missing)}; registered: {', '.join(sorted(registry)) or 'none'}"
        raise ConfigError(msg)
    consumers = []
    for name in wanted:
        try:
            consumer_class = registry[name]()
            consumer = consumer_class()
            if settings is not None and hasattr(consumer, "configure"):
                consumer.configure(settings)
        except Exception as exc:
            msg = f"consumer {name!r} could not be loaded: {exc}"
            raise ConfigError(msg) from exc
        if not isinstance(consumer, Consumer):
            msg = f"consumer {name!r} does not have name, types and handle(events, tx)"
            raise ConfigError(msg)
        consumers.append(consumer)
    return consumers


def matches(patterns: Sequence[str], event_type: str) -> bool:
    """True when `event_type` matches one of the fnmatch-style patterns."""
    return any(p == "*" or fnmatch.fnmatchcase(event_type, p) for p in patterns)


@dataclass(slots=True, frozen=True)
class ConsumerStatus:
    """What the API reports for one consumer."""

    name: str
    state: str  # running | paused | failing | stalled (events wait, the cursor has not moved: see last_error)
    owner: str | None  # the instance running it (None: nobody holds its lease now)
    position: int
    lag_events: int
    lag_seconds: float
    parked: int
    last_error: str | None


class _Poison(Exception):
    def __init__(self, event: Event, cause: BaseException, last: int) -> None:
        super().__init__(str(cause))
        self.event = event
        self.cause = cause
        self.last = last  # the last position the failed batch covered


class ConsumerRunner:
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
        self.poll_s = poll_s
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
        self._wake = asyncio.Event()
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
        await self._call(self._take_over)
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

    def _abandon_thread(self) -> None:
        """Leave a hung handler behind: a fresh thread carries on, and the old one can never commit."""
        self._generation += 1
        # Whether that thread got to commit is not known: take the consumer on again before the next
        # batch (its cursor is read afresh, and the new epoch fences a commit still to come).
        self.lease.epoch = None
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()
        self.metrics.consumer_failures.labels(self.name).inc()

    def notify(self, types: Collection[str] | None = None) -> None:
        """New events were committed (of these `types`, when the committer knows them).

        A consumer is not woken for events it does not read: the alert-dispatch consumer has no
        business with a commit of sensor readings. Its cursor then moves on at its next wake-up
        (the slow poll at the latest), past events it would have skipped anyway."""
        if types is not None and self._span is None and not any(self._wants(t) for t in types):
            return
        self._wake.set()

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
        while True:
            # The slow poll: a missed wake-up costs at most poll_s.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            try:
                if not await self._hold_lease():
                    continue  # another instance runs this consumer; ask again at the next poll
            except StoreError as exc:
                self._quiet.warn("lease", "consumer %s: cannot renew its lease: %s", self.name, exc)
                continue
            # Let a few commits pile up: fewer, larger batches cost ingestion less.
            await asyncio.sleep(self.linger_s)
            while not self.paused:
                try:
                    handled = await self._step()
                except LeaseLostError as exc:
                    log.info("consumer %s: %s; taking it on again if it is free", self.name, exc)
                    self._wake.set()
                    break
                except StoreError as exc:
                    self.last_error = f"database: {exc}"[:500]
                    self._quiet.warn("database", "consumer %s: database error, retrying: %s", self.name, exc)
                    await asyncio.sleep(1.0)
                    break
                except Exception:
                    # A bug in the runtime must not end the consumer for good.
                    log.exception("consumer %s: unexpected error; retrying in 1 s", self.name)
                    await asyncio.sleep(1.0)
                    break
                if handled == 0:
                    break

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
                self._wake.set()  # the consumer's loop takes it on again, or leaves it to its new holder
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
        except _Poison as poison:
            await self._failed(poison, single=single)
            return 1
        except TimeoutError:
            first, last = self._inflight
            self._abandon_thread()
            cause = TimeoutError(f"handler did not return within {self.handler_timeout_s:g} s")
            if first is None:
                raise StoreError(str(cause)) from None  # stuck before the handler: retried as a database problem
            await self._failed(_Poison(first, cause, last), single=single)
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

    async def _failed(self, poison: _Poison, *, single: bool) -> None:
        self.metrics.consumer_failures.labels(self.name).inc()
        self.failing = True
        self.last_error = f"{type(poison.cause).__name__}: {poison.cause}"[:500]
        if not single:
            # Find the event at fault: go one by one through what that batch covered.
            self._single_until = poison.last
            self._attempts = 0
            return
        self._attempts += 1
        ev = poison.event
        if self._attempts == 1:
            self._quiet.warn(
                "failed",
                "consumer %s failed on event %d (%s from %s): %s; retrying up to %d times",
                self.name, ev.position, ev.type, ev.subject, self.last_error, self.max_attempts,
            )  # fmt: skip
        if self._attempts >= self.max_attempts:
            await self._call(self._park, ev, self.last_error, self._attempts)
            self.metrics.consumer_parked.labels(self.name).inc()
            self._quiet.warn(
                "parked",
                "consumer %s parked event %d after %d attempts: %s",
                self.name, ev.position, self._attempts, self.last_error,
            )  # fmt: skip
            self._attempts = 0
            return
        self.metrics.consumer_retries.labels(self.name).inc()
        # Exponential backoff with full jitter, capped.
        await asyncio.sleep(random.uniform(0, min(self.retry_base_s * 2**self._attempts, 30.0)))  # noqa: S311

    # -- in the consumer's thread ------------------------------------------------------------

    async def _hold_lease(self) -> bool:
        """Whether this instance runs the consumer now: renew the lease when due, or try to take it."""
        if self.lease.held:
            if self.lease.due():
                try:
                    await self._call(self._renew)
                except LeaseLostError as exc:
                    log.info("consumer %s: %s", self.name, exc)
            if self.lease.held:
                return True
        return bool(await self._call(self._take_over))

    def _renew(self) -> None:
        with self.store.session(consumer=True) as tx:
            self.lease.fence(tx)
            tx.commit()

    def _take_over(self) -> bool:
        """Take the lease if free (or ours) and load the cursor: the consumer runs here from now on."""
        with self.store.session(consumer=True) as tx:
            if not self.lease.acquire(tx):
                tx.rollback()
                return False
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
            tx.commit()
        # The failure bookkeeping (_single_until, _attempts) stays: a thread abandoned on a hung
        # event leads here too, and that event must still be parked after max_attempts.
        self._caught_up = False
        self._prepare()
        log.info("consumer %s runs on %s from position %d", self.name, self.lease.owner, self.position)
        return True

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
        self._wake.set()

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
                raise _Poison(culprit, exc, upto) from exc
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

    def _park(self, ev: Event, error: str, attempts: int) -> None:
        if not self.lease.held and not self._take_over():  # after an abandoned thread, say
            msg = f"consumer {self.name} runs elsewhere now; {ev.position} is not parked here"
            raise LeaseLostError(msg)
        with self.store.session(consumer=True) as tx:
            tx.add(
                ConsumerDeadLetterRow(
                    consumer=self.name, position=ev.position, event_type=ev.type, subject=ev.subject,
                    error=error, attempts=attempts, parked_at=utcnow(),
                )
            )  # fmt: skip
            self._write_cursor(tx, max(self.position, ev.position))
            tx.commit()
            self.position = max(self.position, ev.position)

    # -- operations --------------------------------------------------------------------------

    async def set_paused(self, paused: bool) -> None:  # noqa: FBT001
        """Pause or resume; persisted, so it survives a restart."""

        def write() -> None:
            with self.store.session(consumer=True) as tx:
                cursor = tx.get(ConsumerCursorRow, self.name) or ConsumerCursorRow(name=self.name, position=0)
                cursor.paused = paused
                tx.add(cursor)
                self._reload_holder(tx)
                tx.commit()
                self.lease.epoch = None

        await self._call(write)
        self.paused = paused
        self._wake.set()
        await self._operated()

    async def replay(self, *, from_position: int | None = None, from_time: datetime | None = None) -> int:
        """Move the cursor back so events from that point are handled again; returns the new cursor."""
        resets = bool(getattr(self.consumer, "replay_resets_state", False))

        def write() -> int:
            with self.store.session(consumer=True) as tx:
                if from_position is not None and from_position > (head := self._head(tx)) + 1:
                    # A cursor past the head would skip every event up to it, silently.
                    raise ReplayRangeError(from_position, head)
                row = tx.get(ConsumerCursorRow, self.name)
                reached = max(self.position, row.position if row is not None else 0)
                if resets:
                    target = 0  # derived state is rebuilt from the start of the log
                    self.consumer.reset(tx)  # type: ignore[attr-defined]
                elif from_time is not None:
                    first = tx.exec(select(func.min(EventRow.id)).where(col(EventRow.time) >= from_time)).one()
                    target = (first - 1) if first is not None else self._head(tx)
                else:
                    target = max((from_position or 1) - 1, 0)
                self._write_cursor(tx, target, fenced=False)
                cursor = tx.get(ConsumerCursorRow, self.name)
                if cursor is not None and target < reached:
                    cursor.replay_until = max(reached, cursor.replay_until or 0)
                    tx.add(cursor)
                    self._replay_until = cursor.replay_until
                self._reload_holder(tx)
                tx.commit()
                self.lease.epoch = None
                self.position = target
                self._single_until = 0
                return target

        target: int = await self._call(write)
        self._wake.set()
        await self._operated()
        return target  # not self.position: the consumer may have moved on already

    @staticmethod
    def _head(tx: Session) -> int:
        return int(tx.exec(select(func.max(EventRow.id))).one() or 0)

    async def retry_parked(self, dead_letter_id: int) -> None:
        """Hand one parked event to the consumer again; on success it is marked retried."""
        if self.elsewhere is not None:
            await self.elsewhere.retry(self.name, dead_letter_id)  # where the consumer's memory is
            return

        def run() -> None:
            with self.store.session(consumer=True) as tx:
                row = tx.get(ConsumerDeadLetterRow, dead_letter_id)
                if row is None or row.consumer != self.name:
                    msg = f"consumer {self.name} has no parked event {dead_letter_id}"
                    raise ConsumerError(msg)
                if row.status != "parked":
                    msg = f"parked event {dead_letter_id} was already {row.status}"
                    raise ConsumerError(msg)
                event_row = tx.get(EventRow, row.position)
                if event_row is None:
                    msg = f"event {row.position} is no longer in the log"
                    raise ConsumerError(msg)
                try:
                    self.consumer.handle([event_from_row(event_row)], tx)
                except Exception as exc:
                    tx.rollback()
                    msg = f"consumer {self.name} failed again: {type(exc).__name__}: {exc}"
                    raise ConsumerError(msg) from exc
                row.status, row.retried_at = "retried", utcnow()
                tx.add(row)
                self._reload_holder(tx)
                tx.commit()
                self.lease.epoch = None
                self._committed(tx)

        await self._call(run)
        self._wake.set()

    async def reload_holder(self) -> None:
        """The consumer's state changed in the database (an edit through the API): whichever
        process or instance runs it takes it on again, and so reads it, before its next step."""

        def write() -> None:
            with self.store.session(consumer=True) as tx:
                self._reload_holder(tx)
                tx.commit()
                self.lease.epoch = None

        await self._call(write)
        self._wake.set()
        await self._operated()

    async def _operated(self) -> None:
        if self.elsewhere is not None:
            await self.elsewhere.reload(self.name)

    def _reload_holder(self, tx: Session) -> None:
        """An operation changed the consumer's cursor or state: whichever instance runs it must
        reload before its next commit (its fence fails; it takes the consumer on again)."""
        bump_epoch(tx, self.lease.name)

    def status_sync(self, head: int, head_time: datetime | None) -> ConsumerStatus:
        """Lag and counts, read in the caller's thread (the API's)."""
        with self.store.session() as tx:
            cursor = tx.get(ConsumerCursorRow, self.name)
            owner = holder(tx, self.lease.name)
            parked = tx.exec(
                select(func.count())
                .select_from(ConsumerDeadLetterRow)
                .where(col(ConsumerDeadLetterRow.consumer) == self.name, col(ConsumerDeadLetterRow.status) == "parked")
            ).one()
            # The cluster's view: another instance may be running this consumer.
            position = cursor.position if cursor is not None and owner != self.lease.owner else self.position
            paused = cursor.paused if cursor is not None else self.paused
            oldest = tx.exec(select(EventRow.received_at).where(col(EventRow.id) == position + 1)).first()
        lag_events = max(head - position, 0)
        lag_seconds = (head_time - oldest).total_seconds() if lag_events and oldest and head_time else 0.0
        failing = self.failing and owner == self.lease.owner
        state = "paused" if paused else "failing" if failing else "running"
        stalled = None if paused else self._stalled(position, lag_events)
        if stalled is not None:
            state = "stalled"
        self.metrics.consumer_lag_events.labels(self.name).set(lag_events)
        self.metrics.consumer_lag_seconds.labels(self.name).set(max(lag_seconds, 0.0))
        self.metrics.consumer_stalled.labels(self.name).set(stalled is not None)
        return ConsumerStatus(
            self.name,
            state,
            owner,
            position,
            lag_events,
            max(lag_seconds, 0.0),
            int(parked),
            stalled or self.last_error,
        )

    def _stalled(self, position: int, lag_events: int) -> str | None:
        """Why the consumer is not progressing (events wait and its cursor has been still for
        `stall_s`, or the process running it does not answer), or None."""
        now = time.monotonic()
        if position != self._seen[0] or lag_events == 0:
            self._seen = (position, now)
        silent = self.elsewhere.unresponsive() if self.elsewhere is not None else None
        if silent is not None:
            return silent
        still = now - self._seen[1]
        if lag_events == 0 or still < self.stall_s:
            return None
        why = f"; last error: {self.last_error}" if self.last_error else ""
        return f"stalled: {lag_events} events waiting, cursor still at {position} for {still:.0f} s{why}"[:500]


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


class Elsewhere(Protocol):
    """The other process of this gateway that runs its consumers (gateway.apart)."""

    def notify(self, types: Collection[str] | None) -> None:
        """New events of `types` (None: unknown) are in the log."""

    def reload(self, name: str) -> Awaitable[None]:
        """An operation changed consumer `name`'s cursor or state in the database."""

    def retry(self, name: str, dead_letter_id: int) -> Awaitable[None]:
        """Retry a parked event there; raises `ConsumerError` with the reason if it fails."""

    def unresponsive(self) -> str | None:
        """Why that process is not running the consumers now (it does not answer), or None."""


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
            with self.store.session() as tx:
                head = ConsumerRunner._head(tx)  # noqa: SLF001
                head_time = tx.exec(select(EventRow.received_at).where(col(EventRow.id) == head)).first()
        except SQLAlchemyError as exc:  # pragma: no cover - session() translates already
            raise StoreError(str(exc)) from exc
        return [r.status_sync(head, head_time) for r in self.runners.values()]

    async def _refresh_lag(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            try:
                await asyncio.get_running_loop().run_in_executor(self._lag_executor, self.status)
            except StoreError as exc:
                log.debug("lag refresh failed: %s", exc)
