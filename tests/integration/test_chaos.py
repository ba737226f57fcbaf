"""Chaos: the database refuses writes for a while (another process holds its write lock)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from devices.load import publish_numbered
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from tests.support.gateway import on_postgresql, running_gateway, wait_for

pytestmark = pytest.mark.anyio


async def test_unwritable_database_holds_acknowledgements_reports_not_ready_and_loses_nothing(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(broker, consumers="")
    async with running_gateway(settings) as gw:
        api = httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw")
        sample = gw.metrics.registry.get_sample_value
        await publish_numbered(broker.url_as("tester"), 5, 20, prefix="before-")

        async def stored(n: int) -> bool:
            return await asyncio.to_thread(gw.store.count_events) == n

        await wait_for(lambda: stored(100), what="the first 100 readings")
        assert (await api.get("/ready")).status_code == 200

        # Another process takes the write lock and keeps it (a backup tool, a stuck migration...).
        locker = create_engine(settings.database_url, poolclass=NullPool).connect()
        locker.exec_driver_sql("LOCK TABLE events IN EXCLUSIVE MODE" if on_postgresql else "BEGIN IMMEDIATE")
        try:
            await publish_numbered(broker.url_as("tester"), 5, 40, prefix="during-")  # the broker accepts them

            async def not_ready() -> bool:
                r = await api.get("/ready")
                return r.status_code == 503 and sample("iotgw_database_writable") == 0

            await wait_for(not_ready, timeout=40, what="/ready to report the database")
            body = (await api.get("/ready")).json()
            assert body["checks"]["database"] == "not writable"
            assert await asyncio.to_thread(gw.store.count_events) == 100
            # Received but neither stored nor acknowledged: the broker still holds them for us.
            assert (sample("iotgw_ingest_pending_messages") or 0) > 0
            assert (sample("iotgw_commit_failures_total") or 0) >= 1
        finally:
            locker.rollback()
            locker.close()

        await wait_for(lambda: stored(300), timeout=60, what="everything after the lock is gone")

        async def ready_again() -> bool:
            return (await api.get("/ready")).status_code == 200

        await wait_for(ready_again, what="/ready to recover")
        assert sample("iotgw_ingest_pending_messages") == 0
        await api.aclose()
