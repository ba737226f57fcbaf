"""The analytics consumer: figures from events, exactly once across crashes and replays."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from analytics.consumer import Analytics, device, fleet
from devices.fleet import Fleet, FleetConfig
from gateway.cli.broker import Mosquitto, free_port
from gateway.core.events import Event
from gateway.log import Store
from tests.support.gateway import kill_9, query, start_gateway, until_ready, wait_for

T0 = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)


def e(etype: str, seconds: float, subject: str = "el-1", site: str = "hq", **data: Any) -> Event:
    return Event(
        id=f"{subject}-{etype}-{seconds}", source=f"devices/{subject}", type=etype,
        time=T0 + timedelta(seconds=seconds), subject=subject, data=data, site=site,
    )  # fmt: skip


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()


def feed(store: Store, events: list[Event]) -> None:
    consumer = Analytics()
    with store.session() as tx:
        consumer.handle(events, tx)
        tx.commit()


def test_elevator_kpis_from_events(store: Store) -> None:
    feed(
        store,
        [
            e("device.discovered", 0, state={"mode": "normal"}),
            e("elevator.trip.completed", 10, floors=3),
            e("elevator.door.opened", 11),
            e("elevator.trip.completed", 20, floors=2),
            e("elevator.door.opened", 21),
            e("elevator.door.opened", 30),
            e("elevator.mode.changed", 100, **{"from": "normal", "to": "fault"}),
            e("elevator.fault.raised", 100, code="STUCK", load_kg=150),
            e("elevator.stuck", 100, reason="fault", load_kg=150),
            e("elevator.fault.cleared", 160, code="STUCK", duration_s=60.0),
            e("elevator.mode.changed", 160, **{"from": "fault", "to": "normal"}),
            e("elevator.door.opened", 200),
        ],
    )
    out = device(store, "el-1")
    assert out is not None
    f = out["figures"]
    assert (f.trips, f.floors, f.door_cycles, f.faults, f.entrapments) == (2, 5, 4, 1, 1)
    assert f.door_openings_per_trip == 2.0
    assert f.faults_by_code == {"STUCK": 1}
    assert f.mode_seconds == {"fault": 60.0, "normal": 140.0}
    assert f.availability == 0.7
    assert f.mtbf_s == 140.0
    assert f.mttr_s == 60.0


def test_stuck_without_load_is_not_an_entrapment_and_sites_are_summed(store: Store) -> None:
    feed(
        store,
        [
            e("elevator.stuck", 1, reason="no_progress", load_kg=0),
            e("elevator.trip.completed", 2, subject="el-2", floors=1),
            e("elevator.trip.completed", 3, subject="el-3", site="north", floors=4),
        ],
    )
    data = fleet(store)
    assert data["total"].entrapments == 0
    assert data["total"].trips == 2
    assert data["sites"]["hq"].trips == 1
    assert data["sites"]["north"].floors == 4


def test_sensor_windows_min_max_mean(store: Store) -> None:
    readings = [
        e("sensor.reading", m * 60, subject="t-1", value=float(v), unit="C") for m, v in enumerate([20, 22, 30])
    ]
    old = e("sensor.reading", -3 * 3600, subject="t-1", value=-5.0, unit="C")
    feed(store, [old, *readings])
    feed(store, [e("sensor.reading", 150, subject="t-1", value=10.0, unit="C")])  # merges into minute 2
    out = device(store, "t-1")
    assert out is not None
    assert out["type"] == "temperature"
    assert out["windows"]["1h"] == {"count": 4, "min": 10.0, "max": 30.0, "mean": 20.5}
    assert out["windows"]["24h"]["min"] == -5.0
    assert out["windows"]["24h"]["count"] == 5


def test_reset_forgets_everything(store: Store) -> None:
    feed(store, [e("elevator.trip.completed", 1, floors=1), e("sensor.reading", 1, subject="t", value=1.0, unit="W")])
    with store.session() as tx:
        Analytics().reset(tx)
        tx.commit()
    assert fleet(store)["total"].elevators == 0
    assert device(store, "t") is None


def _log_counts(db: str) -> dict[str, int]:
    return dict(query(db, "select type, count(*) from events group by type"))


pytestmark_anyio = pytest.mark.anyio


@pytest.mark.anyio
async def test_analytics_after_kill_9_equal_a_clean_rebuild_from_the_log(
    broker: Mosquitto, tmp_path: Path, database_url: str
) -> None:
    db, log, port = database_url, tmp_path / "gw.log", free_port()
    proc = start_gateway(broker, db, port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        await until_ready(port, proc)
        cfg = FleetConfig(
            mqtt_url=broker.url_as("tester"),
            elevators=20,
            sensors=20,
            rate=400,
            fault_rate=0.02,
            steps=400,
            seq_start=0,
            seed=11,
        )
        run = asyncio.create_task(Fleet(cfg).run())

        async def midway() -> bool:
            return sum(_log_counts(db).values()) > 3000

        await wait_for(midway, what="the stream to be under way")
        kill_9(proc)
        proc = start_gateway(broker, db, port, log)
        stats = await run
        await until_ready(port, proc)
        async with httpx.AsyncClient(base_url=base) as client:

            async def caught_up() -> bool:
                devices = {d["device_id"]: d["last_seq"] for d in (await client.get("/api/devices")).json()["items"]}
                done = all(devices.get(k) == v for k, v in stats.by_device.items())
                lag = max(c["lag_events"] for c in (await client.get("/api/consumers")).json()["items"])
                return done and lag == 0

            await wait_for(caught_up, timeout=90, what="every message stored and analysed")
            after_crash = (await client.get("/api/analytics/fleet")).json()
            r = await client.post("/api/consumers/analytics/replay", json={"from_position": 1})
            assert r.json()["reset"] is True

            async def rebuilt() -> bool:
                states = (await client.get("/api/consumers")).json()["items"]
                return next(c for c in states if c["name"] == "analytics")["lag_events"] == 0

            await wait_for(rebuilt, timeout=60, what="the replay to finish")
            rebuilt_figures = (await client.get("/api/analytics/fleet")).json()
    finally:
        kill_9(proc)
    counts = _log_counts(db)
    total = after_crash["total"]
    # No double counting across the crash: the figures equal the log's own counts...
    assert total["trips"] == counts["elevator.trip.completed"] > 0
    assert total["door_cycles"] == counts["elevator.door.opened"]
    assert total["faults"] == counts["elevator.fault.raised"] > 0
    # ...and a rebuild from scratch gives the very same figures.
    for k, v in after_crash["total"].items():
        assert rebuilt_figures["total"][k] == v, k
    assert rebuilt_figures == after_crash


def test_an_open_fault_counts_until_the_newest_event_of_the_fleet(store: Store) -> None:
    feed(
        store,
        [
            e("device.discovered", 0, state={"mode": "normal"}),
            e("elevator.mode.changed", 60, **{"from": "normal", "to": "fault"}),
            e("elevator.fault.raised", 60, code="DOOR_JAM"),
            # The jammed car says nothing more; the rest of the fleet goes on.
            e("elevator.trip.completed", 300, subject="el-2", floors=1),
        ],
    )
    out = device(store, "el-1")
    assert out is not None
    assert out["figures"].mode_seconds == {"fault": 240.0, "normal": 60.0}
    assert out["figures"].availability == 0.2


def test_sql_aggregation_of_readings_equals_the_python_path(tmp_path: Path) -> None:
    units = {"s-0": "C", "s-1": "W", "s-2": "%RH"}
    readings = [
        e(
            "sensor.reading",
            sec,
            subject=f"s-{i % 3}",
            site=f"site-{i % 3}",
            value=float(sec % 17) - 3.5,
            unit=units[f"s-{i % 3}"],
        )
        for i, sec in enumerate(range(0, 7200, 7))
    ]
    via_sql = Store(f"sqlite:///{tmp_path / 'sql.db'}")
    via_sql.create_schema()
    numbered = [
        Event(f"r-{i}", r.source, r.type, r.time, r.subject, r.data, i, 0, r.site) for i, r in enumerate(readings)
    ]
    via_sql.append_batch(numbered, [], [], now=T0)
    with via_sql.session() as tx:
        Analytics().handle_span(tx, 0, len(readings))
        tx.commit()
    via_python = Store(f"sqlite:///{tmp_path / 'py.db'}")
    via_python.create_schema()
    feed(via_python, readings)
    for device_id in units:
        out = device(via_sql, device_id)
        assert out is not None
        assert out["windows"]["24h"]["count"] == len(readings) // 3
        assert out == device(via_python, device_id)
    assert fleet(via_sql)["devices_by_type"] == fleet(via_python)["devices_by_type"] == {
        "humidity": 1, "power": 1, "temperature": 1,
    }  # fmt: skip
