"""Durable storage: the append-only event log, device shadows and dead letters, and their schema.

The one import path for all of it; the parts live in `gateway/log/`, a module a job:
`tables` (the platform's tables and column types), `sql` (dialect plumbing, bulk SQL, engines),
`read` (the log as consumers read and append to it), `spans` (sensor readings of a span summed
up in SQL), `schema` (migrations at start), `store`
(the `Store` and its hot path) and `queries` (the HTTP API's reads).
"""

from __future__ import annotations

from gateway.log.queries import EventQuery, get_device, list_dead_letters, list_devices, list_events, recent_events
from gateway.log.read import (
    EVENT_COLUMNS,
    INBOX_APPEND_LOCK,
    LOG_APPEND_LOCK,
    LOG_GREW,
    REPLAYING,
    append_event,
    batch_end,
    cloudevent_of,
    event_at,
    event_from_row,
    lock_log,
    newest_received_at,
    read_events,
    read_sql_events,
    replaying,
    shadow_from_row,
    type_filter,
)
from gateway.log.schema import MIGRATIONS, SCHEMA_LOCK, alembic_config
from gateway.log.sql import BUSY_TIMEOUT_S, MultiInsert, make_engine, upsert, write_gate
from gateway.log.store import Store
from gateway.log.tables import (
    BrokerSessionRow,
    ConsumerCursorRow,
    ConsumerDeadLetterRow,
    DeadLetter,
    DeadLetterRow,
    DeviceRow,
    EventRow,
    InboxMessage,
    InboxRow,
    LeaseRow,
    Stored,
    UTCDateTime,
    datetime_field,
)

__all__ = [
    "BUSY_TIMEOUT_S",
    "EVENT_COLUMNS",
    "INBOX_APPEND_LOCK",
    "LOG_APPEND_LOCK",
    "LOG_GREW",
    "MIGRATIONS",
    "REPLAYING",
    "SCHEMA_LOCK",
    "BrokerSessionRow",
    "ConsumerCursorRow",
    "ConsumerDeadLetterRow",
    "DeadLetter",
    "DeadLetterRow",
    "DeviceRow",
    "EventQuery",
    "EventRow",
    "InboxMessage",
    "InboxRow",
    "LeaseRow",
    "MultiInsert",
    "Store",
    "Stored",
    "UTCDateTime",
    "alembic_config",
    "append_event",
    "batch_end",
    "cloudevent_of",
    "datetime_field",
    "event_at",
    "event_from_row",
    "get_device",
    "list_dead_letters",
    "list_devices",
    "list_events",
    "lock_log",
    "make_engine",
    "newest_received_at",
    "read_events",
    "read_sql_events",
    "recent_events",
    "replaying",
    "shadow_from_row",
    "type_filter",
    "upsert",
    "write_gate",
]
