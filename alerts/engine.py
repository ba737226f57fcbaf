"""The alert engine: a consumer of the event log that runs the rules and keeps the alert lifecycle.

Each (rule, device) key has an evaluation state (`alerts.rules.KeyState`) and at most one open
alert. FIRE opens an alert (status firing) unless one is open; CLEAR resolves it. People
acknowledge and resolve through the API; every change is a row in `alert_transitions`. All of
it commits with the router's cursor, so a crash or a redelivery never duplicates an alert.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Column, Index, delete
from sqlmodel import Field, Session, SQLModel, col, select

from alerts.rules import DeviceInfo, KeyState, Observation, Rule, RuleSet, Signal, load_rules_file, step
from gateway import events as ev
from gateway.events import Event
from gateway.router import BaseConsumer
from gateway.store import UTCDateTime

log = logging.getLogger(__name__)

SHIPPED_RULES = Path(__file__).resolve().parent / "rules.yaml"


class AlertStatus(StrEnum):
    """The lifecycle: firing -> acknowledged -> resolved (or firing -> resolved)."""

    FIRING = "firing"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


OPEN = (AlertStatus.FIRING.value, AlertStatus.ACKNOWLEDGED.value)


def _dt(*, nullable: bool = True, index: bool = False) -> Any:  # noqa: ANN401 - SQLModel Field
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class AlertRow(SQLModel, table=True):
    """An alert: one episode of a rule's condition on one device."""

    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_rule_device_status", "rule", "device_id", "status"),)

    id: int | None = Field(default=None, primary_key=True)
    rule: str
    device_id: str = Field(index=True)
    site: str | None = Field(default=None, index=True)
    severity: str = Field(index=True)
    status: str = Field(index=True)
    summary: str
    fired_at: datetime = _dt(nullable=False)
    updated_at: datetime = _dt(nullable=False)
    acked_at: datetime | None = _dt()
    acked_by: str | None = None
    resolved_at: datetime | None = _dt()
    resolved_by: str | None = None
    note: str | None = None


class AlertTransitionRow(SQLModel, table=True):
    """One change of an alert's status, with who and why."""

    __tablename__ = "alert_transitions"

    id: int | None = Field(default=None, primary_key=True)
    alert_id: int = Field(index=True)
    at: datetime = _dt(nullable=False)
    from_status: str | None = None
    to_status: str
    by: str  # "engine" or the person
    note: str | None = None


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


def _encode(ks: KeyState) -> dict[str, Any]:
    out = asdict(ks)
    for k, v in out.items():
        if isinstance(v, datetime):
            out[k] = v.isoformat()
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
_TYPE_FROM_UNIT = {"C": "temperature", "mm/s": "vibration", "%RH": "humidity", "W": "power"}


