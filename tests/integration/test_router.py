"""The router: consumers read the log at their own pace; failures, pauses and replays stay local."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session

from devices.load import publish_numbered
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.core.events import Event
from gateway.log import ConsumerCursorRow
from gateway.runtime import BaseConsumer, load_consumers
from gateway.service import Gateway
from tests.support.consumers import Failing
from tests.support.gateway import install_plugin, running_gateway, wait_for

pytestmark = pytest.mark.anyio


class Counting(BaseConsumer):
    """Counts the readings it was given (in memory)."""

    name = "counting"
    types = ("sensor.reading",)

    def __init__(self) -> None:
        self.positions: list[int] = []

    def handle(self, events: Sequence[Event], tx: Session) -> None:  # noqa: ARG002
        self.positions.extend(e.position for e in events)


class Hanging(BaseConsumer):
    """Never returns from the batch holding one particular reading (until released)."""

    name = "hanging"
    types = ("sensor.reading",)
    handler_timeout_s = 0.5
    max_attempts = 2
    retry_base_s = 0.001

    def __init__(self, subject: str, sequence: int) -> None:
        self.culprit = (subject, sequence)
        self.release = threading.Event()
        self.positions: list[int] = []

    def handle(self, events: Sequence[Event], tx: Session) -> None:  # noqa: ARG002
        if any((e.subject, e.sequence) == self.culprit for e in events):
            self.release.wait()  # hangs: a deadlocked client library, a socket without timeout...
            return
        self.positions.extend(e.position for e in events)


def client_for(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw")


async def consumer_state(client: httpx.AsyncClient, name: str) -> dict[str, object]:
    r = await client.get("/api/consumers")
    assert r.status_code == 200
    return next(c for c in r.json()["items"] if c["name"] == name)


async def stored_all(gw: Gateway, n: int) -> None:
    async def check() -> bool:
        return await asyncio.to_thread(gw.store.count_events) >= n

    await wait_for(check, timeout=60, what=f"{n} events stored")


async def test_failing_consumer_parks_events_without_slowing_ingestion_or_others(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    devices, per_device = 20, 100
    n = devices * per_device
    # The same load twice in one test: without the failing consumer, then with it.
    async with running_gateway(settings_for(broker, consumers="analytics", mqtt_client_id="calm")) as gw:
        t0 = time.monotonic()
        await publish_numbered(broker.url_as("tester"), devices, per_device, prefix="calm-")
        await stored_all(gw, n)
        calm_rate = n / (time.monotonic() - t0)

    # Each of its tries takes 10 ms: tried 3 times an event, it needs minutes for this load.
    counting, failing = Counting(), Failing(delay_s=0.01)
    settings = settings_for(broker, consumers="analytics", mqtt_client_id="stormy")
    async with running_gateway(settings, consumers=[counting, failing]) as gw, client_for(gw) as client:
        t0 = time.monotonic()
        await publish_numbered(broker.url_as("tester"), devices, per_device, prefix="stormy-")
        await stored_all(gw, 2 * n)
        stormy_rate = n / (time.monotonic() - t0)
        # Ingestion did not wait for the failing consumer: everything is stored while it is still
        # far behind (the rates are printed; comparing them is the benchmark's business).
        behind = (await consumer_state(client, "failing"))["cursor"]
        assert isinstance(behind, int)
        assert behind < n, f"the failing consumer is at {behind} of {2 * n} when all is stored"
        print(f"ingest without a failing consumer {calm_rate:,.0f} msg/s, with one {stormy_rate:,.0f} msg/s")  # noqa: T201

        async def others_caught_up() -> bool:
            return len(counting.positions) == 2 * n and (await consumer_state(client, "analytics"))["lag_events"] == 0

        await wait_for(others_caught_up, what="the healthy consumers to catch up")
        state = await consumer_state(client, "failing")
        assert state["state"] == "failing"
        assert "boom" in str(state["last_error"])

        async def first_parked() -> bool:
            return (await consumer_state(client, "failing"))["dead_letters"] >= 1

        await wait_for(first_parked, what="an event to be parked")
        parked = (await client.get("/api/consumers/failing/dead-letters")).json()["items"]
        first = parked[0]
        assert first["attempts"] == 3
        assert first["event_type"] == "sensor.reading"
        assert "boom" in first["error"]
        metrics = (await client.get("/metrics")).text
        assert 'iotgw_consumer_parked_total{consumer="failing"}' in metrics

        # Fix the fault, replay from the first parked event: from there on, everything is handled.
        failing.broken, failing.delay_s = False, 0.0
        r = await client.post("/api/consumers/failing/replay", json={"from_position": first["position"]})
        assert r.status_code == 200
        assert r.json() == {"name": "failing", "cursor": first["position"] - 1, "reset": False}

        async def replayed() -> bool:
            return (await consumer_state(client, "failing"))["lag_events"] == 0

        await wait_for(replayed, what="the fixed consumer to catch up")
        handled = set(failing.positions)
        assert {p["position"] for p in parked} <= handled
        # A parked event can also be retried on its own.
        r = await client.post(f"/api/consumers/failing/dead-letters/{first['id']}/retry")
        assert r.status_code == 200
        r = await client.post(f"/api/consumers/failing/dead-letters/{first['id']}/retry")
        assert r.status_code == 409
        assert "already retried" in r.json()["detail"]


async def test_paused_consumer_lags_while_others_keep_up_then_catches_up(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    counting = Counting()
    settings = settings_for(broker, consumers="analytics")
    async with running_gateway(settings, consumers=[counting]) as gw, client_for(gw) as client:
        r = await client.post("/api/consumers/counting/pause")
        assert r.json()["state"] == "paused"
        await publish_numbered(broker.url_as("tester"), 50, 100)
        await stored_all(gw, 5000)

        async def analytics_caught_up() -> bool:
            return (await consumer_state(client, "analytics"))["lag_events"] == 0

        await wait_for(analytics_caught_up, what="analytics to keep up")
        paused = await consumer_state(client, "counting")
        assert paused["lag_events"] >= 5000
        assert float(paused["lag_seconds"]) >= 0
        assert counting.positions == []
        r = await client.post("/api/consumers/counting/resume")
        assert r.json()["state"] == "running"

        async def caught_up() -> bool:
            return (await consumer_state(client, "counting"))["lag_events"] == 0

        await wait_for(caught_up, what="the resumed consumer to catch up")
        assert len(counting.positions) == 5000
        assert len(set(counting.positions)) == 5000


async def test_pause_survives_a_restart_and_cursor_resumes_where_committed(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(broker, consumers="analytics")
    first = Counting()
    async with running_gateway(settings, consumers=[first]) as gw:
        await publish_numbered(broker.url_as("tester"), 5, 20)
        await stored_all(gw, 100)
        await wait_for(lambda: _value(len(first.positions) == 100), what="counting to see 100")
        async with client_for(gw) as client:
            await client.post("/api/consumers/counting/pause")
    second = Counting()
    async with running_gateway(settings, consumers=[second]) as gw, client_for(gw) as client:
        state = await consumer_state(client, "counting")
        assert state["state"] == "paused"
        assert state["cursor"] == max(first.positions)
        await client.post("/api/consumers/counting/resume")
        await publish_numbered(broker.url_as("tester"), 5, 20, prefix="more-")
        await wait_for(lambda: _value(len(second.positions) == 100), what="only the new events")
        assert min(second.positions) > max(first.positions)


async def test_bad_consumer_operations_get_clear_errors(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker, consumers="analytics")) as gw, client_for(gw) as client:
        r = await client.post("/api/consumers/nope/pause")
        assert r.status_code == 404
        assert "analytics" in r.json()["detail"]
        r = await client.post("/api/consumers/analytics/replay", json={})
        assert r.status_code == 422
        r = await client.post("/api/consumers/analytics/replay", json={"from_position": 0})
        assert r.status_code == 422
        r = await client.post("/api/consumers/analytics/dead-letters/999/retry")
        assert r.status_code == 409


def test_unknown_consumer_names_fail_fast_with_the_registered_ones() -> None:
    from gateway.errors import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match="registered: alerts, analytics"):
        load_consumers(["analytics", "nonesuch"])


ENTRY_POINT_PACKAGE = """
from gateway.runtime import BaseConsumer

