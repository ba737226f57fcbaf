"""Operator actions on a consumer (pause, resume, replay, retry a parked event, reload after an
edit): written to the database, then taken on by whichever process or instance runs it."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from gateway.core.clock import utcnow
from gateway.errors import ReplayRangeError
from gateway.log import (
    ConsumerCursorRow,
    ConsumerDeadLetterRow,
    EventRow,
    event_from_row,
)
from gateway.runtime.contract import ConsumerError
from gateway.runtime.leases import bump_epoch
from gateway.runtime.state import RunnerState

log = logging.getLogger("gateway.runtime")  # one logger name for the runtime, as operators know it


class RunnerOperations(RunnerState):
    """The runner's operations, from the API."""

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
        self.wakeloop.wake()
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
        self.wakeloop.wake()
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
        self.wakeloop.wake()

    async def reload_holder(self) -> None:
        """The consumer's state changed in the database (an edit through the API): whichever
        process or instance runs it takes it on again, and so reads it, before its next step."""

        def write() -> None:
            with self.store.session(consumer=True) as tx:
                self._reload_holder(tx)
                tx.commit()
                self.lease.epoch = None

        await self._call(write)
        self.wakeloop.wake()
        await self._operated()

    async def _operated(self) -> None:
        if self.elsewhere is not None:
            await self.elsewhere.reload(self.name)

    def _reload_holder(self, tx: Session) -> None:
        """An operation changed the consumer's cursor or state: whichever instance runs it must
        reload before its next commit (its fence fails; it takes the consumer on again)."""
        bump_epoch(tx, self.lease.name)
