"""A consumer's failures: a batch that raised is narrowed to the event at fault, retried with
backoff and jitter, and parked after `max_attempts`; a hung handler's thread is abandoned."""

from __future__ import annotations

import asyncio
import logging
import random

from gateway.core.clock import utcnow
from gateway.core.events import Event
from gateway.log import (
    ConsumerDeadLetterRow,
)
from gateway.runtime.leases import LeaseLostError
from gateway.runtime.state import RunnerState

log = logging.getLogger("gateway.runtime")  # one logger name for the runtime, as operators know it


class Poison(Exception):
    def __init__(self, event: Event, cause: BaseException, last: int) -> None:
        super().__init__(str(cause))
        self.event = event
        self.cause = cause
        self.last = last  # the last position the failed batch covered


class RunnerFailures(RunnerState):
    """The runner's failure handling."""

    def _abandon_thread(self) -> None:
        """Leave a hung handler behind: a fresh thread carries on, and the old one can never commit."""
        self._generation += 1
        # Whether that thread got to commit is not known: take the consumer on again before the next
        # batch (its cursor is read afresh, and the new epoch fences a commit still to come).
        self.lease.epoch = None
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()
        self.metrics.consumer_failures.labels(self.name).inc()

    async def _failed(self, poison: Poison, *, single: bool) -> None:
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

    def _park(self, ev: Event, error: str, attempts: int) -> None:
        if not self._hold():  # after an abandoned thread, say
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
