"""Sensor readings of a span of the log, summed up where the database can do it.

Readings are most of the log. A consumer that only needs per-device aggregates (analytics'
minute buckets, the alert engine's "who spoke, and did anything cross a limit") asks for them
here and gets a few rows back instead of every reading: on SQLite the aggregates are computed in
SQL (JSON1, in C), which costs far less CPU than decoding each reading in Python. Elsewhere
`in_sql` is False and the consumer reads the readings with `read_events`.

This is the one place that knows how a reading is laid out in the `events` table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlmodel import Session

from gateway.core.events import SENSOR_READING, Event
from gateway.core.protocol import UNIT_TYPES
from gateway.log.read import EVENT_COLUMNS, read_sql_events

_SPAN = f"FROM events WHERE id > ? AND id <= ? AND type = '{SENSOR_READING}'"
_UNIT = "json_extract(data, '$.unit')"
_VALUE = "CAST(json_extract(data, '$.value') AS REAL)"
_TYPE_OF_UNIT = (
    f"CASE {_UNIT} "
    + " ".join(f"WHEN '{unit}' THEN '{dtype}'" for unit, dtype in UNIT_TYPES.items())
    + " ELSE 'sensor' END"
)
_MINUTES = (
    "SELECT subject, minute, count(*), sum(v), min(v), max(v), max(t), max(site), min(time), max(time) FROM ("  # noqa: S608
    f"SELECT subject, site, time, CAST(strftime('%s', time) AS INTEGER) / 60 AS minute, {_VALUE} AS v, "
    f"{_TYPE_OF_UNIT} AS t {_SPAN}) GROUP BY subject, minute"
)
_SPEAKERS = (  # {beyond}: the limits' condition
    f"SELECT subject, max(received_at), max(site), max({_UNIT}), "
    f"max(CASE WHEN ({{beyond}}) THEN 1 ELSE 0 END) {_SPAN} GROUP BY subject"
)
_OF_DEVICES = f"SELECT {', '.join(EVENT_COLUMNS)} {_SPAN} AND subject IN"
_CHUNK = 500  # devices per query (SQLite's bound on parameters is far above)


def in_sql(tx: Session) -> bool:
    """Whether this database sums readings up in SQL (the functions below); else read them."""
    return tx.connection().dialect.name == "sqlite"


@dataclass(frozen=True, slots=True)
class ReadingMinute:
    """One device's readings in one minute of device time. `first` and `last` (the minute's
    earliest and latest reading time) are in the database's own text form, to be written back."""

    device_id: str
    minute: int  # minutes since the epoch
    count: int
    total: float
    low: float
    high: float
    type: str  # the sensor type its unit stands for
    site: str | None
    first: str
    last: str


def reading_minutes(tx: Session, after: int, upto: int) -> list[ReadingMinute]:
    """The readings with after < position <= upto, per device and minute (when `in_sql`)."""
    rows = tx.connection().exec_driver_sql(_MINUTES, (after, upto)).fetchall()
    return [ReadingMinute(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class Limit:
    """A reading is beyond it when its unit is one of `units` (any unit when empty) and its value
    is above `above` or below `below` (one of them)."""

    units: tuple[str, ...]
    above: float | None = None
    below: float | None = None


@dataclass(frozen=True, slots=True)
class Speaker:
    """A device that sent readings in a span: its latest reading's arrival, site and unit, and
    whether any of its readings there is beyond a limit."""

    device_id: str
    last_received: datetime
    site: str | None
    unit: str | None
    beyond: bool


def speakers(tx: Session, after: int, upto: int, limits: Sequence[Limit]) -> list[Speaker]:
    """Every device with readings in the span, in one scan of it (when `in_sql`)."""
    terms: list[str] = []
    params: list[object] = []
    for limit in limits:
        unit = f"{_UNIT} IN ({', '.join('?' * len(limit.units))}) AND " if limit.units else ""
        op, value = (">", limit.above) if limit.above is not None else ("<", limit.below)
        terms.append(f"({unit}{_VALUE} {op} ?)")
        params += [*limit.units, value]
    sql = _SPEAKERS.format(beyond=" OR ".join(terms) or "0")
    rows = tx.connection().exec_driver_sql(sql, (*params, after, upto)).fetchall()
    return [
        Speaker(device, datetime.fromisoformat(last).replace(tzinfo=UTC), site, unit, bool(over))
        for device, last, site, unit, over in rows
    ]


def readings_of(tx: Session, after: int, upto: int, devices: Sequence[str]) -> list[Event]:
    """All readings of `devices` in the span, in log order (when `in_sql`)."""
    conn = tx.connection()
    readings: list[Event] = []
    wanted = sorted(devices)
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i : i + _CHUNK]
        sql = f"{_OF_DEVICES} ({', '.join('?' * len(chunk))}) ORDER BY id"
        readings += read_sql_events(conn, sql, (after, upto, *chunk))
    readings.sort(key=lambda e: e.position)
    return readings
