"""Grouped notifications against real peers: 40 devices offline at a site reach a mailbox (aiosmtpd)
as one message listing them, a later change as one update in the same thread, the end as one
more; a group in Alertmanager's webhook format reaches an HTTP receiver once, retried whole, and
is sent again every repeat_interval (less what a silence holds) while it is open."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select

from alerts.notify.notifier import Notifier
from alerts.tables import AlertTransitionRow, DeliveryRow, NotificationGroupRow
from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from tests.support.elevators import alerts_of, state
from tests.support.gateway import running_gateway, wait_for
from tests.support.peers import Hooks, serving
from tests.support.smtp import PASSWORD, USER, SmtpServer, smtp_server

pytestmark = pytest.mark.anyio

KEY = "k3y-for-the-tests-0123456789abcdef"

OFFLINE_RULE = """
rules:
  - name: device-offline
    severity: warning
    summary: "{device} ({site}) went offline"
    event: {type: device.offline, clear: {type: device.online}}
  - name: door-jam
    severity: major
    summary: "Door jammed on {device}"
    event: {type: elevator.fault.raised, data: {code: DOOR_JAM}, clear: {type: elevator.fault.cleared}}
"""


def _status(online: bool, seq: int) -> bytes:
    return json.dumps({"online": online, "type": "elevator", "site": "hq", "ts": 1764324000000 + seq * 1000}).encode()


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[SmtpServer]:
    with smtp_server(tmp_path) as server:
        yield server


def mails(smtp: SmtpServer, n: int) -> Callable[[], Any]:
    async def check() -> bool:
        return len(smtp.mailbox.messages) >= n

    return check


def alerts(gw: Any, status: str, n: int) -> Callable[[], Any]:
    async def check() -> bool:
        return len(await alerts_of(gw, status=status, limit=100)) == n

    return check


def delivered(gw: Any, n: int) -> Callable[[], Any]:
    async def check() -> bool:
        with gw.store.session() as tx:
            return len(tx.exec(select(DeliveryRow.id).where(DeliveryRow.status == "delivered")).all()) >= n

    return check


def _groups(gw: Any) -> list[NotificationGroupRow]:
    with gw.store.session() as tx:
        return list(tx.exec(select(NotificationGroupRow)))


async def test_forty_devices_offline_reach_a_mailbox_as_one_message_then_one_update_then_the_end(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, smtp: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("IOTGW_TEST_SMTP_PASSWORD", PASSWORD)
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""{OFFLINE_RULE}
receivers:
  - name: ops-mail
    kind: email
    url: "smtp://127.0.0.1:{smtp.port}"
    from: "iotgw@example.org"
    to: ["ops@example.org"]
    username: {USER}
    password_env: IOTGW_TEST_SMTP_PASSWORD
    ca_file: "{smtp.ca_file}"
    group_by: [site, rule]
    group_wait: 2s
    group_interval: 3s
""")
    settings = settings_for(
        broker, consumers="alerts", rules_file=str(rules), public_url="https://staff.example", ack_link_key=KEY
    )
    devices = [f"el-g{i:02d}" for i in range(41)]
    async with running_gateway(settings) as gw:
        async with mqtt_client(broker.url_as("tester"), "site-hq") as c:
            for device in devices:
                await c.publish(f"devices/{device}/state", state(1, floor=2), qos=1)
            for device in devices[:40]:  # the site's power goes: 40 of them drop off, within a second
                await c.publish(f"devices/{device}/status", _status(False, 2), qos=1)
            await wait_for(alerts(gw, "firing", 40), what="40 devices offline")

            await wait_for(mails(smtp, 1), timeout=30, what="the group's first message")
            await wait_for(delivered(gw, 40), what="its outcome")  # (committed after the server took it)
            await asyncio.sleep(1.0)  # (a second one, if it were to come, would be due by now)
            assert len(smtp.mailbox.messages) == 1
            await _acknowledge_all_by_its_link(gw, smtp.mailbox.messages[0].get_body(("plain",)).get_content())
            await c.publish(f"devices/{devices[40]}/status", _status(False, 2), qos=1)  # one more
            await wait_for(mails(smtp, 2), timeout=30, what="the group's update")
            for device in devices:  # power back: all online again
                await c.publish(f"devices/{device}/status", _status(True, 3), qos=1)
            await wait_for(alerts(gw, "resolved", 41), what="41 devices online again")
            await wait_for(mails(smtp, 3), timeout=30, what="the group's end")
            await wait_for(delivered(gw, 122), what="every notification's outcome")
            await asyncio.sleep(1.0)
        assert _groups(gw) == []  # the group ended with the message that left none open
        with gw.store.session() as tx:
            statuses = tx.exec(select(DeliveryRow.status)).all()
        assert set(statuses) == {"delivered"}
        assert len(statuses) == 122  # every notification delivered: 41 offline, 40 acknowledged, 41 online
    first, update, end = smtp.mailbox.messages
    assert first["Subject"] == "[warning] 40 open: device-offline at site hq"
    body = first.get_body(("plain",)).get_content()
    listed = [line for line in body.splitlines() if line.startswith("- ")]
    assert len(listed) == 40
    assert all("firing · el-g" in line and "went offline" in line for line in listed)
    assert "Where: site hq, floor 2" in body  # what they share; the device they differ in is left out
    assert "https://staff.example/ui/" in body
    assert update["Subject"] == "[warning] 41 open: device-offline at site hq"
    update_text = update.get_body(("plain",)).get_content()
    assert "- firing · el-g40" in update_text.splitlines()[5]  # what fires first, then the acknowledged
    assert update_text.count("- acknowledged · el-g") == 40
    assert end["Subject"] == "[warning] 41 resolved: device-offline at site hq"
    root = first["Message-ID"]
    assert root.startswith("<iotgw.group-")
    for later in (update, end):
        assert later["In-Reply-To"] == later["References"] == root
    assert len({m["Message-ID"] for m in smtp.mailbox.messages}) == 3


