"""The HTTP API's reads: events, devices and dead letters, filtered and paged."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import col, select

from gateway.log.store import Store
from gateway.log.tables import DeadLetterRow, DeviceRow, EventRow


@dataclass(slots=True, frozen=True)
class EventQuery:
    """Filters for reading the log (all optional); `after` is the last log id already seen."""

    device_id: str | None = None
    type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after: int = 0
    limit: int = 100
    newest_first: bool = False  # then `after` (0: from the newest) is the last id seen going back


def list_events(store: Store, q: EventQuery) -> list[EventRow]:
    """Events in log order after `q.after` (or newest first, before it); `type` may end in `.*`
    to match a prefix."""
    if q.newest_first:
        stmt = select(EventRow).where(col(EventRow.id) < q.after) if q.after else select(EventRow)
    else:
        stmt = select(EventRow).where(col(EventRow.id) > q.after)
    if q.device_id:
        stmt = stmt.where(col(EventRow.subject) == q.device_id)
    if q.type:
        if q.type.endswith(".*"):
            stmt = stmt.where(col(EventRow.type).startswith(q.type[:-1]))
        else:
            stmt = stmt.where(col(EventRow.type) == q.type)
    if q.since:
        stmt = stmt.where(col(EventRow.time) >= q.since)
    if q.until:
        stmt = stmt.where(col(EventRow.time) < q.until)
    stmt = stmt.order_by(col(EventRow.id).desc() if q.newest_first else col(EventRow.id)).limit(q.limit)
    with store.session() as s:
        return list(s.exec(stmt))


def list_devices(
    store: Store,
    *,
    type_: str | None = None,
    site: str | None = None,
    after: str | None = None,
    limit: int | None = None,
) -> list[DeviceRow]:
    """Devices by id (those after `after`, at most `limit`), optionally filtered by type and site."""
    stmt = select(DeviceRow).limit(limit)
    if after is not None:
        stmt = stmt.where(col(DeviceRow.device_id) > after)
    if type_:
        stmt = stmt.where(col(DeviceRow.type) == type_)
    if site:
        stmt = stmt.where(col(DeviceRow.site) == site)
    with store.session() as s:
        return list(s.exec(stmt.order_by(col(DeviceRow.device_id))))


def get_device(store: Store, device_id: str) -> DeviceRow | None:
    """One device's shadow, or None."""
    with store.session() as s:
        return s.get(DeviceRow, device_id)


def recent_events(store: Store, device_id: str, limit: int, *, before: int | None = None) -> list[EventRow]:
    """A device's latest events (its own and the gateway's about it) before position `before`, newest first."""
    stmt = select(EventRow).where(col(EventRow.subject) == device_id).order_by(col(EventRow.id).desc()).limit(limit)
    if before is not None:
        stmt = stmt.where(col(EventRow.id) < before)
    with store.session() as s:
        return list(s.exec(stmt))


def list_dead_letters(
    store: Store, *, reason: str | None = None, after: int = 0, limit: int = 100
) -> list[DeadLetterRow]:
    """Dead letters in arrival order after id `after`, optionally of one reason."""
    stmt = select(DeadLetterRow).where(col(DeadLetterRow.id) > after)
    if reason:
        stmt = stmt.where(col(DeadLetterRow.reason) == reason)
    with store.session() as s:
        return list(s.exec(stmt.order_by(col(DeadLetterRow.id)).limit(limit)))
