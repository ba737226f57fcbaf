"""The alert engine's working state: device projections and rule keys as stored, the batch in hand,
and which readings a span must be read for."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from msgspec.structs import replace
from sqlmodel import Session

from alerts.evaluation import KeyState
from alerts.rules import Rule
from gateway.core import events as ev
from gateway.core.events import Event
from gateway.core.protocol import SENSOR_UNITS, DeviceType, sensor_type_of
from gateway.log import spans

log = logging.getLogger(__name__)


_KEY_FIELDS = ("breaching", "since", "clear_since", "breaches", "firing", "last_seen", "fired_at")


def encode(ks: KeyState) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in _KEY_FIELDS:
        v = getattr(ks, k)
        out[k] = v.isoformat() if isinstance(v, datetime) else v
    out["hits"] = [t.isoformat() for t in ks.hits]
    return out


def decode(raw: dict[str, Any]) -> KeyState:
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
class DeviceView:
    type: str | None = None
    site: str | None = None
    state: dict[str, Any] = field(default_factory=dict)


def absence_only_moved(rule: Rule, old: KeyState | None, new: KeyState) -> bool:
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
class Batch:
    """Working copies for one transaction; they become the engine's memory when it commits."""

    tx: Session
    devices: dict[str, DeviceView] = field(default_factory=dict)
    keys: dict[tuple[str, str], KeyState] = field(default_factory=dict)
    written: dict[tuple[str, str], KeyState] = field(default_factory=dict)
    flaps: dict[tuple[str, str], datetime | None] = field(default_factory=dict)


SENSOR_TYPES = {t.value for t in SENSOR_UNITS}


VOLATILE = ("value", "unit")  # change with every reading; not worth a write each time


def lasting(dev: DeviceView | None) -> tuple[str | None, str | None, dict[str, Any]] | None:
    """What is persisted of a device view: a sensor's latest value is not (it comes again)."""
    if dev is None:
        return None
    return dev.type, dev.site, {k: v for k, v in dev.state.items() if k not in VOLATILE}


def project(dev: DeviceView, e: Event) -> None:
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


def may_change(rule: Rule, event_type: str) -> bool:
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


def clears_later(rule: Rule) -> bool:
    return rule.event is not None and rule.event.clear_after is not None


def reading_limits(rules: Sequence[Rule]) -> list[spans.Limit] | None:
    """The readings beyond some rule's limit, the ones read one by one; None: read them all.

    Each threshold rule counts only for the units of the sensor types it selects: a power
    meter's `below: 50` says nothing about a thermometer reading 21.
    """
    limits: list[spans.Limit] = []
    for r in rules:
        if r.absence is not None or not may_change(r, ev.SENSOR_READING):
            continue
        t = r.threshold
        if t is None or t.field != "value":
            return None  # a rule that needs every reading
        units = tuple(SENSOR_UNITS[DeviceType(x)] for x in r.select.type or () if x in SENSOR_TYPES)
        if r.select.type is not None and not units:
            continue  # selects no sensor type at all
        limits.append(spans.Limit(units, t.above, t.below))  # exactly one of them is set
    return limits