async def _acknowledge_all_by_its_link(gw: Any, text: str) -> None:
    """The group message's link acknowledges all 40, as the receiver, from a page that lists them."""
    link = re.search(r"Acknowledge all that fire: https://staff.example(\S+)", text)
    assert link is not None, text
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
        page = await client.get(link.group(1))
        assert "40 alerts firing" in page.text
        assert "Acknowledge as ops-mail" in page.text
        clicks = await asyncio.gather(*(client.post(link.group(1)) for _ in range(3)))  # clicked thrice at once
        assert sorted(r.status_code for r in clicks) == [200, 409, 409]
        again = await client.post(link.group(1))
        assert again.status_code == 409
        assert "nothing to acknowledge. They are acknowledged, by ops-mail." in again.text
    acked = await alerts_of(gw, status="acknowledged", limit=100)
    assert len(acked) == 40
    assert {a["acked_by"] for a in acked} == {"ops-mail"}
    with gw.store.session() as tx:  # each acknowledged once
        acks = tx.exec(select(AlertTransitionRow).where(AlertTransitionRow.to_status == "acknowledged"))
        assert len(list(acks)) == 40


async def _sent_as(gw: Any, device: str) -> set[tuple[str, str | None]]:
    """The (delivery, sent_as) of the notifications of `device`'s alert, from the API."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
        (alert,) = (await client.get("/api/alerts", params={"device_id": device})).json()["items"]
        detail = (await client.get(f"/api/alerts/{alert['id']}")).json()
    return {(d["delivery"], d["sent_as"]) for d in detail["notifications"]}


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    with serving(fail_first=1) as server:
        yield server


async def test_a_group_in_alertmanagers_format_is_retried_whole_and_repeated_while_open(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, hooks: Hooks
) -> None:
    base = f"http://127.0.0.1:{hooks.server_address[1]}"
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"""{OFFLINE_RULE}
receivers:
  - {{name: am, kind: alertmanager-webhook, url: "{base}/am", group_by: [site], group_wait: 1s, repeat_interval: 1h}}
