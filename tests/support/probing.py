"""Probing the gateway with odd messages and reading its own answers: metrics samples, dead letters,
consumer states, and a process that holds a database lock."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import httpx
from sqlmodel import col, select

from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.log import DeadLetterRow
from gateway.service import Gateway

IDLE = {"floor": 0, "direction": "idle", "door": "closed", "mode": "normal", "load_kg": 0, "fault": None}


def state(seq: int, ts: str | int, **data: Any) -> bytes:
    return json.dumps({"type": "elevator", "seq": seq, "ts": ts, "site": "hq", "data": {**IDLE, **data}}).encode()


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def publish(broker: Mosquitto, device: str, *payloads: bytes, channel: str = "state") -> None:
    async with mqtt_client(broker.url_as("tester"), device) as c:
        for p in payloads:
            await c.publish(f"devices/{device}/{channel}", p, qos=1)


def api(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw")


def sample(gw: Gateway, name: str, labels: dict[str, str] | None = None) -> float:
    return gw.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def dead_letters(gw: Gateway) -> list[DeadLetterRow]:
    with gw.store.session() as tx:
        return list(tx.exec(select(DeadLetterRow).order_by(col(DeadLetterRow.id))))


async def truth(value: bool) -> bool:
    """`value` as an awaitable, for `wait_for` on a plain condition."""
    return value


HOLD_LOCK = """
import sys, time
from sqlalchemy import create_engine, text
url, seconds = sys.argv[1], float(sys.argv[2])
engine = create_engine(url, isolation_level="AUTOCOMMIT")
with engine.connect() as conn:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the database's one write lock
    else:
        conn.exec_driver_sql("BEGIN")
        conn.exec_driver_sql("LOCK TABLE consumer_cursors IN EXCLUSIVE MODE")  # every consumer's commit waits
    print("locked", flush=True)
    time.sleep(seconds)
    conn.exec_driver_sql("ROLLBACK")
"""


async def consumer_states(gw: Gateway) -> dict[str, dict[str, Any]]:
    async with api(gw) as client:
        return {c["name"]: c for c in (await client.get("/api/consumers")).json()["items"]}


def reading(seq: int) -> bytes:
    return json.dumps(
        {"type": "temperature", "seq": seq, "ts": 1764324000000, "data": {"value": 20.0, "unit": "C"}}
    ).encode()
