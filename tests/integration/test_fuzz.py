"""Fuzzing: hostile device input never crashes the parser or the normaliser, and through the real
broker and gateway every message is accounted for (stored or dead-lettered with a reason)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func
from sqlmodel import select

from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.core.events import EVENT_TYPES
from gateway.core.normalize import Shadow, normalize
from gateway.core.protocol import Reason, parse
from gateway.errors import PayloadError
from gateway.log import DeadLetterRow, EventRow
from tests.support.gateway import running_gateway, settled, wait_for

NOW = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
TYPES = ["elevator", "temperature", "vibration", "humidity", "power", "toaster", "", 7, None]
UNITS = ["C", "mm/s", "%RH", "W", "F", "", None, 3]
DEVICES = ["el-1", "el-2", "t-1", "p-1", "x" * 64, "x" * 65, "bad+id", "bad#id", ""]


def _number() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([10**400, -(10**400), 2**63, 2**64, 0, -1]),
    )


def _junk() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.one_of(st.none(), st.booleans(), _number(), st.text(max_size=20)),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=12,
    )


def _ts() -> st.SearchStrategy[Any]:
    day = timedelta(days=1)
    return st.one_of(
        st.sampled_from([NOW, NOW - day, NOW + day, NOW - 400 * day]).map(lambda t: t.isoformat()),
        st.sampled_from([NOW, NOW + day]).map(lambda t: int(t.timestamp() * 1000)),
        st.sampled_from(["2026-11-28T10:00:00", "yesterday", "", "2026-13-45T99:99:99Z"]),
        _number(),
    )


@st.composite
def hostile(draw: st.DrawFn) -> tuple[str, bytes]:
    """A topic and payload: plausible messages with one or more things wrong (or none)."""
    device = draw(st.sampled_from(DEVICES))
    channel = draw(st.sampled_from(["state", "telemetry", "status", "firmware", ""]))
    kind = draw(st.sampled_from(TYPES))
    data: Any
    if kind == "elevator":
        data = {
            "floor": draw(st.one_of(st.integers(-3, 200), _junk())),
            "direction": draw(st.sampled_from(["up", "down", "idle", "sideways", None])),
            "door": draw(st.sampled_from(["open", "closed", "opening", "closing", 1])),
            "mode": draw(st.sampled_from(["normal", "maintenance", "fault", "out_of_service", "party"])),
            "load_kg": draw(_number()),
            "fault": draw(st.sampled_from([None, "DOOR_JAM", "STUCK", "OVERSPEED", "LEVELLING", "POWER", "GREMLINS"])),
        }
    else:
        data = {"value": draw(_number()), "unit": draw(st.sampled_from(UNITS))}
    if draw(st.booleans()):
        data = draw(_junk())  # the wrong shape altogether
    msg: Any = {
        "type": kind,
        "seq": draw(st.one_of(st.integers(-2, 2**66), _junk())),
        "ts": draw(_ts()),
        "site": draw(st.one_of(st.sampled_from(["hq", "", "x" * 300]), _junk())),
        "data": data,
    }
    if channel == "status":
        msg = {"online": draw(st.one_of(st.booleans(), _junk()))}
    if draw(st.integers(0, 9)) == 0:
        msg = draw(_junk())
    text = json.dumps(msg, allow_nan=True, default=str)  # NaN and Infinity tokens, as some devices send
    body = text.encode()
    mutation = draw(st.sampled_from(["none", "none", "truncate", "utf8", "nest", "huge", "pad", "bignum"]))
    if mutation == "truncate":
        body = body[: draw(st.integers(0, max(len(body) - 1, 0)))]
    elif mutation == "utf8":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"])) + body[at:]
    elif mutation == "nest":
        depth = draw(st.integers(50, 5000))
        body = b"[" * depth + body + b"]" * depth
    elif mutation == "huge":
        body = body + b" " * (1024 * 1024)  # 1 MB
    elif mutation == "pad":
        body = json.dumps({**msg, "pad": "x" * draw(st.integers(1, 20_000))} if isinstance(msg, dict) else msg).encode()
    elif mutation == "bignum":
        body = body.replace(b'"seq": ', b'"seq": 1' + b"9" * 400, 1)
    return f"devices/{device}/{channel}", body


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(hostile(), min_size=1, max_size=6))
def test_hostile_input_is_parsed_or_rejected_with_a_reason_and_normalises_without_crashing(
    messages: list[tuple[str, bytes]],
) -> None:
    shadows: dict[str, Shadow | None] = {}
    for i, (topic, body) in enumerate(messages):
        try:
            msg = parse(topic, body)
        except PayloadError as exc:
            rejected = exc
        else:
            rejected = None
        if rejected is not None:
            assert rejected.reason in set(Reason)
            assert rejected.detail
            continue
        out = normalize(msg, shadows.get(msg.device_id), received_at=NOW + timedelta(seconds=i))
        assert out.shadow.device_id == msg.device_id
        assert all(e.type in EVENT_TYPES and e.subject == msg.device_id for e in out.events)
        shadows[msg.device_id] = out.shadow
        if msg.seq is not None:
            # The same message again (a redelivery, or a replayed seq) adds nothing.
            again = normalize(msg, out.shadow, received_at=NOW + timedelta(seconds=i, milliseconds=1))
            assert again.events == ()


def _payloads(n: int, seed: int) -> list[tuple[str, bytes]]:
    """`n` messages for the end-to-end run: valid readings (unique seq per device) mixed with hostile ones."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    seqs: dict[str, int] = {}
    for _ in range(n):
        device = f"fz-{rng.randrange(40):02d}"
        roll = rng.random()
        seqs[device] = seqs.get(device, 0) + 1
        reading = {"type": "temperature", "seq": seqs[device], "ts": NOW.isoformat(), "site": "hq",
                   "data": {"value": rng.uniform(-20, 40), "unit": "C"}}  # fmt: skip
        if roll < 0.5:
            body = json.dumps(reading).encode()
        elif roll < 0.6:
            body = json.dumps({**reading, "data": {"value": float("nan"), "unit": "C"}}, allow_nan=True).encode()
        elif roll < 0.7:
            body = json.dumps({**reading, "seq": "12"}).encode()
        elif roll < 0.8:
            body = json.dumps(reading).encode()[: rng.randrange(1, 40)]
        elif roll < 0.85:
            body = b"\xff\xfe" + json.dumps(reading).encode()
        elif roll < 0.9:
            body = b"[" * 3000 + b"1" + b"]" * 3000
        elif roll < 0.95:
            body = json.dumps({**reading, "type": "elevator"}).encode()
        else:
            body = json.dumps({**reading, "pad": "x" * 20_000}).encode()
        out.append((f"devices/{device}/telemetry", body))
    return out


