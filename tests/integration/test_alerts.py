"""The alert engine through the real pipeline: device messages in, alerts and transitions out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from alerts.lifecycle import ALERT_SOURCE
from alerts.tables import AlertRow, NotificationRow
from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.log import ConsumerCursorRow, EventRow
from gateway.service import Gateway
from tests.support.elevators import alerts_of, caught_up, state
from tests.support.gateway import running_gateway, wait_for

pytestmark = pytest.mark.anyio

RULES = """
rules:
  - name: door-jam
    severity: major
    summary: "Door jammed on {device} at floor {floor}"
    select: {type: [elevator]}
    event:
      type: elevator.fault.raised
      data: {code: DOOR_JAM}
      clear: {type: elevator.fault.cleared, data: {code: DOOR_JAM}}
  - name: hot
    severity: minor
    summary: "{device} reads {value} C"
    select: {type: [temperature]}
    threshold: {above: 30, clear_below: 28}
    flap_count: 2
    flap_window: 1h
  - name: silent
    severity: warning
    summary: "{device} is silent"
    select: {type: [humidity]}
    absence: {heartbeat: 2s}
"""


@pytest.fixture
def alert_settings(tmp_path: Path, settings_for: Callable[..., Settings]) -> Callable[[Mosquitto], Settings]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return lambda broker: settings_for(broker, consumers="alerts", rules_file=str(rules))


def reading(kind: str, unit: str, seq: int, value: float) -> bytes:
    return json.dumps({"type": kind, "seq": seq, "ts": 1764324000000 + seq * 1000, "site": "hq",
                       "data": {"value": value, "unit": unit}}).encode()  # fmt: skip


async def test_repeated_and_redelivered_door_jam_gives_exactly_one_alert(
    broker: Mosquitto, alert_settings: Callable[[Mosquitto], Settings]
) -> None:
    async with running_gateway(alert_settings(broker)) as gw:
        async with mqtt_client(broker.url_as("tester"), "el-1") as c:
            topic = "devices/el-1/state"
            await c.publish(topic, state(1), qos=1)
            jam = {"mode": "fault", "fault": "DOOR_JAM", "door": "opening"}
            await c.publish(topic, state(2, **jam), qos=1)
            await c.publish(topic, state(2, **jam), qos=1)  # redelivered
            await c.publish(topic, state(3, **jam, load_kg=75), qos=1)  # repeated fault, new seq
            await caught_up(gw, "el-1", 3)
            (alert,) = await alerts_of(gw, status="open")
            assert (alert["rule"], alert["status"], alert["device_id"]) == ("door-jam", "firing", "el-1")
            assert alert["summary"] == "Door jammed on el-1 at floor 2"
            await c.publish(topic, state(4, door="closing"), qos=1)
        await caught_up(gw, "el-1", 4)
        (alert,) = await alerts_of(gw)
        assert alert["status"] == "resolved"
        assert alert["resolved_by"] == "engine"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            detail = (await client.get(f"/api/alerts/{alert['id']}")).json()
        assert [(h["from_status"], h["to_status"]) for h in detail["history"]] == [
            (None, "firing"),
            ("firing", "resolved"),
        ]


async def test_hysteresis_band_gives_no_alert_and_crossing_gives_one(
    broker: Mosquitto, alert_settings: Callable[[Mosquitto], Settings]
) -> None:
    async with running_gateway(alert_settings(broker)) as gw:
        async with mqtt_client(broker.url_as("tester"), "t-1") as c:
            for seq, v in enumerate([29, 29.9, 28.5, 30, 29.5], start=1):
                await c.publish("devices/t-1/telemetry", reading("temperature", "C", seq, v), qos=1)
            await caught_up(gw, "t-1", 5)
            assert await alerts_of(gw) == []
            for seq, v in enumerate([31, 29, 31, 29.5, 27], start=10):
                await c.publish("devices/t-1/telemetry", reading("temperature", "C", seq, v), qos=1)
        await caught_up(gw, "t-1", 14)
        (alert,) = await alerts_of(gw)
        assert alert["rule"] == "hot"
        assert alert["status"] == "resolved"
        assert alert["summary"] == "t-1 reads 31 C"  # whole numbers read as such


async def test_silent_device_alerts_after_its_heartbeat_by_the_passing_of_time(
    broker: Mosquitto, alert_settings: Callable[[Mosquitto], Settings]
) -> None:
    async with running_gateway(alert_settings(broker)) as gw:
        async with mqtt_client(broker.url_as("tester"), "h-1") as c:
            await c.publish("devices/h-1/telemetry", reading("humidity", "%RH", 1, 40), qos=1)
        await caught_up(gw, "h-1", 1)
        # The reading's device time is in the past, so the 2 s heartbeat has long passed by the first tick.

        async def fired() -> bool:
            return any(a["rule"] == "silent" for a in await alerts_of(gw, status="open"))

        await wait_for(fired, timeout=10, what="the absence alert from a tick")


async def test_people_acknowledge_and_resolve_with_clear_errors(
    broker: Mosquitto, alert_settings: Callable[[Mosquitto], Settings]
) -> None:
    async with running_gateway(alert_settings(broker)) as gw:
        async with mqtt_client(broker.url_as("tester"), "el-2") as c:
            await c.publish("devices/el-2/state", state(1), qos=1)
            await c.publish("devices/el-2/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)
        await caught_up(gw, "el-2", 2)
        (alert,) = await alerts_of(gw, rule="door-jam")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            url = f"/api/alerts/{alert['id']}"
            r = await client.post(f"{url}/ack", json={"by": "ana", "note": "on my way"})
            assert r.status_code == 200
            assert (r.json()["status"], r.json()["acked_by"]) == ("acknowledged", "ana")
            assert (await client.post(f"{url}/ack", json={"by": "ana"})).status_code == 409
            r = await client.post(f"{url}/resolve", json={"by": "ana"})
            assert r.status_code == 422
            assert "note" in r.json()["detail"]
            r = await client.post(f"{url}/resolve", json={"by": "ana", "note": "door track cleaned"})
            assert r.json()["status"] == "resolved"
            assert [h["to_status"] for h in r.json()["history"]] == ["firing", "acknowledged", "resolved"]
            assert (await client.post("/api/alerts/99999/ack", json={"by": "x"})).status_code == 404
            assert (await client.get("/api/alerts", params={"status": "bogus"})).status_code == 422
            rules = (await client.get("/api/rules")).json()["items"]
            assert [r["name"] for r in rules] == ["door-jam", "hot", "silent"]

            async def counted() -> bool:
                text = (await client.get("/metrics")).text
                return "iotgw_alert_time_to_resolve_seconds_count 1.0" in text

            await wait_for(counted, timeout=10, what="alert metrics from the transitions")
            text = (await client.get("/metrics")).text
            assert 'iotgw_alert_transitions_total{status="acknowledged"} 1.0' in text
            assert "iotgw_alert_time_to_acknowledge_seconds_count 1.0" in text


async def test_a_value_crossing_both_limits_again_and_again_gives_one_flapping_alert(
    broker: Mosquitto, alert_settings: Callable[[Mosquitto], Settings]
) -> None:
    async with running_gateway(alert_settings(broker)) as gw:
        async with mqtt_client(broker.url_as("tester"), "t-2") as c:
            for seq, v in enumerate([31, 27] * 5, start=1):
                await c.publish("devices/t-2/telemetry", reading("temperature", "C", seq, v), qos=1)
        await caught_up(gw, "t-2", 10)
        (alert,) = await alerts_of(gw)
        assert alert["status"] == "flapping"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            detail = (await client.get(f"/api/alerts/{alert['id']}")).json()
        # Five crossings, three transitions: fired, resolved, then flapping (and quiet from there).
        assert [h["to_status"] for h in detail["history"]] == ["firing", "resolved", "flapping"]
        with gw.store.session() as tx:
            from sqlalchemy import text  # noqa: PLC0415

            notifications = tx.exec(text("select count(*) from notifications")).scalar_one()  # type: ignore[call-overload]
        assert notifications == 3


def reading_now(seq: int, value: float = 40) -> bytes:
    return json.dumps({"type": "humidity", "seq": seq, "ts": int(time.time() * 1000), "site": "hq",
                       "data": {"value": value, "unit": "%RH"}}).encode()  # fmt: skip


def history(gw: Gateway) -> tuple[list[tuple[Any, ...]], list[tuple[str, str]], int]:
    """Alerts as fired (id, rule, device, status, fired_at), the engine's events, notifications made."""
    with gw.store.session() as tx:
        alerts = sorted(
            (a.id, a.rule, a.device_id, a.status, a.fired_at, a.resolved_at) for a in tx.exec(select(AlertRow))
        )
        events = sorted(
            (r.ce_id, r.type) for r in tx.exec(select(EventRow).where(col(EventRow.source) == ALERT_SOURCE))
        )
        return alerts, events, len(tx.exec(select(NotificationRow)).all())


