"""The platform's tables: the log (`events`), device shadows, dead letters, consumers' cursors and
parked events, leases, broker sessions, the cluster's inbox; and the column types plugins use too."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from gateway.log.sql import naive_utc


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, whatever the database keeps."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:  # noqa: ANN401, ARG002
        return naive_utc(value)

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
    reload (a replay, a pause): each commit of the holder checks it (see `gateway.runtime.leases`)."""

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
    into events in the device's seq order (see `gateway.runtime.sequencer`)."""

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