@pytest.mark.anyio
async def test_ten_thousand_random_payloads_through_broker_and_gateway_are_all_accounted_for(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    payloads = _payloads(10_000, seed=11)
    expected_rejects = 0
    for topic, body in payloads:
        try:
            parse(topic, body)
        except PayloadError:
            expected_rejects += 1
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        async with mqtt_client(broker.url_as("tester"), "fuzzer", max_inflight_messages=200) as c:
            for chunk in range(0, len(payloads), 200):
                await asyncio.gather(*(c.publish(t, b, qos=1) for t, b in payloads[chunk : chunk + 200]))

        async def all_in() -> bool:
            received = gw.metrics.registry.get_sample_value
            total = sum(received("iotgw_messages_received_total", {"channel": ch}) or 0 for ch in ("telemetry",))
            return total >= len(payloads)

        await wait_for(all_in, timeout=60, what="all 10,000 messages received")
        await settled(gw)
        with gw.store.session() as tx:
            stored = tx.exec(select(func.count()).select_from(EventRow)).one()
            dead = tx.exec(select(func.count()).select_from(DeadLetterRow)).one()
            reasons = set(tx.exec(select(DeadLetterRow.reason).distinct()).all())
        print(f"e2e fuzz: {stored} stored, {dead} dead-lettered ({sorted(reasons)})")  # noqa: T201
        assert dead == expected_rejects
        assert stored == len(payloads) - expected_rejects  # every accepted reading is one event
        assert reasons <= {r.value for r in Reason}
        assert gw.ingest.connected