def replay_over(gw: Gateway) -> bool:
    with gw.store.session() as tx:
        cursor = tx.get(ConsumerCursorRow, "alerts")
        return cursor is not None and cursor.replay_until is None and cursor.position > 0


async def silent_alerts(broker: Mosquitto, gw: Gateway) -> None:
    """h-1 falls silent (its alert stays open); h-2 falls silent, speaks again (resolved), falls silent again."""
    async with mqtt_client(broker.url_as("tester"), "h-1") as c:
        await c.publish("devices/h-1/telemetry", reading_now(1), qos=1)
    async with mqtt_client(broker.url_as("tester"), "h-2") as c:
        await c.publish("devices/h-2/telemetry", reading_now(1), qos=1)

        async def both_fired() -> bool:
            return len(await alerts_of(gw, status="open")) == 2

        await wait_for(both_fired, timeout=15, what="two absence alerts from ticks")
        await c.publish("devices/h-2/telemetry", reading_now(2), qos=1)
    await caught_up(gw, "h-2", 2)

    async def silent_again() -> bool:
        return len(await alerts_of(gw, status="open")) == 2

    await wait_for(silent_again, timeout=15, what="h-2's second absence alert")
    statuses = sorted((a["device_id"], a["status"]) for a in await alerts_of(gw))
    assert statuses == [("h-1", "firing"), ("h-2", "firing"), ("h-2", "resolved")]


