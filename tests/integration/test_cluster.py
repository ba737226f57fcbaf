"""Scale-out: several gateway instances on one database, a shared MQTT subscription, leases."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from devices.load import Script, elevator_script, publish_scripts, sensor_script
from gateway.cli.broker import Mosquitto, free_port
from gateway.config import Settings
from gateway.core.events import Event
from gateway.errors import StoreError
from gateway.log import InboxMessage, Store, lock_log
from gateway.runtime import ConsumerStatus
from gateway.runtime.sequencer import in_order, ready
from gateway.service import Gateway
from tests.support.gateway import fresh_database, iotgw_run, kill_9, query, running_gateway, until_ready, wait_for

pytestmark = pytest.mark.anyio

LEASE_S = 3
PER_DEVICE = 250

ANALYTICS = (
    "select device_id, site, trips, floors, door_cycles, faults, faults_by_code, faults_cleared, "
    "fault_seconds, entrapments, mode, mode_seconds from analytics_devices order by device_id"
)


def scripts(devices: int, per_device: int) -> dict[str, Script]:
    """Seeded elevators: the same messages on every call."""
    return {f"elev-{i:03d}": elevator_script(f"elev-{i:03d}", per_device) for i in range(devices)}


def order_breaks(db: str) -> list[str]:
    """Devices whose events, in log order, do not follow their seq order."""
    last: dict[str, int] = {}
    broken = []
    for subject, seq in query(db, "select subject, sequence from events where sequence is not null order by id"):
        if seq < last.get(subject, 0):
            broken.append(f"{subject}: {seq} after {last[subject]}")
        last[subject] = max(seq, last.get(subject, 0))
    return broken


def readings(db: str) -> int:
    rows = query(db, "select count(*) from events where type = 'sensor.reading'")
    return int(rows[0][0]) if rows else 0


def sensor_minutes(db: str) -> list[tuple[object, ...]]:
    rows = query(db, "select device_id, minute, count, total, vmin, vmax from analytics_sensor_minutes order by 1, 2")
    return [(d, m, n, round(total, 6), lo, hi) for d, m, n, total, lo, hi in rows]


def outcome(db: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The events (by device and seq, not log position) and the analytics figures."""
    events = [
        (*row[:4], row[4] if isinstance(row[4], str) else json.dumps(row[4]))
        for row in query(db, "select subject, sequence, part, type, data from events order by subject, sequence, part")
    ]
    # Durations rounded: another batching adds the same floats in another order.
    figures = [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in query(db, ANALYTICS)]
    return events, figures


async def all_sequenced(db: str, expected: Mapping[str, Script]) -> bool:
    """Every device's last seq is in, the inbox is empty and every consumer caught up."""
    rows = dict(query(db, "select device_id, last_seq from devices"))
    if any(rows.get(d) != len(s) for d, s in expected.items()):
        return False
    inbox = query(db, "select count(*) from inbox")
    head = query(db, "select coalesce(max(id), 0) from events")[0][0]
    cursors = query(db, "select position from consumer_cursors")
    return bool(inbox) and inbox[0][0] == 0 and bool(cursors) and all(p == head for (p,) in cursors)


