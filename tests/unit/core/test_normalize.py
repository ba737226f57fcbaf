"""The normaliser: a message plus the device's shadow gives the right events, and nothing twice."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.normalize import SeqAnomaly, Shadow, normalize
from gateway.core.protocol import DeviceMessage, DeviceType, ElevatorData, SensorData, StatusData

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
IDLE = {"floor": 0, "direction": "idle", "door": "closed", "mode": "normal", "load_kg": 0.0, "fault": None}


def state(seq: int, t: float = 0.0, **data: Any) -> DeviceMessage:
    return DeviceMessage(
        device_id="e1",
        channel="state",
        type=DeviceType.ELEVATOR,
        seq=seq,
        ts=T0 + timedelta(seconds=t),
        site="hq",
        data=ElevatorData(**{**IDLE, **data}),
    )


def run(messages: list[DeviceMessage], shadow: Shadow | None = None, **kw: Any) -> tuple[list[Any], Shadow]:
    out = []
    for m in messages:
        n = normalize(m, shadow, received_at=m.ts or T0, **kw)
        out.extend(n.events)
        shadow = n.shadow
    assert shadow is not None
    return out, shadow


def types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


def test_first_state_is_discovered_then_only_changes_produce_events() -> None:
    events, sh = run([state(1), state(2, load_kg=75.0)])
    assert types(events) == ["device.discovered"]
    assert sh.last_seq == 2
    assert sh.state["load_kg"] == 75.0


def test_door_cycle_gives_opened_and_closed() -> None:
    events, _ = run(
        [state(1), state(2, door="opening"), state(3, door="open"), state(4, door="closing"), state(5, door="closed")]
    )
    assert types(events)[1:] == ["elevator.door.opened", "elevator.door.closed"]


def test_trip_reports_from_and_to_floor_and_duration() -> None:
    events, _ = run(
        [
            state(1, floor=2),
            state(2, 1, floor=2, direction="up"),
            state(3, 3, floor=3, direction="up"),
            state(4, 5, floor=4, direction="up"),
            state(5, 6, floor=4, direction="idle"),
        ]
    )
    started = next(e for e in events if e.type == "elevator.trip.started")
    done = next(e for e in events if e.type == "elevator.trip.completed")
    assert started.data == {"from_floor": 2, "direction": "up"}
    assert done.data == {"from_floor": 2, "to_floor": 4, "floors": 2, "duration_s": 5.0}


def test_fault_raised_then_cleared_with_its_duration_and_mode_changes() -> None:
    events, sh = run([state(1), state(2, 10, mode="fault", fault="DOOR_JAM"), state(3, 70, mode="normal", fault=None)])
    assert types(events)[1:] == [
        "elevator.mode.changed",
        "elevator.fault.raised",
        "elevator.mode.changed",
        "elevator.fault.cleared",
    ]
    cleared = events[-1]
    assert cleared.data["code"] == "DOOR_JAM"
    assert cleared.data["duration_s"] == 60.0
    assert sh.fault_since is None


def test_fault_code_change_clears_old_and_raises_new() -> None:
    events, _ = run([state(1, mode="fault", fault="DOOR_JAM"), state(2, mode="fault", fault="POWER")])
    assert [(e.type, e.data.get("code")) for e in events if e.type.startswith("elevator.fault")] == [
        ("elevator.fault.raised", "DOOR_JAM"),
        ("elevator.fault.cleared", "DOOR_JAM"),
        ("elevator.fault.raised", "POWER"),
    ]


def test_stuck_fault_code_emits_stuck_once() -> None:
    events, _ = run(
        [
            state(1, direction="up"),
            state(2, 1, direction="up", mode="fault", fault="STUCK", load_kg=150.0),
            state(3, 2, direction="up", mode="fault", fault="STUCK", load_kg=155.0),
        ]
    )
    stuck = [e for e in events if e.type == "elevator.stuck"]
    assert len(stuck) == 1
    assert stuck[0].data == {"reason": "fault", "floor": 0, "load_kg": 150.0}


def test_moving_without_reaching_a_floor_for_too_long_is_stuck() -> None:
    msgs = [
        state(1, 0, floor=5),
        state(2, 1, floor=5, direction="down"),
        state(3, 100, floor=5, direction="down", load_kg=80.0),
    ]
    events, sh = run(msgs, stuck_after_s=60)
    stuck = [e for e in events if e.type == "elevator.stuck"]
    assert len(stuck) == 1
    assert stuck[0].data["reason"] == "no_progress"
    assert sh.stuck
    events, sh = run([state(4, 101, floor=4, direction="down")], sh, stuck_after_s=60)
    assert not sh.stuck


def test_duplicate_and_older_state_produce_nothing_and_leave_the_shadow() -> None:
    _, sh = run([state(1), state(5, door="opening")])
    dup = normalize(state(5, door="open"), sh, received_at=T0)
    old = normalize(state(3, door="open"), sh, received_at=T0)
    assert (dup.events, dup.anomaly, dup.shadow) == ((), SeqAnomaly.DUPLICATE, sh)
    assert (old.events, old.anomaly, old.shadow) == ((), SeqAnomaly.OUT_OF_ORDER, sh)
    gap = normalize(state(9), sh, received_at=T0)
    assert gap.anomaly is SeqAnomaly.GAP


def test_late_sensor_reading_is_kept_but_does_not_rewind_the_shadow() -> None:
    def reading(seq: int, value: float) -> DeviceMessage:
        return DeviceMessage(
            "t1", "telemetry", DeviceType.TEMPERATURE, seq, T0, None, SensorData(value=value, unit="C")
        )

    _, sh = run([reading(1, 20.0), reading(3, 22.0)])
    late = normalize(reading(2, 21.0), sh, received_at=T0)
    assert [e.data["value"] for e in late.events] == [21.0]
    assert late.shadow.last_seq == 3
    assert late.anomaly is SeqAnomaly.OUT_OF_ORDER
    assert normalize(reading(3, 22.0), sh, received_at=T0).events == ()


def test_status_changes_emit_online_and_offline_once_each() -> None:
    def status(online: bool) -> DeviceMessage:
        return DeviceMessage("e1", "status", None, None, None, None, StatusData(online=online))

    events, sh = run([status(True), status(True), status(False), status(False), status(True)])
    assert types(events) == ["device.online", "device.offline", "device.online"]
    assert sh.online


def test_data_from_a_device_marked_offline_brings_it_back_online() -> None:
    _, sh = run([state(1)])
    offline = normalize(
        DeviceMessage("e1", "status", None, None, None, None, StatusData(online=False)), sh, received_at=T0
    )
    back = normalize(state(2, load_kg=80.0), offline.shadow, received_at=T0)
    assert types(list(back.events)) == ["device.online"]
    assert back.shadow.online


elevator_states = st.fixed_dictionaries(
    {
        "floor": st.integers(0, 5),
        "direction": st.sampled_from(["up", "down", "idle"]),
        "door": st.sampled_from(["open", "closed", "opening", "closing"]),
        "mode": st.sampled_from(["normal", "maintenance", "fault", "out_of_service"]),
        "load_kg": st.sampled_from([0.0, 75.0, 150.0]),
        "fault": st.sampled_from([None, "DOOR_JAM", "STUCK", "POWER"]),
    }
)


@given(st.lists(elevator_states, min_size=1, max_size=40), st.lists(st.integers(1, 3), min_size=40, max_size=40))
def test_any_state_sequence_gives_consistent_events(states: list[dict[str, Any]], steps: list[int]) -> None:
    seq, msgs = 0, []
    for i, data in enumerate(states):
        seq += steps[i]
        msgs.append(state(seq, float(i), **data))
    events, sh = run(msgs)
    c = Counter(types(events))
    # Trips and faults nest properly: every completion follows a start, every clear a raise.
    assert c["elevator.trip.completed"] <= c["elevator.trip.started"] + 1
    assert c["elevator.fault.cleared"] <= c["elevator.fault.raised"]
    assert c["elevator.fault.raised"] - c["elevator.fault.cleared"] == (1 if states[-1]["fault"] else 0)
    assert c["device.discovered"] == 1
    # Event ids are unique and deterministic: the same input gives the same ids.
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids))
    assert [e.id for e in run(msgs)[0]] == ids
    assert sh.last_seq == seq
    # Replaying the same messages against the final shadow produces nothing new.
    assert run(msgs, sh)[0] == []
