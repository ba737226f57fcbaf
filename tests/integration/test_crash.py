"""Durability: kill -9 the gateway mid-stream, or restart the broker, and lose nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from devices.fleet import Fleet, FleetConfig
from devices.load import publish_numbered
from gateway.cli.broker import Mosquitto, free_port
from gateway.config import Settings
from tests.support.gateway import (
    kill_9,
    query,
    running_gateway,
    settled,
    start_gateway,
    until_ready,
    wait_for,
)

pytestmark = pytest.mark.anyio


def _count(db: str) -> tuple[int, int]:
    rows = query(
        db,
        "select count(*), count(distinct subject || ':' || cast(sequence as varchar)) "
        "from events where type = 'sensor.reading'",
    )
    return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)


def _sensor_minutes(db: str) -> list[tuple[object, ...]]:
    # Sums rounded: a different batching adds the same floats in another order.
    rows = query(db, "select device_id, minute, count, total, vmin, vmax from analytics_sensor_minutes order by 1, 2")
    return [(d, m, n, round(total, 6), lo, hi) for d, m, n, total, lo, hi in rows]


async def test_three_kill_9s_during_50000_messages_lose_duplicate_and_miscount_nothing(
    broker: Mosquitto, tmp_path: Path, database_url: str
) -> None:
    db, log, port = database_url, tmp_path / "gateway.log", free_port()
    devices, per_device = 100, 500
    total = devices * per_device
    proc = start_gateway(broker, db, port, log)
    try:
        await until_ready(port, proc)
        publisher = asyncio.create_task(publish_numbered(broker.url_as("tester"), devices, per_device))
        killed_at = []
        for share in (0.2, 0.45, 0.7):

            async def far_enough(share: float = share) -> bool:
                return _count(db)[0] >= total * share

            await wait_for(far_enough, timeout=60, what=f"{share:.0%} of the stream to be stored")
            kill_9(proc)
            killed_at.append(_count(db)[0])
            await asyncio.sleep(0.3)  # devices keep publishing while the gateway is down
            # Not waiting for /ready: the restarted gateway stores from its first second, and
            # the broker holds the rest of the stream by now; the next kill must not come late.
            proc = start_gateway(broker, db, port, log)
        stats = await publisher
        await until_ready(port, proc)
        assert stats.acked == total

        async def all_stored() -> bool:
            return _count(db)[0] >= total

        await wait_for(all_stored, timeout=90, what=f"{total} events after the restarts")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def settled_and_caught_up() -> bool:
                # Redelivered duplicates, if any, are received and committed by now, and handled.
                text = (await client.get("/metrics")).text
                lags = [c["lag_events"] for c in (await client.get("/api/consumers")).json()["items"]]
                return "iotgw_ingest_pending_messages 0.0" in text and max(lags) == 0

            await wait_for(settled_and_caught_up, timeout=60, what="the gateway to commit and route everything")
            assert killed_at[-1] < total, "the kills came too late to prove anything"
            assert _count(db) == (total, total)
            # The consumers' effects after three crashes equal an uninterrupted pass over the log.
            interrupted = _sensor_minutes(db)
            assert sum(int(row[2]) for row in interrupted) == total  # readings counted once each
            r = await client.post("/api/consumers/analytics/replay", json={"from_position": 1})
            assert r.json()["reset"] is True

            async def rebuilt() -> bool:
                states = (await client.get("/api/consumers")).json()["items"]
                return next(c for c in states if c["name"] == "analytics")["lag_events"] == 0

            await wait_for(rebuilt, timeout=60, what="the analytics replay")
            assert _sensor_minutes(db) == interrupted
    finally:
        kill_9(proc)


async def test_broker_restart_while_devices_publish_loses_nothing(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker)) as gw:
        cfg = FleetConfig(
            mqtt_url=broker.url_as("tester"), elevators=0, sensors=10, rate=100, steps=300, seq_start=0, seed=3
        )
        fleet = Fleet(cfg)
        run = asyncio.create_task(fleet.run())
        await wait_for(lambda: _async(fleet.stats.sent > 500), what="devices to publish")
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(broker.start)
        stats = await asyncio.wait_for(run, 120)
        assert stats.reconnects >= cfg.sensors  # every device really lost its connection

        async def complete() -> bool:
            # Readings only: the log also holds the alerts derived from them.
            return await asyncio.to_thread(gw.store.count_events, "sensor.reading") >= 10 * 300

        await wait_for(complete, timeout=60, what="every reading after the broker restart")
        await settled(gw)
        with gw.store.session() as s:
            from sqlalchemy import text  # noqa: PLC0415

            rows = s.exec(
                text("select subject, count(*), count(distinct sequence), min(sequence), max(sequence) "
                     "from events where type='sensor.reading' group by subject")
            ).all()  # fmt: skip
        assert len(rows) == cfg.sensors
        for subject, n, distinct, lo, hi in rows:
            assert (n, distinct, lo, hi) == (300, 300, 1, 300), subject
        assert gw.ingest.connected


async def _async(value: bool) -> bool:
    return value