class AlertEngine(BaseConsumer):
    """Runs the alert rules over the log and keeps alerts (consumer `alerts`)."""

    name = "alerts"
    types = ("*",)
    replay_resets_state = True
    linger_s = 0.01  # alerts are real-time: do not wait for more events
    tick_s = 1.0

    def __init__(self, rules: RuleSet | None = None, *, alerts_in_maintenance: bool = False) -> None:
        self.rules: list[Rule] = list((rules or load_rules_file(SHIPPED_RULES)).rules)
        self.alerts_in_maintenance = alerts_in_maintenance

    def configure(self, settings: Any) -> None:  # noqa: ANN401 - gateway.config.Settings
        """Load the configured rules file (or the shipped one)."""
        path = Path(settings.rules_file) if settings.rules_file else SHIPPED_RULES
        self.rules = list(load_rules_file(path).rules)
        self.alerts_in_maintenance = bool(settings.alerts_in_maintenance)
        log.info("alert engine: %d rules from %s", len(self.rules), path)

    def reset(self, tx: Session) -> None:
        """Forget everything derived (alerts included) before a replay from the start."""
        for table in (AlertTransitionRow, AlertRow, AlertKeyRow, AlertDeviceRow):
            tx.exec(delete(table))

    def handle(self, events: Sequence[Event], tx: Session) -> None:
        """Update each device's view, then step every selected rule with the event."""
        devices: dict[str, AlertDeviceRow] = {}
        keys: dict[tuple[str, str], AlertKeyRow] = {}
        for e in events:
            dev = devices.get(e.subject) or tx.get(AlertDeviceRow, e.subject) or AlertDeviceRow(device_id=e.subject)
            devices[e.subject] = dev
            self._project(dev, e)
            info = DeviceInfo(dev.device_id, dev.type, dev.site)
            obs = Observation(e.time, e.type, e.data, dev.state)
            for rule in self.rules:
                if not rule.select.matches(info):
                    continue
                key = keys.get((rule.name, e.subject)) or self._key(tx, rule.name, e.subject)
                keys[(rule.name, e.subject)] = key
                new, signal = step(rule, _decode(key.state), obs, e.time)
                key.state = _encode(new)
                if signal is not None:
                    self._transition(tx, rule, dev, signal, e.time, {**dev.state, **e.data})
        for row in (*devices.values(), *keys.values()):
            tx.add(row)

    def tick(self, tx: Session, now: datetime) -> None:
        """Step time-driven keys (for, clear_for, clear_after, absence, rate windows) to `now`."""
        timed = {r.name: r for r in self.rules if r.absence or r.rate or r.for_ or r.clear_for or _clears_later(r)}
        if not timed:
            return
        rows = tx.exec(select(AlertKeyRow).where(col(AlertKeyRow.rule).in_(timed))).all()
        for key in rows:
            rule = timed[key.rule]
            new, signal = step(rule, _decode(key.state), None, now)
            encoded = _encode(new)
            if encoded != key.state:
                key.state = encoded
                tx.add(key)
            if signal is not None:
                dev = tx.get(AlertDeviceRow, key.device_id) or AlertDeviceRow(device_id=key.device_id)
                self._transition(tx, rule, dev, signal, now, dict(dev.state))

    @staticmethod
    def _key(tx: Session, rule: str, device_id: str) -> AlertKeyRow:
        return tx.get(AlertKeyRow, (rule, device_id)) or AlertKeyRow(rule=rule, device_id=device_id, state={})

    @staticmethod
    def _project(dev: AlertDeviceRow, e: Event) -> None:
        dev.site = e.site or dev.site
        if e.type == ev.DEVICE_DISCOVERED:
            dev.type = str(e.data.get("type") or dev.type or "")
        elif e.type.startswith("elevator.") and dev.type is None:
            dev.type = "elevator"
        elif e.type == ev.SENSOR_READING and dev.type is None:
            dev.type = _TYPE_FROM_UNIT.get(str(e.data.get("unit")), "sensor")
        change = _STATE_FROM_EVENT.get(e.type)
        if change is not None:
            dev.state = change(dict(dev.state), e.data)  # a new dict: JSON columns are compared by value

    def _transition(  # noqa: PLR0913, PLR0917
        self, tx: Session, rule: Rule, dev: AlertDeviceRow, signal: Signal, at: datetime, values: dict[str, Any]
    ) -> None:
        open_alert = tx.exec(
            select(AlertRow).where(
                col(AlertRow.rule) == rule.name,
                col(AlertRow.device_id) == dev.device_id,
                col(AlertRow.status).in_(OPEN),
            )
        ).first()
        if signal is Signal.FIRE:
            if open_alert is not None:
                return  # exactly one open alert per (rule, device)
            if dev.state.get("mode") == "maintenance" and not self.alerts_in_maintenance:
                return  # planned work: no alerts
            info = DeviceInfo(dev.device_id, dev.type, dev.site)
            alert = AlertRow(
                rule=rule.name, device_id=dev.device_id, site=dev.site, severity=rule.severity.value,
                status=AlertStatus.FIRING.value, summary=rule.render(info, values)[:500], fired_at=at, updated_at=at,
            )  # fmt: skip
            tx.add(alert)
            tx.flush()
            record(tx, alert, None, AlertStatus.FIRING, at, "engine")
        elif open_alert is not None:
            resolve(tx, open_alert, at, "engine", "condition cleared")


def _clears_later(rule: Rule) -> bool:
    return rule.event is not None and rule.event.clear_after is not None


def record(  # noqa: PLR0913, PLR0917
    tx: Session, alert: AlertRow, old: str | None, new: AlertStatus, at: datetime, by: str, note: str | None = None
) -> None:
    """Write one transition of `alert`."""
    assert alert.id is not None  # noqa: S101 - flushed before
    tx.add(AlertTransitionRow(alert_id=alert.id, at=at, from_status=old, to_status=new.value, by=by, note=note))


def resolve(tx: Session, alert: AlertRow, at: datetime, by: str, note: str | None = None) -> None:
    """Resolve an open alert."""
    old = alert.status
    alert.status, alert.resolved_at, alert.resolved_by, alert.updated_at = AlertStatus.RESOLVED.value, at, by, at
    if note:
        alert.note = note
    tx.add(alert)
    record(tx, alert, old, AlertStatus.RESOLVED, at, by, note)


def acknowledge(tx: Session, alert: AlertRow, at: datetime, by: str, note: str | None = None) -> None:
    """Acknowledge a firing alert."""
    old = alert.status
    alert.status, alert.acked_at, alert.acked_by, alert.updated_at = AlertStatus.ACKNOWLEDGED.value, at, by, at
    if note:
        alert.note = note
    tx.add(alert)
    record(tx, alert, old, AlertStatus.ACKNOWLEDGED, at, by, note)


def utcnow() -> datetime:
    """Wall-clock time for people's actions."""
    return datetime.now(UTC)
