"""The analytics consumer: trips, door cycles, availability, MTBF/MTTR, entrapments, sensor windows.

Its tables are derived state: `Analytics.reset` empties them and a replay from the start of the
log rebuilds the same figures (the router commits these writes together with the cursor).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Column, delete, func
from sqlmodel import Field, Session, SQLModel, col, select

from gateway.core import events as ev
from gateway.core.events import Event
from gateway.core.protocol import sensor_type_of
from gateway.log import MultiInsert, Store, datetime_field, newest_received_at, read_events, spans
from gateway.runtime import BaseConsumer

if TYPE_CHECKING:
    from analytics.plugin import AnalyticsFamilies

WINDOWS = {"1h": 60, "24h": 24 * 60}  # minutes


class AnalyticsDeviceRow(SQLModel, table=True):
    """Running figures for one device."""

    __tablename__ = "analytics_devices"

    device_id: str = Field(primary_key=True)
    type: str | None = None
    site: str | None = Field(default=None, index=True)
    trips: int = 0
    floors: int = 0
    door_cycles: int = 0
    faults: int = 0
    faults_by_code: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    faults_cleared: int = 0
    fault_seconds: float = 0.0
    entrapments: int = 0
    mode: str | None = None
    mode_since: datetime | None = datetime_field()
    mode_seconds: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    first_time: datetime | None = datetime_field()
    last_time: datetime | None = datetime_field()


class AnalyticsSensorMinuteRow(SQLModel, table=True):
    """One minute of one sensor's readings (for rolling windows)."""

    __tablename__ = "analytics_sensor_minutes"

    device_id: str = Field(primary_key=True)
    minute: int = Field(primary_key=True)  # epoch minutes of the reading's device time
    count: int = 0
    total: float = 0.0
    vmin: float = 0.0
    vmax: float = 0.0


_MINUTE_UPSERT = (
    "INSERT INTO analytics_sensor_minutes (device_id, minute, count, total, vmin, vmax) "
    "VALUES ({m}, {m}, {m}, {m}, {m}, {m}) "
    "ON CONFLICT (device_id, minute) DO UPDATE SET count = analytics_sensor_minutes.count + excluded.count, "
    "total = analytics_sensor_minutes.total + excluded.total, "
    "vmin = CASE WHEN excluded.vmin < analytics_sensor_minutes.vmin THEN excluded.vmin "
    "ELSE analytics_sensor_minutes.vmin END, "
    "vmax = CASE WHEN excluded.vmax > analytics_sensor_minutes.vmax THEN excluded.vmax "
    "ELSE analytics_sensor_minutes.vmax END"
)


_MINUTES = MultiInsert(
    "analytics_sensor_minutes",
    ("device_id", "minute", "count", "total", "vmin", "vmax"),
    "?",
    _MINUTE_UPSERT[_MINUTE_UPSERT.index("ON CONFLICT") :],
)
_SENSORS = MultiInsert(
    "analytics_devices",
    ("device_id", "type", "site", "trips", "floors", "door_cycles", "faults", "faults_by_code", "faults_cleared",
     "fault_seconds", "entrapments", "mode_seconds", "first_time", "last_time"),
    "?",
    "ON CONFLICT (device_id) DO UPDATE SET site = coalesce(excluded.site, analytics_devices.site), "
    "last_time = CASE WHEN analytics_devices.last_time IS NULL OR excluded.last_time > analytics_devices.last_time "
    "THEN excluded.last_time ELSE analytics_devices.last_time END",
)  # fmt: skip


