"""Dialect plumbing and bulk SQL: multi-row inserts on the raw DB-API, upserts, the advisory locks
that keep log positions in commit order, and the engines (SQLite pragmas and the write gate)."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import psycopg
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    event,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel import Session, SQLModel, create_engine

from gateway.errors import ConfigError

SHADOW_FIELDS = (
    "type", "site", "last_seq", "online", "last_seen", "state",
    "trip_from", "trip_started", "fault_since", "floor_since", "stuck", "seq_base",
)  # fmt: skip


def insert_sql(table: str, columns: Sequence[str], mark: str, conflict: str, rows: int = 1) -> str:
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
        self._sql = {n: insert_sql(table, columns, mark, conflict, n) for n in (2**k for k in range(9))}

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


def naive_utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC).replace(tzinfo=None) if value is not None and value.tzinfo else value


def sqlite_dt(value: datetime | None) -> str | None:
    # The text form SQLAlchemy's SQLite DateTime writes and reads back.
    if value is not None and value.tzinfo is UTC:  # the usual case, without a conversion
        return value.isoformat(" ", "microseconds")[:-6]  # less its "+00:00"
    naive = naive_utc(value)
    return None if naive is None else naive.isoformat(" ", "microseconds")


def table_of(model: type[SQLModel]) -> Table:
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)  # noqa: S101 - every table=True model has one
    return table


def upsert(tx: Session, model: type[SQLModel], rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Insert `rows` or update them where their `keys` exist: one executemany, no SELECT per row.

    (`Session.merge` reads every row before writing it: most of the alert engine's time at 5,000
    devices, found with py-spy.) SQLite and PostgreSQL both have ON CONFLICT ... DO UPDATE.
    """
    if not rows:
        return
    table = table_of(model)
    insert_for = pg_insert if tx.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert_for(table)
    update = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    tx.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=update), list(rows))


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


def _pg_settings(idle_s: float | None, dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # As SQLite's busy_timeout: a lock held elsewhere (a migration, a backup tool) makes a write
    # fail after 10 s instead of hanging, so ingest reports it and retries, holding the acks.
    cur = dbapi_conn.cursor()
    cur.execute("SET lock_timeout = '10s'")
    if idle_s:
        # A process that stops in the middle of a transaction (frozen, swapped out, stuck in a
        # debugger) would hold its locks for as long as it is stopped, and every other instance's
        # writes to the log would wait for it. The server ends such a transaction after `idle_s`;
        # the process finds its connection gone when it resumes, and nothing stale commits.
        cur.execute(f"SET idle_in_transaction_session_timeout = '{int(idle_s * 1000)}ms'")
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


def write_gate(path: str) -> threading.Lock:
    with _GATES_LOCK:
        return _GATES.setdefault(str(Path(path).resolve()), threading.Lock())


def make_engine(url: str, *, durable: bool = True, idle_in_transaction_s: float | None = None) -> Engine:
    """An engine for `url`; SQLite gets WAL mode. Only SQLite and PostgreSQL are supported.

    `durable` (SQLite): synchronous=FULL, so a commit survives a power cut; ingest needs that,
    because it acknowledges to the broker after the commit. Consumers use NORMAL (still atomic,
    and safe against a process crash): a power cut can at worst undo their last commits, effects
    and cursor together, and they redo that work from the log.

    `idle_in_transaction_s` (PostgreSQL): the longest a transaction may wait between two of its
    statements before the server ends it (see `_pg_settings`); None: no bound.
    """
    try:
        if url.startswith("sqlite"):
            engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S, "factory": _GatedConnection}
            )
            event.listen(engine, "connect", _sqlite_pragmas("FULL" if durable else "NORMAL"))
            database = engine.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                event.listen(engine, "connect", functools.partial(_attach_gate, write_gate(database)))
        elif url.startswith("postgresql"):
            engine = create_engine(url, pool_pre_ping=True)
            event.listen(engine, "connect", functools.partial(_pg_settings, idle_in_transaction_s))
        else:
            msg = f"unsupported database_url {url!r}: use sqlite:///path or postgresql+psycopg://..."
            raise ConfigError(msg)
    except SQLAlchemyError as exc:
        msg = f"cannot use database {url!r}: {exc}"
        raise ConfigError(msg) from exc
    return engine
