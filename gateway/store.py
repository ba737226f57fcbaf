"""Durable storage: the append-only event log, device shadows and dead letters (SQLModel tables).

The hot path (`Store.append_batch`) uses Core bulk inserts in one transaction per batch:
measured here, `session.add_all` manages ~7k rows/s and an executemany insert ~50k rows/s.
SQLAlchemy errors are translated to `StoreError` here and never leak into the core.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import importlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, Self

import psycopg
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
    event,
    func,
    inspect,
    or_,
    text,
)
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from gateway.errors import ConfigError, StoreError
from gateway.events import Event
from gateway.normalize import Shadow


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, whatever the database keeps."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:  # noqa: ANN401, ARG002
        return _naive_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:  # noqa: ANN401, ARG002
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


# Log positions and device sequence numbers are 64-bit (PostgreSQL's INTEGER is 32). On SQLite the
# id stays INTEGER PRIMARY KEY, the rowid, which is what makes it a log position there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _big(*, primary_key: bool = False) -> Any:  # noqa: ANN401 - SQLModel Field
    return Field(default=None, sa_column=Column(BigId, nullable=not primary_key, primary_key=primary_key))


def datetime_field(*, index: bool = False, nullable: bool = True) -> Any:  # noqa: ANN401 - SQLModel Field
    """A column of timezone-aware UTC datetimes, the same on SQLite and PostgreSQL (for plugins' tables too)."""
    return Field(default=None, sa_column=Column(UTCDateTime(), index=index, nullable=nullable))


class EventRow(SQLModel, table=True):
    """One stored event. `id` is the log position that consumers' cursors point at."""

    __tablename__ = "events"
    __table_args__ = (
        # The idempotency key: a redelivered message maps onto the same rows.
        UniqueConstraint("subject", "sequence", "part", name="uq_events_subject_seq_part"),
        Index("ix_events_subject_id", "subject", "id"),
        Index("ix_events_type_id", "type", "id"),
    )

    id: int | None = _big(primary_key=True)
    ce_id: str = Field(sa_column=Column(String(200), nullable=False))
    source: str
    type: str
    subject: str
    time: datetime = datetime_field(index=True, nullable=False)
    received_at: datetime = datetime_field(nullable=False)
    sequence: int | None = _big()
    part: int = 0
    site: str | None = None
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class DeviceRow(SQLModel, table=True):
    """A device's shadow: last state, connectivity and bookkeeping for the normaliser."""

    __tablename__ = "devices"

    device_id: str = Field(primary_key=True)
    type: str | None = Field(default=None, index=True)
    site: str | None = Field(default=None, index=True)
    last_seq: int | None = _big()
    online: bool = False
    first_seen: datetime | None = datetime_field()
    last_seen: datetime | None = datetime_field()
    state: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    trip_from: int | None = None
    trip_started: datetime | None = datetime_field()
    fault_since: datetime | None = datetime_field()
    floor_since: datetime | None = datetime_field()
    stuck: bool = False
    # Added to the device's seq for the log: it grows at each counter reset (device.seq.reset).
    seq_base: int | None = _big()


class ConsumerCursorRow(SQLModel, table=True):
    """Where a consumer is in the log (the last position it handled), and whether it is paused."""

    __tablename__ = "consumer_cursors"

    name: str = Field(primary_key=True)
    position: int = Field(default=0, sa_column=Column(BigId, nullable=False))
    paused: bool = False
    updated_at: datetime | None = datetime_field()
    # After a replay: the position the consumer had reached before. Up to it, the events are
    # handled again to rebuild state (Session.info[REPLAYING]); their effects happened already.
    replay_until: int | None = _big()


class LeaseRow(SQLModel, table=True):
    """Who does a cluster-wide job (a consumer, the notifier, the sequencer) until `expires_at`.

    `epoch` grows with every acquisition and with every operation that must make the holder
    reload (a replay, a pause): each commit of the holder checks it (see `gateway.cluster`)."""

    __tablename__ = "leases"

    name: str = Field(primary_key=True)
    owner: str | None = None
    expires_at: datetime | None = datetime_field()
    epoch: int = Field(default=0, sa_column=Column(BigId, nullable=False))


class BrokerSessionRow(SQLModel, table=True):
    """A persistent broker session the gateway holds: the broker keeps its messages while the
    gateway is away, so a reconnect that finds none means messages may have been lost."""

    __tablename__ = "broker_sessions"

    client_id: str = Field(primary_key=True)
    broker: str = Field(primary_key=True)  # the broker's URL, without credentials
    since: datetime | None = datetime_field()


class InboxRow(SQLModel, table=True):
    """A device message an instance of a cluster accepted, waiting for the sequencer to turn it
    into events in the device's seq order (see `gateway.sequencer`)."""

    __tablename__ = "inbox"
    # AUTOINCREMENT on SQLite: the sequencer reads on from the last id it saw, and deletes what
    # it is done with; a plain rowid would hand those ids out again.
    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_inbox_device_seq"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = _big(primary_key=True)
    device_id: str
    seq: int | None = Field(default=None, sa_column=Column(BigId, nullable=True))
    topic: str
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    received_at: datetime = datetime_field(nullable=False)


@dataclass(slots=True, frozen=True)
class InboxMessage:
    """An accepted device message on its way through the inbox (`id` 0 until stored)."""

    device_id: str
    seq: int | None
    topic: str
    payload: bytes
    received_at: datetime
    id: int = 0


class ConsumerDeadLetterRow(SQLModel, table=True):
    """An event a consumer failed on `attempts` times; parked so the consumer could move on."""

    __tablename__ = "consumer_dead_letters"

    id: int | None = Field(default=None, primary_key=True)
    consumer: str = Field(index=True)
    position: int = Field(sa_column=Column(BigId, nullable=False))
    event_type: str
    subject: str
    error: str
    attempts: int
    parked_at: datetime = datetime_field(nullable=False)
    status: str = "parked"  # parked | retried
    retried_at: datetime | None = datetime_field()


class DeadLetterRow(SQLModel, table=True):
    """A rejected message, kept whole with the reason it was rejected."""

    __tablename__ = "dead_letters"

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = datetime_field(index=True, nullable=False)
    topic: str
    reason: str = Field(index=True)
    detail: str
    payload_b64: str
    size: int


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """A rejected message on its way to the dead-letter table."""

    topic: str
    reason: str
    detail: str
    payload: bytes
    received_at: datetime


@dataclass(slots=True, frozen=True)
class Stored:
    """What one batch commit wrote."""

    events_inserted: int
    events_skipped: int
    dead_letters: int


_SHADOW_FIELDS = (
    "type", "site", "last_seq", "online", "last_seen", "state",
    "trip_from", "trip_started", "fault_since", "floor_since", "stuck", "seq_base",
)  # fmt: skip


def _insert_sql(table: str, columns: Sequence[str], mark: str, conflict: str, rows: int = 1) -> str:
    """INSERT of `rows` rows; `mark` is the driver's placeholder, or `$` for PostgreSQL's own $1, $2..."""
    width = len(columns)
    if mark == "$":
        groups = (", ".join(f"${r * width + c + 1}" for c in range(width)) for r in range(rows))
    else:
        groups = (", ".join([mark] * width) for _ in range(rows))
    marks = ", ".join(f"({g})" for g in groups)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {marks} {conflict}"  # noqa: S608 - fixed names


class MultiInsert:
    """An INSERT of many rows in a few multi-row statements (chunks of 2**k rows, k <= 8).

    The driver's executemany steps the statement once per row, and the sqlite3 module lets the
    GIL go around every step: with consumer threads busy in the same process, the ingest writer
    then waited for it back at every row (measured: its inserts took twice as long with the
    consumers on). A statement of 256 rows lets it go once. Each chunk size has its own
    statement text, so the driver's statement cache keeps them all prepared.

    With mark `$` (PostgreSQL) the statements carry PostgreSQL's own numbered parameters and run
    on psycopg's RawCursor: psycopg's ordinary cursor rewrites `%s` into `$n` with a regular
    expression on every execution and caches the result only for statements of up to 50
    parameters, which made that rewrite most of an insert's cost (512 events: 38-43 ms, raw 15-19 ms).
    """

    MAX_ROWS = 256

    def __init__(self, table: str, columns: Sequence[str], mark: str, conflict: str) -> None:
        self._raw = mark == "$"
        self._sql = {n: _insert_sql(table, columns, mark, conflict, n) for n in (2**k for k in range(9))}

    def run(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert `rows` (in order); returns how many were inserted (conflicts skipped)."""
        done, inserted = 0, 0
        with _raw_cursors(conn) if self._raw else contextlib.nullcontext():
            while done < len(rows):
                n = min(self.MAX_ROWS, 1 << ((len(rows) - done).bit_length() - 1))
                params = tuple(v for row in rows[done : done + n] for v in row)
                inserted += max(conn.exec_driver_sql(self._sql[n], params).rowcount, 0)
                done += n
        return inserted


@contextmanager
def _raw_cursors(conn: Connection) -> Iterator[None]:
    """While inside: the psycopg connection under `conn` makes RawCursors (SQL with $n parameters,
    passed as they are); SQLAlchemy still runs the statements (its errors, events, rowcount)."""
    driver = conn.connection.driver_connection
    before = driver.cursor_factory  # type: ignore[union-attr]
    driver.cursor_factory = psycopg.RawCursor  # type: ignore[union-attr]
    try:
        yield
    finally:
        driver.cursor_factory = before  # type: ignore[union-attr]


def _naive_utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC).replace(tzinfo=None) if value is not None and value.tzinfo else value


def _sqlite_dt(value: datetime | None) -> str | None:
    # The text form SQLAlchemy's SQLite DateTime writes and reads back.
    naive = _naive_utc(value)
    return None if naive is None else naive.isoformat(" ", "microseconds")


def _table(model: type[SQLModel]) -> Table:
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)  # noqa: S101 - every table=True model has one
    return table


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
    table = _table(EventRow)
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


def upsert(tx: Session, model: type[SQLModel], rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Insert `rows` or update them where their `keys` exist: one executemany, no SELECT per row.

    (`Session.merge` reads every row before writing it: most of the alert engine's time at 5,000
    devices, found with py-spy.) SQLite and PostgreSQL both have ON CONFLICT ... DO UPDATE.
    """
    if not rows:
        return
    table = _table(model)
    insert_for = pg_insert if tx.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert_for(table)
    update = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    tx.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=update), list(rows))


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


