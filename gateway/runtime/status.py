"""What the API and /metrics report of a consumer: state, owner, position, lag, parked events, and
why it is stalled."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from gateway.log import (
    ConsumerCursorRow,
    ConsumerDeadLetterRow,
    EventRow,
)
from gateway.runtime.leases import holder
from gateway.runtime.state import RunnerState

log = logging.getLogger("gateway.runtime")  # one logger name for the runtime, as operators know it


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


class RunnerStatus(RunnerState):
    """The runner's status, read in the caller's thread."""

    def status_sync(self, tx: Session, head: int, head_time: datetime | None) -> ConsumerStatus:
        """Lag and counts, read in the caller's thread (the API's) and session `tx`."""
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
        # Failing here, unless another instance holds the consumer now (a lease that lapsed because
        # this one cannot reach the database any more still says failing).
        failing = self.failing and owner in (None, self.lease.owner)
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
