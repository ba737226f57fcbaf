"""The parser's two paths agree: what the fast path (msgspec straight from bytes) accepts, the
careful path (JSON parsed first, then validated) accepts the same way, and a message either
refuses gets the same reason and detail from both."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.protocol import _parse_carefully, parse, parse_topic
from gateway.errors import PayloadError

ELEVATOR = {"floor": 3, "direction": "up", "door": "closed", "mode": "normal", "load_kg": 150.5, "fault": None}
SENSOR = {"value": 21.5, "unit": "C"}


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except PayloadError as exc:
        return exc.reason, exc.detail


def _both(topic: str, payload: bytes) -> tuple[tuple[str, Any], tuple[str, Any]]:
    device_id, channel = parse_topic(topic)
    return _outcome(parse, topic, payload), _outcome(_parse_carefully, payload.decode(), device_id, channel, topic)


_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["elevator", "temperature", "up", "open", "normal", "C", "W", "2026-11-28T10:00:00Z", "e-1"]),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def _message(draw: st.DrawFn) -> tuple[str, bytes]:
    channel = draw(st.sampled_from(["state", "telemetry", "status"]))
    if channel == "status":
        body: dict[str, Any] = {"online": True, "type": "elevator", "ts": 1764324000000}
    elif channel == "state":
        body = {"type": "elevator", "seq": 1, "ts": "2026-11-28T10:00:00Z", "site": "hq", "data": dict(ELEVATOR)}
    else:
        body = {"type": "temperature", "seq": 1, "ts": 1764324000000, "data": dict(SENSOR)}
    for _ in range(draw(st.integers(0, 3))):  # a few fields changed, added or removed
        inner = "data" in body and isinstance(body["data"], dict) and draw(st.booleans())
        target = body["data"] if inner else body
        key = draw(st.sampled_from([*target, "extra", "device_id"]))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(_value)
    return f"devices/e-1/{channel}", json.dumps(body).encode()


@settings(max_examples=600, deadline=None)
@given(_message())
def test_the_fast_and_the_careful_path_agree_on_every_message(message: tuple[str, bytes]) -> None:
    fast, careful = _both(*message)
    assert fast == careful


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type": "temperature", "seq": 1, "ts": 1, "data": {"value": NaN, "unit": "C"}}',
        b'{"type": "temperature", "seq": 1, "ts": 1, "data": {"value": -Infinity, "unit": "C"}}',
        b'{"type": "temperature", "seq": 1, "ts": 1, "data": {"value": 1e400, "unit": "C"}}',
        b'{"type": "temperature", "seq": 1, "seq": "1", "ts": 1, "data": {"value": 1, "unit": "C"}}',
    ],
)
def test_numbers_json_has_no_word_for_are_refused_by_both_paths(payload: bytes) -> None:
    fast, careful = _both("devices/t-1/telemetry", payload)
    assert fast == careful
    assert fast[0] == "schema", fast


def test_a_wrong_choice_names_the_allowed_values() -> None:
    body = {"type": "elevator", "seq": 1, "ts": 1, "data": {**ELEVATOR, "door": "ajar"}}
    with pytest.raises(PayloadError) as info:
        parse("devices/e-1/state", json.dumps(body).encode())
    assert info.value.detail == "data.door: Invalid enum value 'ajar' (one of open, closed, opening, closing)"
