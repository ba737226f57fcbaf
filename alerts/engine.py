"""The alert engine: a consumer of the event log that runs the rules and keeps the alert lifecycle.

Each (rule, device) key has an evaluation state (`alerts.rules.KeyState`) and at most one open
alert. FIRE opens an alert (status firing) unless one is open; CLEAR resolves it. People
acknowledge and resolve through the API; every change is a row in `alert_transitions`. All of
it commits with the router's cursor, so a crash or a redelivery never duplicates an alert.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, delete, event
from sqlmodel import Field, Session, SQLModel, col, select

from alerts.rules import DeviceInfo, KeyState, Observation, Receiver, Rule, RuleSet, Signal, load_rules_file, step
from gateway import events as ev
from gateway.events import Event
from gateway.protocol import SENSOR_UNITS, DeviceType, sensor_type_of
from gateway.router import BaseConsumer
from gateway.store import (
    EVENT_COLUMNS,
    append_event,
    datetime_field,
    read_events,
    read_sql_events,
    replaying,
    upsert,
)

log = logging.getLogger(__name__)

SHIPPED_RULES = Path(__file__).resolve().parent / "rules.yaml"


class AlertStatus(StrEnum):
    """The lifecycle: firing -> acknowledged -> resolved; flapping when it keeps toggling."""

    FIRING = "firing"
    ACKNOWLEDGED = "acknowledged"
    FLAPPING = "flapping"
    RESOLVED = "resolved"


OPEN = (AlertStatus.FIRING.value, AlertStatus.ACKNOWLEDGED.value, AlertStatus.FLAPPING.value)


class AlertRow(SQLModel, table=True):
    """An alert: one episode of a rule's condition on one device."""

    __tablename__ = "alerts"
    # Ids are never reused (not even after a replay empties the table): other consumers (dispatch)
    # remember alerts by id.
    __table_args__ = (
        Index("ix_alerts_rule_device_status", "rule", "device_id", "status"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    rule: str
    device_id: str = Field(index=True)
    site: str | None = Field(default=None, index=True)
    severity: str = Field(index=True)
    status: str = Field(index=True)
    summary: str
    fired_at: datetime = datetime_field(nullable=False)
    updated_at: datetime = datetime_field(nullable=False)
    acked_at: datetime | None = datetime_field()
    acked_by: str | None = None
    resolved_at: datetime | None = datetime_field()
    resolved_by: str | None = None
    note: str | None = None


class AlertReplayIdRow(SQLModel, table=True):
    """An alert's id kept across a replay: the rebuilt alert of the same rule, device and firing
    time takes it again, so that what others hold of it (dispatch's orders, pages) stays true."""

    __tablename__ = "alert_replay_ids"
    __table_args__ = (Index("ix_alert_replay_ids_key", "rule", "device_id"),)

    id: int = Field(primary_key=True)
    rule: str
    device_id: str
    fired_at: datetime = datetime_field(nullable=False)
    status: str | None = None  # as it was when the replay was asked for
    resolved_at: datetime | None = datetime_field()
    taken: bool = False  # a rebuilt alert has this id again


class AlertTransitionRow(SQLModel, table=True):
    """One change of an alert's status, with who and why."""

    __tablename__ = "alert_transitions"
    __table_args__ = ({"sqlite_autoincrement": True},)  # notification keys name transitions: never reused

    id: int | None = Field(default=None, primary_key=True)
    alert_id: int = Field(index=True)
    at: datetime = datetime_field(nullable=False)
    from_status: str | None = None
    to_status: str
    by: str  # "engine" or the person
    note: str | None = None


class NotificationRow(SQLModel, table=True):
    """The outbox: one row per alert transition, written in the transition's transaction.

    The sender (alerts/notify.py) fans it out to the receivers and delivers with retries; the
    key is the idempotency key receivers see, the same on every retry.
    """

    __tablename__ = "notifications"

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True)
    alert_id: int = Field(index=True)
    transition_id: int
    status: str  # the alert status this notification announces (or the work order's step)
    created_at: datetime = datetime_field(nullable=False)
    fanned_out: bool = Field(default=False, index=True)
    # Work-order notifications (alerts/dispatch.py) page one person: their contact receiver.
    # alert_id is then the alert that opened the order, transition_id 0.
    work_order_id: int | None = Field(default=None, index=True)
    entry_id: int | None = None
    receiver: str | None = None
    person: str | None = None  # a page: the technician it is for (PagerDuty: one incident per order and person)
    # The event of the log this notification announces: what CloudEvents receivers get.
    event_position: int | None = Field(default=None, sa_column=Column(BigInteger().with_variant(Integer(), "sqlite")))


class DeliveryRow(SQLModel, table=True):
    """One notification to one receiver."""

    __tablename__ = "notification_deliveries"
    __table_args__ = (Index("ix_notification_deliveries_lane", "status", "receiver", "id"),)  # a receiver's lane

    id: int | None = Field(default=None, primary_key=True)
    notification_id: int = Field(index=True)
    alert_id: int = Field(index=True)
    receiver: str
    status: str = Field(default="pending", index=True)  # pending | delivered | failed | skipped | silenced
    attempts: int = 0
    next_at: datetime = datetime_field(nullable=False, index=True)
    last_error: str | None = None
    delivered_at: datetime | None = datetime_field()
    created_at: datetime | None = datetime_field()  # when it was fanned out: retries end at the maximum age


class SilenceRow(SQLModel, table=True):
    """A silence: notifications of matching alerts are not sent while it lasts (alerts still fire)."""

    __tablename__ = "silences"

    id: int | None = Field(default=None, primary_key=True)
    matchers: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_by: str
    comment: str
    starts_at: datetime = datetime_field(nullable=False)
    ends_at: datetime = datetime_field(nullable=False, index=True)

    def matches(self, alert: AlertRow, at: datetime) -> bool:
        """True when `alert` falls under this silence at `at` (matchers are fnmatch patterns)."""
        if not self.starts_at <= at < self.ends_at:
            return False
        fields = {
            "rule": alert.rule,
            "device_id": alert.device_id,
            "site": alert.site or "",
            "severity": alert.severity,
        }
        return all(fnmatch.fnmatchcase(fields.get(k, ""), v) for k, v in self.matchers.items())


class AlertKeyRow(SQLModel, table=True):
    """Evaluation state of one (rule, device) key."""

    __tablename__ = "alert_keys"

    rule: str = Field(primary_key=True)
    device_id: str = Field(primary_key=True)
    state: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class AlertDeviceRow(SQLModel, table=True):
    """The engine's own view of a device, built from the log (replays give the same view)."""

    __tablename__ = "alert_devices"

    device_id: str = Field(primary_key=True)
    type: str | None = None
    site: str | None = None
    state: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


_KEY_FIELDS = ("breaching", "since", "clear_since", "breaches", "firing", "last_seen", "fired_at")


def _encode(ks: KeyState) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in _KEY_FIELDS:
        v = getattr(ks, k)
        out[k] = v.isoformat() if isinstance(v, datetime) else v
    out["hits"] = [t.isoformat() for t in ks.hits]
    return out


def _decode(raw: dict[str, Any]) -> KeyState:
    if not raw:
        return KeyState()
    values = dict(raw)
    for k in ("since", "clear_since", "last_seen", "fired_at"):
        if values.get(k):
            values[k] = datetime.fromisoformat(values[k])
    values["hits"] = tuple(datetime.fromisoformat(t) for t in values.get("hits", ()))
    return KeyState(**values)


# Device state kept from events: what `state` conditions and summaries can refer to.
_STATE_FROM_EVENT = {
    ev.DOOR_OPENED: lambda s, d: {**s, "door": "open", "floor": d.get("floor", s.get("floor"))},
    ev.DOOR_CLOSED: lambda s, d: {**s, "door": "closed", "floor": d.get("floor", s.get("floor"))},
    ev.TRIP_STARTED: lambda s, d: {**s, "direction": d.get("direction"), "floor": d.get("from_floor")},
    ev.TRIP_COMPLETED: lambda s, d: {**s, "direction": "idle", "floor": d.get("to_floor")},
    ev.FAULT_RAISED: lambda s, d: {**s, "fault": d.get("code"), "floor": d.get("floor", s.get("floor"))},
    ev.FAULT_CLEARED: lambda s, d: {**s, "fault": None},  # noqa: ARG005
    ev.MODE_CHANGED: lambda s, d: {**s, "mode": d.get("to")},
    ev.SENSOR_READING: lambda s, d: {**s, "value": d.get("value"), "unit": d.get("unit")},
    ev.DEVICE_ONLINE: lambda s, d: {**s, "online": True},  # noqa: ARG005
    ev.DEVICE_OFFLINE: lambda s, d: {**s, "online": False},  # noqa: ARG005
    ev.DEVICE_DISCOVERED: lambda s, d: {**s, **d.get("state", {})},
    ev.STUCK: lambda s, d: {**s, "load_kg": d.get("load_kg", s.get("load_kg")), "floor": d.get("floor")},
}


@dataclass(slots=True)
class _Device:
    type: str | None = None
    site: str | None = None
    state: dict[str, Any] = field(default_factory=dict)


def _absence_only_moved(rule: Rule, old: KeyState | None, new: KeyState) -> bool:
    """True when an absence key only advanced last_seen by less than a quarter heartbeat.

    Such keys are not written on every reading: after a crash the last_seen read back can be
    at most a quarter heartbeat old, which cannot make a device look silent.
    """
    if rule.absence is None or old is None or old.last_seen is None or new.last_seen is None:
        return False
    if replace(old, last_seen=new.last_seen) != new:
        return False
    return (new.last_seen - old.last_seen).total_seconds() < rule.absence.heartbeat / 4


@dataclass(slots=True)
class _Batch:
    """Working copies for one transaction; they become the engine's memory when it commits."""

    tx: Session
    devices: dict[str, _Device] = field(default_factory=dict)
    keys: dict[tuple[str, str], KeyState] = field(default_factory=dict)
    written: dict[tuple[str, str], KeyState] = field(default_factory=dict)
    flaps: dict[tuple[str, str], datetime | None] = field(default_factory=dict)


class AlertEngine(BaseConsumer):
    """Runs the alert rules over the log and keeps alerts (consumer `alerts`).

    Device views and key states live in memory (loaded once, all of them, so that silent
    devices tick too); a batch works on copies, writes only what changed, and the copies become
    the new memory after the commit: a rolled-back batch leaves memory as the database has it.
    """

    name = "alerts"
    # Sensor readings (most of the log) come through handle_span; everything else one by one.
    types = ("device.*", "elevator.*")
    replay_resets_state = True
    linger_s = 0.05  # alerts are real-time: wait only briefly for more events
    tick_s = 1.0

    def __init__(self, rules: RuleSet | None = None, *, alerts_in_maintenance: bool = False) -> None:
        ruleset = rules or load_rules_file(SHIPPED_RULES)
        self.rules: list[Rule] = list(ruleset.rules)
        self.receivers: list[Receiver] = list(ruleset.receivers)
        self.alerts_in_maintenance = alerts_in_maintenance
        # Set by the gateway: whether it holds its broker session (inhibits absence alerts).
        self._absence_quiet_until: datetime | None = None
        self.forget()

    def configure(self, settings: Any) -> None:  # noqa: ANN401 - gateway.config.Settings
        """Load the configured rules file (or the shipped one)."""
        path = Path(settings.rules_file) if settings.rules_file else SHIPPED_RULES
        ruleset = load_rules_file(path)
        self.rules = list(ruleset.rules)
        self.receivers = list(ruleset.receivers)
        self.alerts_in_maintenance = bool(settings.alerts_in_maintenance)
        self.forget()
        log.info("alert engine: %d rules from %s", len(self.rules), path)

    def forget(self) -> None:
        """Drop what is held in memory; it is loaded again from the database when next needed."""
        self._loaded = False
        self._kept_pending = False  # alerts kept by a replay wait for the first tick after it (tick)
        self._flapping: dict[tuple[str, str], datetime] = {}  # key -> last toggle of its flapping alert
        self._current: _Batch | None = None
        self._devices: dict[str, _Device] = {}
        self._keys: dict[tuple[str, str], KeyState] = {}  # as stored (or as good: see _absence_only_moved)
        self._by_type: dict[tuple[str, str, str | None, str | None], list[Rule]] = {}
        self._by_name = {r.name: r for r in self.rules}

    def reset(self, tx: Session) -> None:
        """Forget everything derived (alerts included) before a replay from the start.

        The replay rebuilds it silently (`replaying`: no events, no notifications: they were sent
        already, and stay in the outbox), and each rebuilt alert takes the id it had."""
        # Asked for during another replay: what was kept at the first is what happened.
        waiting = {k.id: k for k in tx.exec(select(AlertReplayIdRow))}
        for k in waiting.values():
            k.taken = False
            tx.add(k)
        kept = [
            {"id": a.id, "rule": a.rule, "device_id": a.device_id, "fired_at": a.fired_at, "status": a.status,
             "resolved_at": a.resolved_at, "taken": False}
            for a in tx.exec(select(AlertRow))
            if a.id not in waiting
        ]  # fmt: skip
        if kept:
            tx.execute(AlertReplayIdRow.__table__.insert(), kept)  # type: ignore[attr-defined]
        for table in (AlertTransitionRow, AlertRow, AlertKeyRow, AlertDeviceRow):
            tx.exec(delete(table))
        self.forget()
        self._loaded = True  # the tables are empty now
        self._kept_pending = bool(kept or waiting)

    def _load(self, tx: Session) -> None:
        if self._loaded:
            return
        for d in tx.exec(select(AlertDeviceRow)):
            self._devices[d.device_id] = _Device(d.type, d.site, dict(d.state))
        for k in tx.exec(select(AlertKeyRow)):
            if k.rule in self._by_name:
                self._keys[(k.rule, k.device_id)] = _decode(dict(k.state))
        for a in tx.exec(select(AlertRow).where(col(AlertRow.status) == AlertStatus.FLAPPING.value)):
            self._flapping[(a.rule, a.device_id)] = a.updated_at
        self._kept_pending = tx.exec(select(AlertReplayIdRow.id).limit(1)).first() is not None
        self._loaded = True

    def _rules_for(self, event_type: str, device_id: str, dev: _Device) -> list[Rule]:
        """The rules that select this device and that an event of this type can affect (cached)."""
        cache_key = (event_type, device_id, dev.type, dev.site)
        rules = self._by_type.get(cache_key)
        if rules is None:
            info = DeviceInfo(device_id, dev.type, dev.site)
            rules = [r for r in self.rules if _may_change(r, event_type) and r.select.matches(info)]
            self._by_type[cache_key] = rules
        return rules

    def _batch(self, tx: Session) -> _Batch:
        b = self._current
        if b is None or b.tx is not tx:
            b = self._current = _Batch(tx)
            # Memory follows the database: only what commits is remembered.
            event.listen(tx, "after_commit", lambda _s: self._remember(b), once=True)
            event.listen(tx, "after_rollback", lambda _s: self._discard(b), once=True)
        return b

    def _remember(self, b: _Batch) -> None:
        self._devices.update(b.devices)
        self._keys.update(b.written)
        for key, since in b.flaps.items():
            if since is None:
                self._flapping.pop(key, None)
            else:
                self._flapping[key] = since
        self._discard(b)

    def _discard(self, b: _Batch) -> None:
        if self._current is b:
            self._current = None

    def _device(self, b: _Batch, device_id: str) -> _Device:
        dev = b.devices.get(device_id)
        if dev is None:
            known = self._devices.get(device_id)
            dev = b.devices[device_id] = _Device(known.type, known.site, dict(known.state)) if known else _Device()
        return dev

    def handle(self, events: Sequence[Event], tx: Session) -> None:
        """Update each device's view, then step the rules an event can affect."""
        self._load(tx)
        b = self._batch(tx)
        for e in events:
            dev = self._device(b, e.subject)
            _project(dev, e)
            self._observe(tx, b, e, dev)
        self._write(tx, b)

    def _observe(self, tx: Session, b: _Batch, e: Event, dev: _Device) -> None:
        rebuilding = replaying(tx)
        device_id = e.subject
        obs = Observation(e.time, e.type, e.data, dev.state)
        # Silence is measured on the gateway's clock, as the timer measures it: a device whose
        # clock runs behind must not look silent (its events keep their own time otherwise).
        heard = replace(obs, time=e.received_at) if e.received_at is not None else obs
        for rule in self._rules_for(obs.event_type, device_id, dev):
            seen = heard if rule.absence is not None else obs
            k = (rule.name, device_id)
            before = b.keys.get(k) or self._keys.get(k) or KeyState()
            if rebuilding:
                before = self._catch_up(tx, rule, device_id, dev, before, seen.time)
            new, signal = step(rule, before, seen, seen.time)
            b.keys[k] = new
            if signal is not None and not self._transition(
                tx, rule, device_id, dev, signal, seen.time, {**dev.state, **e.data}
            ):
                b.keys[k] = before  # held back for now: the key fires again when it may
            elif signal is None:
                self._settle_flapping(tx, k, new, seen.time)

    def _catch_up(  # noqa: PLR0913, PLR0917
        self, tx: Session, rule: Rule, device_id: str, dev: _Device, ks: KeyState, at: datetime
    ) -> KeyState:
        """During a replay, events come faster than time passed: before an event, what the timer
        did to its key up to then (a device silent beyond its heartbeat fired before it spoke again)."""
        new, signal = step(rule, ks, None, at)
        if signal is None:
            return new
        return new if self._transition(tx, rule, device_id, dev, signal, at, dict(dev.state)) else ks

    def handle_span(self, tx: Session, after: int, upto: int) -> None:
        """Sensor readings of the span, without reading most of them into Python.

        Every reading says its device is alive (one aggregate row per device is enough for that),
        but only readings that can move a threshold key matter one by one: values beyond the
        rules' limits, and all readings of devices whose keys are breaching or firing.
        """
        self._load(tx)
        b = self._batch(tx)
        conn = tx.connection()
        # A replay reads every reading: the gaps between a device's readings are what its
        # absence rules fired on the first time.
        if conn.dialect.name != "sqlite" or self._reading_limits() is None or replaying(tx):
            readings = read_events(tx, after, upto, (ev.SENSOR_READING,))
        else:
            beyond_sql, beyond_params = self._reading_limits() or ("0", [])
            # One scan of the span: each device's last reading, site and unit, and whether any of
            # its readings is beyond a limit (SQLite parses each row's JSON once for all of these).
            query = _SQL_READERS.format(beyond=beyond_sql)
            beyond: set[str] = set()
            for subject, last, site, unit, over in conn.exec_driver_sql(
                query, (*beyond_params, after, upto)
            ).fetchall():
                if over:
                    beyond.add(subject)
                dev = self._device(b, subject)
                dev.site = site or dev.site
                dev.type = dev.type or sensor_type_of(unit)
                at = datetime.fromisoformat(last).replace(tzinfo=UTC)
                for rule in self._rules_for(ev.SENSOR_READING, subject, dev):
                    if rule.absence is None:
                        continue
                    k = (rule.name, subject)
                    before = b.keys.get(k) or self._keys.get(k) or KeyState()
                    new, signal = step(rule, before, Observation(at, ev.SENSOR_READING, {}, dev.state), at)
                    b.keys[k] = new
                    if signal is not None and not self._transition(tx, rule, subject, dev, signal, at, dev.state):
                        b.keys[k] = before
            value_rules = {r.name for r in self.rules if r.threshold is not None}
            merged = {**self._keys, **b.keys}
            hot = sorted({d for (r, d), ks in merged.items() if r in value_rules and (ks.breaching or ks.firing)})
            # Devices with a reading beyond a limit, or already breaching: all their readings, in order.
            wanted = sorted(beyond | set(hot))
            readings = []
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                sql = f"{_SQL_READINGS_OF} ({', '.join('?' * len(chunk))}) ORDER BY id"
                readings += read_sql_events(conn, sql, (after, upto, *chunk))
            readings.sort(key=lambda e: e.position)
        for e in readings:
            dev = self._device(b, e.subject)
            _project(dev, e)
            self._observe(tx, b, e, dev)
        self._write(tx, b)

    def _reading_limits(self) -> tuple[str, list[object]] | None:
        """SQL condition (and its parameters) for readings beyond some rule's limit; None: read all.

        Each threshold rule counts only for the units of the sensor types it selects: a power
        meter's `below: 50` says nothing about a thermometer reading 21.
        """
        terms: list[str] = []
        params: list[object] = []
        for r in self.rules:
            if r.absence is not None or not _may_change(r, ev.SENSOR_READING):
                continue
            t = r.threshold
            if t is None or t.field != "value":
                return None  # a rule that needs every reading
            units = [SENSOR_UNITS[DeviceType(x)] for x in r.select.type or () if x in _SENSOR_TYPES]
            if r.select.type is not None and not units:
                continue  # selects no sensor type at all
            unit_sql = f"json_extract(data, '$.unit') IN ({', '.join('?' * len(units))}) AND " if units else ""
            op, limit = (">", t.above) if t.above is not None else ("<", t.below)
            terms.append(f"({unit_sql}CAST(json_extract(data, '$.value') AS REAL) {op} ?)")
            params += [*units, limit]
        return (" OR ".join(terms) or "0"), params

    def tick(self, tx: Session, now: datetime) -> None:
        """Step time-driven keys (for, clear_for, clear_after, absence, rate windows) to `now`.

        The first tick after a replay settles it (`RECONCILING`): what the timer finds due now
        and what was kept from before the replay tell what happened already (an alert open then
        fires again silently, under its id; one resolved then resolves silently, at its time)
        from what is new (told as ever); then nothing is kept any more."""
        self._load(tx)
        b = self._batch(tx)
        if self._kept_pending and not replaying(tx):
            tx.info[RECONCILING] = True
            event.listen(tx, "after_commit", lambda _s: setattr(self, "_kept_pending", False), once=True)
        timed = {r.name for r in self.rules if r.absence or r.rate or r.for_ or r.clear_for or _clears_later(r)}
        # (Keys of this batch too: a replay ticks in the batch that rebuilt them.)
        for (rule_name, device_id), stored in list({**self._keys, **b.keys}.items()):
            if rule_name not in timed:
                continue
            rule = self._by_name[rule_name]
            old = b.keys.get((rule_name, device_id), stored)
            new, signal = step(rule, old, None, now)
            if new != old:
                b.keys[(rule_name, device_id)] = new
            if signal is not None:
                dev = self._devices.get(device_id) or _Device()
                if not self._transition(tx, rule, device_id, dev, signal, now, dict(dev.state)):
                    b.keys[(rule_name, device_id)] = old  # held back: the next tick tries again
        self._write(tx, b)
        if tx.info.get(RECONCILING):
            tx.exec(delete(AlertReplayIdRow))

    def _inhibited(self, tx: Session, rule: Rule, dev: _Device, at: datetime) -> str | None:
        """Why this rule may not fire now: "broker" (lost; absence rules), "site" (an inhibiting alert)."""
        if rule.absence is not None and self.broker_connected is not None:
            if not self.broker_connected():
                self._absence_quiet_until = at + timedelta(seconds=rule.absence.heartbeat)
                return "broker"  # the gateway hears nothing: silence says nothing about the devices
            if self._absence_quiet_until is not None and at < self._absence_quiet_until:
                return "broker"  # after the broker came back, give every device one heartbeat
        inhibitors = [r.name for r in self.rules if rule.name in r.inhibits]
        if not inhibitors or dev.site is None:
            return None
        blocking = tx.exec(
            select(AlertRow.id).where(
                col(AlertRow.rule).in_(inhibitors), col(AlertRow.site) == dev.site, col(AlertRow.status).in_(OPEN)
            )
        ).first()
        return "site" if blocking is not None else None

    def _settle_flapping(self, tx: Session, key: tuple[str, str], ks: KeyState, at: datetime) -> None:
        """Resolve a flapping alert once an event shows its condition clear for a whole flap window.

        Decided on event times only, so a replay or a restart decides it the same way.
        """
        flaps = self._batch(tx).flaps
        since = flaps.get(key, self._flapping.get(key))
        rule = self._by_name.get(key[0])
        if since is None or rule is None or ks.firing or at - since < timedelta(seconds=rule.flap_window):
            return
        alert = tx.exec(
            select(AlertRow).where(
                col(AlertRow.rule) == key[0],
                col(AlertRow.device_id) == key[1],
                col(AlertRow.status) == AlertStatus.FLAPPING.value,
            )
        ).first()
        if alert is not None:
            resolve(tx, alert, at, "engine", "stopped flapping")
        flaps[key] = None

    def _write(self, tx: Session, b: _Batch) -> None:
        """Upsert what changed (compared with memory); may run several times in one transaction."""
        devices = [
            {"device_id": device_id, "type": dev.type, "site": dev.site, "state": dev.state}
            for device_id, dev in b.devices.items()
            if _lasting(self._devices.get(device_id)) != _lasting(dev)
        ]
        keys = []
        for k, v in b.keys.items():
            old = self._keys.get(k)
            if v != old and not _absence_only_moved(self._by_name[k[0]], old, v) and b.written.get(k) != v:
                keys.append({"rule": k[0], "device_id": k[1], "state": _encode(v)})
                b.written[k] = v
        upsert(tx, AlertDeviceRow, devices, ["device_id"])
        upsert(tx, AlertKeyRow, keys, ["rule", "device_id"])

    def _transition(  # noqa: PLR0913, PLR0917
        self,
        tx: Session,
        rule: Rule,
        device_id: str,
        dev: _Device,
        signal: Signal,
        at: datetime,
        values: dict[str, Any],
    ) -> bool:
        """Apply a signal to the alert of (rule, device); False when a FIRE must wait (broker lost)."""
        open_alert = tx.exec(
            select(AlertRow).where(
                col(AlertRow.rule) == rule.name,
                col(AlertRow.device_id) == device_id,
                col(AlertRow.status).in_(OPEN),
            )
        ).first()
        if open_alert is not None and open_alert.status == AlertStatus.FLAPPING.value:
            # While flapping, toggles only move the quiet-period clock (see tick); no notifications.
            open_alert.updated_at = at
            tx.add(open_alert)
            self._batch(tx).flaps[(rule.name, device_id)] = at
            return True
        if signal is Signal.FIRE:
            if open_alert is not None:
                return True  # exactly one open alert per (rule, device)
            if dev.state.get("mode") == "maintenance" and not self.alerts_in_maintenance:
                return True  # planned work: no alerts
            inhibited = self._inhibited(tx, rule, dev, at)
            if inhibited:
                return inhibited != "broker"
            recent = tx.exec(
                select(AlertRow)
                .where(
                    col(AlertRow.rule) == rule.name,
                    col(AlertRow.device_id) == device_id,
                    col(AlertRow.fired_at) >= at - timedelta(seconds=rule.flap_window),
                )
                .order_by(col(AlertRow.id))
            ).all()
            if recent and len(recent) + 1 >= rule.flap_count:
                # Firing again and again within the window: reopen the first one, as flapping.
                alert = recent[0]
                self._batch(tx).flaps[(rule.name, device_id)] = at
                change_status(tx, alert, AlertStatus.FLAPPING, at, "engine", f"fired {len(recent) + 1} times")
                return True
            info = DeviceInfo(device_id, dev.type, dev.site)
            # Rebuilt by a replay: the alert it was, under its id and from when it fired then.
            alert_id, fired_at = _before_replay(tx, rule.name, device_id, at)
            alert = AlertRow(
                id=alert_id,
                rule=rule.name, device_id=device_id, site=dev.site, severity=rule.severity.value,
                status=AlertStatus.FIRING.value, summary=rule.render(info, values)[:500], fired_at=fired_at,
                updated_at=fired_at,
            )  # fmt: skip
            tx.add(alert)
            tx.flush()
            # What dispatch needs to decide (an entrapment is a stuck car with load inside).
            context = {"device_type": dev.type, "state": {k: v for k, v in values.items() if k not in _VOLATILE}}
            record(tx, alert, None, AlertStatus.FIRING, fired_at, "engine", context=context)
        elif open_alert is not None:
            kept = tx.get(AlertReplayIdRow, open_alert.id) if _rebuilding(tx) else None
            if kept is not None and kept.resolved_at is not None and kept.status == AlertStatus.RESOLVED.value:
                at = max(kept.resolved_at, open_alert.fired_at)  # rebuilt: it resolved then
            resolve(tx, open_alert, at, "engine", "condition cleared")
        return True


_READINGS_SPAN = "FROM events WHERE id > ? AND id <= ? AND type = 'sensor.reading'"
_SQL_READERS = (  # {beyond}: the rules' limits, see _reading_limits
    "SELECT subject, max(received_at), max(site), max(json_extract(data, '$.unit')), "
    f"max(CASE WHEN ({{beyond}}) THEN 1 ELSE 0 END) {_READINGS_SPAN} GROUP BY subject"
)
_SQL_READINGS_OF = f"SELECT {', '.join(EVENT_COLUMNS)} {_READINGS_SPAN} AND subject IN"

_SENSOR_TYPES = {t.value for t in SENSOR_UNITS}
_VOLATILE = ("value", "unit")  # change with every reading; not worth a write each time


def _lasting(dev: _Device | None) -> tuple[str | None, str | None, dict[str, Any]] | None:
    """What is persisted of a device view: a sensor's latest value is not (it comes again)."""
    if dev is None:
        return None
    return dev.type, dev.site, {k: v for k, v in dev.state.items() if k not in _VOLATILE}


def _project(dev: _Device, e: Event) -> None:
    dev.site = e.site or dev.site
    if e.type == ev.DEVICE_DISCOVERED:
        dev.type = str(e.data.get("type") or dev.type or "")
    elif e.type.startswith("elevator.") and dev.type is None:
        dev.type = "elevator"
    elif e.type == ev.SENSOR_READING and dev.type is None:
        dev.type = sensor_type_of(e.data.get("unit"))
    change = _STATE_FROM_EVENT.get(e.type)
    if change is not None:
        dev.state = change(dev.state, e.data)


def _may_change(rule: Rule, event_type: str) -> bool:
    """Whether an event of this type can change the rule's key (a cheap prefilter)."""
    if rule.absence is not None:
        return True  # every message says the device is alive
    if rule.event is not None:
        clear = rule.event.clear
        return fnmatch.fnmatchcase(event_type, rule.event.type) or (
            clear is not None and fnmatch.fnmatchcase(event_type, clear.type)
        )
    if rule.rate is not None:
        return fnmatch.fnmatchcase(event_type, rule.rate.event.type)
    if rule.state is not None and event_type == ev.SENSOR_READING:
        return rule.state.field in ("value", "unit")  # a reading changes nothing else of the view
    return event_type in _STATE_FROM_EVENT  # state and threshold rules read the device view


def _clears_later(rule: Rule) -> bool:
    return rule.event is not None and rule.event.clear_after is not None


ALERT_SOURCE = "iotgw/alerts"


RECONCILING = "iotgw_alerts_reconciling"  # Session.info: the first tick after a replay (AlertEngine.tick)


def _rebuilding(tx: Session) -> bool:
    return replaying(tx) or bool(tx.info.get(RECONCILING))


def _before_replay(tx: Session, rule: str, device_id: str, at: datetime) -> tuple[int | None, datetime]:
    """While a replay rebuilds alerts: the id and firing time this alert had before (None, `at`: new).

    An alert fired by an event fires at that event's time again; one fired by the timer fires
    when the replay's clock (the log's receive times) passes its due time, which may be earlier
    or later than the first time (the engine was paused, say): it is the alert of the rule and
    device, not rebuilt yet, that fired closest to then. After the replay, only an alert still
    open before it can be the one firing again."""
    if not _rebuilding(tx):
        return None, at
    where = [
        col(AlertReplayIdRow.rule) == rule,
        col(AlertReplayIdRow.device_id) == device_id,
        col(AlertReplayIdRow.taken).is_(False),
    ]
    if not replaying(tx):
        where.append(col(AlertReplayIdRow.status) != AlertStatus.RESOLVED.value)
    candidates = tx.exec(select(AlertReplayIdRow).where(*where)).all()
    kept = min(candidates, key=lambda k: abs(k.fired_at - at), default=None)
    if kept is None:
        return None, at
    kept.taken = True
    tx.add(kept)
    return kept.id, kept.fired_at


def _happened_before(tx: Session, alert: AlertRow, new: AlertStatus) -> bool:
    """On the first tick after a replay: whether this transition of a rebuilt alert happened
    before the replay (then it is not told again)."""
    if not tx.info.get(RECONCILING):
        return False
    kept = tx.get(AlertReplayIdRow, alert.id)
    return kept is not None and kept.taken and (new is AlertStatus.FIRING or kept.status == new.value)


def record(  # noqa: PLR0913, PLR0917
    tx: Session,
    alert: AlertRow,
    old: str | None,
    new: AlertStatus,
    at: datetime,
    by: str,
    note: str | None = None,
    *,
    context: Mapping[str, Any] | None = None,
) -> None:
    """Write one transition of `alert`, its notification to the outbox and its event to the log.

    All in `tx`: the event (`alert.firing`, `alert.acknowledged`, ...) is how other consumers
    (dispatch) learn of alerts, through the log like everything else.
    """
    assert alert.id is not None  # noqa: S101 - flushed before
    transition = AlertTransitionRow(alert_id=alert.id, at=at, from_status=old, to_status=new.value, by=by, note=note)
    tx.add(transition)
    if replaying(tx) or _happened_before(tx, alert, new):
        return  # rebuilt after a replay: its notification and its event went out the first time
    tx.flush()
    assert transition.id is not None  # noqa: S101 - flushed
    key = f"iotgw-alert-{alert.id}-{transition.id}"
    notification = NotificationRow(
        key=key, alert_id=alert.id, transition_id=transition.id, status=new.value, created_at=at
    )
    data = {
        "alert_id": alert.id, "rule": alert.rule, "severity": alert.severity, "status": new.value,
        "from_status": old, "summary": alert.summary, "device_id": alert.device_id, "site": alert.site,
        "fired_at": _iso(alert.fired_at), "by": by, "note": note, **(context or {}),
    }  # fmt: skip
    # The notification is this event: receivers of CloudEvents get it as the log holds it.
    notification.event_position = append_event(
        tx, ce_id=key, source=ALERT_SOURCE, type=f"alert.{new.value}", subject=alert.device_id, time=at,
        site=alert.site, data=data,
    )  # fmt: skip
    tx.add(notification)


def change_status(  # noqa: PLR0913, PLR0917
    tx: Session, alert: AlertRow, new: AlertStatus, at: datetime, by: str, note: str | None = None
) -> None:
    """Move an alert to `new` (with who, when and why) and record the transition."""
    old = alert.status
    alert.status, alert.updated_at = new.value, at
    if new is AlertStatus.ACKNOWLEDGED:
        alert.acked_at, alert.acked_by = at, by
    elif new is AlertStatus.RESOLVED:
        alert.resolved_at, alert.resolved_by = at, by
    else:  # firing again, or flapping: open once more
        alert.resolved_at, alert.resolved_by = None, None
    if note and new is not AlertStatus.FLAPPING:
        alert.note = note
    tx.add(alert)
    record(tx, alert, old, new, at, by, note)


def resolve(tx: Session, alert: AlertRow, at: datetime, by: str, note: str | None = None) -> None:
    """Resolve an open alert."""
    change_status(tx, alert, AlertStatus.RESOLVED, at, by, note)


def acknowledge(tx: Session, alert: AlertRow, at: datetime, by: str, note: str | None = None) -> None:
    """Acknowledge a firing alert."""
    change_status(tx, alert, AlertStatus.ACKNOWLEDGED, at, by, note)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


class AlertMetrics:
    """Alert gauges and histograms, read from the alerts tables (the engine stays metric-free)."""

    def __init__(self) -> None:
        self.last_transition = 0
        self.seen_open: set[tuple[str, str, str]] = set()
        self._started = False

    def publish(self, tx: Session, metrics: Any) -> None:  # noqa: ANN401 - alerts.metrics.AlertFamilies
        """Observe the transitions written since the last call, and set the open-alert gauges."""
        if not self._started:
            for status in AlertStatus:
                metrics.alert_transitions.labels(status.value)  # 0 from the start, not absent
            self._started = True
        rows = tx.exec(
            select(AlertTransitionRow, AlertRow)
            .join(AlertRow, col(AlertRow.id) == col(AlertTransitionRow.alert_id))
            .where(col(AlertTransitionRow.id) > self.last_transition)
            .order_by(col(AlertTransitionRow.id))
        ).all()
        for tr, alert in rows:
            metrics.alert_transitions.labels(tr.to_status).inc()
            spent = (tr.at - alert.fired_at).total_seconds()
            if tr.to_status == AlertStatus.ACKNOWLEDGED.value:
                metrics.alert_time_to_ack.observe(max(spent, 0.0))
            elif tr.to_status == AlertStatus.RESOLVED.value:
                metrics.alert_time_to_resolve.observe(max(spent, 0.0))
            self.last_transition = tr.id or self.last_transition
        counts: dict[tuple[str, str, str], int] = {}
        for a in tx.exec(select(AlertRow).where(col(AlertRow.status).in_(OPEN))):
            k = (a.severity, a.rule, a.status)
            counts[k] = counts.get(k, 0) + 1
        for k in self.seen_open | set(counts):
            metrics.alerts_open.labels(*k).set(counts.get(k, 0))
        self.seen_open |= set(counts)
