"""Simulator -> Mosquitto -> gateway -> event log -> API, against a real broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from devices.connect import mqtt_client
from devices.fleet import Fleet, FleetConfig
from devices.misbehave import publish_bad
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.log import EventQuery, list_events
from tests.support.gateway import running_gateway, settled, wait_for

pytestmark = pytest.mark.anyio


async def _all_events(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = {**params, "limit": 1000, **({"cursor": cursor} if cursor else {})}
        r = await client.get("/api/events", params=q)
        assert r.status_code == 200, r.text
        page = r.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def test_seeded_fleet_run_shows_expected_event_types(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker)) as gw:
        cfg = FleetConfig(
            mqtt_url=broker.url_as("tester"),
            elevators=4,
            sensors=4,
            rate=200,
            fault_rate=0.03,
            seed=7,
            steps=150,
            seq_start=0,
        )
        stats = await Fleet(cfg).run()
        # Every acknowledged state/telemetry message gives at least one event; wait for the last seqs.
        expected_last = dict(stats.by_device)

        async def caught_up() -> bool:
            shadows = await asyncio.to_thread(gw.store.load_shadows)
            return all(shadows.get(d) and shadows[d].last_seq == s for d, s in expected_last.items())

        await wait_for(caught_up, what="the gateway to store every device's last seq")
        transport = httpx.ASGITransport(app=gw.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            events = await _all_events(client)
            devices = (await client.get("/api/devices")).json()["items"]
            one = (await client.get("/api/devices/elev-001")).json()
    types = {e["type"] for e in events}
    for t in (
        "device.online",
        "device.discovered",
        "elevator.door.opened",
        "elevator.door.closed",
        "elevator.trip.started",
        "elevator.trip.completed",
        "elevator.fault.raised",
        "elevator.fault.cleared",
        "elevator.mode.changed",
        "sensor.reading",
    ):
        assert t in types, f"{t} missing from {sorted(types)}"
    assert len(devices) == 8
    assert one["type"] == "elevator"
    assert one["online"] is False  # the simulator said goodbye at the end of its run
    assert one["last_seq"] == expected_last["elev-001"]
    # Trips are well formed: floors travelled equals |to - from|.
    for e in events:
        if e["type"] == "elevator.trip.completed":
            assert e["data"]["floors"] == abs(e["data"]["to_floor"] - e["data"]["from_floor"])
    # Sensor readings: exactly one per acknowledged telemetry message (seq 1..last).
    readings = [e for e in events if e["type"] == "sensor.reading" and e["subject"] == "temp-001"]
    assert [e["seq"] for e in readings] == list(range(1, expected_last["temp-001"] + 1))


def _telemetry(seq: int, value: float = 21.0) -> bytes:
    body = {
        "type": "temperature",
        "seq": seq,
        "ts": "2026-11-28T10:00:00Z",
        "site": "hq",
        "data": {"value": value, "unit": "C"},
    }
    return json.dumps(body).encode()


async def test_duplicate_seq_is_stored_once_and_bad_input_is_dead_lettered(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker)) as gw:
        async with mqtt_client(broker.url_as("tester"), "temp-dup") as c:
            await c.publish("devices/temp-dup/telemetry", _telemetry(1), qos=1)
            await c.publish("devices/temp-dup/telemetry", _telemetry(1), qos=1)  # the same seq again
            reasons = await publish_bad(broker.url_as("tester"), "rogue-1", seq=5)
            # Good traffic keeps flowing after the bad messages.
            for seq in range(2, 12):
                await c.publish("devices/temp-dup/telemetry", _telemetry(seq, 20 + seq), qos=1)

        async def stored() -> bool:
            rows = await asyncio.to_thread(list_events, gw.store, EventQuery(device_id="temp-dup", limit=1000))
            return len(rows) >= 11

        await wait_for(stored, what="11 readings from temp-dup")
        await settled(gw)  # the duplicate, too, was received and committed (as nothing)
        transport = httpx.ASGITransport(app=gw.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            readings = await _all_events(client, device_id="temp-dup", type="sensor.reading")
            dead = (await client.get("/api/dead-letters")).json()["items"]
            metrics = (await client.get("/metrics")).text
    assert [e["seq"] for e in readings] == list(range(1, 12))
    assert [d["reason"] for d in dead] == reasons
    assert all(d["payload_b64"] for d in dead)
    too_large = next(d for d in dead if d["reason"] == "too_large")
    assert too_large["size"] > 16 * 1024
    spoofed = next(d for d in dead if d["reason"] == "device_mismatch")
    assert "someone-else" in spoofed["detail"]
    assert 'iotgw_messages_rejected_total{reason="too_large"} 1.0' in metrics
    assert 'iotgw_seq_anomalies_total{kind="duplicate"} 1.0' in metrics


async def test_device_changing_type_is_dead_lettered(broker: Mosquitto, settings_for: Callable[..., Settings]) -> None:
    async with running_gateway(settings_for(broker)) as gw:
        async with mqtt_client(broker.url_as("tester"), "temp-x") as c:
            await c.publish("devices/temp-x/telemetry", _telemetry(1), qos=1)
            body = {"type": "humidity", "seq": 2, "ts": 1764324000000, "data": {"value": 40, "unit": "%RH"}}
            await c.publish("devices/temp-x/telemetry", json.dumps(body).encode(), qos=1)

        async def dead_lettered() -> bool:
            with gw.store.session() as s:
                from sqlalchemy import text  # noqa: PLC0415

                return bool(s.exec(text("select count(*) from dead_letters where reason='type_mismatch'")).scalar_one())

        await wait_for(dead_lettered, what="a type_mismatch dead letter")
