"""Chat and push receivers through apprise, against a real (small) HTTP server apprise reaches
with its `json://` and `ntfy://` services: the message it sends, a failure retried, bad
receivers refused (without repeating a token)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from alerts.notify import push
from alerts.notify.receivers import Receiver
from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from tests.support.elevators import alerts_of, caught_up, door_jam_rules, state
from tests.support.gateway import running_gateway, wait_for
from tests.support.peers import Hooks, serving

pytestmark = pytest.mark.anyio


@pytest.fixture
def chat() -> Iterator[Hooks]:
    with serving(fail_first=2) as server:
        yield server


async def test_an_alert_reaches_chat_and_ntfy_through_apprise_after_a_failure(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, chat: Hooks
) -> None:
    port = chat.server_address[1]
    receivers = f"""
  - name: ops-chat
    kind: apprise
    urls: ["json://127.0.0.1:{port}/chat", "ntfy://127.0.0.1:{port}/ops-lifts"]
"""
    rules = door_jam_rules(tmp_path, receivers)
    settings = settings_for(broker, consumers="alerts", rules_file=str(rules), public_url="https://staff.example")
    async with running_gateway(settings) as gw:
        async with mqtt_client(broker.url_as("tester"), "el-a1") as c:
            await c.publish("devices/el-a1/state", state(1, floor=2), qos=1)
            await c.publish("devices/el-a1/state", state(2, mode="fault", fault="DOOR_JAM", floor=2), qos=1)
            await caught_up(gw, "el-a1", 2)
        (alert,) = await alerts_of(gw)

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:

            async def delivered() -> bool:  # (its outcome is committed after the service answered)
                notes = (await client.get(f"/api/alerts/{alert['id']}")).json()["notifications"]
                return [n["delivery"] for n in notes] == ["delivered"]

            await wait_for(delivered, timeout=30, what="the retried messages")
            (note,) = (await client.get(f"/api/alerts/{alert['id']}")).json()["notifications"]
    assert (note["delivery"], note["attempts"]) == ("delivered", 2)  # the first try met two 503s
    first = [r for r in chat.requests if r["code"] == 503]
    assert len(first) == 2
    by_path = {r["path"]: r["body"] for r in chat.ok()}
    body = by_path["/chat"]
    assert body["title"] == "[major] firing: Door jammed on el-a1"
    assert body["type"] == "failure"
    assert "Where: site hq, device el-a1, floor 2" in body["message"]
    assert f"https://staff.example/ui/?alert={alert['id']}" in body["message"]
    ntfy = next(b for path, b in by_path.items() if path != "/chat")
    assert ntfy["topic"] == "ops-lifts"
    assert ntfy["title"] == body["title"]
    assert "Door jammed on el-a1" in ntfy["message"]


async def test_a_service_slower_than_timeout_s_is_given_longer_at_each_retry(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    """It takes every message and answers after 2.5 s: with timeout_s 1 the tries wait 1, 2 and
    4 s, so it gets the message three times in all, not once each retry for a day."""
    with serving(delay_s=2.5) as slow:
        receivers = f"""
  - {{name: slow-chat, kind: apprise, urls: ["json://127.0.0.1:{slow.server_address[1]}/chat"], timeout_s: 1}}
