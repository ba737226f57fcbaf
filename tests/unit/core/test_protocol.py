"""The wire protocol: what is accepted, and the reason for everything that is not."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.protocol import ElevatorData, Reason, SensorData, StatusData, parse, parse_ts
from gateway.errors import PayloadError

ELEVATOR = {"floor": 3, "direction": "up", "door": "closed", "mode": "normal", "load_kg": 150.5, "fault": None}


def msg(**changes: Any) -> bytes:
    body = {"type": "elevator", "seq": 42, "ts": "2026-11-28T10:00:00.123Z", "site": "hq", "data": ELEVATOR}
    return json.dumps({**body, **changes}).encode()


def reason_of(topic: str, payload: bytes, **kw: Any) -> str:
    with pytest.raises(PayloadError) as info:
        parse(topic, payload, **kw)
    return info.value.reason


def test_valid_elevator_state_parses_with_identity_from_the_topic() -> None:
    m = parse("devices/elev-1/state", msg())
    assert m.device_id == "elev-1"
    assert m.seq == 42
    assert m.site == "hq"
    assert m.ts == datetime(2026, 11, 28, 10, 0, 0, 123000, tzinfo=UTC)
    assert isinstance(m.data, ElevatorData)
    assert m.data.floor == 3


def test_epoch_milliseconds_and_offsets_are_accepted_as_device_time() -> None:
    assert parse_ts(1764324000123) == datetime(2025, 11, 28, 10, 0, 0, 123000, tzinfo=UTC)
    assert parse_ts("2026-11-28T11:00:00+01:00") == datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def test_sensor_reading_parses_and_unit_must_match_type() -> None:
    body = {"type": "vibration", "seq": 1, "ts": 1764324000000, "data": {"value": 2.5, "unit": "mm/s"}}
    m = parse("devices/vib-1/telemetry", json.dumps(body).encode())
    assert isinstance(m.data, SensorData)
    assert m.data.value == 2.5
    body["data"] = {"value": 2.5, "unit": "C"}
    assert reason_of("devices/vib-1/telemetry", json.dumps(body).encode()) == "schema"


def test_status_message_needs_no_seq() -> None:
    m = parse("devices/elev-1/status", b'{"online": false}')
    assert isinstance(m.data, StatusData)
    assert m.data.online is False
    assert m.seq is None


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("devices/elev-1/state", b"{not json", "bad_json"),
        ("devices/elev-1/state", b"\xc3\x28", "not_utf8"),
        ("devices/elev-1/state", b"[1, 2]", "schema"),
        ("devices/elev-1/state", msg(seq=-1), "schema"),
        ("devices/elev-1/state", msg(seq=True), "schema"),
        ("devices/elev-1/state", msg(seq="42"), "schema"),
        ("devices/elev-1/state", msg(ts="2026-11-28T10:00:00"), "schema"),
        ("devices/elev-1/state", msg(ts="yesterday"), "schema"),
        ("devices/elev-1/state", msg(data={**ELEVATOR, "door": "ajar"}), "schema"),
        ("devices/elev-1/state", msg(data={**ELEVATOR, "fault": "GREMLINS"}), "schema"),
        ("devices/elev-1/state", msg(data={**ELEVATOR, "floor": 2.5}), "schema"),
        ("devices/elev-1/state", msg(data={**ELEVATOR, "extra": 1}), "schema"),
        ("devices/elev-1/state", msg(type="toaster"), "unknown_type"),
        ("devices/elev-1/state", msg(device_id="elev-2"), "device_mismatch"),
        ("devices/elev-1/telemetry", msg(), "channel_mismatch"),
        ("devices/elev-1/status", b'{"online": "yes"}', "schema"),
        ("devices/elev-1/status", b'{"online": true, "device_id": "elev-9"}', "device_mismatch"),
        ("devices/elev-1/firmware", msg(), "bad_topic"),
        ("devices/elev 1/state", msg(), "bad_topic"),
        ("devices/elev-1/state/extra", msg(), "bad_topic"),
        ("sensors/elev-1/state", msg(), "bad_topic"),
        ("devices/" + "x" * 65 + "/state", msg(), "bad_topic"),
    ],
)
def test_each_kind_of_bad_message_has_its_reason(topic: str, payload: bytes, reason: str) -> None:
    assert reason_of(topic, payload) == reason


def test_size_limit_is_checked_before_anything_else() -> None:
    assert reason_of("devices/elev-1/state", msg(), max_bytes=100) == "too_large"
    assert reason_of("not/a/topic/at/all", b"x" * 200, max_bytes=100) == "too_large"


def test_deeply_nested_json_is_rejected_not_crashing() -> None:
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    assert reason_of("devices/elev-1/state", deep, max_bytes=10**6) in ("bad_json", "schema")


@given(st.binary(max_size=300), st.text(max_size=40))
def test_arbitrary_input_is_either_parsed_or_rejected_with_a_reason(payload: bytes, device: str) -> None:
    try:
        parse(f"devices/{device}/state", payload)
    except PayloadError as exc:
        problem = exc
    else:
        return
    assert problem.reason
    assert problem.detail


elevator_data = st.fixed_dictionaries(
    {
        "floor": st.integers(-10, 300),
        "direction": st.sampled_from(["up", "down", "idle"]),
        "door": st.sampled_from(["open", "closed", "opening", "closing"]),
        "mode": st.sampled_from(["normal", "maintenance", "fault", "out_of_service"]),
        "load_kg": st.floats(0, 5000, allow_nan=False),
        "fault": st.sampled_from([None, "DOOR_JAM", "STUCK", "OVERSPEED", "LEVELLING", "POWER"]),
    }
)


@given(elevator_data, st.integers(0, 2**62), st.integers(0, 4_000_000_000_000))
def test_every_valid_elevator_message_round_trips(data: dict[str, Any], seq: int, ts_ms: int) -> None:
    m = parse("devices/e-1/state", json.dumps({"type": "elevator", "seq": seq, "ts": ts_ms, "data": data}).encode())
    assert isinstance(m.data, ElevatorData)
    assert m.data.model_dump() == {**data, "load_kg": float(data["load_kg"])}
    assert m.seq == seq


def test_a_huge_integer_timestamp_is_a_schema_error_not_a_crash() -> None:
    # Found by tests/integration/test_fuzz.py: math.isfinite(10**400) raised OverflowError.
    body = b'{"type": "temperature", "seq": 1, "ts": 1' + b"0" * 400 + b', "data": {"value": 1, "unit": "C"}}'
    with pytest.raises(PayloadError) as info:
        parse("devices/t-1/telemetry", body)
    assert info.value.reason == Reason.SCHEMA


@pytest.mark.parametrize(
    "ts",
    [
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:30:00-23:59",
        "0001-01-01T00:00:00+14:00",
    ],
)
def test_offset_dates_at_the_limits_are_schema_errors_not_crashes(ts: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse("devices/elev-1/state", msg(ts=ts))
    assert info.value.reason == Reason.SCHEMA
    assert "out of range" in info.value.detail


@pytest.mark.parametrize("field", ["seq", "value"])
def test_a_number_of_thousands_of_digits_is_a_schema_error_not_a_crash(field: str) -> None:
    body = msg(seq=1) if field == "seq" else msg(type="temperature", data={"value": 1, "unit": "C"})
    huge = body.replace(b'"seq": 1' if field == "seq" else b'"value": 1', f'"{field}": {"9" * 5000}'.encode())
    topic = "devices/t-1/telemetry" if field == "value" else "devices/elev-1/state"
    with pytest.raises(PayloadError) as info:
        parse(topic, huge)
    assert info.value.reason == Reason.SCHEMA
    assert "too long" in info.value.detail


@pytest.mark.parametrize("ts", [None, True, ["x"], {"a": 1}])
def test_a_ts_of_the_wrong_json_type_is_a_schema_error_not_a_crash(ts: object) -> None:
    with pytest.raises(PayloadError) as info:
        parse("devices/elev-1/state", msg(ts=ts))
    assert info.value.reason == Reason.SCHEMA
    assert info.value.detail.startswith("ts:")


@pytest.mark.parametrize("where", ["site", "key", "nested"])
def test_nul_characters_anywhere_are_schema_errors(where: str) -> None:
    body = {
        "site": msg(site="a\x00b"),
        "key": msg(**{"x\x00": 1}),
        "nested": msg(data={**ELEVATOR, "fault": "DOOR\x00JAM"}),
    }[where]
    with pytest.raises(PayloadError) as info:
        parse("devices/elev-1/state", body)
    assert info.value.reason == Reason.SCHEMA
    assert "NUL" in info.value.detail
