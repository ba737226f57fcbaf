"""Turn a validated device message plus the device's shadow into events.

Pure: `normalize(msg, shadow, received_at=..., stuck_after_s=...)` reads no clock and no database.
The shadow is the gateway's memory of a device (last state, last seq, open trip and fault).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import msgspec
from msgspec.structs import replace

from gateway.core import events as ev
from gateway.core.events import Event
from gateway.core.protocol import DeviceMessage, DeviceType, ElevatorData, Reason, SensorData, StatusData
from gateway.errors import PayloadError


class SeqAnomaly(StrEnum):
    """How a message's seq relates to the last one accepted from its device."""

    GAP = "gap"  # seq jumped ahead: messages in between never arrived (or the device restarted)
    DUPLICATE = "duplicate"  # same seq again: a redelivery, stored once
    OUT_OF_ORDER = "out_of_order"  # an older seq after a newer one (late, or redelivered after a crash)
    RESET = "reset"  # far below the last one: the device's counter restarted (or one bad seq came before)


SEQ_MAX = 2**63 - 1  # the log's sequence column (BIGINT)


class Shadow(msgspec.Struct, frozen=True, gc=False):
    """What the gateway knows of a device between messages."""

    device_id: str
    type: str | None = None
    site: str | None = None
    last_seq: int | None = None
    online: bool = False
    last_seen: datetime | None = None
    state: dict[str, Any] = {}
    # Elevator bookkeeping, kept so a diff can say how long things took.
    trip_from: int | None = None
    trip_started: datetime | None = None
    fault_since: datetime | None = None
    floor_since: datetime | None = None
    stuck: bool = False
    # Added to the device's seq in the log: each counter reset moves it, so that the log's
    # sequence goes on growing (and the idempotency key stays unique) when the device starts over.
    seq_base: int = 0


class Normalized(msgspec.Struct, frozen=True, gc=False):
    """The events a message produced, the device's new shadow, any seq anomaly, and whether the
    device's clock was off by more than the skew allowed (its events then carry the receive time)."""

    events: tuple[Event, ...]
    shadow: Shadow
    anomaly: SeqAnomaly | None = None
    clock_skewed: bool = False


def event_time(ts: datetime | None, received_at: datetime, max_skew_s: float | None) -> tuple[datetime, bool]:
    """The time a message's events carry: the device's `ts`, unless it is missing or further than
    `max_skew_s` from the gateway's receive time (then the receive time, and True): one device's
    clock set to 2100 must not stretch the fleet's figures, nor one at 1970 shrink them."""
    if ts is None:
        return received_at, False
    if max_skew_s is not None and abs((ts - received_at).total_seconds()) > max_skew_s:
        return received_at, True
    return ts, False


class _Builder:
    def __init__(self, msg: DeviceMessage, time: datetime, seq_base: int = 0) -> None:
        self.msg = msg
        self.time = time
        self.seq = msg.seq + seq_base if msg.seq is not None else None  # the log's sequence
        self.out: list[Event] = []

    def add(self, etype: str, data: dict[str, Any]) -> None:
        m = self.msg
        part = len(self.out)
        eid = (
            f"{m.device_id}-{self.seq}-{part}"
            if self.seq is not None
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
                sequence=self.seq,
                part=part,
                site=m.site,
            )
        )


def _seq_anomaly(seq: int, last: int | None, reset_below: int | None = None) -> SeqAnomaly | None:
    if last is None or seq == last + 1:
        return None
    if seq > last:
        return SeqAnomaly.GAP
    if seq == last:
        return SeqAnomaly.DUPLICATE
    if reset_below is not None and seq < last - reset_below:
        return SeqAnomaly.RESET
    return SeqAnomaly.OUT_OF_ORDER


