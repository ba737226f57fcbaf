"""API keys on every route: no key 401, a role too low 403, the right role 2xx, and an audit row per
mutation. The table below names each route's role; a route missing from it fails the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from alerts.dispatch.consumer import Dispatch
from alerts.dispatch.roster import load_roster
from devices.connect import mqtt_client
from devices.load import telemetry_payload
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.security import ROLES, AuditRow, create_api_key
from gateway.service import Gateway
from tests.support.consumers import Failing
from tests.support.dispatching import ROSTER, RULES, STUCK, WED_10_BERLIN, Clock, message, publish
from tests.support.gateway import running_gateway, settled, wait_for

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Step:
    method: str
    route: str  # the route's path template, as FastAPI knows it
    path: str  # the request's path, with values
    role: str
    json: Any = None
    params: dict[str, str] | None = None


ALL_DAY = {"start": "00:00", "end": "24:00"}
ROSTER_EDIT = [
    {"id": "tina", "name": "Tina", "contact": "pager", "sites": ["hq"], "skills": ["elevator"],
     "shifts": [{"start": "08:00", "end": "18:00"}]},
    {"id": "sue", "name": "Sue", "role": "supervisor", "contact": "pager", "shifts": [ALL_DAY]},
    {"id": "max", "name": "Max", "role": "manager", "contact": "pager", "shifts": [ALL_DAY]},
]  # fmt: skip
WHO = {"by": "tina"}

# In order: each mutation finds the state the steps before it left (one alert, one work order, ...).
STEPS = [
    Step("GET", "/api/devices", "/api/devices", "viewer"),
    Step("GET", "/api/devices/{device_id}", "/api/devices/el-1", "viewer"),
    Step("GET", "/api/devices/{device_id}/events", "/api/devices/el-1/events", "viewer"),
    Step("POST", "/api/devices", "/api/devices", "admin", json={"id": "temp-new", "type": "temperature"}),
    Step("DELETE", "/api/devices/{device_id}", "/api/devices/temp-new", "admin"),
    Step("GET", "/api/events", "/api/events", "viewer"),
    Step("GET", "/api/dead-letters", "/api/dead-letters", "viewer"),
    Step("GET", "/api/analytics/fleet", "/api/analytics/fleet", "viewer"),
    Step("GET", "/api/analytics/devices/{device_id}", "/api/analytics/devices/el-1", "viewer"),
    Step("GET", "/api/consumers", "/api/consumers", "viewer"),
    Step("POST", "/api/consumers/{name}/pause", "/api/consumers/analytics/pause", "admin"),
    Step("POST", "/api/consumers/{name}/resume", "/api/consumers/analytics/resume", "admin"),
    Step("POST", "/api/consumers/{name}/replay", "/api/consumers/analytics/replay", "admin", json={"from_position": 1}),
    Step("GET", "/api/consumers/{name}/dead-letters", "/api/consumers/failing/dead-letters", "viewer"),
    Step(
        "POST",
        "/api/consumers/{name}/dead-letters/{dead_letter_id}/retry",
        "/api/consumers/failing/dead-letters/1/retry",
        "admin",
    ),
    Step("GET", "/api/alerts", "/api/alerts", "viewer"),
    Step("GET", "/api/alerts/{alert_id}", "/api/alerts/1", "viewer"),
    Step("GET", "/api/rules", "/api/rules", "viewer"),
    Step("POST", "/api/alerts/{alert_id}/ack", "/api/alerts/1/ack", "technician", json=WHO),
    Step(
        "POST",
        "/api/alerts/{alert_id}/resolve",
        "/api/alerts/1/resolve",
        "technician",
        json={"by": "tina", "note": "freed the passengers"},
    ),
    Step("GET", "/api/silences", "/api/silences", "viewer"),
    Step(
        "POST",
        "/api/silences",
        "/api/silences",
        "admin",
        json={"matchers": {"site": "hq"}, "duration": "1h", "by": "ada", "comment": "works"},
    ),
    Step("DELETE", "/api/silences/{silence_id}", "/api/silences/1", "admin"),
    Step("GET", "/api/work-orders", "/api/work-orders", "viewer"),
    Step("GET", "/api/work-orders/{order_id}", "/api/work-orders/1", "viewer"),
    Step(
        "POST",
        "/api/work-orders/{order_id}/reassign",
        "/api/work-orders/1/reassign",
        "technician",
        json={"by": "tina", "to": "sue"},
    ),
    Step("POST", "/api/work-orders/{order_id}/ack", "/api/work-orders/1/ack", "technician", json={"by": "sue"}),
    Step("POST", "/api/work-orders/{order_id}/en-route", "/api/work-orders/1/en-route", "technician", json=WHO),
    Step("POST", "/api/work-orders/{order_id}/on-site", "/api/work-orders/1/on-site", "technician", json=WHO),
    Step(
        "POST",
        "/api/work-orders/{order_id}/resolve",
        "/api/work-orders/1/resolve",
        "technician",
        json={"by": "tina", "problem": "brake", "action": "replaced"},
    ),
    Step("GET", "/api/technicians", "/api/technicians", "viewer"),
    Step("PUT", "/api/technicians", "/api/technicians", "admin", json=ROSTER_EDIT, params={"by": "ada"}),
    Step("GET", "/api/stream", "/api/stream", "viewer"),
    Step("GET", "/api/audit", "/api/audit", "admin"),
    Step("GET", "/api/session", "/api/session", "viewer"),
]


@pytest.fixture
async def gateway(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> AsyncIterator[tuple[Gateway, Failing]]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    settings = settings_for(
        broker,
        consumers="analytics,alerts",
        rules_file=str(rules),
        api_auth=True,
        broker_password_file=str(broker.passwords.path),
        broker_pid_file=str(broker.data_dir / "mosquitto.pid"),
    )
    clock = Clock(WED_10_BERLIN)
    dispatch = Dispatch(load_roster(ROSTER.format(url="http://127.0.0.1:9/")), clock=clock)
    failing = Failing()
    async with running_gateway(settings, serve_http=True, consumers=[dispatch, failing]) as gw:
        yield gw, failing


async def test_every_route_wants_a_key_of_its_role_and_mutations_are_audited(
    broker: Mosquitto, gateway: tuple[Gateway, Failing]
) -> None:
    gw, failing = gateway
    paths = gw.app.openapi()["paths"]
    api_routes = {(m.upper(), p) for p, ops in paths.items() if p.startswith("/api/") for m in ops}
    assert api_routes == {(s.method, s.route) for s in STEPS}, "every /api route has a row in STEPS"

    # The world the steps act on: an entrapment (alert 1, work order 1) and a parked event.
    await publish(broker, "el-1", message(1, WED_10_BERLIN), message(2, WED_10_BERLIN, **STUCK))
    async with mqtt_client(broker.url_as("tester"), "temp-1") as c:
        await c.publish("devices/temp-1/telemetry", telemetry_payload(1, 20.0), qos=1)
    await settled(gw)
    keys = {role: create_api_key(gw.store, f"{role}-key", role)[1] for role in ROLES}
    transport = httpx.ASGITransport(app=gw.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:

        async def ready() -> bool:
            orders = await client.get("/api/work-orders", headers=bearer(keys["viewer"]))
            parked = await client.get("/api/consumers/failing/dead-letters", headers=bearer(keys["viewer"]))
            analysed = await client.get("/api/analytics/devices/el-1", headers=bearer(keys["viewer"]))
            return len(orders.json()["items"]) == 1 and len(parked.json()["items"]) == 1 and analysed.status_code == 200

        await wait_for(ready, what="the work order, the parked event and el-1's analytics")
        failing.broken = False  # so that the retry step succeeds

        for step in STEPS:
            await check_step(client, gw, step, keys)

        # A revoked or made-up key is 401 too.
        for bad in ("iotgw_0123456789ab_" + "x" * 32, "not-a-key"):
            r = await client.get("/api/devices", headers=bearer(bad))
            assert r.status_code == 401
        # Each key learns its own name and role, and what the role includes.
        for i, role in enumerate(ROLES):
            r = await client.get("/api/session", headers=bearer(keys[role]))
            assert r.json() == {"name": f"{role}-key", "role": role, "may": list(ROLES[: i + 1]), "time_zone": "UTC"}
        # X-API-Key works as well as the Authorization header.
        assert (await client.get("/api/devices", headers={"X-API-Key": keys["viewer"]})).status_code == 200


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def audit_rows(gw: Gateway) -> list[AuditRow]:
    with gw.store.session() as tx:
        return list(tx.exec(select(AuditRow).order_by(col(AuditRow.id))))


async def check_step(client: httpx.AsyncClient, gw: Gateway, step: Step, keys: dict[str, str]) -> None:
    what = f"{step.method} {step.path}"
    request: dict[str, Any] = {"json": step.json, "params": step.params}
    if step.route == "/api/stream":  # endless: over real HTTP (the ASGI transport would wait for its end)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.settings.http_port}") as real:
            for headers, expected in (({}, 401), (bearer(keys["viewer"]), 200)):
                async with real.stream("GET", step.path, headers=headers) as r:
                    assert r.status_code == expected, what
        return
    before = len(audit_rows(gw))
    r = await client.request(step.method, step.path, **request)
    assert r.status_code == 401, f"{what} without a key: {r.status_code}"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = await client.request(step.method, step.path, headers={"Authorization": keys[step.role]}, **request)
    assert r.status_code == 401, f"{what} with a key but no Bearer: {r.status_code}"
    assert "needs the Bearer scheme: `Authorization: Bearer <key>`" in r.json()["detail"]
    for lower in ROLES[: ROLES.index(step.role)]:
        r = await client.request(step.method, step.path, headers=bearer(keys[lower]), **request)
        assert r.status_code == 403, f"{what} as {lower}: {r.status_code} {r.text}"
        assert step.role in r.json()["detail"]
    r = await client.request(step.method, step.path, headers=bearer(keys[step.role]), **request)
    assert 200 <= r.status_code < 300, f"{what} as {step.role}: {r.status_code} {r.text}"
    rows = audit_rows(gw)[before:]
    if step.method == "GET":
        assert rows == [], f"{what} is a read: no audit row"
        return
    # The refused attempts (403) are on record too, then the one that worked.
    lower = ROLES[: ROLES.index(step.role)]
    assert [(a.who, a.status) for a in rows] == [
        *((f"{role}-key", 403) for role in lower),
        (f"{step.role}-key", r.status_code),
    ], what
    assert {(a.method, a.path) for a in rows} == {(step.method, step.path)}
    assert all(a.at is not None and abs((datetime.now(UTC) - a.at).total_seconds()) < 60 for a in rows)


async def test_probes_are_open_unless_configured_and_bodies_have_a_limit(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker, api_auth=True, consumers="analytics")) as gw:
        key = create_api_key(gw.store, "ops", "admin")[1]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            for path in ("/health", "/ready", "/metrics"):
                assert (await client.get(path)).status_code == 200, path
            assert (await client.get("/ui/")).status_code == 200, "the page itself is public; its data is not"

            big = {"from_position": 1, "padding": "x" * 70_000}
            r = await client.post("/api/consumers/analytics/replay", json=big, headers=bearer(key))
            assert r.status_code == 413
            assert "IOTGW_MAX_BODY_BYTES" in r.json()["detail"]

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
                for _ in range(100):
                    yield b"x" * 1000

            r = await client.post("/api/consumers/analytics/replay", content=chunks(), headers=bearer(key))
            assert r.status_code == 413

            r = await client.post(
                "/api/consumers/analytics/replay",
                content=b"{not json",
                headers={**bearer(key), "Content-Type": "application/json"},
            )
            assert r.status_code == 422
            assert r.json()["detail"]
            # Refused before the route ran (so before the key was read): nothing changed, nothing audited.
            assert audit_rows(gw) == []

    closed = settings_for(broker, api_auth=True, api_open_probes=False, consumers="")
    async with running_gateway(closed) as gw:
        key = create_api_key(gw.store, "prometheus", "viewer")[1]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client:
            for path in ("/health", "/ready", "/metrics"):
                assert (await client.get(path)).status_code == 401, path
                assert (await client.get(path, headers=bearer(key))).status_code == 200, path


async def test_cors_is_off_by_default_and_allows_only_the_configured_origins(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    preflight = {"Origin": "https://ops.example", "Access-Control-Request-Method": "POST"}
    async with (
        running_gateway(settings_for(broker, consumers="")) as gw,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client,
    ):
        r = await client.options("/api/devices", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = await client.get("/api/devices", headers={"Origin": "https://ops.example"})
        assert "access-control-allow-origin" not in r.headers
    allowed = settings_for(broker, consumers="", cors_origins="https://ops.example")
    async with (
        running_gateway(allowed) as gw,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as client,
    ):
        r = await client.options("/api/devices", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://ops.example"
        r = await client.options("/api/devices", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
