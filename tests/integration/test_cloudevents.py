"""CloudEvents 1.0 as the official SDK reads them: every webhook body (structured and binary
mode, alerts and pages) and every item of GET /api/events; a notification is its log event."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from cloudevents.core.formats.json import JSONFormat

from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from tests.support.dispatching import RULES, STUCK, WED_10_BERLIN, Clock, api, dispatcher, message, publish
from tests.support.gateway import running_gateway, wait_for
from tests.support.peers import Hooks, serving

pytestmark = pytest.mark.anyio

EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
CORE = {"specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema", "data"}


def parsed(request: dict[str, Any]) -> Any:
    """The official SDK's reading of one recorded HTTP request (it picks the mode from the headers)."""
    headers = {k.lower(): v for k, v in request["headers"].items()}
    return from_http_event(HTTPMessage(headers=headers, body=request["raw"]))


def check_extensions(attributes: dict[str, Any]) -> None:
    for name in set(attributes) - CORE:
        assert EXTENSION_NAME.match(name), f"extension attribute {name!r}: lowercase letters and digits only"
    assert "sequence" not in attributes or isinstance(attributes["sequence"], str), "the sequence extension is a string"


async def test_webhooks_send_the_log_s_events_in_both_modes_and_the_sdk_reads_every_one(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    clock = Clock(WED_10_BERLIN)
    with serving() as structured, serving() as binary, serving() as pager:

        def url(h: Hooks) -> str:
            return f"http://127.0.0.1:{h.server_address[1]}/hook"

        rules = tmp_path / "rules.yaml"
        rules.write_text(f"""{RULES}
receivers:
  - {{name: ce-structured, kind: webhook, url: "{url(structured)}"}}
  - {{name: ce-binary, kind: webhook, url: "{url(binary)}", mode: binary}}
""")
        settings = settings_for(broker, consumers="alerts", rules_file=str(rules))
        async with running_gateway(settings, consumers=[dispatcher(pager, clock)]) as gw, api(gw) as c:
            # An entrapment (a page), then the car freed (resolved): firing and resolved.
            await publish(broker, "el-1", message(1, clock.now), message(2, clock.now, **STUCK), message(3, clock.now))
            await wait_for(lambda: asyncio.sleep(0, len(structured.ok()) >= 2 and len(binary.ok()) >= 2
                                                 and len(pager.ok()) >= 1), what="the notifications")  # fmt: skip
            items: list[dict[str, Any]] = []
            cursor = None
            while True:
                page = (
                    await c.get("/api/events", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
                ).json()
                items += page["items"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
        log = {}
        for item in items:
            event = JSONFormat().read(None, json.dumps(item).encode())  # raises on anything invalid
            attributes = event.get_attributes()
            assert attributes["specversion"] == "1.0"
            check_extensions(attributes)
            assert isinstance(attributes["receivedat"], str)
            log[event.get_id()] = event
        assert {e.get_type() for e in log.values()} >= {"elevator.stuck", "alert.firing", "alert.resolved"}
        for hooks, mode in ((structured, "structured"), (binary, "binary"), (pager, "structured")):
            for request in hooks.ok():
                content_type = request["headers"]["Content-Type"]
                if mode == "structured":
                    assert content_type == "application/cloudevents+json; charset=utf-8"
                    assert not any(k.lower().startswith("ce-") for k in request["headers"])
                else:
                    assert content_type == "application/json"
                    assert request["headers"]["ce-specversion"] == "1.0"
                event = parsed(request)
                check_extensions(event.get_attributes())
                same = log[event.get_id()]  # the notification is the log's event, id and all
                assert (event.get_type(), event.get_source(), event.get_subject()) == (
                    same.get_type(), same.get_source(), same.get_subject(),
                )  # fmt: skip
                assert event.get_data() == same.get_data()
                assert event.get_time() == same.get_time()
        types = [parsed(r).get_type() for r in structured.ok()]
        assert types == ["alert.firing", "alert.resolved"]
        assert parsed(pager.ok()[0]).get_type() == "workorder.assigned"
        assert parsed(pager.ok()[0]).get_data()["assignee"] == "tina"


def test_binary_mode_headers_carry_any_text_the_sdk_reads_back() -> None:
    from alerts.notify.bodies import cloudevent_request  # noqa: PLC0415
    from alerts.notify.receivers import Receiver  # noqa: PLC0415

    event = {
        "specversion": "1.0", "id": "iotgw-alert-1-1", "source": "iotgw/alerts", "type": "alert.firing",
        "time": "2026-12-01T10:00:00Z", "subject": "el-1", "datacontenttype": "application/json",
        "data": {"summary": 'Tür "klemmt" 100% \u2013 Stock 3'}, "site": 'Zürich "Nord" 50%', "position": 7,
    }  # fmt: skip
    body, headers = cloudevent_request(Receiver(name="b", url="http://h/x", mode="binary"), event)
    for value in headers.values():
        assert value.isascii(), value
        assert " " not in value, value
        assert '"' not in value, value
    got = from_http_event(HTTPMessage(headers={k.lower(): v for k, v in headers.items()}, body=body))
    assert got.get_attributes()["site"] == 'Zürich "Nord" 50%'
    assert got.get_data() == event["data"]
