"""The `Store`: one database, its engines, and the operations on it the gateway's parts use (the
hot path `append_batch`: Core bulk inserts, one transaction per batch). SQLAlchemy errors are
translated to `StoreError` here and never leak into the core."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import (
    Connection,
    func,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, SQLModel, col, select

from gateway.core.events import Event
from gateway.core.normalize import Shadow
from gateway.errors import StoreError
from gateway.log.read import INBOX_APPEND_LOCK, is_transient, lock_log, no_nul, shadow_from_row
from gateway.log.schema import SCHEMA_LOCK, migrate_schema, sqlite_file_lock
from gateway.log.sql import (
    SHADOW_FIELDS,
    MultiInsert,
    insert_sql,
    make_engine,
    naive_utc,
    sqlite_dt,
    table_of,
    upsert,
)
from gateway.log.tables import (
    BrokerSessionRow,
    DeadLetter,
    DeadLetterRow,
    DeviceRow,
    EventRow,
    InboxMessage,
    InboxRow,
    Stored,
)


class Store:
    """The event log and device registry on one SQLAlchemy engine."""

    def __init__(self, url: str, *, idle_in_transaction_s: float | None = None) -> None:
        self.url = url
        self.engine = make_engine(url, idle_in_transaction_s=idle_in_transaction_s)
        # Consumers' own engine (see make_engine); on PostgreSQL simply the same one.
        self.consumer_engine = make_engine(url, durable=False) if url.startswith("sqlite") else self.engine
        dialect = self.engine.dialect
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        bulk = "?" if dialect.paramstyle == "qmark" else "$"  # MultiInsert's placeholders
        # SQLite keeps datetimes as text in SQLAlchemy's format; other drivers take datetimes.
        self._dt_param = sqlite_dt if dialect.name == "sqlite" else naive_utc
        self._insert_events = MultiInsert(
            "events",
            ("ce_id", "source", "type", "subject", "time", "received_at", "sequence", "part", "site", "data"),
            bulk,
            "ON CONFLICT (subject, sequence, part) DO NOTHING",
        )
        shadow_cols = ("device_id", *SHADOW_FIELDS, "first_seen")
        # first_seen is kept from the first insert; everything else is the new shadow.
        update = ", ".join(f"{c} = excluded.{c}" for c in SHADOW_FIELDS)
        self._upsert_devices = MultiInsert(
            "devices", shadow_cols, bulk, f"ON CONFLICT (device_id) DO UPDATE SET {update}"
        )
        self._dead_rows = MultiInsert(
            "dead_letters", ("received_at", "topic", "reason", "detail", "payload_b64", "size"), bulk, ""
        )
        self._sql_inbox = insert_sql(
            "inbox",
            ("device_id", "seq", "topic", "payload", "received_at"),
            mark,
            "ON CONFLICT (device_id, seq) DO NOTHING",
        )

    def create_schema(self) -> None:
        """Create or migrate the schema to this version (Alembic, gateway/migrations), then create the
        tables of consumers from other packages, which migrations do not know (idempotent)."""
        try:
            with sqlite_file_lock(self.engine), self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # Several gateways starting at once: one migrates, the others wait for it.
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
                migrate_schema(conn)
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
        dt, js = self._dt_param, _json
        at = dt(now)
        event_rows = [
            (e.id, e.source, e.type, e.subject, dt(e.time), at, e.sequence, e.part, e.site, js(e.data)) for e in events
        ]
        device_rows = [
            (
                sh.device_id, sh.type, sh.site, sh.last_seq, sh.online, dt(sh.last_seen), js(sh.state),
                sh.trip_from, dt(sh.trip_started), dt(sh.fault_since), dt(sh.floor_since), sh.stuck, sh.seq_base,
                at,
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
                    inbox = table_of(InboxRow)
                    conn.execute(inbox.delete().where(inbox.c.id.in_(list(inbox_done))))
        except SQLAlchemyError as exc:
            msg = f"batch commit failed: {exc}"
            raise StoreError(msg, transient=is_transient(exc)) from exc
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
            raise StoreError(msg, transient=is_transient(exc)) from exc
        return max(inserted, 0)

    def _insert_dead(self, conn: Connection, dead: Sequence[DeadLetter]) -> None:
        # Values converted here and multi-row statements, like events: a flooding device's dead
        # letters (hundreds a second) must cost the database and the interpreter lock little.
        fields = ("topic", "reason", "detail", "payload_b64", "size")
        rows = [(self._dt_param(r["received_at"]), *(no_nul(r[k]) for k in fields)) for r in map(_dead_row, dead)]
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


_ENCODER = msgspec.json.Encoder()


def _json(value: dict[str, Any]) -> str:
    """An event's data or a device's state as JSON text (msgspec: several times json.dumps's speed)."""
    return _ENCODER.encode(value).decode()


def _dead_row(d: DeadLetter) -> dict[str, Any]:
    return {
        "received_at": d.received_at,
        "topic": d.topic,
        "reason": d.reason,
        "detail": d.detail[:1000],
        "payload_b64": base64.b64encode(d.payload).decode("ascii"),
        "size": len(d.payload),
    }