""")
    settings = settings_for(broker, consumers="alerts", rules_file=str(rules))
    async with running_gateway(settings) as gw:
        async with mqtt_client(broker.url_as("tester"), "pub") as c:
            await c.publish("devices/el-a/state", state(1), qos=1)
            await c.publish("devices/el-b/state", state(1), qos=1)
            await c.publish("devices/el-a/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)
            await c.publish("devices/el-b/status", _status(False, 2), qos=1)
            await c.publish("devices/el-c/state", state(1), qos=1)  # el-c drops off and is back at once:
            await c.publish("devices/el-c/status", _status(False, 2), qos=1)  # two notifications of one
            await c.publish("devices/el-c/status", _status(True, 3), qos=1)  # alert, listed once
        await wait_for(alerts(gw, "firing", 2), what="two alerts")
        await wait_for(alerts(gw, "resolved", 1), what="el-c's, resolved")

        async def delivered() -> bool:  # (its outcome is committed after the receiver answered)
            return len(hooks.ok()) >= 1 and [g.messages for g in _groups(gw)] == [1]

        await wait_for(delivered, timeout=30, what="the group, after a 503")
        assert [r["code"] for r in hooks.requests] == [503, 200]  # one message, retried whole
        assert hooks.requests[0]["key"] == hooks.requests[1]["key"]  # the same Idempotency-Key
        body = hooks.ok()[0]["body"]
        assert body["groupLabels"] == {"site": "hq"}
        assert body["status"] == "firing"
        assert body["commonLabels"] == {"site": "hq", "device_type": "elevator"}
        assert [(a["labels"]["device"], a["status"]) for a in body["alerts"]] == [
            ("el-a", "firing"),
            ("el-b", "firing"),
            ("el-c", "resolved"),
        ]  # the worst first; each alert once
        # Its deliveries name the message they went in: the key the receiver saw.
        assert await _sent_as(gw, "el-a") == {("delivered", hooks.ok()[0]["key"])}
        (group,) = _groups(gw)
        assert group.sent_at is not None
        assert group.messages == 1
        notifier = gw.plugins["alerts"].notifier
        later = group.sent_at + timedelta(hours=1, seconds=1)
        await asyncio.to_thread(notifier.deliver_lane, "am", later)  # an hour on: sent again
        assert len(hooks.ok()) == 2
        assert hooks.ok()[1]["body"]["alerts"] == body["alerts"][:2]  # what is open
        assert hooks.ok()[1]["key"] != hooks.ok()[0]["key"]
        await asyncio.to_thread(notifier.deliver_lane, "am", later + timedelta(minutes=1))
        assert len(hooks.ok()) == 2  # not before another hour
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            until = (datetime.now(UTC) + timedelta(hours=3)).isoformat()
            silence = {"matchers": {"device_id": "el-a"}, "by": "ana", "comment": "door fixed", "ends_at": until}
            r = await client.post("/api/silences", json=silence)
            assert r.status_code == 201, r.text
        await asyncio.to_thread(notifier.deliver_lane, "am", later + timedelta(hours=1, seconds=1))
        assert len(hooks.ok()) == 3
        assert [a["labels"]["device"] for a in hooks.ok()[2]["body"]["alerts"]] == ["el-b"]  # el-a is silenced
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            assert (await client.delete(f"/api/silences/{r.json()['id']}")).status_code in (200, 204)
        await asyncio.to_thread(notifier.deliver_lane, "am", later + timedelta(hours=2, seconds=2))
        assert len(hooks.ok()) == 4
        again = [a["labels"]["device"] for a in hooks.ok()[3]["body"]["alerts"]]
        assert again == ["el-a", "el-b"]  # the silence over: el-a is in the group's repeats again


async def test_a_crash_while_a_groups_first_message_is_sent_sends_it_again_under_the_same_key(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request goes out, then the sender dies before its outcome is committed (here: it
    raises there): the message goes again with the same Idempotency-Key, of the same group.
    (PostgreSQL tells: its sequences do not give back the id of a rolled-back row; SQLite's do.)"""
    with serving() as hooks:
        base = f"http://127.0.0.1:{hooks.server_address[1]}"
        rules = tmp_path / "rules.yaml"
        rules.write_text(f"""{OFFLINE_RULE}
receivers:
  - {{name: am, kind: alertmanager-webhook, url: "{base}/am", group_by: [site], group_wait: 0s}}
""")
        sent = Notifier._send
        crashes = [1]

        def send_then_crash(receiver: Any, request: Any, key: str) -> Any:
            result = sent(receiver, request, key)
            if crashes:
                crashes.pop()
                raise RuntimeError("the sender dies after the request, before its outcome")
            return result

        monkeypatch.setattr(Notifier, "_send", staticmethod(send_then_crash))
        settings = settings_for(broker, consumers="alerts", rules_file=str(rules))
        async with running_gateway(settings) as gw:
            async with mqtt_client(broker.url_as("tester"), "pub") as c:
                await c.publish("devices/el-k/state", state(1), qos=1)
                await c.publish("devices/el-k/status", _status(False, 2), qos=1)

            async def settled() -> bool:
                return len(hooks.ok()) >= 2 and [g.messages for g in _groups(gw)] == [1]

            await wait_for(settled, what="the message sent again, and its outcome")
            (group,) = _groups(gw)
        first, again = hooks.ok()[:2]
        assert first["key"] == again["key"]
        assert first["key"].startswith(f"iotgw-group-{group.id}-1-")
        assert first["body"] == again["body"]


