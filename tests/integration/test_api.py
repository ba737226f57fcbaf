"""The HTTP API through httpx against the real app on a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import APIRouter
from prometheus_client import CollectorRegistry

from gateway.api import AppState, create_app
from gateway.api.auth import ApiSecurity
from gateway.config import Settings
from gateway.core.events import Event
from gateway.core.normalize import Shadow
from gateway.log import DeadLetter, Store
from gateway.metrics import Metrics
from gateway.plugins import Host, Plugin, plugin_classes, start_plugins

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def installed_plugins(store: Store, registry: CollectorRegistry) -> dict[str, Plugin]:
    """The installed plugins (their routes), as a gateway over `store` that runs no consumer has them."""
    host = Host(settings=Settings(), store=store, registry=registry, consumers={},
                background=ThreadPoolExecutor(max_workers=1), public_url="http://gw")  # fmt: skip
    return start_plugins(host, plugin_classes())


class Probe:
    broker = True
    database = True


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def client(make_store: Callable[[], Store], probe: Probe) -> AsyncIterator[httpx.AsyncClient]:
    store = make_store()
    events = [
        Event(
            id=f"e{i % 3}-{i}-0",
            source=f"devices/e{i % 3}",
            type="elevator.door.opened" if i % 2 else "sensor.reading",
            time=T0 + timedelta(seconds=i),
            subject=f"e{i % 3}",
            data={"i": i},
            sequence=i,
            site="hq",
        )
        for i in range(1, 251)
    ]
    shadows = [Shadow(f"e{i}", type="elevator", site="hq" if i else "north", last_seq=i, online=True) for i in range(3)]
    dead = [DeadLetter("devices/x/state", "bad_json", "Expecting value", b"{oops", T0)]
    store.append_batch(events, shadows, dead, now=T0)
    metrics = Metrics(CollectorRegistry())
    metrics.messages_received.labels("state").inc(250)
    security = ApiSecurity(auth=False)  # keys: tests/integration/test_security.py
    plugins = installed_plugins(store, metrics.registry)
    app = create_app(
        AppState(store, metrics, lambda: probe.broker, lambda: probe.database, security=security, plugins=plugins)
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c
    store.close()


async def test_events_paginate_with_a_cursor_in_log_order(client: httpx.AsyncClient) -> None:
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        r = await client.get("/api/events", params={"limit": 100, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200
        body = r.json()
        seen.extend(e["position"] for e in body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 250
    assert seen == sorted(seen)
    assert pages == 3


async def test_events_newest_first_paginate_back_through_the_whole_log(client: httpx.AsyncClient) -> None:
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": 100, "order": "desc", **({"cursor": cursor} if cursor else {})}
        body = (await client.get("/api/events", params=params)).json()
        seen.extend(e["position"] for e in body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen, reverse=True)
    assert len(seen) == len(set(seen)) == 250
    r = await client.get("/api/events", params={"order": "newest"})
    assert r.status_code == 422


async def test_event_filters(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/events", params={"device_id": "e1", "type": "elevator.door.opened", "limit": 1000})
    items = r.json()["items"]
    assert items
    assert all(e["subject"] == "e1" and e["type"] == "elevator.door.opened" for e in items)
    r = await client.get("/api/events", params={"since": "2026-11-28T10:00:10Z", "until": "2026-11-28T10:00:20Z"})
    assert [e["data"]["i"] for e in r.json()["items"]] == list(range(10, 20))
    r = await client.get("/api/events", params={"type": "elevator.*", "limit": 1000})
    assert len(r.json()["items"]) == 125
    first = r.json()["items"][0]
    assert first["source"] == "devices/e1"
    assert first["id"] == "e1-1-0"


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"limit": 1001}, "limit"),
        ({"limit": 0}, "limit"),
        ({"cursor": "abc"}, "cursor"),
        ({"since": "not a time"}, "since"),
        ({"since": "2026-11-28T10:00:00"}, "time zone"),
        ({"device_id": "bad id!"}, "device_id"),
    ],
)
async def test_bad_event_queries_get_a_clear_422(
    client: httpx.AsyncClient, params: dict[str, object], fragment: str
) -> None:
    r = await client.get("/api/events", params=params)
    assert r.status_code == 422
    assert fragment in r.json()["detail"]


async def test_devices_list_filter_and_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/devices")
    assert [d["device_id"] for d in r.json()["items"]] == ["e0", "e1", "e2"]
    r = await client.get("/api/devices", params={"site": "north"})
    assert [d["device_id"] for d in r.json()["items"]] == ["e0"]
    r = await client.get("/api/devices/e2")
    assert r.json()["last_seq"] == 2
    r = await client.get("/api/devices/nope")
    assert r.status_code == 404
    assert "nope" in r.json()["detail"]


async def test_dead_letters_show_reason_and_payload(client: httpx.AsyncClient) -> None:
    (item,) = (await client.get("/api/dead-letters")).json()["items"]
    assert item["reason"] == "bad_json"
    assert item["payload_preview"] == "{oops"
    assert (await client.get("/api/dead-letters", params={"reason": "schema"})).json()["items"] == []


async def test_ready_reports_each_dependency(client: httpx.AsyncClient, probe: Probe) -> None:
    assert (await client.get("/ready")).status_code == 200
    probe.broker = False
    r = await client.get("/ready")
    assert r.status_code == 503
    assert r.json()["checks"]["broker"] == "disconnected"
    probe.broker, probe.database = True, False
    r = await client.get("/ready")
    assert r.status_code == 503
    assert r.json()["checks"]["database"] == "not writable"
    assert (await client.get("/health")).json() == {"status": "ok"}


async def test_metrics_are_exposed(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert 'iotgw_messages_received_total{channel="state"} 250.0' in r.text


async def test_openapi_docs_are_served(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert {"/api/events", "/api/devices", "/api/devices/{device_id}", "/api/dead-letters", "/ready"} <= set(
        spec["paths"]
    )
    assert (await client.get("/docs")).status_code == 200


async def test_a_misspelt_parameter_or_value_is_a_422_that_says_what_is_taken(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/events", params={"typ": "sensor.reading"})
    assert r.status_code == 422
    assert "unknown query parameter typ; this endpoint takes: " in r.json()["detail"]
    assert "type" in r.json()["detail"]
    r = await client.get("/api/alerts", params={"status": "opne"})
    assert r.status_code == 422
    assert "'open'" in r.text, "the allowed values"
    assert "pattern" not in r.text, "not a regex"
    assert (await client.get("/api/events", params={"type": "sensor.reading", "limit": 5})).status_code == 200
    assert (await client.get("/api/devices/nope/events")).status_code == 404, "as /api/devices/nope is"
    r = await client.get("/api/events", params={"type": "elevator.fault.rasied"})
    assert r.status_code == 422
    assert "did you mean elevator.fault.raised?" in r.json()["detail"]
    for fine in ("elevator.*", "alert.firing", "workorder.assigned", "elevator.door.opened"):
        assert (await client.get("/api/events", params={"type": fine})).status_code == 200, fine
    assert (await client.get("/api/events", params={"type": "elevatr.*"})).status_code == 422
    assert (await client.get("/api/devices", params={"type": "elevatr"})).status_code == 422
    assert (await client.get("/api/dead-letters", params={"reason": "badjson"})).status_code == 422
    assert (await client.get("/api/dead-letters", params={"reason": "bad_json"})).status_code == 200
    r = await client.get("/api/events", params={"type": "elevatr.*"})
    assert "did you mean elevator.*?" in r.json()["detail"]


async def walk(client: httpx.AsyncClient, path: str, key: str, **params: object) -> list[object]:
    """Every item of a list, a page of 2 at a time; each page has the one shape, the last a null cursor."""
    seen: list[object] = []
    cursor = None
    for _ in range(100):
        r = await client.get(path, params={**params, "limit": 2, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"items", "next_cursor"}, path
        seen += [item[key] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            assert len(body["items"]) <= 2
            return seen
        assert len(body["items"]) == 2, "a page with a cursor is full"
    raise AssertionError(f"{path} never ended")


async def test_every_list_has_one_shape_and_pages_through_every_item_once(make_store: Callable[[], Store]) -> None:
    from alerts.dispatch.orders import WorkOrderRow  # noqa: PLC0415 - the tables the lists read
    from alerts.tables import AlertRow, SilenceRow  # noqa: PLC0415
    from gateway.security import AuditRow  # noqa: PLC0415

    store = make_store()
    shadows = [Shadow(f"d{i:02}", type="elevator", site="hq", last_seq=i, online=True) for i in range(7)]
    events = [
        Event(id=f"d00-{i}", source="devices/d00", type="sensor.reading", time=T0 + timedelta(seconds=i),
              subject="d00", data={"i": i}, sequence=i, site="hq")
        for i in range(1, 6)
    ]  # fmt: skip
    store.append_batch(events, shadows, [], now=T0)
    # Work orders in every rank of the list's order: open before resolved, P1 before P3, newest first.
    kinds = [("P3", "assigned"), ("P1", "resolved"), ("P1", "assigned"), ("P2", "unassigned"), ("P3", "resolved"),
             ("P1", "acknowledged"), ("P2", "resolved")]  # fmt: skip
    with store.session() as tx:
        for i, (priority, status) in enumerate(kinds):
            tx.add(WorkOrderRow(device_id=f"d{i:02}", priority=priority, status=status, summary="s", first_alert_id=i,
                                created_at=T0, updated_at=T0))  # fmt: skip
            tx.add(AlertRow(rule="r", device_id=f"d{i:02}", severity="major", status="firing", summary="s",
                            fired_at=T0, updated_at=T0))  # fmt: skip
            tx.add(AuditRow(at=T0, who="ann", role="admin", method="POST", path="/api/x", status=200))
            forever = T0 + timedelta(days=9999)
            tx.add(SilenceRow(matchers={"rule": "r"}, created_by="ann", comment="c", starts_at=T0, ends_at=forever))
        tx.commit()
    metrics = Metrics(CollectorRegistry())
    app = create_app(AppState(store, metrics, lambda: True, lambda: True, security=ApiSecurity(auth=False),
                              plugins=installed_plugins(store, metrics.registry)))  # fmt: skip
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        whole = (await c.get("/api/work-orders", params={"limit": 1000})).json()
        expected = [o["id"] for o in whole["items"]]
        assert [(o["status"] == "resolved", o["priority"]) for o in whole["items"]] == sorted(
            (s == "resolved", p) for p, s in kinds
        ), "open first, then by priority"
        assert whole["next_cursor"] is None
        assert await walk(c, "/api/work-orders", "id") == expected
        opened = [o["id"] for o in whole["items"] if o["status"] != "resolved"]
        assert await walk(c, "/api/work-orders", "id", status="open") == opened
        assert await walk(c, "/api/alerts", "id") == list(range(7, 0, -1)), "newest first"
        assert await walk(c, "/api/audit", "id") == list(range(7, 0, -1))
        assert await walk(c, "/api/silences", "id") == list(range(1, 8))
        assert await walk(c, "/api/devices", "device_id") == [f"d{i:02}" for i in range(7)]
        assert await walk(c, "/api/devices/d00/events", "seq") == [5, 4, 3, 2, 1]
        for path in ("/api/work-orders", "/api/alerts", "/api/audit", "/api/silences", "/api/devices/d00/events"):
            for bad in ("x", "0.P1.3", "2.P1.3", "1.P9.3", "-1", "99999999999999999999"):
                r = await c.get(path, params={"cursor": bad})
                if r.status_code == 200:
                    continue
                assert r.status_code == 422, (path, bad, r.text)
                assert "cursor" in r.json()["detail"], (path, bad)
        assert (await c.get("/api/work-orders", params={"cursor": "0.P1"})).status_code == 422
        assert (await c.get("/api/alerts", params={"cursor": "0.P1.3"})).status_code == 422
    store.close()


async def test_an_event_type_a_consumer_appends_is_filtered_on_even_undeclared(make_store: Callable[[], Store]) -> None:
    store = make_store()
    custom = Event(id="c-1", source="plugins/x", type="doorwatch.busy", time=T0, subject="e1", data={})
    store.append_batch([custom], [], [], now=T0)
    metrics = Metrics(CollectorRegistry())
    app = create_app(AppState(store, metrics, lambda: True, lambda: True, security=ApiSecurity(auth=False),
                              plugins=installed_plugins(store, metrics.registry)))  # fmt: skip
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        for wanted in ("doorwatch.busy", "doorwatch.*"):
            r = await c.get("/api/events", params={"type": wanted})
            assert r.status_code == 200, r.text
            assert [e["type"] for e in r.json()["items"]] == ["doorwatch.busy"]
        assert (await c.get("/api/events", params={"type": "doorwatch.bsy"})).status_code == 422
        declared = await c.get("/api/events", params={"type": "workorder.assigned"})  # the alerts plugin's
        assert declared.status_code == 200, declared.text
    store.close()


def test_a_plugin_page_under_api_would_take_no_key_and_is_refused(make_store: Callable[[], Store]) -> None:
    class Leaky(Plugin):
        name = "leaky"

        def pages(self) -> APIRouter:
            router = APIRouter()
            router.add_api_route("/api/secrets", lambda: {"all": "of them"})
            return router

    store = make_store()
    metrics = Metrics(CollectorRegistry())
    leaky = Leaky.__new__(Leaky)
    with pytest.raises(ValueError, match="pages\\(\\) routes take no API key, so none may be under /api"):
        create_app(AppState(store, metrics, lambda: True, lambda: True, plugins={"leaky": leaky}))
    store.close()