def _transient(exc: SQLAlchemyError) -> bool:
    """Whether a failed write may succeed when retried as it is (the database down, locked or
    full), as opposed to data the database refuses (a value it cannot store, a broken constraint)."""
    return not isinstance(exc, DataError | IntegrityError | ProgrammingError)


def _no_nul(value: Any) -> Any:  # noqa: ANN401 - a column value
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
    fields = {f: getattr(row, f) for f in _SHADOW_FIELDS}
    fields["seq_base"] = fields["seq_base"] or 0  # rows from before counter resets were kept
    return Shadow(device_id=row.device_id, **fields)


def _sqlite_pragmas(synchronous: str) -> Callable[[DBAPIConnection, ConnectionPoolEntry], None]:
    def apply(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers (API, consumers) never block the writer
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return apply


def _attach_gate(gate: threading.Lock, dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    if isinstance(dbapi_conn, _GatedConnection):
        dbapi_conn.gate = gate


def _pg_settings(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # As SQLite's busy_timeout: a lock held elsewhere (a migration, a backup tool) makes a write
    # fail after 10 s instead of hanging, so ingest reports it and retries, holding the acks.
    cur = dbapi_conn.cursor()
    cur.execute("SET lock_timeout = '10s'")
    cur.close()
    dbapi_conn.commit()


BUSY_TIMEOUT_S = 10.0
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLAC")
_GATES: dict[str, threading.Lock] = {}
_GATES_LOCK = threading.Lock()


class _GatedConnection(sqlite3.Connection):
    """A SQLite connection that queues for its database's write lock in Python first.

    SQLite lets one connection write at a time; the others wait in its busy handler, which
    sleeps 1, 2, 5, 10, 15... ms between tries, however soon the lock is free again. With the
    consumers writing in the ingest process, the ingest writer's first insert of a batch took
    twice as long at the median for that reason. The connections of one process to one file
    therefore take a shared lock at a transaction's first write and give it back after its
    commit or rollback: the next writer goes on the moment the lock is released. Other
    processes still meet SQLite's own locking; a gate not had within the busy timeout (a hung
    transaction) is passed by, and SQLite decides as before.
    """

    gate: threading.Lock | None = None
    holding = False

    def cursor(self, factory: Any = None) -> Any:  # noqa: ANN401 - the sqlite3 signature
        return super().cursor(factory or _GatedCursor)

    def enter(self, statement: str) -> None:
        """Before `statement`: a write outside a transaction of ours waits for the gate."""
        if self.holding or self.gate is None or statement.lstrip()[:6].upper() not in _WRITES:
            return
        self.holding = self.gate.acquire(timeout=BUSY_TIMEOUT_S)

    def leave(self) -> None:
        """Give the gate back once no transaction is open (after a commit, a rollback, an error)."""
        if self.holding and not self.in_transaction:
            self._release()

    def _release(self) -> None:
        if self.holding and self.gate is not None:
            self.holding = False
            self.gate.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.leave()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.leave()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()  # a closed connection has no transaction to ask about


class _GatedCursor(sqlite3.Cursor):
    def execute(self, sql: str, parameters: Any = (), /) -> Self:  # noqa: ANN401 - the sqlite3 signature
        return self._gated(super().execute, sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> Self:  # noqa: ANN401
        return self._gated(super().executemany, sql, seq_of_parameters)

    def _gated(self, run: Callable[[str, Any], object], sql: str, parameters: Any) -> Self:  # noqa: ANN401
        conn = self.connection
        assert isinstance(conn, _GatedConnection)  # noqa: S101 - made by its cursor()
        conn.enter(sql)
        try:
            run(sql, parameters)
            return self
        finally:
            conn.leave()


def _write_gate(path: str) -> threading.Lock:
    with _GATES_LOCK:
        return _GATES.setdefault(str(Path(path).resolve()), threading.Lock())


def make_engine(url: str, *, durable: bool = True) -> Engine:
    """An engine for `url`; SQLite gets WAL mode. Only SQLite and PostgreSQL are supported.

    `durable` (SQLite): synchronous=FULL, so a commit survives a power cut; ingest needs that,
    because it acknowledges to the broker after the commit. Consumers use NORMAL (still atomic,
    and safe against a process crash): a power cut can at worst undo their last commits, effects
    and cursor together, and they redo that work from the log.
    """
    try:
        if url.startswith("sqlite"):
            engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S, "factory": _GatedConnection}
            )
            event.listen(engine, "connect", _sqlite_pragmas("FULL" if durable else "NORMAL"))
            database = engine.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                event.listen(engine, "connect", functools.partial(_attach_gate, _write_gate(database)))
        elif url.startswith("postgresql"):
            engine = create_engine(url, pool_pre_ping=True)
            event.listen(engine, "connect", _pg_settings)
        else:
            msg = f"unsupported database_url {url!r}: use sqlite:///path or postgresql+psycopg://..."
            raise ConfigError(msg)
    except SQLAlchemyError as exc:
        msg = f"cannot use database {url!r}: {exc}"
        raise ConfigError(msg) from exc
    return engine


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SCHEMA_LOCK = 0x696F74677722


def _migrate(conn: Connection) -> None:
    """Bring the schema to the newest revisions: the platform's (gateway/migrations) and every
    installed plugin's branch. A database made before migrations existed (tables, no
    alembic_version) is completed the old way (missing tables created, nullable columns added:
    which is all the revisions so far do) and marked as the newest revisions."""
    branches = _plugin_migrations()
    config = alembic_config(conn, branches)
    tables = set(inspect(conn).get_table_names())
    if tables & set(SQLModel.metadata.tables) and "alembic_version" not in tables:
        SQLModel.metadata.create_all(conn)
        _add_missing_columns(conn)
        alembic_command.stamp(config, "heads")
    elif "alembic_version" in tables:
        _adopt_plugin_tables(conn, config, branches, tables)
    alembic_command.upgrade(config, "heads")


def alembic_config(conn: Connection, branches: dict[str, Any] | None = None) -> AlembicConfig:
    """Alembic's configuration on `conn`: the platform's revisions and every plugin branch's."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    branches = _plugin_migrations() if branches is None else branches
    locations = [str(MIGRATIONS / "versions"), *(str(files(pkg) / "versions") for pkg in branches)]
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", os.pathsep.join(locations))
    config.attributes["connection"] = conn
    return config


def _plugin_migrations() -> dict[str, Any]:
    """The installed plugins' migration packages (imported), by package name."""
    from gateway.plugins import plugin_classes  # noqa: PLC0415 - plugins load when the schema is made

    names = [cls.migrations for cls in plugin_classes().values() if cls.migrations]
    return {name: importlib.import_module(name) for name in names}


def _adopt_plugin_tables(conn: Connection, config: AlembicConfig, branches: dict[str, Any], tables: set[str]) -> None:
    """A database whose plugin tables came with the platform's revisions, before the plugin had a
    branch of its own: stamp that branch at the revision its tables are at (`ADOPTED_AT`), so its
    later revisions run and its first ones do not run again."""
    versions = {row[0] for row in conn.exec_driver_sql("SELECT version_num FROM alembic_version")}
    if len(versions) != 1:
        return  # a database of the branches already: each branch has a row of its own
    (platform,) = versions
    for module in branches.values():
        adopted = getattr(module, "ADOPTED_AT", {}).get(platform)
        if adopted and getattr(module, "ADOPTED_IF_TABLE", None) in tables:
            alembic_command.stamp(config, adopted)


def _add_missing_columns(conn: Connection) -> None:
    """Add the nullable columns later pre-migration versions brought to tables an older one created."""
    existing = inspect(conn)
    for table in SQLModel.metadata.sorted_tables:
        if not existing.has_table(table.name):
            continue
        have = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable:
                msg = f"table {table.name} lacks column {column.name}: this database needs a migration"
                raise StoreError(msg)
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """On an SQLite file, an exclusive flock on `<file>.schema-lock` while the schema is migrated:
    gateways starting together take turns. (Not on the database file itself: closing any
    descriptor of it would drop SQLite's own POSIX locks held by this process.)"""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    with Path(f"{path}.schema-lock").open("ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Store:
    """The event log and device registry on one SQLAlchemy engine."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        # Consumers' own engine (see make_engine); on PostgreSQL simply the same one.
        self.consumer_engine = make_engine(url, durable=False) if url.startswith("sqlite") else self.engine
        dialect = self.engine.dialect
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        bulk = "?" if dialect.paramstyle == "qmark" else "$"  # MultiInsert's placeholders
        # SQLite keeps datetimes as text in SQLAlchemy's format; other drivers take datetimes.
        self._dt_param = _sqlite_dt if dialect.name == "sqlite" else _naive_utc
        self._insert_events = MultiInsert(
            "events",
            ("ce_id", "source", "type", "subject", "time", "received_at", "sequence", "part", "site", "data"),
            bulk,
            "ON CONFLICT (subject, sequence, part) DO NOTHING",
        )
        shadow_cols = ("device_id", *_SHADOW_FIELDS, "first_seen")
        # first_seen is kept from the first insert; everything else is the new shadow.
        update = ", ".join(f"{c} = excluded.{c}" for c in _SHADOW_FIELDS)
        self._upsert_devices = MultiInsert(
            "devices", shadow_cols, bulk, f"ON CONFLICT (device_id) DO UPDATE SET {update}"
        )
        self._dead_rows = MultiInsert(
            "dead_letters", ("received_at", "topic", "reason", "detail", "payload_b64", "size"), bulk, ""
        )
        self._sql_inbox = _insert_sql(
            "inbox",
            ("device_id", "seq", "topic", "payload", "received_at"),
            mark,
            "ON CONFLICT (device_id, seq) DO NOTHING",
        )

    def create_schema(self) -> None:
        """Create or migrate the schema to this version (Alembic, gateway/migrations), then create the
        tables of consumers from other packages, which migrations do not know (idempotent)."""
        try:
            with _sqlite_file_lock(self.engine), self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # Several gateways starting at once: one migrates, the others wait for it.
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
                _migrate(conn)
                SQLModel.metadata.create_all(conn)
        except SQLAlchemyError as exc:
            msg = f"cannot create the schema in {self.url}: {exc}"
            raise StoreError(msg) from exc

    def probe_write(self) -> None:
        """Whether a write to the log could commit now, without writing: SQLite's write lock taken
        and given back (waiting up to its busy timeout); on PostgreSQL a read-write transaction
        that gets the lock an insert into the log takes (waiting up to the lock timeout). Raises
        `StoreError` (transient) when not."""
        try:
            with self.engine.connect() as conn:
                if conn.dialect.name == "sqlite":
                    dbapi = conn.connection.dbapi_connection
                    assert dbapi is not None  # noqa: S101 - a live pooled connection
                    dbapi.execute("BEGIN IMMEDIATE")
                    dbapi.rollback()
                    return
                with conn.begin() as tx:
                    if conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "on":
                        msg = "the database is read-only (a standby, or default_transaction_read_only)"
                        raise StoreError(msg)
                    conn.exec_driver_sql("LOCK TABLE events IN ROW EXCLUSIVE MODE")
                    tx.rollback()
        except SQLAlchemyError as exc:
            msg = f"cannot write to the database: {exc}"
            raise StoreError(msg) from exc
        except sqlite3.Error as exc:
            msg = f"cannot write to the database: {exc}"
            raise StoreError(msg) from exc

    def had_broker_session(self, client_id: str, broker: str) -> bool:
        """Whether the gateway held a persistent session as `client_id` on `broker` before."""
        with self.session() as tx:
            return tx.get(BrokerSessionRow, (client_id, broker)) is not None

    def note_broker_session(self, client_id: str, broker: str, since: datetime) -> None:
        """Remember that the gateway holds a persistent session as `client_id` on `broker`."""
        with self.session() as tx:
            row = {"client_id": client_id, "broker": broker, "since": since}
            upsert(tx, BrokerSessionRow, [row], ["client_id", "broker"])
            tx.commit()

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()
        self.consumer_engine.dispose()

    @contextmanager
    def session(self, *, consumer: bool = False) -> Iterator[Session]:
        """A session whose SQLAlchemy errors surface as `StoreError` (`consumer`: on the consumers' engine)."""
        try:
            with Session(self.consumer_engine if consumer else self.engine) as s:
                yield s
        except SQLAlchemyError as exc:
            msg = f"database error: {exc}"
            raise StoreError(msg) from exc

    def ping(self) -> None:
        """Raise `StoreError` unless the database answers."""
        with self.session() as s:
            s.exec(text("SELECT 1"))  # type: ignore[call-overload]

    def load_shadows(self) -> dict[str, Shadow]:
        """Every device's shadow, for the ingest cache at start."""
        with self.session() as s:
            return {r.device_id: shadow_from_row(r) for r in s.exec(select(DeviceRow))}

    def append_batch(  # noqa: PLR0913
        self,
        events: Sequence[Event],
        shadows: Sequence[Shadow],
        dead: Sequence[DeadLetter],
        *,
        now: datetime,
        inbox_done: Sequence[int] = (),
        fence: Callable[[Connection], None] | None = None,
    ) -> Stored:
        """Append events, upsert shadows and store dead letters in ONE transaction.

        Events, shadows and dead letters go in multi-row statements (MultiInsert) with values
        converted here: measured on a 30,000-message drain, SQLAlchemy's per-parameter processing
        was a third of the writer's time.
        """
        dt = self._dt_param
        event_rows = [
            (e.id, e.source, e.type, e.subject, dt(e.time), dt(now), e.sequence, e.part, e.site, json.dumps(e.data))
            for e in events
        ]
        device_rows = [
            (
                sh.device_id, sh.type, sh.site, sh.last_seq, sh.online, dt(sh.last_seen), json.dumps(sh.state),
                sh.trip_from, dt(sh.trip_started), dt(sh.fault_since), dt(sh.floor_since), sh.stuck, sh.seq_base,
                dt(now),
            )
            for sh in shadows
        ]  # fmt: skip
        try:
            with self.engine.begin() as conn:
                if fence is not None:
                    fence(conn)
                inserted = 0
                if event_rows:
                    lock_log(conn)
                    inserted = self._insert_events.run(conn, event_rows)
                if device_rows:
                    self._upsert_devices.run(conn, device_rows)
                if dead:
                    self._insert_dead(conn, dead)
                if inbox_done:
                    inbox = _table(InboxRow)
                    conn.execute(inbox.delete().where(inbox.c.id.in_(list(inbox_done))))
        except SQLAlchemyError as exc:
            msg = f"batch commit failed: {exc}"
            raise StoreError(msg, transient=_transient(exc)) from exc
        inserted = max(inserted, 0)
        return Stored(inserted, len(event_rows) - inserted, len(dead))

    def append_inbox(self, messages: Sequence[InboxMessage], dead: Sequence[DeadLetter]) -> int:
        """A cluster instance's batch: accepted messages into the sequencer's inbox (a redelivered
        one is stored once) and dead letters, in one transaction; returns the messages inserted."""
        dt = self._dt_param
        rows = [(m.device_id, m.seq, m.topic, m.payload, dt(m.received_at)) for m in messages]
        try:
            with self.engine.begin() as conn:
                inserted = 0
                if rows:
                    # Inbox ids in commit order too: the sequencer reads on from the last id it saw.
                    lock_log(conn, INBOX_APPEND_LOCK)
                    inserted = conn.exec_driver_sql(self._sql_inbox, rows).rowcount
                if dead:
                    self._insert_dead(conn, dead)
        except SQLAlchemyError as exc:
            msg = f"batch commit failed: {exc}"
            raise StoreError(msg, transient=_transient(exc)) from exc
        return max(inserted, 0)

    def _insert_dead(self, conn: Connection, dead: Sequence[DeadLetter]) -> None:
        # Values converted here and multi-row statements, like events: a flooding device's dead
        # letters (hundreds a second) must cost the database and the interpreter lock little.
        fields = ("topic", "reason", "detail", "payload_b64", "size")
        rows = [(self._dt_param(r["received_at"]), *(_no_nul(r[k]) for k in fields)) for r in map(_dead_row, dead)]
        self._dead_rows.run(conn, rows)

    def inbox_size(self) -> int:
        """How many messages wait in the cluster's inbox."""
        with self.session() as s:
            return int(s.exec(select(func.count()).select_from(InboxRow)).one())

    def read_inbox(self, after: int, limit: int) -> list[InboxMessage]:
        """Inbox messages with ids above `after`, oldest first."""
        stmt = select(InboxRow).where(col(InboxRow.id) > after).order_by(col(InboxRow.id)).limit(limit)
        with self.session() as s:
            return [
                InboxMessage(r.device_id, r.seq, r.topic, bytes(r.payload), r.received_at, r.id or 0)
                for r in s.exec(stmt)
            ]

    def count_dead_letters(self) -> int:
        """How many rejected messages the dead-letter store holds."""
        with self.session() as s:
            return int(s.exec(select(func.count()).select_from(DeadLetterRow)).one())

    def count_events(self, event_type: str | None = None) -> int:
        """How many events (of one type) the log holds."""
        stmt = select(func.count()).select_from(EventRow)
        if event_type is not None:
            stmt = stmt.where(col(EventRow.type) == event_type)
        with self.session() as s:
            return int(s.exec(stmt).one())


def _dead_row(d: DeadLetter) -> dict[str, Any]:
    return {
        "received_at": d.received_at,
        "topic": d.topic,
        "reason": d.reason,
        "detail": d.detail[:1000],
        "payload_b64": base64.b64encode(d.payload).decode("ascii"),
        "size": len(d.payload),
    }


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
