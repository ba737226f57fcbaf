"""The log as consumers read and append to it: positions, type filters, events from rows, CloudEvents,
and `append_event` for the events a consumer derives."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    or_,
)
from sqlalchemy import select as sa_select
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError, SQLAlchemyError
from sqlmodel import Session, col, select

from gateway.core.events import Event
from gateway.core.normalize import Shadow
from gateway.log.sql import SHADOW_FIELDS, table_of
from gateway.log.tables import DeviceRow, EventRow

EVENT_COLUMNS = ("id", "ce_id", "source", "type", "subject", "time", "sequence", "part", "site", "data", "received_at")


def batch_end(tx: Session, position: int, limit: int) -> int | None:
    """Position of the `limit`-th event after `position` (or of the last one); None when none."""
    # Plain SQL: built with SQLAlchemy's expression language, compiling it and its cache key was
    # most of what a caught-up consumer spent holding the GIL (the router asks every batch).
    conn = tx.connection()
    sql = _SQL_BATCH_END if conn.dialect.paramstyle == "qmark" else _SQL_BATCH_END.replace("?", "%s")
    end = conn.exec_driver_sql(sql, (position, limit)).scalar()
    return int(end) if end is not None else None


_SQL_BATCH_END = "SELECT max(id) FROM (SELECT id FROM events WHERE id > ? ORDER BY id LIMIT ?) AS span"


def type_filter(patterns: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """(exact types, LIKE prefixes) selecting at least the types `patterns` match; None = all.

    A LIKE prefix can select more than the pattern ('_' is a LIKE wildcard), so callers filter
    the rows again with the patterns themselves.
    """
    exact: list[str] = []
    prefixes: list[str] = []
    for p in patterns:
        if not any(c in p for c in "*?["):
            exact.append(p)
        elif p.endswith("*") and not any(c in p[:-1] for c in "*?["):
            prefixes.append(p[:-1] + "%")
        else:
            return None  # "*" or a pattern SQL cannot express: read everything
    return exact, prefixes


def read_events(tx: Session, after: int, upto: int, patterns: Sequence[str] = ("*",)) -> list[Event]:
    """Events with after < position <= upto whose type may match `patterns`, in log order.

    On SQLite the rows come straight from the driver and are converted here (fromisoformat and
    json.loads, both in C), without ORM objects or SQLAlchemy's per-column processing.
    """
    conn = tx.connection()
    wanted = type_filter(patterns)
    if conn.dialect.name == "sqlite":
        sql = _SQL_EVENTS_BETWEEN
        params: list[object] = [after, upto]
        if wanted is not None:
            exact, prefixes = wanted
            terms = [f"type IN ({', '.join('?' * len(exact))})"] if exact else []
            terms += ["type LIKE ?"] * len(prefixes)
            sql += " AND (" + " OR ".join(terms or ["0"]) + ")"
            params += exact + prefixes
        return read_sql_events(conn, sql + " ORDER BY id", params)
    table = table_of(EventRow)
    stmt = sa_select(*[table.c[n] for n in EVENT_COLUMNS]).where(table.c.id > after, table.c.id <= upto)
    if wanted is not None:
        exact, prefixes = wanted
        stmt = stmt.where(or_(table.c.type.in_(exact), *[table.c.type.like(p) for p in prefixes]))
    return [
        Event(
            id=ce_id, source=source, type=etype, time=_as_utc(time), subject=subject,
            data=dict(data), sequence=sequence, part=part, site=site, position=pos, received_at=_as_utc(received),
        )
        for pos, ce_id, source, etype, subject, time, sequence, part, site, data, received in conn.execute(
            stmt.order_by(table.c.id)
        )
    ]  # fmt: skip


_SQL_EVENTS_BETWEEN = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE id > ? AND id <= ?"  # noqa: S608


def read_sql_events(conn: Any, sql: str, params: Sequence[object]) -> list[Event]:  # noqa: ANN401 - Connection
    """Events from a SQLite query that selects EVENT_COLUMNS (for consumers' own filters)."""
    return [
        Event(
            id=ce_id, source=source, type=etype, time=_sqlite_time(time), subject=subject,
            data=json.loads(data), sequence=sequence, part=part, site=site, position=pos,
            received_at=_sqlite_time(received),
        )
        for pos, ce_id, source, etype, subject, time, sequence, part, site, data, received in conn.exec_driver_sql(
            sql, tuple(params)
        ).fetchall()
    ]  # fmt: skip


def _sqlite_time(text_value: str) -> datetime:
    return datetime.fromisoformat(text_value).replace(tzinfo=UTC)


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def cloudevent_of(row: EventRow) -> dict[str, Any]:
    """A stored event as a CloudEvent (`Event.to_cloudevent`)."""
    return event_from_row(row).to_cloudevent()


def event_at(tx: Session, position: int) -> Event | None:
    """The event at `position` in the log, or None."""
    row = tx.get(EventRow, position)
    return None if row is None else event_from_row(row)


def newest_received_at(tx: Session) -> datetime | None:
    """When the gateway received the newest event of the log (None: the log is empty)."""
    return tx.exec(select(EventRow.received_at).order_by(col(EventRow.id).desc()).limit(1)).first()


def event_from_row(row: EventRow) -> Event:
    """The stored event as consumers see it, with its log position."""
    return Event(
        id=row.ce_id,
        source=row.source,
        type=row.type,
        time=row.time,
        subject=row.subject,
        data=row.data,
        sequence=row.sequence,
        part=row.part,
        site=row.site,
        position=row.id or 0,
        received_at=row.received_at,
    )


LOG_GREW = "iotgw_log_grew"  # Session.info flag: this transaction appended events to the log
# Session.info flag set by the router: these events were handled before a replay moved the
# cursor back. A consumer rebuilds its state from them and repeats no effect (no derived
# events, no notifications): they happened already.
REPLAYING = "iotgw_replaying"


def replaying(tx: Session) -> bool:
    """Whether `tx` handles events again after a replay (their effects happened already)."""
    return bool(tx.info.get(REPLAYING))


# Log positions in commit order. PostgreSQL hands out ids when rows are inserted, not when they
# commit: with two writers, the later id can commit first, a consumer reads it and moves its
# cursor past the earlier id, which commits a moment later and is never read. Every transaction
# that appends to the log therefore takes this lock first and holds it to its commit, so ids are
# given in commit order. (SQLite has one writer at a time anyway.)
LOG_APPEND_LOCK = 0x696F74677721


INBOX_APPEND_LOCK = 0x696F74677722


def is_transient(exc: SQLAlchemyError) -> bool:
    """Whether a failed write may succeed when retried as it is (the database down, locked or
    full), as opposed to data the database refuses (a value it cannot store, a broken constraint)."""
    return not isinstance(exc, DataError | IntegrityError | ProgrammingError)


def no_nul(value: Any) -> Any:  # noqa: ANN401 - a column value
    # PostgreSQL refuses NUL in text: a dead letter must be storable whatever the device sent.
    return value.replace("\x00", "\\u0000") if isinstance(value, str) else value


def lock_log(conn: Any, lock: int = LOG_APPEND_LOCK) -> None:  # noqa: ANN401 - a Connection or a Session
    """Take the log's (or the inbox's) append lock for this transaction (PostgreSQL; nothing elsewhere)."""
    connection = conn.connection() if isinstance(conn, Session) else conn
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({lock})")


def append_event(  # noqa: PLR0913 - one argument per CloudEvents attribute
    tx: Session,
    *,
    ce_id: str,
    source: str,
    type: str,  # noqa: A002 - the CloudEvents name
    subject: str,
    time: datetime,
    site: str | None,
    data: dict[str, Any],
) -> int:
    """Append an event the gateway itself derived (an alert, a work order) to the log, in `tx`;
    returns its position.

    Such events have no device sequence (NULL never collides in the idempotency key); they
    commit with whatever caused them, and the flag on the session tells the router to wake the
    consumers after the commit.
    """  # fmt: skip
    lock_log(tx)
    row = EventRow(
        ce_id=ce_id[:200], source=source, type=type, subject=subject, time=time,
        received_at=datetime.now(UTC), sequence=None, part=0, site=site, data=data,
    )  # fmt: skip
    tx.add(row)
    tx.flush()
    tx.info[LOG_GREW] = True
    assert row.id is not None  # noqa: S101 - flushed
    return row.id


def shadow_from_row(row: DeviceRow) -> Shadow:
    """The normaliser's view of a stored device."""
    fields = {f: getattr(row, f) for f in SHADOW_FIELDS}
    fields["seq_base"] = fields["seq_base"] or 0  # rows from before counter resets were kept
    return Shadow(device_id=row.device_id, **fields)
