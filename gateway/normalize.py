"""Turn a validated device message plus the device's shadow into events.

Pure: `normalize(msg, shadow, received_at=..., stuck_after_s=...)` reads no clock and no database.
The shadow is the gateway's memory of a device (last state, last seq, open trip and fault).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from gateway import events as ev
from gateway.events import Event
from gateway.protocol import DeviceMessage, DeviceType, ElevatorData, SensorData, StatusData


class SeqAnomaly(StrEnum):
    """How a message's seq relates to the last one accepted from its device."""

    GAP = "gap"  # seq jumped ahead: messages in between never arrived (or the device restarted)
    DUPLICATE = "duplicate"  # same seq again: a redelivery, stored once
    OUT_OF_ORDER = "out_of_order"  # an older seq after a newer one (late, or redelivered after a crash)


@dataclass(slots=True, frozen=True)
class Shadow:
    """What the gateway knows of a device between messages."""

    device_id: str
    type: str | None = None
    site: str | None = None
    last_seq: int | None = None
    online: bool = False
    last_seen: datetime | None = None
    state: dict[str, Any] = field(default_factory=dict)
    # Elevator bookkeeping, kept so a diff can say how long things took.
    trip_from: int | None = None
    trip_started: datetime | None = None
    fault_since: datetime | None = None
    floor_since: datetime | None = None
    stuck: bool = False


@dataclass(slots=True, frozen=True)
class Normalized:
    """The events a message produced, the device's new shadow, and any seq anomaly."""

    events: tuple[Event, ...]
    shadow: Shadow
    anomaly: SeqAnomaly | None = None


class _Builder:
    def __init__(self, msg: DeviceMessage, time: datetime) -> None:
        self.msg = msg
        self.time = time
        self.out: list[Event] = []

    def add(self, etype: str, data: dict[str, Any]) -> None:
        m = self.msg
        part = len(self.out)
        eid = (
            f"{m.device_id}-{m.seq}-{part}"
            if m.seq is not None
            else f"{m.device_id}-{etype}-{self.time.timestamp():.6f}"
        )
        self.out.append(
            Event(
                id=eid,
                source=f"devices/{m.device_id}",
                type=etype,
                time=self.time,
                subject=m.device_id,
                data=data,
                sequence=m.seq,
                part=part,
                site=m.site,
            )
        )


def _seq_anomaly(seq: int, last: int | None) -> SeqAnomaly | None:
    if last is None or seq == last + 1:
        return None
    if seq > last:
        return SeqAnomaly.GAP
    if seq == last:
        return SeqAnomaly.DUPLICATE
    return SeqAnomaly.OUT_OF_ORDER


def normalize(
    msg: DeviceMessage, shadow: Shadow | None, *, received_at: datetime, stuck_after_s: float = 60.0
) -> Normalized:
    """Events for one message. A stale state message (seq not above the last) yields none."""
    prev = shadow or Shadow(device_id=msg.device_id)
    if isinstance(msg.data, StatusData):
        return _status(msg, msg.data, prev, received_at)
    assert msg.seq is not None  # noqa: S101 - protocol guarantees seq on state and telemetry
    anomaly = _seq_anomaly(msg.seq, prev.last_seq)
    time = msg.ts or received_at
    b = _Builder(msg, time)
    stale = anomaly in (SeqAnomaly.DUPLICATE, SeqAnomaly.OUT_OF_ORDER)
    if isinstance(msg.data, SensorData):
        if anomaly is not SeqAnomaly.DUPLICATE:
            # A late reading is still a reading; the store drops it if this seq was stored before.
            b.add(ev.SENSOR_READING, {"value": msg.data.value, "unit": msg.data.unit})
        new = prev if stale else _touch(prev, msg, received_at, {"value": msg.data.value, "unit": msg.data.unit})
        return Normalized(tuple(b.out), new, anomaly)
    if stale:
        # A state older than the one we hold says nothing new: no events, shadow untouched.
        return Normalized((), prev, anomaly)
    assert isinstance(msg.data, ElevatorData)  # noqa: S101 - only elevators publish state
    new = _elevator(b, prev, msg.data, stuck_after_s)
    if not prev.online and shadow is not None:
        b.add(ev.DEVICE_ONLINE, {"reason": "message"})
    new = _touch(new, msg, received_at, msg.data.model_dump())
    return Normalized(tuple(b.out), new, anomaly)


def _touch(sh: Shadow, msg: DeviceMessage, received_at: datetime, state: dict[str, Any]) -> Shadow:
    return replace(
        sh,
        type=msg.type.value if msg.type else sh.type,
        site=msg.site or sh.site,
        last_seq=msg.seq if msg.seq is not None else sh.last_seq,
        online=True,
        last_seen=received_at,
        state=state,
    )


