"""kill -9 the gateway in the middle of a recorded scenario: the same alerts as an uninterrupted run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from devices.connect import mqtt_client
from devices.elevator import Elevator
from devices.fleet import settle
from gateway.cli.broker import Mosquitto, free_port
from tests.support.gateway import fresh_database, iotgw_run, kill_9, new_broker, query, until_ready, wait_for

pytestmark = pytest.mark.anyio
BASE_MS = 1764324000000

RULES = """
rules:
  - name: door-jam
    severity: major
    summary: "Door jammed on {device}"
    event:
      type: elevator.fault.raised
      data: {code: DOOR_JAM}
      clear: {type: elevator.fault.cleared, data: {code: DOOR_JAM}}
  - name: any-fault
    severity: critical
    summary: "{device}: fault {fault}"
    state: {field: mode, op: "==", value: fault}
  - name: out-of-service
    severity: major
    summary: "{device} out of service"
    state: {field: mode, op: "==", value: out_of_service}
receivers: []
"""


def scenario() -> dict[str, list[bytes]]:
    """A recorded sequence of elevator state messages per device (device times, no wall clock)."""
    out: dict[str, list[bytes]] = {}
    for i in range(16):
        did = f"rec-{i}"
        car = Elevator(did, "hq", random.Random(f"scenario:{did}"), fault_rate=0.03, maintenance_rate=0.0)
        msgs, seq = [], 0
        for step in range(800):
            data = car.step()
            if data is None:
                continue
            seq += 1
            body = {"type": "elevator", "seq": seq, "ts": BASE_MS + step * 1000, "site": "hq", "data": data}
            msgs.append(json.dumps(body).encode())
        out[did] = msgs
    return out


async def publish(url: str, messages: dict[str, list[bytes]]) -> None:
    async def one(device: str, payloads: list[bytes]) -> None:
        pending = list(payloads)
        while pending:
            client = mqtt_client(url, device, timeout=10)
            try:
                async with client:
                    while pending:
                        await client.publish(f"devices/{device}/state", pending[0], qos=1)
                        pending.pop(0)
            except aiomqtt.MqttError:
                settle(client)
                await asyncio.sleep(0.2)

    await asyncio.gather(*(one(d, p) for d, p in messages.items()))


def start(port: int, db: str, http: int, rules: Path, log: Path) -> subprocess.Popen[bytes]:
    return iotgw_run(f"mqtt://127.0.0.1:{port}", db, http, "--consumers", "alerts", log=log,
                     env={"IOTGW_RULES_FILE": str(rules)})  # fmt: skip


def outcome(db: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """Each alert with its transitions in order, and the notifications by status."""
    transitions: dict[int, list[str]] = {}
    for alert_id, to_status in query(db, "select alert_id, to_status from alert_transitions order by id"):
        transitions.setdefault(alert_id, []).append(to_status)
    alerts = [
        (rule, device, status, fired_at, ">".join(transitions.get(alert_id, [])))
        for alert_id, rule, device, status, fired_at in query(
            db, "select id, rule, device_id, status, fired_at from alerts order by rule, device_id, fired_at"
        )
    ]
    notes = query(db, "select status, count(*) from notifications group by status order by status")
    return alerts, notes


def stored(db: str) -> int:
    """Messages stored so far (each device's last seq; seqs run 1..n)."""
    rows = query(db, "select coalesce(sum(last_seq), 0) from devices")
    return int(rows[0][0]) if rows else 0


def lag(db: str) -> int:
    head = query(db, "select coalesce(max(id), 0) from events")
    cursor = query(db, "select position from consumer_cursors where name = 'alerts'")
    return int(head[0][0] if head else 0) - int(cursor[0][0] if cursor else 0)


@pytest.fixture
def brokers() -> Iterator[list[Mosquitto]]:
    mqs = [new_broker() for _ in range(2)]
    for m in mqs:
        m.start()
    yield mqs
    for m in mqs:
        m.stop()
        shutil.rmtree(m.data_dir, ignore_errors=True)


async def test_alerts_after_kill_9_equal_an_uninterrupted_run(brokers: list[Mosquitto], tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    msgs = scenario()
    with contextlib.ExitStack() as stack:
        databases = [stack.enter_context(fresh_database(tmp_path, f"run{run}")) for run in range(2)]
        results = await _both_runs(brokers, databases, rules, msgs, tmp_path)
    (alerts_a, notes_a), (alerts_b, notes_b) = results
    assert alerts_a, "the scenario raises alerts"
    assert {a[0] for a in alerts_a} >= {"any-fault"}
    assert alerts_b == alerts_a
    assert notes_b == notes_a


async def _both_runs(
    brokers: list[Mosquitto], databases: list[str], rules: Path, msgs: dict[str, list[bytes]], tmp_path: Path
) -> list[tuple[list[tuple[object, ...]], list[tuple[object, ...]]]]:
    """An uninterrupted run, and one killed -9 a third of the way in, each on its own broker and database."""
    total = sum(len(v) for v in msgs.values())
    results = []
    for run, broker in enumerate(brokers):
        db, http, log = databases[run], free_port(), tmp_path / f"run{run}.log"
        proc = start(broker.gateway_port, db, http, rules, log)
        try:
            await until_ready(http, proc)
            sending = asyncio.create_task(publish(broker.url_as("tester"), msgs))
            if run == 1:  # the interrupted run

                async def midway(db: str = db) -> bool:
                    return stored(db) > total // 3

                await wait_for(midway, what="a third of the scenario stored")
                kill_9(proc)
                assert stored(db) < total, "the kill came too late to prove anything"
                proc = start(broker.gateway_port, db, http, rules, log)
            await sending

            async def done(db: str = db) -> bool:
                return stored(db) == total and lag(db) == 0

            await wait_for(done, timeout=60, what="the whole scenario stored and alerted")
        finally:
            kill_9(proc)
        results.append(outcome(db))
    return results