class Analytics(BaseConsumer):
    """Elevator KPIs and sensor aggregates, per device (sites are summed at query time)."""

    name = "analytics"
    # Sensor readings, most of the log, are not read row by row: handle_span aggregates them.
    types = ("device.discovered", "elevator.*")
    replay_resets_state = True
    batch_size = 2000
    linger_s = 0.5  # KPIs need no sub-second freshness; fewer commits cost ingestion less

    def reset(self, tx: Session) -> None:
        """Forget every figure; a replay from the start rebuilds them."""
        tx.exec(delete(AnalyticsDeviceRow))
        tx.exec(delete(AnalyticsSensorMinuteRow))

    def handle(self, events: Sequence[Event], tx: Session) -> None:
        """Fold a batch of events into the figures."""
        subjects = {e.subject for e in events if e.type != ev.SENSOR_READING}
        rows: dict[str, AnalyticsDeviceRow] = {}
        if subjects:
            found = tx.exec(select(AnalyticsDeviceRow).where(col(AnalyticsDeviceRow.device_id).in_(subjects)))
            rows = {r.device_id: r for r in found}
        minutes: dict[tuple[str, int], list[float]] = {}
        sensors: dict[str, Event] = {}
        for e in events:
            if e.type == ev.SENSOR_READING:
                value = float(e.data["value"])
                key = (e.subject, int(e.time.timestamp()) // 60)
                agg = minutes.get(key)
                minutes[key] = [1, value, value, value] if agg is None else [
                    agg[0] + 1, agg[1] + value, min(agg[2], value), max(agg[3], value),
                ]  # fmt: skip
                sensors[e.subject] = e
                continue
            row = rows.get(e.subject)
            if row is None:
                row = rows[e.subject] = AnalyticsDeviceRow(device_id=e.subject, type="elevator", site=e.site)
            _apply(row, e)
        for row in rows.values():
            tx.add(row)
        if minutes:
            conn = tx.connection()
            mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
            conn.exec_driver_sql(
                _MINUTE_UPSERT.format(m=mark), [(d, m, a[0], a[1], a[2], a[3]) for (d, m), a in minutes.items()]
            )
        self._touch_sensors(tx, sensors)

    def handle_span(self, tx: Session, after: int, upto: int) -> None:
        """Fold the sensor readings with after < position <= upto into the minute buckets.

        On SQLite aggregated in SQL (JSON1, in C): readings are most of the log, and reading each
        into Python would take the CPU ingestion needs. The aggregates are read first and written
        after: SQLite takes its one write lock at a transaction's first write, and an INSERT ...
        SELECT would hold it while scanning the span, stalling ingestion's commits. Elsewhere,
        the rows go through `handle`.
        """
        if not spans.in_sql(tx):
            readings = read_events(tx, after, upto, (ev.SENSOR_READING,))
            if readings:
                self.handle(readings, tx)
            return
        minutes = spans.reading_minutes(tx, after, upto)
        sensors: dict[str, tuple[str, str | None, str, str]] = {}
        for m in minutes:
            seen = sensors.get(m.device_id)
            sensors[m.device_id] = (
                (m.type, m.site, m.first, m.last)
                if seen is None
                else (
                    max(seen[0], m.type), max(seen[1] or "", m.site or "") or None,
                    min(seen[2], m.first), max(seen[3], m.last),
                )
            )  # fmt: skip
        conn = tx.connection()
        _MINUTES.run(conn, [(m.device_id, m.minute, m.count, m.total, m.low, m.high) for m in minutes])
        _SENSORS.run(
            conn,
            [
                (d, t, site, 0, 0, 0, 0, "{}", 0, 0, 0, "{}", first, last)
                for d, (t, site, first, last) in sensors.items()
            ],
        )

    @staticmethod
    def _touch_sensors(tx: Session, latest: dict[str, Event]) -> None:
        if not latest:
            return
        known = {
            r.device_id: r
            for r in tx.exec(select(AnalyticsDeviceRow).where(col(AnalyticsDeviceRow.device_id).in_(latest)))
        }
        for device_id, e in latest.items():
            row = known.get(device_id) or AnalyticsDeviceRow(
                device_id=device_id,
                type=sensor_type_of(e.data.get("unit")),
                site=e.site,
                first_time=e.time,
            )
            if row.last_time is None or e.time > row.last_time:
                row.last_time = e.time
            tx.add(row)


def _apply(row: AnalyticsDeviceRow, e: Event) -> None:
    t = e.time
    row.site = e.site or row.site
    if row.first_time is None:
        row.first_time = t
    if row.last_time is None or t > row.last_time:
        row.last_time = t
    if e.type == ev.DEVICE_DISCOVERED:
        state = e.data.get("state", {})
        if row.mode is None:
            row.mode, row.mode_since = state.get("mode"), t
    elif e.type == ev.TRIP_COMPLETED:
        row.trips += 1
        row.floors += int(e.data.get("floors", 0))
    elif e.type == ev.DOOR_OPENED:
        row.door_cycles += 1
    elif e.type == ev.FAULT_RAISED:
        code = str(e.data.get("code"))
        row.faults += 1
        # JSON columns: assign a new dict (in-place changes are invisible to SQLAlchemy).
        row.faults_by_code = {**row.faults_by_code, code: row.faults_by_code.get(code, 0) + 1}
    elif e.type == ev.FAULT_CLEARED:
        row.faults_cleared += 1
        row.fault_seconds += float(e.data.get("duration_s") or 0.0)
    elif e.type == ev.STUCK:
        if float(e.data.get("load_kg") or 0) > 0:
            row.entrapments += 1
    elif e.type == ev.MODE_CHANGED:
        if row.mode is not None and row.mode_since is not None:
            spent = max((t - row.mode_since).total_seconds(), 0.0)
            row.mode_seconds = {**row.mode_seconds, row.mode: row.mode_seconds.get(row.mode, 0.0) + spent}
        row.mode, row.mode_since = e.data.get("to"), t


@dataclass(slots=True, frozen=True)
class ElevatorFigures:
    """KPIs of one elevator or a group of them."""

    elevators: int
    trips: int
    floors: int
    door_cycles: int
    door_openings_per_trip: float | None
    faults: int
    faults_by_code: dict[str, int]
    entrapments: int
    mode_seconds: dict[str, float]
    availability: float | None  # share of observed time in normal service
    mtbf_s: float | None  # time in service per fault
    mttr_s: float | None  # mean fault duration (raised -> cleared)


def _mode_seconds(row: AnalyticsDeviceRow, horizon: datetime | None) -> dict[str, float]:
    out = dict(row.mode_seconds)
    end = horizon or row.last_time
    if row.mode and row.mode_since and end:
        out[row.mode] = out.get(row.mode, 0.0) + max((end - row.mode_since).total_seconds(), 0.0)
    return out


def _horizon(tx: Session) -> datetime | None:
    # The current mode lasts until the newest event of the whole fleet: an elevator stuck in a
    # fault publishes nothing, yet its fault goes on. Taken from the log, not the clock, so a
    # replay gives the same figures; and never past the gateway's own time of the newest stored
    # event, so that no device's clock (ahead by less than IOTGW_MAX_CLOCK_SKEW_S) stretches the
    # other elevators' open modes.
    newest = tx.exec(select(func.max(AnalyticsDeviceRow.last_time))).one()
    stored = newest_received_at(tx)
    return min(newest, stored) if newest is not None and stored is not None else newest


def figures(rows: Sequence[AnalyticsDeviceRow], horizon: datetime | None = None) -> ElevatorFigures:
    """Sum the figures of elevator rows (one row: that elevator); open modes last until `horizon`."""
    # math.fsum: the same figures whatever order the database returns the rows in (a float sum
    # in another order can differ in its last bits, and the rounding below can then flip).
    mode_parts: dict[str, list[float]] = defaultdict(list)
    by_code: dict[str, int] = defaultdict(int)
    cleared = 0
    for r in rows:
        for m, sec in _mode_seconds(r, horizon).items():
            mode_parts[m].append(sec)
        for c, n in r.faults_by_code.items():
            by_code[c] += n
        cleared += r.faults_cleared
    modes = {m: math.fsum(parts) for m, parts in mode_parts.items()}
    fault_s = math.fsum(r.fault_seconds for r in rows)
    trips = sum(r.trips for r in rows)
    faults = sum(r.faults for r in rows)
    observed = math.fsum(modes.values())
    in_service = modes.get("normal", 0.0)
    return ElevatorFigures(
        elevators=len(rows),
        trips=trips,
        floors=sum(r.floors for r in rows),
        door_cycles=sum(r.door_cycles for r in rows),
        door_openings_per_trip=round(sum(r.door_cycles for r in rows) / trips, 3) if trips else None,
        faults=faults,
        faults_by_code=dict(sorted(by_code.items())),
        entrapments=sum(r.entrapments for r in rows),
        mode_seconds={k: round(v, 3) for k, v in sorted(modes.items())},
        availability=round(in_service / observed, 4) if observed > 0 else None,
        mtbf_s=round(in_service / faults, 3) if faults else None,
        mttr_s=round(fault_s / cleared, 3) if cleared else None,
    )


def fleet(store: Store) -> dict[str, Any]:
    """Figures per site and for the whole fleet (elevators), plus device counts by type."""
    with store.session() as tx:
        rows = list(tx.exec(select(AnalyticsDeviceRow)))
        horizon = _horizon(tx)
    elevators = [r for r in rows if r.type == "elevator"]
    by_site: dict[str, list[AnalyticsDeviceRow]] = defaultdict(list)
    for r in elevators:
        by_site[r.site or "unknown"].append(r)
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r.type or "unknown"] += 1
    return {
        "devices_by_type": dict(sorted(counts.items())),
        "total": figures(elevators, horizon),
        "sites": {site: figures(rs, horizon) for site, rs in sorted(by_site.items())},
    }