"""
        settings = settings_for(broker, consumers="alerts", rules_file=str(door_jam_rules(tmp_path, receivers)))
        async with running_gateway(settings) as gw:
            async with mqtt_client(broker.url_as("tester"), "el-s1") as c:
                await c.publish("devices/el-s1/state", state(1), qos=1)
                await c.publish("devices/el-s1/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:

                async def delivered() -> bool:
                    alerts = await alerts_of(gw)
                    if not alerts:
                        return False
                    notes = (await client.get(f"/api/alerts/{alerts[0]['id']}")).json()["notifications"]
                    return [n["delivery"] for n in notes] == ["delivered"]

                await wait_for(delivered, timeout=60, what="the slow service's answer in time")
                (alert,) = await alerts_of(gw)
                (note,) = (await client.get(f"/api/alerts/{alert['id']}")).json()["notifications"]
        assert note["attempts"] == 3
        assert len(slow.requests) == 3


def test_a_failure_says_what_apprise_said(tmp_path: Path) -> None:
    with serving(always=500) as refusing:
        receiver = Receiver.model_validate(
            {"name": "c", "kind": "apprise", "urls": [f"json://127.0.0.1:{refusing.server_address[1]}/x"]}
        )
        outcome, error, _ = push.send(receiver, push.Push("t", "b", "info"))
    assert outcome == "transient"
    assert error is not None
    assert "500" in error
    gone = Receiver.model_validate({"name": "c", "kind": "apprise", "urls_file": str(tmp_path / "none")})
    assert push.send(gone, push.Push("t", "b", "info"))[:2] == (
        "transient", f"cannot read urls_file {tmp_path / 'none'}: No such file or directory"
    )  # fmt: skip


def test_timeout_s_is_how_long_apprise_waits_for_an_answer() -> None:
    """apprise's own 4 s would cut off a service that answers in 5 and send it again and again;
    the receiver's timeout_s is what it waits, longer or shorter."""
    with serving(delay_s=5) as slow:
        url = f"json://127.0.0.1:{slow.server_address[1]}/slow"
        patient = Receiver.model_validate({"name": "c", "kind": "apprise", "urls": [url], "timeout_s": "10s"})
        assert push.send(patient, push.Push("t", "b", "info"))[0] == "delivered"
        assert len(slow.requests) == 1
    with serving(delay_s=3) as slow:
        url = f"json://127.0.0.1:{slow.server_address[1]}/slow"
        hasty = Receiver.model_validate({"name": "c", "kind": "apprise", "urls": [url], "timeout_s": 1})
        assert push.send(hasty, push.Push("t", "b", "info"))[0] == "transient"


def test_urls_from_a_file_are_read_at_each_try(tmp_path: Path) -> None:
    secret = tmp_path / "apprise-urls"
    receiver = Receiver.model_validate({"name": "c", "kind": "apprise", "urls_file": str(secret)})
    with serving() as one, serving() as two:
        secret.write_text(f"# the ops room\njson://127.0.0.1:{one.server_address[1]}/a\n")
        assert push.send(receiver, push.Push("t", "b", "warning"))[0] == "delivered"
        secret.write_text(f"json://127.0.0.1:{two.server_address[1]}/b\n")
        assert push.send(receiver, push.Push("t", "b", "warning"))[0] == "delivered"
        assert [r["path"] for r in one.ok()] == ["/a"]
        assert [r["path"] for r in two.ok()] == ["/b"]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"kind": "apprise", "urls": ["nosuchservice://s3cr3t-token@x"]}, "not a URL apprise takes"),
        ({"kind": "apprise"}, "urls: [apprise URLs] and/or urls_file"),
        ({"kind": "apprise", "urls": ["json://h/x"], "url": "http://h/x"}, "(no url)"),
        ({"kind": "webhook", "url": "http://h/x", "urls": ["json://h/x"]}, "urls: for apprise receivers only"),
        ({"kind": "webhook", "url": "http://h/x", "subject": "{summary}"}, "for email and apprise receivers only"),
        ({"kind": "apprise", "urls": ["json://h/x"], "body": "{nope}"}, "unknown field {nope}"),
        ({"kind": "apprise", "urls": ["ntfy://127.0.0.1:8080/"]}, "an ntfy URL names its topic"),
        ({"kind": "apprise", "urls": ["ntfys://"]}, "an ntfy URL names its topic"),
    ],
)
def test_a_bad_apprise_receiver_is_refused(raw: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Receiver.model_validate({"name": "c", **raw})
    said = " ".join(e["msg"] for e in caught.value.errors())  # what `iotgw rules check` prints
    assert says in said
    assert "s3cr3t-token" not in said