@pytest.mark.parametrize("answer", [400, 503], ids=["refused", "expired"])
async def test_the_alerts_of_a_message_failed_for_good_are_in_the_groups_next_one(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, answer: int
) -> None:
    """Refused (400), or retried past the maximum age (503): the group's next message lists it."""
    with serving(always=answer) as hooks:  # fails the first message for good; takes the next
        base = f"http://127.0.0.1:{hooks.server_address[1]}"
        rules = tmp_path / "rules.yaml"
        rules.write_text(f"""{OFFLINE_RULE}
receivers:
  - {{name: am, kind: alertmanager-webhook, url: "{base}/am", group_by: [site], group_wait: 0s, group_interval: 1s}}
""")
        settings = settings_for(broker, consumers="alerts", rules_file=str(rules), notify_max_age_s=2.0)
        async with running_gateway(settings) as gw, mqtt_client(broker.url_as("tester"), "pub") as c:
            await c.publish("devices/el-a/state", state(1), qos=1)
            await c.publish("devices/el-a/status", _status(False, 2), qos=1)

            async def failed() -> bool:
                return bool(hooks.requests) and await _sent_as(gw, "el-a") == {("failed", hooks.requests[0]["key"])}

            await wait_for(failed, timeout=30, what="el-a's message, failed for good")
            hooks.always = None
            await c.publish("devices/el-b/state", state(1), qos=1)
            await c.publish("devices/el-b/status", _status(False, 2), qos=1)

            async def sent() -> bool:
                return len(hooks.ok()) >= 1 and [g.messages for g in _groups(gw)] == [1]

            await wait_for(sent, what="the group's next message")
        (message,) = hooks.ok()
        # el-a is still firing and still the group's: listed with el-b, not left out for good.
        assert [(a["labels"]["device"], a["status"]) for a in message["body"]["alerts"]] == [
            ("el-a", "firing"),
            ("el-b", "firing"),
        ]
