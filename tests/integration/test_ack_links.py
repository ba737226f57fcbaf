"""Acknowledge from the message: a notification's signed, expiring link opens a page (which
changes nothing) whose button acknowledges the alert as the receiver it was sent to, with API
keys required everywhere else; a changed, foreign or expired link is refused."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from alerts.notify.acklinks import Grant, token
from alerts.tables import AlertRow, AlertTransitionRow
from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from tests.support.elevators import door_jam_rules, state
from tests.support.gateway import running_gateway, wait_for
from tests.support.peers import Hooks, serving

pytestmark = pytest.mark.anyio

KEY = "k3y-for-the-tests-0123456789abcdef"


async def test_the_link_in_a_message_acknowledges_as_its_receiver(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    with serving() as chat:
        receivers = f'  - {{name: ops-chat, kind: apprise, urls: ["json://127.0.0.1:{chat.server_address[1]}/chat"]}}'
        rules = door_jam_rules(tmp_path, receivers)
        settings = settings_for(
            broker, consumers="alerts", rules_file=str(rules), public_url="https://staff.example",
            ack_link_key=KEY, api_auth=True,
        )  # fmt: skip
        async with running_gateway(settings) as gw:
            async with mqtt_client(broker.url_as("tester"), "el-k1") as c:
                await c.publish("devices/el-k1/state", state(1), qos=1)
                await c.publish("devices/el-k1/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)
            link = await _link_in(chat)
            assert link.startswith("https://staff.example/ack/")
            path = link.removeprefix("https://staff.example")
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
                (alert,) = _alerts(gw)
                assert (await client.post(f"/api/alerts/{alert.id}/ack", json={"by": "x"})).status_code == 401
                page = await client.get(path)
                assert page.status_code == 200
                assert "Acknowledge as ops-chat" in page.text
                assert f"Alert {alert.id}: Door jammed on el-k1" in page.text
                assert page.headers["cache-control"] == "no-store"
                assert _alerts(gw)[0].status == "firing"  # opening the link changes nothing
                clicks = await asyncio.gather(*(client.post(path) for _ in range(6)))  # a double click, and more
                assert sorted(r.status_code for r in clicks) == [200, 409, 409, 409, 409, 409]
                assert "Acknowledged by ops-chat" in next(r.text for r in clicks if r.status_code == 200)
                (acked,) = _alerts(gw)
                assert (acked.status, acked.acked_by) == ("acknowledged", "ops-chat")
                with gw.store.session() as tx:  # acknowledged once: one transition, one notification of it
                    acks = tx.exec(select(AlertTransitionRow).where(AlertTransitionRow.to_status == "acknowledged"))
                    assert len(list(acks)) == 1
                again = await client.post(path)
                assert again.status_code == 409
                assert "Already acknowledged by ops-chat" in again.text
                payload, _, mac = path.removeprefix("/ack/").partition(".")
                changed = f"/ack/{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{mac}"
                soon, gone = datetime.now(UTC) + timedelta(hours=1), datetime.now(UTC) - timedelta(seconds=1)
                foreign = token("another-key-of-32-characters-long!", Grant("alert", alert.id or 0, "mallory", soon))
                expired = token(KEY, Grant("alert", alert.id or 0, "ops-chat", gone))
                for bad, status, says in (
                    (changed, 403, "not valid"),
                    (f"/ack/{foreign}", 403, "not valid"),
                    (f"/ack/{expired}", 410, "expired"),
                    ("/ack/garbage", 403, "not valid"),
                    ("/ack/%C3%A9.abc", 403, "not valid"),
                ):
                    for method in (client.get, client.post):
                        r = await method(bad)
                        assert r.status_code == status, (bad, r.text)
                        assert says in r.text


def _alerts(gw: object) -> list[AlertRow]:
    with gw.store.session() as tx:  # type: ignore[attr-defined]
        return list(tx.exec(select(AlertRow)))


async def _link_in(chat: Hooks) -> str:
    async def sent() -> bool:
        return bool(chat.ok())

    await wait_for(sent, what="the notification")
    message = chat.ok()[0]["body"]["message"]
    found = re.search(r"Acknowledge: (\S+)", message)
    assert found is not None, message
    return found.group(1)


async def test_a_gateway_whose_links_no_phone_could_open_says_so(
    broker: Mosquitto, settings_for: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.service"):
        async with running_gateway(settings_for(broker, http_host="0.0.0.0")):  # noqa: S104 - as in the image
            pass
        assert "IOTGW_PUBLIC_URL is not set: links in notifications point to http://0.0.0.0:" in caplog.text
        caplog.clear()
        async with running_gateway(settings_for(broker, http_host="0.0.0.0", public_url="https://staff.example")):  # noqa: S104
            pass
        assert "IOTGW_PUBLIC_URL" not in caplog.text