async def single_run(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, load: dict[str, Script]
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """What one gateway on its own makes of `load` (the reference)."""
    with fresh_database(tmp_path, "single") as db:
        settings = settings_for(broker, consumers="analytics", database_url=db, mqtt_client_id="iotgw-single")
        async with running_gateway(settings):
            await publish_scripts(broker.url_as("tester"), load)
            await wait_for(lambda: all_sequenced(db, load), timeout=60, what="the single gateway to finish")
        return outcome(db)


async def test_two_instances_share_the_stream_keep_each_devices_order_and_count_like_one(
    broker: Mosquitto, settings_for: Callable[..., Settings], database_url: str, tmp_path: Path
) -> None:
    load = scripts(20, 150)
    one = settings_for(broker, instance="gw-1", consumers="analytics", lease_s=3)
    two = one.model_copy(update={"instance": "gw-2", "http_port": free_port()})
    async with running_gateway(one) as gw1, running_gateway(two) as gw2:
        stats = await publish_scripts(broker.url_as("tester"), load)
        assert stats.acked == 20 * 150
        await wait_for(lambda: all_sequenced(database_url, load), timeout=60, what="both instances to finish")
        received = [
            sum(
                gw.metrics.registry.get_sample_value("iotgw_messages_received_total", {"channel": c}) or 0
                for c in ("state", "telemetry", "status")
            )
            for gw in (gw1, gw2)
        ]
        owners = {r[0] for r in query(database_url, "select owner from leases")}
    print(f"\nmessages received by gw-1 / gw-2: {received[0]:.0f} / {received[1]:.0f}")  # noqa: T201
    assert min(received) > 0.2 * sum(received), "the broker should share the stream between the instances"
    assert sum(received) == 20 * 150
    assert owners <= {"gw-1", "gw-2", None}
    assert order_breaks(database_url) == []
    events, figures = outcome(database_url)
    reference_events, reference_figures = await single_run(broker, settings_for, tmp_path, load)
    assert set(events) ^ set(reference_events) == set()
    assert len(events) == len(reference_events) > 20 * 150 / 3
    assert events == reference_events
    assert figures == reference_figures


def start_instance(broker: Mosquitto, db: str, instance: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`iotgw run --instance NAME` as its own process (so it can be killed -9), and its API port."""
    port = free_port()
    # The killed instance is back well within the reorder window: the order must hold.
    env = {"IOTGW_LEASE_S": str(LEASE_S), "IOTGW_REORDER_WINDOW_S": "600"}
    flags = ("--instance", instance, "--client-id", "iotgw-cluster", "--consumers", "analytics")
    return iotgw_run(broker.url, db, port, *flags, log=log, env=env), port


def lease_holder(db: str, name: str) -> str | None:
    rows = query(db, "select owner, expires_at from leases where name = :name", name=name)
    return rows[0][0] if rows else None


async def test_an_instance_killed_mid_stream_loses_reorders_and_double_counts_nothing(
    broker: Mosquitto, settings_for: Callable[..., Settings], database_url: str, tmp_path: Path
) -> None:
    # 200 devices, 50,000 QoS 1 messages: 100 elevators (state changes, events derived in seq
    # order) and 100 sensors (one reading each).
    load: dict[str, Script] = {
        **{f"elev-{i:03d}": elevator_script(f"elev-{i:03d}", PER_DEVICE, site=f"site-{i % 3}") for i in range(100)},
        **{f"temp-{i:03d}": sensor_script(f"temp-{i:03d}", PER_DEVICE, site=f"site-{i % 3}") for i in range(100)},
    }
    total = 200 * PER_DEVICE
    db, log = database_url, tmp_path / "cluster.log"
    procs = {name: start_instance(broker, db, name, log) for name in ("gw-1", "gw-2")}
    try:
        for proc, port in procs.values():
            await until_ready(port, proc)
        publisher = asyncio.create_task(publish_scripts(broker.url_as("tester"), load))

        async def under_way() -> bool:
            return readings(db) >= total // 2 * 0.3

        await wait_for(under_way, timeout=60, what="30 % of the stream to be stored")
        victim = lease_holder(db, "consumer:analytics")
        assert victim in procs
        survivor = next(n for n in procs if n != victim)
        kill_9(procs[victim][0])
        killed_at, stored_at_kill = time.monotonic(), readings(db)

        async def taken_over() -> bool:
            return lease_holder(db, "consumer:analytics") == survivor

        await wait_for(taken_over, timeout=LEASE_S * 3, what=f"{survivor} to take the analytics consumer over")
        takeover_s = time.monotonic() - killed_at
        procs[victim] = start_instance(broker, db, victim, log)
        await until_ready(procs[victim][1], procs[victim][0])
        stats = await publisher
        assert stats.acked == total
        await wait_for(lambda: all_sequenced(db, load), timeout=120, what="the cluster to finish")
        print(  # noqa: T201 - the figures, for the log
            f"\n{victim} killed with {stored_at_kill} of {total // 2} readings stored; "
            f"{survivor} took the analytics consumer over after {takeover_s:.1f} s (lease {LEASE_S} s)"
        )
        assert stored_at_kill < total // 2, "the kill came too late to prove anything"
        assert takeover_s <= LEASE_S + 2
        # Exactly once: every reading stored once, nothing else from the sensors.
        assert query(db, "select count(*), count(distinct subject || ':' || cast(sequence as varchar)) "
                     "from events where type = 'sensor.reading'") == [(total // 2, total // 2)]  # fmt: skip
        assert order_breaks(db) == []
        events, figures = outcome(db)
        minutes = sensor_minutes(db)
    finally:
        for proc, _ in procs.values():
            kill_9(proc)
    # Counted once each, in order: the same as one gateway on its own over the same messages.
    assert sum(int(row[2]) for row in minutes) == total // 2
    reference_events, reference_figures = await single_run(broker, settings_for, tmp_path, load)
    assert events == reference_events
    assert figures == reference_figures


def test_the_sequencer_releases_a_device_s_messages_in_seq_order_and_waits_for_gaps() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def msg(seq: int | None, at: float, id_: int) -> InboxMessage:
        return InboxMessage("d", seq, "devices/d/state", b"{}", t0 + timedelta(seconds=at), id_)

    # Arrival order 7, 5, status, 6: applied 5, 6, 7, with the status after what came before it.
    arrived = [msg(7, 0.0, 1), msg(5, 0.1, 2), msg(None, 0.2, 3), msg(6, 0.3, 4)]
    assert [(m.seq, m.id) for m in in_order(arrived)] == [(5, 2), (6, 4), (7, 1), (None, 3)]
    now = t0 + timedelta(seconds=1)
    assert ready(in_order(arrived), 4, now, 30) == 4  # 5 follows 4: all four go
    assert ready(in_order(arrived), 3, now, 30) == 0  # 4 is missing: wait for it
    assert ready(in_order(arrived), 3, t0 + timedelta(seconds=31), 30) == 4  # waited long enough: the gap is recorded
    # A device never seen: seq 1 starts it at once; seq 5 waits for 1-4 for the window.
    assert ready([msg(1, 0, 1), msg(2, 0, 2)], None, now, 30) == 2
    assert ready([msg(5, 0, 1)], None, now, 30) == 0
    assert ready([msg(5, 0, 1)], None, t0 + timedelta(seconds=30), 30) == 1
    # Older than the last applied (a redelivery): goes at once (the normaliser drops it).
    assert ready([msg(3, 0, 1)], 9, now, 30) == 1


async def test_pause_resume_and_replay_from_the_instance_that_does_not_run_the_consumer(
    broker: Mosquitto, settings_for: Callable[..., Settings], database_url: str
) -> None:
    first, second = scripts(6, 60), {f"late-{i}": sensor_script(f"late-{i}", 50) for i in range(4)}
    one = settings_for(broker, instance="gw-1", consumers="analytics", lease_s=3)
    two = one.model_copy(update={"instance": "gw-2", "http_port": free_port()})
    async with running_gateway(one) as gw1, running_gateway(two) as gw2:
        await publish_scripts(broker.url_as("tester"), first)
        await wait_for(lambda: all_sequenced(database_url, first), timeout=60, what="the first stream")
        owner = next(gw for gw in (gw1, gw2) if gw.router.get("analytics").lease.held)
        other = gw2 if owner is gw1 else gw1

        def status(gw: Gateway) -> ConsumerStatus:
            return next(s for s in gw.router.status() if s.name == "analytics")

        # The other instance's API reports the cluster's view: who runs it, and where it is.
        seen = await asyncio.to_thread(status, other)
        assert seen.owner == owner.settings.instance
        assert seen.position == (await asyncio.to_thread(status, owner)).position > 0
        figures = outcome(database_url)[1]
        assert figures

        # Paused from the other instance: the owner stops (its lag grows) while ingest goes on.
        await other.router.get("analytics").set_paused(True)

        async def owner_paused() -> bool:
            return owner.router.get("analytics").paused

        await wait_for(owner_paused, timeout=10, what="the owner to learn of the pause")
        await publish_scripts(broker.url_as("tester"), second)

        async def stored_second() -> bool:
            return readings(database_url) == 4 * 50

        await wait_for(stored_second, what="the second stream stored")
        paused = await asyncio.to_thread(status, owner)
        assert paused.state == "paused"
        assert paused.lag_events >= 4 * 50
        assert query(database_url, "select count(*) from analytics_sensor_minutes where device_id like 'late-%'") == [
            (0,)
        ]
        await other.router.get("analytics").set_paused(False)

        async def caught_up() -> bool:
            s = await asyncio.to_thread(status, other)
            return s.state == "running" and s.lag_events == 0

        await wait_for(caught_up, what="the owner to resume and catch up")
        after_resume = outcome(database_url)[1]
        late = query(database_url, "select sum(count) from analytics_sensor_minutes where device_id like 'late-%'")
        assert late == [(4 * 50,)]

        # Replayed from the other instance (analytics resets and rebuilds from the start): the
        # owner reloads its cursor; the figures come back the same, nothing counted twice.
        await other.router.get("analytics").replay(from_position=1)
        await wait_for(caught_up, what="the replay")
        assert outcome(database_url)[1] == after_resume
        assert (
            query(database_url, "select sum(count) from analytics_sensor_minutes where device_id like 'late-%'") == late
        )
        assert (await asyncio.to_thread(status, other)).owner == owner.settings.instance


async def test_consumers_in_a_process_of_their_own_read_the_log_another_gateway_fills(
    broker: Mosquitto, settings_for: Callable[..., Settings], database_url: str
) -> None:
    load = {f"temp-{i}": sensor_script(f"temp-{i}", 100) for i in range(5)}
    ingest_only = settings_for(broker, consumers="")
    readers = settings_for(broker, ingest=False, consumers="analytics", http_port=free_port())
    async with running_gateway(ingest_only) as writer:
        reader = Gateway(readers, registry=CollectorRegistry(), serve_http=True)
        await reader.start()
        try:
            await publish_scripts(broker.url_as("tester"), load)

            async def counted() -> bool:
                rows = query(database_url, "select sum(count) from analytics_sensor_minutes")
                return bool(rows) and rows[0][0] == 500

            await wait_for(counted, what="the consumers' process to count every reading")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{readers.http_port}") as client:
                ready = await client.get("/ready")
                assert ready.status_code == 200, ready.text
                assert ready.json()["checks"] == {"database": "ok"}  # no broker: it does not subscribe
            assert not reader.ingest.connected
            received = writer.metrics.registry.get_sample_value(
                "iotgw_messages_received_total", {"channel": "telemetry"}
            )
            assert received == 500
            assert (
                reader.metrics.registry.get_sample_value("iotgw_messages_received_total", {"channel": "telemetry"}) == 0
            )
        finally:
            await reader.stop()


async def test_a_gateway_on_its_own_first_makes_the_events_a_cluster_left_in_the_inbox(
    broker: Mosquitto, settings_for: Callable[..., Settings], make_store: Callable[[], Store]
) -> None:
    # A cluster stopped with messages in the inbox (held behind a gap: seq 2 never came).
    store = make_store()
    script = elevator_script("elev-left", 5)
    now = datetime.now(UTC)
    left = [InboxMessage("elev-left", n, "devices/elev-left/state", script.payloads[n - 1], now) for n in (1, 3, 4, 5)]
    assert store.append_inbox(left, []) == 4
    async with running_gateway(settings_for(broker, consumers="")):
        assert store.inbox_size() == 0
        seqs = [r[0] for r in query(store.url, "select sequence from events where subject = 'elev-left' order by id")]
        assert seqs[0] == 1  # device.discovered, then what the states changed, in seq order
        assert seqs == sorted(seqs)
        assert set(seqs) <= {1, 3, 4, 5}
        assert query(store.url, "select last_seq from devices where device_id = 'elev-left'") == [(5,)]


def test_a_stopped_instance_holding_the_log_lock_is_cut_off_and_the_others_write_on(tmp_path: Path) -> None:
    # An instance frozen (SIGSTOP, swapped out) in the middle of a transaction holds the log's
    # append lock: without a bound every other instance's writes would wait for it as long as
    # it is stopped. The server ends such a transaction; the writer behind it goes on, the
    # stopped one finds its connection gone. (PostgreSQL is what clusters run on.)
    with fresh_database(tmp_path, postgresql=True) as url:
        frozen = Store(url, idle_in_transaction_s=1.0)
        frozen.create_schema()
        writer = Store(url, idle_in_transaction_s=1.0)
        now = datetime.now(UTC)
        reading = Event("t-1-1-0", "devices/t-1", "sensor.reading", now, "t-1", {"value": 1.0, "unit": "C"}, 1, 0, "hq")
        try:
            with (  # noqa: PT012 - the stopped transaction is the block
                pytest.raises(StoreError, match="idle-in-transaction timeout"),
                frozen.session() as stopped,
            ):
                lock_log(stopped)  # what a writer takes first, then (stopped) never gets further
                started = time.monotonic()
                writer.append_batch([reading], [], [], now=now)  # waits behind it, then goes on
                waited = time.monotonic() - started
                stored = writer.count_events()
                stopped.connection().exec_driver_sql("SELECT 1")  # when it resumes: ended by the server
            assert stored == 1
            print(f"\nthe writer behind the stopped transaction waited {waited:.1f} s")  # noqa: T201
        finally:
            frozen.close()
            writer.close()


async def test_the_gateway_bounds_its_idle_transactions_on_postgresql(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    with fresh_database(tmp_path, postgresql=True) as url:
        async with running_gateway(settings_for(broker, database_url=url)) as gw:
            with gw.store.session() as tx:
                shown = tx.connection().exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar()
            assert shown == f"{int(gw.settings.idle_in_transaction_s)}s"
