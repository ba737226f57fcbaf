"""Leases: in a cluster of gateway instances, one instance at a time does each singular job
(a consumer, the notifier, the sequencer).

A lease is a row of `leases`: its owner (an instance name), when it expires and an epoch. An
instance takes a lease that is free, expired or its own (a restarted instance takes back its
own at once), which bumps the epoch. Every commit of the holder goes through `fence`, in the
same transaction: it renews the lease, and fails (`LeaseLostError`, the transaction is rolled
back) unless the row still names this owner and epoch. So an instance that stalled past its
lease, or whose consumer was replayed or paused from another instance (which bumps the epoch),
cannot commit anything stale: it takes the lease again, reloads, and carries on.

The expiry is compared with this machine's clock: instances on several machines need their
clocks in step (NTP), well within the lease time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from enum import IntEnum

from sqlalchemy import Connection, or_, select, text, update
from sqlmodel import Session

from gateway.core.clock import utcnow
from gateway.errors import GatewayError
from gateway.log import LeaseRow

LEASES = LeaseRow.__table__  # type: ignore[attr-defined]
log = logging.getLogger("gateway.runtime")


class Hold(IntEnum):
    """What `Lease.hold` found; false when another instance holds the lease."""

    ELSEWHERE = 0
    HELD = 1
    TAKEN = 2  # taken just now: what an earlier holder left is in the database


class LeaseLostError(GatewayError):
    """This instance no longer holds the lease (expired and taken, or its epoch moved on)."""


class Lease:
    """One instance's hold on one job. Use from one thread (the job's)."""

    def __init__(self, name: str, owner: str, ttl_s: float, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.name = name
        self.owner = owner
        self.ttl = timedelta(seconds=ttl_s)
        self.clock = clock
        self.epoch: int | None = None  # the epoch held, or None
        self._renewed = 0.0  # time.monotonic() of the last successful acquire or fence

    @property
    def held(self) -> bool:
        """Whether this instance believes it holds the lease (its next `fence` tells for sure)."""
        return self.epoch is not None

    def due(self) -> bool:
        """Whether the lease should be renewed (a third of its time has passed since the last renewal)."""
        return time.monotonic() - self._renewed >= self.ttl.total_seconds() / 3

    def acquire(self, tx: Session) -> bool:
        """Take the lease if it is free, expired or this owner's; the caller commits."""
        tx.connection().execute(
            text("INSERT INTO leases (name, epoch) VALUES (:name, 0) ON CONFLICT (name) DO NOTHING"),
            {"name": self.name},
        )
        now = self.clock()
        taken = (
            tx.connection()
            .execute(
                update(LEASES)
                .where(
                    LEASES.c.name == self.name,
                    or_(LEASES.c.owner.is_(None), LEASES.c.owner == self.owner, LEASES.c.expires_at < now),
                )
                .values(owner=self.owner, expires_at=now + self.ttl, epoch=LEASES.c.epoch + 1)
                .returning(LEASES.c.epoch)
            )
            .first()
        )
        self.epoch = None if taken is None else int(taken[0])
        if taken is not None:
            self._renewed = time.monotonic()
        return taken is not None

    def fence(self, tx: Session | Connection) -> None:
        """Renew the lease in `tx`, or raise `LeaseLostError` (and forget it) if it is not ours any more."""
        if self.epoch is None:
            msg = f"{self.owner} does not hold the lease {self.name}"
            raise LeaseLostError(msg)
        conn = tx.connection() if isinstance(tx, Session) else tx
        renewed = conn.execute(
            update(LEASES)
            .where(LEASES.c.name == self.name, LEASES.c.owner == self.owner, LEASES.c.epoch == self.epoch)
            .values(expires_at=self.clock() + self.ttl)
        )
        if renewed.rowcount != 1:
            self.epoch = None
            msg = f"{self.owner} lost the lease {self.name} (taken over, or replayed/paused elsewhere)"
            raise LeaseLostError(msg)
        self._renewed = time.monotonic()

    def confirmed(self, tx: Session) -> bool:
        """Whether the lease is still ours (its owner and epoch unchanged), read without renewing
        or locking it: for a check before work outside the database (a request) that another
        holder must not see done twice. Forgets the lease when it is not ours any more."""
        if self.epoch is None:
            return False
        row = tx.connection().execute(select(LEASES.c.owner, LEASES.c.epoch).where(LEASES.c.name == self.name)).first()
        if row is None or row[0] != self.owner or row[1] != self.epoch:
            self.epoch = None
            return False
        return True

    def hold(
        self,
        session: Callable[[], AbstractContextManager[Session]],
        on_take: Callable[[Session], None] | None = None,
    ) -> Hold:
        """Renew the lease when due, or take it when it is free; `on_take(tx)` runs in the
        transaction that takes it (to load the job's state with it). From the job's thread."""
        if self.held and not self.due():
            return Hold.HELD  # renewed a moment ago: no database round trip every round
        with session() as tx:
            if self.held:
                try:
                    self.fence(tx)
                except LeaseLostError as exc:
                    log.info("%s", exc)
                else:
                    tx.commit()
                    return Hold.HELD
            if not self.acquire(tx):
                tx.rollback()
                return Hold.ELSEWHERE
            if on_take is not None:
                on_take(tx)
            tx.commit()
        return Hold.TAKEN

    def release(self, tx: Session) -> None:
        """Give the lease up (a clean stop: another instance may take it at once); the caller commits."""
        if self.epoch is not None:
            tx.connection().execute(
                update(LEASES)
                .where(LEASES.c.name == self.name, LEASES.c.owner == self.owner, LEASES.c.epoch == self.epoch)
                .values(owner=None, expires_at=None)
            )
        self.epoch = None


def release_now(lease: Lease, session: Callable[[], AbstractContextManager[Session]]) -> None:
    """Give `lease` up in a transaction of its own, if held (a clean stop)."""
    if lease.held:
        with session() as tx:
            lease.release(tx)
            tx.commit()


def bump_epoch(tx: Session, name: str) -> None:
    """Make the holder of lease `name` reload (its next commit fails the fence); the caller commits."""
    tx.connection().execute(update(LEASES).where(LEASES.c.name == name).values(epoch=LEASES.c.epoch + 1))


def holder(tx: Session, name: str, now: datetime | None = None) -> str | None:
    """Who holds lease `name` now (None: nobody, or expired)."""
    row = tx.get(LeaseRow, name)
    if row is None or row.owner is None or row.expires_at is None:
        return None
    return row.owner if row.expires_at >= (now or utcnow()) else None
