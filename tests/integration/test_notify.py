"""Notifications: the outbox reaches a real (tiny) HTTP receiver, once per key, despite outages."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import text

from alerts.windows import DAYS
from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from tests.support.elevators import alerts_of, caught_up, door_jam_rules, state
from tests.support.gateway import running_gateway, wait_for
from tests.support.peers import PD_KEY, Hooks, serving

pytestmark = pytest.mark.anyio


def client_of(gw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw")


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    with serving(fail_first=4) as server:
        yield server


async def test_each_transition_reaches_every_receiver_once_after_an_outage(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, hooks: Hooks
) -> None:
    base = f"http://127.0.0.1:{hooks.server_address[1]}"
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""
rules:
  - name: door-jam
    severity: major
    summary: "Door jammed on {{device}}"
    event:
      type: elevator.fault.raised
      data: {{code: DOOR_JAM}}
      clear: {{type: elevator.fault.cleared, data: {{code: DOOR_JAM}}}}
receivers:
  - {{name: hook, kind: webhook, url: "{base}/hook"}}
  - {{name: am, kind: alertmanager-webhook, url: "{base}/am"}}
  - {{name: pd, kind: pagerduty, url: "{base}/pd", routing_key: {PD_KEY}}}
  - {{name: pager-critical-only, kind: webhook, url: "{base}/critical", severities: [critical]}}
""")
    settings = settings_for(broker, consumers="alerts", rules_file=str(rules))
    async with running_gateway(settings) as gw:
        async with mqtt_client(broker.url_as("tester"), "el-9") as c:
            await c.publish("devices/el-9/state", state(1), qos=1)
            await c.publish("devices/el-9/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)
            await caught_up(gw, "el-9", 2)
            (alert,) = await alerts_of(gw)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
                r = await client.post(f"/api/alerts/{alert['id']}/ack", json={"by": "ana"})
                assert r.status_code == 200
            await c.publish("devices/el-9/state", state(3), qos=1)
            await caught_up(gw, "el-9", 3)

        async def delivered() -> bool:
            return len(hooks.ok()) >= 8

        await wait_for(delivered, timeout=30, what="8 deliveries after the receiver's outage")
        async with client_of(gw) as client:
            metrics = (await client.get("/metrics")).text
            detail = (await client.get(f"/api/alerts/{alert['id']}")).json()
    deliveries = {(n["receiver"], n["status"]): n["delivery"] for n in detail["notifications"]}
    assert deliveries[("am", "acknowledged")] == "skipped"
    assert deliveries[("pd", "resolved")] == "delivered"
    assert len(detail["notifications"]) == 9  # 3 transitions x 3 receivers (the critical-only one gets none)
    sent = {n["sent_as"] for n in detail["notifications"] if n["delivery"] == "delivered"}
    assert sent == {n["key"] for n in detail["notifications"] if n["delivery"] == "delivered"}  # each under its own
    assert sent <= {str(r["key"]) for r in hooks.ok()}  # the Idempotency-Keys the receivers saw
    assert [n["sent_as"] for n in detail["notifications"] if n["delivery"] == "skipped"] == [None]  # never tried
    ok = hooks.ok()
    assert len(ok) == 8  # 3 transitions x (webhook + pagerduty) + 2 for Alertmanager (no acknowledge there)
    by_path: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        by_path.setdefault(r["path"], []).append(r)
    assert sorted(by_path) == ["/am", "/hook", "/pd"]  # nothing to the critical-only receiver
    for path, rows in by_path.items():
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)), f"{path} got a key twice"
    failed_keys = {r["key"] for r in hooks.requests if r["code"] == 503}
    assert failed_keys, "the outage really happened"
    assert failed_keys <= {r["key"] for r in ok}, "every failed request was retried with its key until it got through"
    assert [r["body"]["type"] for r in by_path["/hook"]] == [
        "alert.firing", "alert.acknowledged", "alert.resolved",
    ]  # fmt: skip
    pd = by_path["/pd"]
    assert [r["body"]["event_action"] for r in pd] == ["trigger", "acknowledge", "resolve"]
    assert len({r["body"]["dedup_key"] for r in pd}) == 1
    assert pd[0]["body"]["routing_key"] == PD_KEY
    assert pd[0]["body"]["payload"]["severity"] == "error"
    assert [r["body"]["status"] for r in by_path["/am"]] == ["firing", "resolved"]
    assert by_path["/am"][0]["body"]["alerts"][0]["labels"]["alertname"] == "door-jam"
    assert "iotgw_notification_retries_total{receiver=" in metrics


