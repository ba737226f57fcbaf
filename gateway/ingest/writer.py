"""The batch writer: commits what the MQTT client received, a batch at a time on a thread of its
own, and only then has it acknowledged (`ack`). A batch the database refuses is retried with
backoff and nothing of it is acknowledged; a batch the database refuses for its data is
committed message by message, the culprit dead-lettered. Messages of a device over its rate
limit are dead-lettered in batches of their own, on another thread, so a flood never makes the
other devices' commits wait. A quiet gateway probes now and then that the database takes writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from gateway.config import Settings
from gateway.core.normalize import Shadow
from gateway.core.protocol import Reason, parse
from gateway.errors import PayloadError, StoreError
from gateway.ingest.admission import Buckets, Census, Registry
from gateway.ingest.pipeline import (
    Clock,
    Parsed,
    Pending,
    Prepared,
    channel_of,
    count_outcome,
    derive,
    internal_error,
    topic_device,
)
from gateway.log import DeadLetter, InboxMessage, Store
from gateway.logs import QuietLog
from gateway.metrics import Metrics
from gateway.tasks import stop_task

log = logging.getLogger("gateway.ingest")

LIMITED_FLUSH_S = 1.0  # messages over their device's rate are dead-lettered at most this late
PROBE_S = 5.0  # with no commit for this long, the writer checks that the database takes writes


class Writer:
    """Commits received messages in batches, then acknowledges them. One per gateway process."""

    def __init__(  # noqa: PLR0913
        self,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        *,
        clock: Clock,
        ack: Callable[[list[Pending]], None],
        on_commit: Callable[[set[str]], None] | None = None,
        on_inbox: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._ack = ack
        self.on_commit = on_commit
        self.on_inbox = on_inbox  # cluster: a batch went into the inbox (the sequencer's input)
        self.database_ok = True
        self._received: list[Pending] = []  # waiting for the next batch, oldest first
        self._arrived = asyncio.Event()  # set while _received holds any
        self._shadows: dict[str, Shadow] = {}
        # One writer thread: SQLite allows one writer, and the shadow cache is touched only there.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iotgw-writer")
        self._pending = 0
        metrics.pending.set_function(lambda: self._pending)  # read when scraped, not counted per message
        self._drained = asyncio.Event()  # set while nothing received is waiting for its commit
        self._drained.set()
        self._census = Census()
        self._buckets = Buckets(settings.device_rate, settings.device_burst) if settings.device_rate > 0 else None
        self._limited: list[Pending] = []  # over their device's rate, waiting to be dead-lettered
        # Their commits run on a thread of their own: the writer, which every other device's
        # messages wait for, never waits for a flood's dead letters.
        self._limited_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="iotgw-limited") if self._buckets else None
        )
        self._limited_max = max(10, settings.mqtt_receive_maximum // 4)  # unacknowledged, they hold the window
        self._flush_limited = asyncio.Event()
        self._registry = Registry(store) if settings.require_registered_devices else None
        self._rejections = QuietLog(log, every_s=10.0)
        self._committed_at = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self.failure: str | None = None  # why one of the writer's loops ended (they never should)

    async def start(self) -> None:
        """Load the shadows (unless in a cluster: the sequencer keeps them) and start committing."""
        if not self.settings.clustered:
            self._shadows = await self.call(self.store.load_shadows)
        for sh in self._shadows.values():
            self._census.move(None, sh)
        self._census.publish(self.metrics)
        self._tasks.append(asyncio.create_task(self._write_loop(), name="iotgw-ingest-writer"))
        if self._buckets is not None:
            self._tasks.append(asyncio.create_task(self._limited_loop(), name="iotgw-ingest-limited"))
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="iotgw-ingest-probe"))
        for task in self._tasks:
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return  # stopped
        exc = task.exception()
        self.failure = f"{task.get_name()}: {type(exc).__name__}: {exc}"
        log.critical("%s ended; nothing received is stored or acknowledged any more", task.get_name(), exc_info=exc)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until everything received is committed and acknowledged."""
        self._flush_limited.set()
        if self.database_ok:
            # Bounded: a batch the database refuses stays unacknowledged; the broker keeps it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout_s)

    async def stop(self) -> None:
        for task in self._tasks:
            await stop_task(task)
        self._executor.shutdown(wait=True)
        if self._limited_executor is not None:
            self._limited_executor.shutdown(wait=True)

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:  # noqa: ANN401
        """Run `fn(*args)` on the writer's thread (the one that writes the database)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def put(self, p: Pending) -> None:
        """A message received: to the next batch (or, over its device's rate, to the dead letters)."""
        self._pending += 1
        self._drained.clear()
        if self._buckets is not None:
            device_id = topic_device(p.topic)
            if device_id is not None and not self._buckets.allow(device_id, p.received_at.timestamp()):
                # Over its rate: not in the other devices' batches (their commits stay as small as
                # without the flood); dead-lettered in a batch of its own, at most a second later.
                self._limited.append(p)
                if len(self._limited) >= self._limited_max:
                    self._flush_limited.set()
                return
        self._received.append(p)
        self._arrived.set()

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            n = self.settings.batch_max
            batch, self._received = self._received[:n], self._received[n:]
            if not self._received:
                self._arrived.clear()
            types = await self._commit_with_retry(loop, batch)
            self._ack(batch)
            if self.on_inbox is not None and self.settings.clustered:
                self.on_inbox()
            if self.on_commit is not None and types:
                self.on_commit(types)  # wake the consumers of these event types: the log has grown
            self._done(batch)

    async def _limited_loop(self) -> None:
        """Dead-letter the messages of devices over their rate: a batch a second, or sooner when many."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_limited.wait(), LIMITED_FLUSH_S)
            self._flush_limited.clear()
            if not self._limited:
                continue
            batch, self._limited = self._limited, []
            await self._commit_with_retry(loop, batch, self._process_limited, self._limited_executor)
            self._ack(batch)
            self._done(batch)

    def _done(self, batch: list[Pending]) -> None:
        """After a batch's commit and acknowledgement: latency, and what is still pending."""
        stored_at = self.clock()
        self.metrics.receive_latency.observe_all(max((stored_at - p.received_at).total_seconds(), 0.0) for p in batch)
        self._pending -= len(batch)
        if self._pending == 0:
            self._drained.set()

    async def _commit_with_retry(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[Pending],
        process: Callable[[list[Pending]], set[str]] | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> set[str]:
        """Commit the batch (by default in the writer thread, with `_process`), retrying while the
        database refuses; returns the types of the events stored."""
        delay = 0.1
        process = process or self._process
        while True:
            try:
                types = await loop.run_in_executor(executor or self._executor, process, batch)
            except StoreError as exc:
                if not exc.transient and process == self._process:
                    # The database refused the data, not the write: retrying the batch as it is would
                    # hold every device's messages for ever. Each message on its own, then; the one it
                    # refuses becomes a dead letter.
                    log.error(  # noqa: TRY400 - one line: the culprit is dead-lettered with the error
                        "the database refused a batch of %d messages (%s); committing them one by one", len(batch), exc
                    )
                    process = self._isolate
                    continue
                # Nothing is acknowledged: the broker keeps the messages until a commit succeeds.
                if self.database_ok:
                    log.error("cannot commit a batch of %d messages, holding acknowledgements: %s", len(batch), exc)  # noqa: TRY400 - one line, no traceback: this is an expected outage
                self.database_ok = False
                self.metrics.database_writable.set(0)
                self.metrics.commit_failures.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception:
                # A bug, or data nothing checked before the database driver refused it: the writer
                # must not end (nothing would be stored or acknowledged again). Each message on its
                # own, then; the one that fails becomes a dead letter `internal_error`.
                if process != self._process:
                    raise
                log.exception("committing a batch of %d messages failed; committing them one by one", len(batch))
                process = self._isolate
                continue
            if not self.database_ok:
                log.info("database writable again; committed the held batch")
            self.database_ok = True
            self.metrics.database_writable.set(1)
            self._committed_at = time.monotonic()
            return types

    async def _probe_loop(self) -> None:
        """A quiet gateway commits nothing, so no commit can fail: check now and then that one
        could, so that /ready, iotgw_database_writable and the rule tell the truth before the
        next device message finds the database locked, full of another's transaction, or read-only."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PROBE_S)
            if time.monotonic() - self._committed_at < PROBE_S:
                continue
            try:
                await loop.run_in_executor(self._executor, self.store.probe_write)
            except StoreError as exc:
                if self.database_ok:
                    log.error("the database takes no writes (%s); device messages would be held", exc)  # noqa: TRY400 - an outage, no traceback
                self.database_ok = False
                self.metrics.database_writable.set(0)
                continue
            if not self.database_ok and self._pending == 0:  # nothing held: no batch is still failing
                log.info("database writable again")
                self.database_ok = True
                self.metrics.database_writable.set(1)
            self._committed_at = time.monotonic()

    def _isolate(self, batch: list[Pending]) -> set[str]:
        """Runs in the writer thread: commit each message of a refused batch on its own; one the
        database refuses is stored as a dead letter `internal_error` with the database's words."""
        types: set[str] = set()
        for p in batch:
            try:
                types |= self._process([p])
            except Exception as exc:
                if isinstance(exc, StoreError) and exc.transient:
                    raise  # the database itself is in trouble: the whole batch waits, as usual
                dead = internal_error(p.topic, p.payload, p.received_at, exc)
                now = self.clock()
                self.store.append_batch([], [], [dead], now=now)
                self._count([p], Prepared([], {}, [dead], Counter(), Counter({channel_of(p.topic): 1})), 0, now)
        return types

    def _process(self, batch: list[Pending]) -> set[str]:
        """Runs in the writer thread: parse, normalise, commit, then update the shadow cache.
        Returns the types of the events in the batch."""
        if self.settings.clustered:
            return self._process_into_inbox(batch)
        prepared = self._prepare(batch)
        now = self.clock()
        with self.metrics.commit_duration.time():
            stored = self.store.append_batch(prepared.events, list(prepared.shadows.values()), prepared.dead, now=now)
        # Only after the commit: a failed batch must leave the cache as the database has it.
        for device_id, new in prepared.shadows.items():
            self._census.move(self._shadows.get(device_id), new)
        self._shadows.update(prepared.shadows)
        self._count(batch, prepared, stored.events_skipped, now)
        self._census.publish(self.metrics)
        return {e.type for e in prepared.events}

    def _process_limited(self, batch: list[Pending]) -> set[str]:
        """Runs in the rate limit's own thread: dead letters `rate_limited` for messages over their
        device's rate. (Touches no shadow: those belong to the writer thread.)"""
        dead = []
        for p in batch:
            detail = f"device {topic_device(p.topic)} exceeds {self.settings.device_rate:g} messages/s"
            self._rejections.warn(Reason.RATE_LIMITED, "rejected %s: %s", p.topic[:200], detail)
            dead.append(DeadLetter(p.topic, Reason.RATE_LIMITED, detail, p.payload, p.received_at))
        received = Counter(channel_of(p.topic) for p in batch)
        now = self.clock()
        with self.metrics.commit_duration.time():
            self.store.append_batch([], [], dead, now=now)
        self._count(batch, Prepared([], {}, dead, Counter(), received), 0, now)
        return set()

    def _process_into_inbox(self, batch: list[Pending]) -> set[str]:
        """Cluster: check and store the batch for the sequencer, which normalises in seq order."""
        parsed, dead, received = self._parse(batch)
        messages = [InboxMessage(p.msg.device_id, p.msg.seq, p.topic, p.payload, p.received_at) for p in parsed]
        now = self.clock()
        with self.metrics.commit_duration.time():
            self.store.append_inbox(messages, dead)
        self._count(batch, Prepared([], {}, dead, Counter(), received), 0, now)
        return set()

    def _parse(self, batch: list[Pending]) -> tuple[list[Parsed], list[DeadLetter], Counter[str]]:
        """Admit and parse every message: the valid ones, the dead letters, messages by channel."""
        parsed: list[Parsed] = []
        dead: list[DeadLetter] = []
        received: Counter[str] = Counter()
        admitted = self._admit(batch)
        for p, refusal in zip(batch, admitted, strict=True):
            received[channel_of(p.topic)] += 1
            try:
                if refusal is not None:
                    raise refusal  # noqa: TRY301 - handled with the parse errors below
                parsed.append(
                    Parsed(
                        p.topic,
                        p.payload,
                        p.received_at,
                        parse(p.topic, p.payload, max_bytes=self.settings.max_message_bytes),
                    )
                )
            except PayloadError as exc:
                self._rejections.warn(exc.reason, "rejected %s: %s", p.topic[:200], exc)
                dead.append(DeadLetter(p.topic, exc.reason, exc.detail, p.payload, p.received_at))
            except Exception as exc:
                dead.append(internal_error(p.topic, p.payload, p.received_at, exc))
        return parsed, dead, received

    def _prepare(self, batch: list[Pending]) -> Prepared:
        parsed, dead, received = self._parse(batch)
        derived = derive(parsed, self._shadows, self.settings, rejections=self._rejections)
        return Prepared(derived.events, derived.shadows, dead + derived.dead, derived.anomalies, received)

    def _admit(self, batch: list[Pending]) -> list[PayloadError | None]:
        """Per message, why it is refused before parsing (from an unregistered device), or None.
        Cheap on purpose: a flood must not cost a parse each. (Over its device's rate: sorted out
        on arrival, see `_receive`.)"""
        refusals: list[PayloadError | None] = [None] * len(batch)
        if self._registry is None:
            return refusals
        devices = [topic_device(p.topic) for p in batch]
        known = self._registry.known({d for d in devices if d is not None})
        for i, (p, device_id) in enumerate(zip(batch, devices, strict=True)):
            if device_id is not None and device_id not in known:
                detail = f"device {device_id} is not provisioned (iotgw devices provision --id {device_id})"
                refusals[i] = PayloadError(Reason.UNKNOWN_DEVICE, detail, p.topic)
        return refusals

    def _count(self, batch: list[Pending], prepared: Prepared, skipped: int, now: datetime) -> None:
        m = self.metrics
        m.batch_size.observe(len(batch))
        for channel, n in prepared.received.items():
            m.messages_received.labels(channel).inc(n)
        count_outcome(m, prepared.events, prepared.dead, prepared.anomalies, skipped=skipped, now=now)