def device(store: Store, device_id: str) -> dict[str, Any] | None:
    """One device's figures: elevator KPIs, or min/max/mean of a sensor over 1 h and 24 h."""
    with store.session() as tx:
        row = tx.get(AnalyticsDeviceRow, device_id)
        if row is None:
            return None
        out: dict[str, Any] = {"device_id": row.device_id, "type": row.type, "site": row.site}
        if row.type == "elevator":
            out["figures"] = figures([row], _horizon(tx))
            return out
        last = tx.exec(
            select(AnalyticsSensorMinuteRow.minute)
            .where(col(AnalyticsSensorMinuteRow.device_id) == device_id)
            .order_by(col(AnalyticsSensorMinuteRow.minute).desc())
        ).first()
        windows: dict[str, Any] = {}
        minutes: list[dict[str, Any]] = []
        for label, span in WINDOWS.items():
            buckets = list(
                tx.exec(
                    select(AnalyticsSensorMinuteRow).where(
                        col(AnalyticsSensorMinuteRow.device_id) == device_id,
                        col(AnalyticsSensorMinuteRow.minute) > (last or 0) - span,
                    )
                )
            )
            n = sum(b.count for b in buckets)
            windows[label] = {
                "count": n,
                "min": min((b.vmin for b in buckets), default=None),
                "max": max((b.vmax for b in buckets), default=None),
                "mean": round(sum(b.total for b in buckets) / n, 4) if n else None,
            }
            if label == "1h":
                minutes = [
                    {"minute": datetime.fromtimestamp(b.minute * 60, UTC).isoformat(), "count": b.count,
                     "min": b.vmin, "max": b.vmax, "mean": round(b.total / b.count, 4) if b.count else None}
                    for b in sorted(buckets, key=lambda b: b.minute)
                ]  # fmt: skip
        out["windows"] = windows
        out["minutes"] = minutes  # the last hour minute by minute (device time): the staff page's chart
        return out


def publish_metrics(store: Store, metrics: AnalyticsFamilies, *, max_device_series: int) -> None:
    """Set the analytics gauges: per site always, per elevator while the fleet is small enough."""
    data = fleet(store)
    for site, f in data["sites"].items():
        _set(metrics, "site", {"site": site}, f)
    if data["total"].elevators <= max_device_series:
        with store.session() as tx:
            horizon = _horizon(tx)
            for r in tx.exec(select(AnalyticsDeviceRow).where(col(AnalyticsDeviceRow.type) == "elevator")):
                labels = {"device": r.device_id, "site": r.site or "unknown"}
                _set(metrics, "elevator", labels, figures([r], horizon))


def _set(metrics: AnalyticsFamilies, level: str, labels: dict[str, str], f: ElevatorFigures) -> None:
    g = metrics.site_figures if level == "site" else metrics.elevator_figures
    values = {
        "trips": f.trips,
        "door_cycles": f.door_cycles,
        "faults": f.faults,
        "entrapments": f.entrapments,
        "availability_ratio": f.availability,
        "mtbf_seconds": f.mtbf_s,
        "mttr_seconds": f.mttr_s,
    }
    for name, value in values.items():
        if value is not None:
            g[name].labels(**labels).set(value)