async def test_a_replay_rebuilds_alerts_fired_by_time_silently_under_their_ids(
    broker: Mosquitto, alert_settings: Callable[[Mosquitto], Settings]
) -> None:
    async with running_gateway(alert_settings(broker)) as gw:
        await silent_alerts(broker, gw)
        before = history(gw)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            r = await client.post("/api/consumers/alerts/replay", json={"from_position": 1})
            assert r.status_code == 200, r.text
        await wait_for(lambda: asyncio.to_thread(replay_over, gw), what="the replay to end")
        await asyncio.sleep(3.0)  # the timer ticked meanwhile, past every heartbeat
        assert history(gw) == before, "the same alerts (ids, times), no event, no notification again"
        # After the replay, the timer's doings are new ones again.
        async with mqtt_client(broker.url_as("tester"), "h-3") as c:
            await c.publish("devices/h-3/telemetry", reading_now(1), qos=1)

        async def fired() -> bool:
            return any(a["device_id"] == "h-3" for a in await alerts_of(gw, status="open"))

        await wait_for(fired, timeout=15, what="a new absence alert")
        alerts, events, notifications = history(gw)
        assert (len(alerts), len(events), notifications) == (4, len(before[1]) + 1, before[2] + 1)


async def test_a_replay_cut_short_by_a_restart_still_rebuilds_silently(
    broker: Mosquitto, alert_settings: Callable[[Mosquitto], Settings]
) -> None:
    settings = alert_settings(broker)
    async with running_gateway(settings) as gw:
        await silent_alerts(broker, gw)
        before = history(gw)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            assert (await client.post("/api/consumers/alerts/pause")).status_code == 200
            r = await client.post("/api/consumers/alerts/replay", json={"from_position": 1})
            assert r.status_code == 200, r.text
    await asyncio.sleep(3.0)  # the gateway is away for longer than a heartbeat
    async with running_gateway(settings) as gw:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            assert (await client.post("/api/consumers/alerts/resume")).status_code == 200
        await wait_for(lambda: asyncio.to_thread(replay_over, gw), what="the replay to end")
        await asyncio.sleep(3.0)
        assert history(gw) == before


async def test_what_falls_due_while_the_engine_is_paused_is_new_after_a_replay(
    broker: Mosquitto, alert_settings: Callable[[Mosquitto], Settings]
) -> None:
    async with (
        running_gateway(alert_settings(broker)) as gw,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client,
    ):
        async with mqtt_client(broker.url_as("tester"), "h-7") as c:
            await c.publish("devices/h-7/telemetry", reading_now(1), qos=1)
        await caught_up(gw, "h-7", 1)
        assert (await client.post("/api/consumers/alerts/pause")).status_code == 200
        await asyncio.sleep(3.0)  # past h-7's heartbeat, with no tick: nothing has fired yet
        assert history(gw)[0] == []
        assert (await client.post("/api/consumers/alerts/replay", json={"from_position": 1})).status_code == 200
        assert (await client.post("/api/consumers/alerts/resume")).status_code == 200

        async def told() -> bool:
            alerts, events, notifications = await asyncio.to_thread(history, gw)
            return len(alerts) == 1 and len(events) == 1 and notifications == 1

        await wait_for(told, timeout=15, what="the new alert with its event and notification")


async def test_a_device_whose_clock_runs_behind_is_not_silent_while_it_speaks(
    broker: Mosquitto, alert_settings: Callable[[Mosquitto], Settings]
) -> None:
    async with running_gateway(alert_settings(broker)) as gw, mqtt_client(broker.url_as("tester"), "h-slow") as c:
        for seq in range(1, 9):  # every 0.5 s, stamped 10 s in the past (within the skew bound)
            body = json.loads(reading_now(seq))
            body["ts"] -= 10_000
            await c.publish("devices/h-slow/telemetry", json.dumps(body).encode(), qos=1)
            await asyncio.sleep(0.5)
        await caught_up(gw, "h-slow", 8)
        await asyncio.sleep(1.2)  # ticks pass; the last reading is 1.2 s old by the gateway's clock
        assert await alerts_of(gw) == [], "its heartbeat is 2 s and it spoke every 0.5 s"