def _reset(prev: Shadow, seq: int, topic_device: str, window: int) -> Shadow:
    """The shadow after a counter reset to `seq`: the log's sequence goes on above the last one,
    `window` further on. A message of the new count that arrives late (up to `window` below the
    device's newest seq: not a reset itself) is then logged above every sequence of the old count,
    not on one of them (where the store would take it for a repeat and drop it)."""
    assert prev.last_seq is not None  # noqa: S101 - a reset needs a last seq
    last_logged = prev.seq_base + prev.last_seq
    if last_logged + window >= SEQ_MAX:
        msg = f"device {topic_device}: the log's sequence is exhausted; provision the device under a new id"
        raise PayloadError(Reason.SCHEMA, msg)
    # base + seq == last_logged + 1 + window: so base + (seq - window) == last_logged + 1.
    return replace(prev, seq_base=last_logged + 1 + window - seq)


def normalize(  # noqa: PLR0913
    msg: DeviceMessage,
    shadow: Shadow | None,
    *,
    received_at: datetime,
    stuck_after_s: float = 60.0,
    max_skew_s: float | None = None,
    reset_below: int | None = None,
) -> Normalized:
    """Events for one message. A stale state message (seq not above the last) yields none.
    Device time further than `max_skew_s` from `received_at` is replaced by `received_at`.
    A seq more than `reset_below` under the last one is a counter reset: the message is taken
    as new, after a `device.seq.reset` event, so that no device is muted by one huge seq or by
    starting its count over."""
    prev = shadow or Shadow(device_id=msg.device_id)
    time, skewed = event_time(msg.ts, received_at, max_skew_s)
    if isinstance(msg.data, StatusData):
        return replace(_status(msg, msg.data, prev, received_at, time), clock_skewed=skewed)
    assert msg.seq is not None  # noqa: S101 - protocol guarantees seq on state and telemetry
    anomaly = _seq_anomaly(msg.seq, prev.last_seq, reset_below)
    if anomaly is SeqAnomaly.RESET:
        last = prev.last_seq
        assert reset_below is not None  # noqa: S101 - a reset is only told with it
        prev = _reset(prev, msg.seq, msg.device_id, reset_below)
        b = _Builder(msg, time, prev.seq_base)
        b.add(ev.SEQ_RESET, {"last_seq": last, "seq": msg.seq, "reason": f"seq went back by more than {reset_below}"})
    else:
        b = _Builder(msg, time, prev.seq_base)
    if msg.seq + prev.seq_base > SEQ_MAX:
        msg_ = f"seq {msg.seq} after counter resets exceeds the log's sequence range"
        raise PayloadError(Reason.SCHEMA, msg_)
    stale = anomaly in (SeqAnomaly.DUPLICATE, SeqAnomaly.OUT_OF_ORDER)
    if isinstance(msg.data, SensorData):
        if anomaly is not SeqAnomaly.DUPLICATE:
            # A late reading is still a reading; the store drops it if this seq was stored before.
            b.add(ev.SENSOR_READING, {"value": msg.data.value, "unit": msg.data.unit})
        new = prev if stale else _touch(prev, msg, received_at, {"value": msg.data.value, "unit": msg.data.unit})
        return Normalized(tuple(b.out), new, anomaly, skewed)
    if stale:
        # A state older than the one we hold says nothing new: no events, shadow untouched.
        return Normalized((), prev, anomaly, skewed)
    assert isinstance(msg.data, ElevatorData)  # noqa: S101 - only elevators publish state
    new = _elevator(b, prev, msg.data, stuck_after_s)
    if not prev.online and shadow is not None:
        b.add(ev.DEVICE_ONLINE, {"reason": "message"})
    new = _touch(new, msg, received_at, msg.data.model_dump())
    return Normalized(tuple(b.out), new, anomaly, skewed)


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


def _status(msg: DeviceMessage, data: StatusData, prev: Shadow, received_at: datetime, time: datetime) -> Normalized:
    b = _Builder(msg, time)
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
    old = msgspec.convert(prev.state, ElevatorData)
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