SEEN = []


class DoorCount(BaseConsumer):
    name = "doorcount"
    types = ("elevator.door.opened",)

    def handle(self, events, tx):
        SEEN.extend((e.site, e.subject) for e in events)
"""


async def test_entry_point_consumer_is_discovered_and_receives_events(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real distribution on sys.path with an iotgw.consumers entry point, as pip would install it.
    install_plugin(tmp_path, "doorcount", ENTRY_POINT_PACKAGE, "DoorCount", monkeypatch)
    from devices.fleet import Fleet, FleetConfig  # noqa: PLC0415

    async with running_gateway(settings_for(broker, consumers="doorcount")) as gw:
        assert list(gw.router.runners) == ["doorcount"]
        await Fleet(
            FleetConfig(mqtt_url=broker.url_as("tester"), elevators=2, sensors=0, rate=200, steps=80, seq_start=0)
        ).run()
        import iotgw_doorcount  # type: ignore[import-not-found]  # noqa: PLC0415

        await wait_for(lambda: _value(len(iotgw_doorcount.SEEN) > 0), what="door openings at the plug-in consumer")
        assert {s for s, _ in iotgw_doorcount.SEEN} <= {"site-1", "site-2"}


async def _value(v: bool) -> bool:
    return v


async def test_hung_consumer_is_timed_out_reported_and_parked_while_the_others_continue(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    devices, per_device = 5, 40
    n = devices * per_device
    hanging, counting = Hanging("hang-00002", 7), Counting()
    settings = settings_for(broker, consumers="analytics")
    try:
        async with running_gateway(settings, consumers=[hanging, counting]) as gw, client_for(gw) as client:
            await publish_numbered(broker.url_as("tester"), devices, per_device, prefix="hang-")
            await stored_all(gw, n)

            async def others_done() -> bool:
                return len(counting.positions) == n and (await consumer_state(client, "analytics"))["lag_events"] == 0

            await wait_for(others_done, what="the other consumers to handle everything")

            async def parked() -> bool:
                return (await consumer_state(client, "hanging"))["dead_letters"] == 1

            await wait_for(parked, timeout=10, what="the hung event to be parked")
            (dead,) = (await client.get("/api/consumers/hanging/dead-letters")).json()["items"]
            assert "did not return within 0.5 s" in dead["error"]
            assert dead["subject"] == "hang-00002"

            async def moved_on() -> bool:
                return len(hanging.positions) == n - 1

            # After a park it goes event by event to the end of the failed batch (one commit each):
            # the wait is a bound for a loaded machine, not a goal (it moves on, is what is asserted).
            parked_at = time.monotonic()
            await wait_for(moved_on, timeout=120, what="the hung consumer to handle everything else")
            print(f"\nthe hung consumer handled the {n - 1} others {time.monotonic() - parked_at:.1f} s after the park")  # noqa: T201
            assert dead["position"] not in hanging.positions
            metrics = (await client.get("/metrics")).text
            assert 'iotgw_consumer_failures_total{consumer="hanging"} 0.0' not in metrics
            # Released now, the abandoned threads finish their batches: they must not commit them
            # (their cursor is behind; committing would move it back and repeat the effects).
            hanging.release.set()

            async def abandoned_threads_ended() -> bool:
                alive = [t for t in threading.enumerate() if t.name.startswith("iotgw-consumer-hanging")]
                return len(alive) <= 1  # the consumer's current thread only

            await wait_for(abandoned_threads_ended, what="the released threads to finish their batches")
            with gw.store.session() as tx:
                cursor = tx.get(ConsumerCursorRow, "hanging")
                assert cursor is not None
                assert cursor.position == n
    finally:
        hanging.release.set()  # the abandoned threads end (and cannot commit)


async def test_a_commit_wakes_only_the_consumers_that_read_its_event_types(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    class AlertsOnly(Counting):
        name = "alerts-only"
        types = ("alert.*",)

    readings, alerts_only = Counting(), AlertsOnly()
    async with running_gateway(settings_for(broker, consumers=""), consumers=[readings, alerts_only]) as gw:
        runners = gw.router.runners
        for runner in runners.values():
            runner.wakeloop.wakeup.clear()
        gw.router.notify({"sensor.reading"})
        assert runners["counting"].wakeloop.wakeup.is_set()
        assert not runners["alerts-only"].wakeloop.wakeup.is_set(), "no alert event in that commit"
        gw.router.notify({"alert.firing", "sensor.reading"})
        assert runners["alerts-only"].wakeloop.wakeup.is_set()
        # Not woken, it still moves past the readings at its next wake-up (the slow poll at the latest).
        await publish_numbered(broker.url_as("tester"), 2, 10)

        async def both_current() -> bool:
            status = {s.name: s for s in await asyncio.to_thread(gw.router.status)}
            return all(s.lag_events == 0 for s in status.values()) and len(readings.positions) == 20

        await wait_for(both_current, what="both consumers at the head of the log")
        assert alerts_only.positions == []
