"""The sequencer: in a cluster, turns the inbox into events, per device in seq order.

Instances of a cluster share one MQTT subscription, so the broker hands a device's messages to
whichever instance is next: message 41 may reach gw-1 and 42 gw-2, and gw-2 may commit first;
when gw-1 dies, the messages queued for its session wait at the broker until it is back. Each
instance therefore only checks and stores what it receives, in the `inbox`. One sequencer in
the cluster (whichever instance holds the `sequencer` lease) reads the inbox on, keeps each
device's messages in seq order, and hands a message to the normaliser once its predecessor
(seq - 1) is through, or once it has waited `reorder_window_s` for it (the gap is recorded, as
on a single gateway). Events, shadows and the inbox rows done commit together, under the lease.

A device that numbers its messages with gaps (not +1 each time) waits the reorder window at
every gap, and so does the first message of a device never seen unless its seq is 0 or 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from gateway.config import Settings
from gateway.core.clock import utcnow
from gateway.core.normalize import Shadow
from gateway.core.protocol import parse
from gateway.errors import PayloadError, StoreError
from gateway.ingest.admission import Census
from gateway.ingest.pipeline import Clock, Derived, Parsed, count_outcome, derive, internal_error
from gateway.log import DeadLetter, InboxMessage, Store
from gateway.logs import QuietLog
from gateway.metrics import Metrics
from gateway.runtime.leases import Hold, Lease, release_now
from gateway.runtime.loop import WakeLoop
from gateway.tasks import stop_task

log = logging.getLogger(__name__)

POLL_S = 0.1  # the inbox may grow on another instance: look at least this often


def in_order(messages: Sequence[InboxMessage]) -> list[InboxMessage]:
    """One device's messages in the order they apply: by seq; a status message (no seq) after
    every message received before it."""
    out = sorted((m for m in messages if m.seq is not None), key=lambda m: (m.seq, m.id))
    after = -1  # statuses keep their own order too
    for status in sorted((m for m in messages if m.seq is None), key=lambda m: m.id):
        earlier = [i for i, m in enumerate(out) if m.seq is not None and m.received_at <= status.received_at]
        after = max([after, *earlier]) + 1
        out.insert(after, status)
    return out


def ready(messages: Sequence[InboxMessage], last_seq: int | None, now: datetime, window_s: float) -> int:
    """How many of one device's messages (in `in_order` order) may be normalised now: up to the
    first whose predecessor has neither been seen nor waited for long enough. A device never
    seen starts at seq 0 or 1 at once, at a higher seq once that has waited (its first messages
    may have gone to an instance that commits later)."""
    n = 0
    for m in messages:
        if m.seq is not None:
            gap = m.seq > 1 if last_seq is None else m.seq > last_seq + 1
            if gap and (now - m.received_at).total_seconds() < window_s:
                break
            last_seq = m.seq if last_seq is None else max(last_seq, m.seq)
        n += 1
    return n


class Sequencer:
    """Runs wherever the `sequencer` lease is held; `notify()` when the local inbox grew."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        *,
        on_commit: Callable[[set[str]], None] | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.on_commit = on_commit
        self.clock = clock
        self.lease = Lease("sequencer", settings.instance_name, settings.lease_s)
        self.window_s = settings.reorder_window_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iotgw-sequencer")
        self.wakeloop = WakeLoop("sequencer", POLL_S, retry_s=0.5)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shadows: dict[str, Shadow] = {}
        self._held: dict[str, list[InboxMessage]] = {}  # read from the inbox, not yet normalised
        self._read_to = 0  # the last inbox id read
        self._census = Census()
        self._quiet = QuietLog(log, every_s=10.0)

    @property
    def waiting(self) -> int:
        """Messages read and held back, waiting for their predecessors."""
        return sum(len(v) for v in self._held.values())

    def notify(self) -> None:
        """The inbox grew (on this instance)."""
        self.wakeloop.wake()

    async def start(self) -> None:
        """Start the loop (it takes the lease when it is free)."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self.wakeloop.run(self._run_round), name="iotgw-sequencer")

    async def stop(self) -> None:
        """Stop after the round in hand and give the lease up."""
        await stop_task(self._task)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(StoreError, TimeoutError):
            await asyncio.wait_for(loop.run_in_executor(self._executor, self._release), 10)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run_round(self) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._round)

    def drain(self) -> int:
        """Normalise everything in the inbox now, gaps or not (blocking): for a gateway started on
        its own over a database a cluster left messages in. Returns how many were left."""
        window, self.window_s = self.window_s, 0.0
        try:
            while self._round():
                pass
        finally:
            self.window_s = window
            self._release()
        return self.store.inbox_size()

    # -- in the sequencer's thread -----------------------------------------------------------

    def _release(self) -> None:
        release_now(self.lease, self.store.session)

    def _taken_over(self) -> None:
        # Whatever an earlier holder left is in the database: shadows, and the inbox from its start.
        self._shadows = self.store.load_shadows()
        self._held, self._read_to = {}, 0
        self._census = Census()
        for sh in self._shadows.values():
            self._census.move(None, sh)
        self._census.publish(self.metrics)
        log.info("the sequencer runs on %s (%d devices known)", self.lease.owner, len(self._shadows))

    def _round(self) -> bool:
        """Read the inbox on and normalise what is ready; True if there may be more at once."""
        held = self.lease.hold(self.store.session)
        if not held:
            return False
        if held is Hold.TAKEN:
            self._taken_over()
        limit = self.settings.batch_max
        fresh = self.store.read_inbox(self._read_to, limit)
        for m in fresh:
            self._held.setdefault(m.device_id, []).append(m)
        if fresh:
            self._read_to = fresh[-1].id
        now = self.clock()
        batch: list[InboxMessage] = []
        for device_id, messages in self._held.items():
            if len(batch) >= limit:
                break
            ordered = in_order(messages)
            shadow = self._shadows.get(device_id)
            n = ready(ordered, shadow.last_seq if shadow else None, now, self.window_s)
            batch.extend(ordered[:n])
        if batch:
            self._commit(batch, now)
        self.metrics.sequencer_waiting.set(self.waiting)
        return len(fresh) == limit or bool(batch)

    def _commit(self, batch: list[InboxMessage], now: datetime) -> None:
        parsed: list[Parsed] = []
        dead: list[DeadLetter] = []
        for m in batch:
            try:
                msg = parse(m.topic, m.payload, max_bytes=self.settings.max_message_bytes)
            except PayloadError as exc:  # checked at ingest already; a different limit since?
                dead.append(DeadLetter(m.topic, exc.reason, exc.detail, m.payload, m.received_at))
                continue
            except Exception as exc:
                dead.append(internal_error(m.topic, m.payload, m.received_at, exc))
                continue
            parsed.append(Parsed(m.topic, m.payload, m.received_at, msg))
        derived = derive(parsed, self._shadows, self.settings, rejections=self._quiet)
        with self.metrics.commit_duration.time():
            stored = self.store.append_batch(
                derived.events,
                list(derived.shadows.values()),
                [*dead, *derived.dead],
                now=now,
                inbox_done=[m.id for m in batch],
                fence=self.lease.fence,
            )
        # Only after the commit: a failed one leaves memory as the database has it.
        done = {m.id for m in batch}
        for device_id in {m.device_id for m in batch}:
            left = [m for m in self._held[device_id] if m.id not in done]
            if left:
                self._held[device_id] = left
            else:
                del self._held[device_id]
        for device_id, new in derived.shadows.items():
            self._census.move(self._shadows.get(device_id), new)
        self._shadows.update(derived.shadows)
        self._count(derived, [*dead, *derived.dead], stored.events_skipped, now)
        types = {e.type for e in derived.events}
        if types and self.on_commit is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_commit, types)

    def _count(self, derived: Derived, dead: Sequence[DeadLetter], skipped: int, now: datetime) -> None:
        count_outcome(self.metrics, derived.events, dead, derived.anomalies, skipped=skipped, now=now)
        self._census.publish(self.metrics)