def _status(msg: DeviceMessage, data: StatusData, prev: Shadow, received_at: datetime) -> Normalized:
    b = _Builder(msg, msg.ts or received_at)
    known = prev.last_seen is not None or prev.type is not None
    if data.online != prev.online or not known:
        b.add(ev.DEVICE_ONLINE if data.online else ev.DEVICE_OFFLINE, {"reason": "status"})
    new = replace(
        prev,
        type=msg.type.value if msg.type else prev.type,
        site=msg.site or prev.site,
        online=data.online,
        last_seen=received_at if data.online else prev.last_seen,
    )
    return Normalized(tuple(b.out), new)


def _elevator(b: _Builder, prev: Shadow, cur: ElevatorData, stuck_after_s: float) -> Shadow:
    t = b.time
    if not prev.state:
        # First state we see: say so, with the state, and raise any fault already present.
        b.add(ev.DEVICE_DISCOVERED, {"type": DeviceType.ELEVATOR.value, "state": cur.model_dump()})
        moving = cur.direction != "idle"
        sh = replace(
            prev,
            trip_from=cur.floor if moving else None,
            trip_started=t if moving else None,
            floor_since=t,
            fault_since=t if cur.fault else None,
        )
        if cur.fault:
            b.add(ev.FAULT_RAISED, {"code": cur.fault, "floor": cur.floor, "load_kg": cur.load_kg})
            if cur.fault == "STUCK":
                b.add(ev.STUCK, {"reason": "fault", "floor": cur.floor, "load_kg": cur.load_kg})
                sh = replace(sh, stuck=True)
        return sh
    old = ElevatorData.model_validate(prev.state)
    sh = prev
    if old.mode != cur.mode:
        b.add(ev.MODE_CHANGED, {"from": old.mode, "to": cur.mode})
    sh = _fault_diff(b, sh, old, cur)
    sh = _trip_diff(b, sh, old, cur)
    if old.door != cur.door:
        if cur.door == "open":
            b.add(ev.DOOR_OPENED, {"floor": cur.floor})
        elif cur.door == "closed":
            b.add(ev.DOOR_CLOSED, {"floor": cur.floor})
    return _stuck_check(b, sh, old, cur, stuck_after_s)


def _fault_diff(b: _Builder, sh: Shadow, old: ElevatorData, cur: ElevatorData) -> Shadow:
    if old.fault == cur.fault:
        return sh
    t = b.time
    if old.fault:
        since = sh.fault_since
        duration = (t - since).total_seconds() if since else None
        b.add(ev.FAULT_CLEARED, {"code": old.fault, "duration_s": duration, "floor": cur.floor})
    if cur.fault:
        b.add(ev.FAULT_RAISED, {"code": cur.fault, "floor": cur.floor, "load_kg": cur.load_kg})
    return replace(sh, fault_since=t if cur.fault else None)


def _trip_diff(b: _Builder, sh: Shadow, old: ElevatorData, cur: ElevatorData) -> Shadow:
    t = b.time
    was_moving, moving = old.direction != "idle", cur.direction != "idle"
    if not was_moving and moving:
        b.add(ev.TRIP_STARTED, {"from_floor": old.floor, "direction": cur.direction})
        return replace(sh, trip_from=old.floor, trip_started=t, floor_since=t)
    if was_moving and not moving:
        start = sh.trip_from if sh.trip_from is not None else old.floor
        duration = (t - sh.trip_started).total_seconds() if sh.trip_started else None
        b.add(
            ev.TRIP_COMPLETED,
            {"from_floor": start, "to_floor": cur.floor, "floors": abs(cur.floor - start), "duration_s": duration},
        )
        return replace(sh, trip_from=None, trip_started=None, floor_since=t)
    if old.floor != cur.floor:
        return replace(sh, floor_since=t)
    return sh


def _stuck_check(b: _Builder, sh: Shadow, old: ElevatorData, cur: ElevatorData, stuck_after_s: float) -> Shadow:
    if cur.fault == "STUCK" and old.fault != "STUCK":
        b.add(ev.STUCK, {"reason": "fault", "floor": cur.floor, "load_kg": cur.load_kg})
        return replace(sh, stuck=True)
    moving = cur.direction != "idle"
    progressed = cur.floor != old.floor or not moving
    if progressed and cur.fault != "STUCK":
        return replace(sh, stuck=False) if sh.stuck else sh
    since = sh.floor_since
    if moving and not sh.stuck and since is not None and (b.time - since).total_seconds() > stuck_after_s:
        b.add(
            ev.STUCK,
            {
                "reason": "no_progress",
                "floor": cur.floor,
                "load_kg": cur.load_kg,
                "seconds": (b.time - since).total_seconds(),
            },
        )
        return replace(sh, stuck=True)
    return sh