async def test_a_silence_stops_notifications_but_not_the_alert(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, hooks: Hooks
) -> None:
    hooks.fail_first = 0
    base = f"http://127.0.0.1:{hooks.server_address[1]}"
    receivers = f"""
  - {{name: hook, kind: webhook, url: "{base}/hook"}}
"""
    rules = door_jam_rules(tmp_path, receivers)
    settings = settings_for(broker, consumers="alerts", rules_file=str(rules))
    transport = httpx.ASGITransport
    async with (
        running_gateway(settings) as gw,
        httpx.AsyncClient(transport=transport(app=gw.app), base_url="http://gw") as client,
    ):
        bad = await client.post("/api/silences", json={"matchers": {"colour": "red"}, "duration": "1h", "by": "a",
                                                       "comment": "x"})  # fmt: skip
        assert bad.status_code == 422
        assert "colour" in bad.json()["detail"]
        r = await client.post(
            "/api/silences",
            json={"matchers": {"rule": "door-jam", "device_id": "el-q*"}, "duration": "2h", "by": "ana",
                  "comment": "lift under repair"},
        )  # fmt: skip
        assert r.status_code == 201
        silence = r.json()
        assert silence["active"] is True
        async with mqtt_client(broker.url_as("tester"), "pub") as c:
            for device in ("el-q1", "el-z1"):  # one silenced, one not
                await c.publish(f"devices/{device}/state", state(1), qos=1)
                await c.publish(f"devices/{device}/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)
        await caught_up(gw, "el-z1", 2)
        assert {a["device_id"] for a in await alerts_of(gw, status="open")} == {"el-q1", "el-z1"}

        async def one_sent() -> bool:
            return len(hooks.ok()) >= 1

        await wait_for(one_sent, what="the unsilenced alert's notification")

        async def silenced_handled() -> bool:
            with gw.store.session() as tx:
                return bool(
                    tx.exec(text("select count(*) from notification_deliveries where status = 'silenced'")).one()[0]
                )  # type: ignore[call-overload]

        await wait_for(silenced_handled, what="the silenced alert's notification to be held back")
        assert [r["body"]["subject"] for r in hooks.ok()] == ["el-z1"]
        assert (await client.delete(f"/api/silences/{silence['id']}")).status_code == 200
        assert (await client.get("/api/silences")).json()["items"] == []
        assert (await client.delete("/api/silences/999")).status_code == 404

        async def told_after() -> bool:
            return len(hooks.ok()) >= 2

        # The silence is over and el-q1's alert still fires: its receiver is told now.
        await wait_for(told_after, what="the held notification, once the silence ended")
        assert [r["body"]["subject"] for r in hooks.ok()] == ["el-z1", "el-q1"]


async def test_a_maintenance_window_holds_notifications_until_it_closes(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, hooks: Hooks
) -> None:
    hooks.fail_first = 0
    base = f"http://127.0.0.1:{hooks.server_address[1]}"
    receivers = f"""
  - {{name: hook, kind: webhook, url: "{base}/hook"}}
"""
    rules = door_jam_rules(tmp_path, receivers)
    settings = settings_for(broker, consumers="alerts", rules_file=str(rules))
    now = datetime.now(UTC)
    opened, closes = now - timedelta(hours=1), now + timedelta(hours=1)  # a window around now, in Tokyo
    tokyo = ZoneInfo("Asia/Tokyo")
    window = {"days": [DAYS[opened.astimezone(tokyo).weekday()]], "start": opened.astimezone(tokyo).strftime("%H:%M"),
              "end": closes.astimezone(tokyo).strftime("%H:%M"), "time_zone": "Asia/Tokyo"}  # fmt: skip
    async with running_gateway(settings) as gw, client_of(gw) as client:
        bad = await client.post("/api/silences", json={"matchers": {"site": "*"}, "by": "ana", "comment": "x",
                                                       "schedule": {**window, "days": ["someday"]}})  # fmt: skip
        assert bad.status_code == 422
        assert "days: a list of mon" in str(bad.json()["detail"])
        r = await client.post("/api/silences", json={"matchers": {"rule": "door-jam"}, "by": "ana",
                                                     "comment": "weekly lift service", "schedule": window})  # fmt: skip
        assert r.status_code == 201, r.text
        assert (r.json()["in_force"], r.json()["schedule"]) == (True, window)
        async with mqtt_client(broker.url_as("tester"), "pub") as c:
            for device in ("el-w1", "el-w2"):
                await c.publish(f"devices/{device}/state", state(1), qos=1)
                await c.publish(f"devices/{device}/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)
            await c.publish("devices/el-w2/state", state(3), qos=1)  # el-w2 recovers inside the window
        await caught_up(gw, "el-w2", 3)

        async def held() -> int:
            with gw.store.session() as tx:
                return int(
                    tx.exec(text("select count(*) from notification_deliveries where status = 'silenced'")).one()[0]
                )  # type: ignore[call-overload]

        async def three_held() -> bool:
            return await held() == 3  # el-w1 firing; el-w2 firing and resolved

        await wait_for(three_held, what="the window to hold three notifications back")
        assert hooks.ok() == []
        # The window closes (its end, a minute later): what is still firing is told then.
        notifier = gw.plugins["alerts"].notifier
        await asyncio.to_thread(notifier.fan_out, closes + timedelta(minutes=1))

        async def told() -> bool:
            return len(hooks.ok()) >= 1

        await wait_for(told, what="the notification of the alert still firing after the window")
        await asyncio.sleep(1.0)  # (anything more would have gone out by now)
        assert [(r["body"]["subject"], r["body"]["type"]) for r in hooks.ok()] == [("el-w1", "alert.firing")]
        assert await held() == 2  # el-w2 resolved meanwhile: nothing to say about it
