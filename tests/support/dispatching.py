"""A dispatch scenario: rules, a roster, a clock to move, device messages, the API."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from alerts.dispatch.consumer import Dispatch
from alerts.dispatch.roster import load_roster
from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.service import Gateway
from tests.support.gateway import wait_for
from tests.support.peers import Hooks

RULES = """
rules:
  - name: stuck
    severity: critical
    summary: "{device} stuck at floor {floor} with {load_kg} kg inside"
    select: {type: [elevator]}
    event: {type: elevator.stuck, clear: {type: elevator.fault.cleared}}
  - name: door-jam
    severity: major
    summary: "Door jammed on {device}"
    select: {type: [elevator]}
    event:
      type: elevator.fault.raised
      data: {code: DOOR_JAM}
      clear: {type: elevator.fault.cleared, data: {code: DOOR_JAM}}
  - name: out-of-service
    severity: major
    summary: "{device} is out of service"
    select: {type: [elevator]}
    state: {field: mode, op: "==", value: out_of_service}
"""


ROSTER = """
timezone: Europe/Berlin
receivers:
  - {{name: pager, kind: webhook, url: "{url}"}}
technicians:
  - {{id: abe, name: Abe, contact: pager, sites: [hq], skills: [elevator],
     shifts: [{{start: "22:00", end: "06:00"}}]}}
  - {{id: tina, name: Tina, contact: pager, sites: [hq], skills: [elevator],
     shifts: [{{start: "08:00", end: "18:00"}}]}}
  - {{id: sue, name: Sue, role: supervisor, contact: pager, shifts: [{{start: "00:00", end: "24:00"}}]}}
  - {{id: max, name: Max, role: manager, contact: pager, shifts: [{{start: "00:00", end: "24:00"}}]}}
policies:
  - name: default
    levels:
      - {{role: technician, ack_timeout: 5m}}
      - {{role: supervisor, ack_timeout: 10m}}
      - {{role: manager, ack_timeout: 15m}}
"""


WED_10_BERLIN = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)  # tina on shift, abe not


STUCK = {"mode": "fault", "fault": "STUCK", "direction": "up", "load_kg": 80}


class Clock:
    """The simulated clock: stands still until the test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def dispatcher(pager: Hooks, clock: Clock) -> Dispatch:
    roster = load_roster(ROSTER.format(url=f"http://127.0.0.1:{pager.server_address[1]}/page"))
    return Dispatch(roster, clock=clock)


def message(seq: int, at: datetime, **data: Any) -> bytes:
    ts = int(at.timestamp() * 1000)
    return json.dumps({"type": "elevator", "seq": seq, "ts": ts, "site": "hq", "data": {**IDLE, **data}}).encode()


async def publish(broker: Mosquitto, device: str, *payloads: bytes) -> None:
    async with mqtt_client(broker.url_as("tester"), device) as c:
        for p in payloads:
            await c.publish(f"devices/{device}/state", p, qos=1)


def api(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw")


IDLE = {"floor": 3, "direction": "idle", "door": "closed", "mode": "normal", "load_kg": 0, "fault": None}


async def trap(broker: Mosquitto, clock: Clock) -> None:
    """el-1 at rest, then stuck with 80 kg inside: an entrapment, at the simulated time."""
    await publish(broker, "el-1", message(1, clock.now), message(2, clock.now, **STUCK))


async def detail(gw: Gateway, order_id: int) -> dict[str, Any]:
    async with api(gw) as c:
        r = await c.get(f"/api/work-orders/{order_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())


async def one_order(gw: Gateway, what: str, check: Callable[[dict[str, Any]], bool] = lambda _o: True) -> dict:
    found: list[dict[str, Any]] = []

    async def ready() -> bool:
        found[:] = [o for o in await orders(gw) if check(o)]
        return len(found) == 1

    await wait_for(ready, what=what)
    return found[0]


async def ticked(d: Dispatch, clock: Clock, to: datetime) -> None:
    """Move the clock and wait until dispatch has committed a tick at that time."""
    clock.now = to

    async def done() -> bool:
        return d.last_tick == to

    await wait_for(done, what=f"a dispatch tick at {to}")


async def orders(gw: Gateway, **params: Any) -> list[dict[str, Any]]:
    async with api(gw) as c:
        r = await c.get("/api/work-orders", params=params)
        assert r.status_code == 200, r.text
        return list(r.json()["items"])
