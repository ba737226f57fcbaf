"""Bad input that must not reach too far, and statuses that must tell the truth (issue: hardening).

Real Mosquitto with the project's config, a real database, the gateway's own API: a far-future
device clock, messages at the limits of the protocol, a replay past the log's head, a quiet
gateway's metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from devices.connect import mqtt_client
from gateway.api.limits import ConcurrencyLimit
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.errors import StoreError
from gateway.log import DeadLetterRow, EventRow, Store
from gateway.security import create_api_key, revoke_api_key
from gateway.service import Gateway
from tests.support.gateway import running_gateway, settled, wait_for

pytestmark = pytest.mark.anyio

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


async def test_one_device_clock_in_2100_neither_dates_its_events_there_nor_skews_the_fleet(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(broker, consumers="analytics", max_clock_skew_s=86400)
    async with running_gateway(settings) as gw:
        now = datetime.now(UTC)
        await publish(broker, "el-good", state(1, iso(now - timedelta(seconds=30))), state(2, iso(now)))
        # Far ahead: beyond the bound; 12 h ahead: within it, but never past the gateway's own time.
        await publish(broker, "el-2100", state(1, "2100-01-01T00:00:00Z"), state(2, "2100-01-01T00:00:05Z"))
        await publish(broker, "el-ahead", state(1, iso(now + timedelta(hours=12))))
        await settled(gw)
        with gw.store.session() as tx:
            times = {e.subject: e.time for e in tx.exec(select(EventRow))}
        assert times["el-2100"] < now + timedelta(minutes=5), "the receive time, not 2100"
        assert sample(gw, "iotgw_device_clock_skew_total") == 2
        assert dead_letters(gw) == [], "nothing lost: the events are kept, with the gateway's time"
        async with api(gw) as client:

            async def analysed() -> bool:
                fleet = (await client.get("/api/analytics/fleet")).json()
                return fleet["devices_by_type"].get("elevator") == 3

            await wait_for(analysed, what="analytics of the three elevators")
            fleet = (await client.get("/api/analytics/fleet")).json()["total"]
            good = (await client.get("/api/analytics/devices/el-good")).json()["figures"]
        assert fleet["availability"] == 1.0
        assert set(fleet["mode_seconds"]) == {"normal"}
        observed = sum(good["mode_seconds"].values())
        assert observed < 3600, f"el-good's time is its own, not stretched by el-ahead's clock: {observed}"


@pytest.mark.parametrize(
    "payload",
    [
        state(1, "9999-12-31T23:59:59-01:00"),
        state(1, "0001-01-01T00:00:00+01:00"),
        b'{"type": "elevator", "seq": ' + b"7" * 5000 + b', "ts": 1764324000000, "data": {}}',
    ],
    ids=["year-10000-in-utc", "year-0-in-utc", "5000-digit-seq"],
)
async def test_messages_at_the_limits_are_schema_dead_letters_and_the_gateway_goes_on(
    broker: Mosquitto, settings_for: Callable[..., Settings], payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        await publish(broker, "el-1", *[payload] * 200)
        await publish(broker, "el-1", state(1, 1764324000000))
        await settled(gw)
        reasons = [d.reason for d in dead_letters(gw)]
        assert reasons == ["schema"] * 200
        with gw.store.session() as tx:
            assert len(tx.exec(select(EventRow)).all()) == 1, "the next valid message is stored"
    assert "internal error" not in caplog.text
    assert "Traceback" not in caplog.text
    assert len(caplog.text) < 5000, "rejections are logged, not 200 times"


async def test_internal_errors_are_dead_lettered_with_one_traceback_not_one_each(
    broker: Mosquitto,
    settings_for: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gateway.ingest.pipeline  # noqa: PLC0415

    def broken(*_args: object, **_kwargs: object) -> None:
        msg = "a bug"
        raise RuntimeError(msg)

    monkeypatch.setattr(gateway.ingest.pipeline, "normalize", broken)
    caplog.set_level(logging.WARNING)
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        await publish(broker, "el-1", *[state(seq, 1764324000000) for seq in range(1, 501)])
        await settled(gw)
        assert [d.reason for d in dead_letters(gw)] == ["internal_error"] * 500
    assert caplog.text.count("Traceback") == 1
    assert caplog.text.count("internal error on devices/el-1/state") == 1


async def test_a_replay_beyond_the_head_of_the_log_is_refused_and_the_consumer_goes_on(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker, consumers="dispatch,analytics")) as gw:
        await publish(broker, "el-1", state(1, 1764324000000), state(2, 1764324001000, door="open"))
        await settled(gw)
        async with api(gw) as client:
            with gw.store.session() as tx:
                head = max(e.id or 0 for e in tx.exec(select(EventRow)))
            for name in ("dispatch", "analytics"):  # analytics rebuilds from 0: refused all the same
                for position in (2**63 - 1, head + 2):
                    r = await client.post(f"/api/consumers/{name}/replay", json={"from_position": position})
                    assert r.status_code == 422, r.text
                    assert f"its last event is at {head}" in r.json()["detail"]
            for body in ({"from_time": "9999-12-31T23:59:59-01:00"}, {"from_position": True}, {"from_position": "5"}):
                r = await client.post("/api/consumers/dispatch/replay", json=body)
                assert r.status_code == 422, (body, r.text)
            r = await client.post("/api/consumers/dispatch/replay", json={"from_position": head + 1})
            assert r.status_code == 200
            assert r.json()["cursor"] == head
            await publish(broker, "el-1", state(3, 1764324002000, door="closed"))

            async def caught_up() -> bool:
                states = (await client.get("/api/consumers")).json()["items"]
                (dispatch,) = [c for c in states if c["name"] == "dispatch"]
                return dispatch["cursor"] == head + 1 and dispatch["lag_events"] == 0

            await wait_for(caught_up, what="analytics to handle the new event")


async def test_a_quiet_gateway_reports_its_database_writable_from_the_start(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        assert sample(gw, "iotgw_database_writable") == 1, "IotgwDatabaseNotWritable must not fire on a quiet gateway"
        async with api(gw) as client:
            assert (await client.get("/ready")).status_code == 200


async def test_a_retained_invalid_message_is_dead_lettered_once_across_restarts_and_reconnects(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(broker, consumers="")
    async with mqtt_client(broker.url_as("tester"), "temp-9") as c:
        await c.publish("devices/temp-9/status", b"{not json", qos=1, retain=True)
    async with running_gateway(settings) as gw:
        await wait_for(lambda: _true(len(dead_letters(gw)) == 1), what="the retained message's dead letter")
    for _ in range(2):
        async with running_gateway(settings) as gw:
            await settled(gw)
    async with running_gateway(settings) as gw:
        broker.stop()  # a reconnect on a session that survived the broker's restart
        broker.start()
        await wait_for(lambda: _true(gw.ingest.connected), what="the gateway to reconnect")
        async with mqtt_client(broker.url_as("tester"), "temp-8") as c:  # a marker behind it
            await c.publish("devices/temp-8/status", b'{"online": true}', qos=1)
        await wait_for(lambda: _true(sample(gw, "iotgw_events_total", {"type": "device.online"}) == 1), what="marker")
        assert [(d.topic, d.reason) for d in dead_letters(gw)] == [("devices/temp-9/status", "bad_json")]


async def _true(value: bool) -> bool:
    return value


def test_a_device_may_publish_only_to_its_three_channels(broker: Mosquitto) -> None:
    broker.add_devices({"temp-acl": "acl-pw"})
    outcomes = {}
    for topic in ("devices/temp-acl/telemetry", "devices/temp-acl/state/extra", "devices/temp-acl/other"):
        cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5", "-q", "1", "-d",
               "-u", "temp-acl", "-P", "acl-pw", "-t", topic, "-m", "{}"]  # fmt: skip
        outcomes[topic] = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout
    accepted = outcomes["devices/temp-acl/telemetry"]
    assert "received PUBACK (Mid: 1, RC:" in accepted, accepted
    assert "RC:135" not in accepted  # 0 or 16 (no subscriber yet): accepted
    for topic in ("devices/temp-acl/state/extra", "devices/temp-acl/other"):
        assert "RC:135" in outcomes[topic], f"{topic}: refused at the broker (not authorized), not silently dropped"


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


async def test_a_long_database_lock_stalls_the_consumers_and_they_recover_by_themselves(
    broker: Mosquitto, settings_for: Callable[..., Settings], database_url: str
) -> None:
    settings = settings_for(broker, consumers="alerts,dispatch,analytics", consumer_timeout_s=1.5, consumer_stall_s=3.0)
    async with running_gateway(settings) as gw:
        await publish(broker, "el-1", state(1, 1764324000000))

        async def all_running_and_current() -> bool:
            states = await consumer_states(gw)
            return all(s["state"] == "running" and s["lag_events"] == 0 and s["cursor"] > 0 for s in states.values())

        await wait_for(all_running_and_current, what="the consumers to catch up")
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLD_LOCK, database_url, "12", stdout=asyncio.subprocess.PIPE
        )
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"locked\n"
        # Meanwhile: a door jam, and a backlog. (On SQLite ingest waits for the lock too, holding
        # its acknowledgements.) Ticks and batches time out, their threads are abandoned.
        await publish(broker, "el-1", state(2, 1764324001000, mode="fault", fault="DOOR_JAM"))
        await publish(broker, "t-1", *[reading(seq) for seq in range(1, 301)], channel="telemetry")
        assert await asyncio.wait_for(holder.wait(), 60) == 0
        # The lock is gone: ingest commits what it held, every consumer goes on by itself, and
        # the door jam is an alert.
        await settled(gw)
        await wait_for(all_running_and_current, timeout=60, what="the consumers to recover after the lock")
        async with api(gw) as client:
            alerts = (await client.get("/api/alerts", params={"rule": "door-jam"})).json()["items"]
        assert [a["device_id"] for a in alerts] == ["el-1"]
        assert sample(gw, "iotgw_consumer_stalled", {"consumer": "alerts"}) == 0


def reading(seq: int) -> bytes:
    return json.dumps(
        {"type": "temperature", "seq": seq, "ts": 1764324000000, "data": {"value": 20.0, "unit": "C"}}
    ).encode()


async def test_an_open_event_stream_ends_when_its_key_is_revoked(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(broker, consumers="", api_auth=True)
    async with running_gateway(settings, serve_http=True) as gw:
        key_id, key = create_api_key(gw.store, "phone", "viewer")
        _, other = create_api_key(gw.store, "desk", "viewer")
        url = f"http://127.0.0.1:{settings.http_port}/api/stream"
        async with httpx.AsyncClient(timeout=30) as client:
            async with (
                client.stream("GET", url, headers={"Authorization": f"Bearer {key}"}) as revoked_stream,
                client.stream("GET", url, headers={"Authorization": f"Bearer {other}"}) as kept_stream,
            ):
                lines = revoked_stream.aiter_lines()
                assert await anext(lines) == "event: snapshot"
                assert revoke_api_key(gw.store, key_id)
                rest = [line async for line in lines]  # the stream must end by itself
                assert "event: revoked" in rest
                assert not any(line.startswith("event: snapshot") for line in rest)
                # The other key's stream goes on.
                kept = kept_stream.aiter_lines()
                assert await anext(kept) == "event: snapshot"
            again = await client.get(url, headers={"Authorization": f"Bearer {key}"})
            assert again.status_code == 401


async def test_one_huge_seq_does_not_mute_a_device_and_a_restarted_counter_is_taken_on(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker, consumers="alerts")) as gw:
        ts = 1764324000000
        await publish(broker, "el-7", state(1, ts), state(2, ts + 1000), state(2**62, ts + 2000))
        # After the bad seq the device goes on with its own numbering: a door jam, then stuck.
        await publish(broker, "el-7", state(3, ts + 3000, mode="fault", fault="DOOR_JAM"))
        await publish(broker, "el-7", state(4, ts + 4000, mode="fault", fault="STUCK", direction="up", load_kg=80))
        # A sensor counts to 1,500, restarts and counts from 1 again.
        await publish(broker, "t-7", *[reading(seq) for seq in range(1, 1501)], channel="telemetry")
        await publish(broker, "t-7", *[reading(seq) for seq in range(1, 11)], channel="telemetry")
        await settled(gw)
        with gw.store.session() as tx:
            el = [(e.type, e.sequence) for e in tx.exec(select(EventRow).where(EventRow.subject == "el-7"))]
            readings = tx.exec(
                select(EventRow).where(EventRow.subject == "t-7", EventRow.type == "sensor.reading")
            ).all()
            resets = tx.exec(select(EventRow).where(EventRow.type == "device.seq.reset")).all()
        assert ("elevator.fault.raised", 2**62 + 1) in el, f"the door jam after the huge seq is an event: {el}"
        assert "elevator.stuck" in {t for t, _ in el}
        assert len(readings) == 1510, "the restarted counter's readings are new, not duplicates"
        assert sorted(r.sequence for r in readings)[-10:] == list(range(1501, 1511)), "the log's sequence goes on"
        assert {(r.subject, r.data["last_seq"], r.data["seq"]) for r in resets} == {
            ("el-7", 2**62, 3),
            ("t-7", 1500, 1),
        }
        assert sample(gw, "iotgw_seq_anomalies_total", {"kind": "reset"}) == 2
        assert dead_letters(gw) == []
        async with api(gw) as client:

            async def jammed() -> bool:
                alerts = (await client.get("/api/alerts", params={"rule": "door-jam"})).json()["items"]
                return [a["device_id"] for a in alerts] == ["el-7"]

            await wait_for(jammed, what="the door jam's alert")
        # A redelivered message after the reset is still stored once.
        await publish(broker, "t-7", reading(10), channel="telemetry")
        await settled(gw)
        with gw.store.session() as tx:
            # The device's own events (the alert engine may have said something of t-7 too).
            rows = tx.exec(select(EventRow).where(EventRow.source == "devices/t-7")).all()
            assert len(rows) == 1511  # + the reset


async def test_api_work_is_bounded_overall_and_per_key_with_429_and_retry_after() -> None:
    release = asyncio.Event()
    started = 0

    async def slow(_scope: Any, _receive: Any, send: Any) -> None:
        nonlocal started
        started += 1
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = ConcurrencyLimit(slow, overall=3, per_key=2)
    transport = httpx.ASGITransport(app=app)
    a = {"Authorization": "Bearer iotgw_aaaaaaaaaaaa_" + "x" * 32}
    b = {"Authorization": "Bearer iotgw_bbbbbbbbbbbb_" + "y" * 32}
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        running = [asyncio.create_task(client.get("/api/events", headers=a)) for _ in range(2)]
        await wait_for(lambda: _true(started == 2), what="two requests of key a running")
        third_of_a = await client.get("/api/events", headers=a)
        assert third_of_a.status_code == 429
        assert third_of_a.headers["retry-after"] == "1"
        assert "IOTGW_API_MAX_CONCURRENT_PER_KEY" in third_of_a.json()["detail"]
        running.append(asyncio.create_task(client.get("/api/events", headers=b)))  # another key: let in
        await wait_for(lambda: _true(started == 3), what="key b's request running")
        over = await client.get("/api/devices", headers=b)
        assert over.status_code == 429
        assert "IOTGW_API_MAX_CONCURRENT" in over.json()["detail"]
        assert started == 3, "a refused request does none of its work"
        stream = asyncio.create_task(client.get("/api/stream", headers=a))  # never bounded
        await wait_for(lambda: _true(started == 4), what="the stream, beyond the bound")
        release.set()
        assert [r.status_code for r in await asyncio.gather(*running, stream)] == [200] * 4
        assert (await client.get("/api/events", headers=a)).status_code == 200, "slots are given back"


NUL_SITE = b'{"type":"temperature","seq":1,"ts":1764324000000,"site":"a\\u0000b","data":{"value":1.0,"unit":"C"}}'
NUL_KEY = b'{"type":"temperature","seq":2,"ts":1764324000000,"x\\u0000":1,"data":{"value":1.0,"unit":"C"}}'


async def test_nul_characters_are_schema_dead_letters_and_the_fleet_goes_on(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        await publish(broker, "t-nul", NUL_SITE, NUL_KEY, channel="telemetry")
        await publish(broker, "t-ok", *[reading(seq) for seq in range(1, 4)], channel="telemetry")
        await settled(gw)
        assert [(d.reason, "NUL" in d.detail) for d in dead_letters(gw)] == [("schema", True)] * 2
        with gw.store.session() as tx:
            assert len(tx.exec(select(EventRow).where(EventRow.subject == "t-ok")).all()) == 3
        assert sample(gw, "iotgw_database_writable") == 1


async def test_a_message_the_database_refuses_is_a_dead_letter_and_the_others_are_stored(
    broker: Mosquitto, settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever the protocol lets through that the database then refuses (a value it cannot
    # store): the real commit path, with the database's refusal made to order for one device.
    real = Store.append_batch

    def refusing(self: Store, events: Any, *args: Any, **kwargs: Any) -> Any:
        if any(e.subject == "t-poison" for e in events):
            msg = "batch commit failed: (DataError) a value the database cannot store"
            raise StoreError(msg, transient=False)
        return real(self, events, *args, **kwargs)

    monkeypatch.setattr(Store, "append_batch", refusing)
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        await publish(broker, "t-poison", reading(1), channel="telemetry")
        await publish(broker, "t-ok", *[reading(seq) for seq in range(1, 51)], channel="telemetry")
        await settled(gw)
        (dead,) = dead_letters(gw)
        assert (dead.topic, dead.reason) == ("devices/t-poison/telemetry", "internal_error")
        assert "cannot store" in dead.detail
        with gw.store.session() as tx:
            assert len(tx.exec(select(EventRow).where(EventRow.subject == "t-ok")).all()) == 50
        assert sample(gw, "iotgw_database_writable") == 1


async def test_a_quiet_gateway_whose_database_is_locked_says_so_and_recovers(
    broker: Mosquitto, settings_for: Callable[..., Settings], database_url: str
) -> None:
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        lock = HOLD_LOCK.replace("IN EXCLUSIVE MODE", "IN ACCESS EXCLUSIVE MODE").replace("consumer_cursors", "events")
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", lock, database_url, "25", stdout=asyncio.subprocess.PIPE
        )
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"locked\n"
        async with api(gw) as client:

            async def not_writable() -> bool:
                ready = await client.get("/ready")
                return sample(gw, "iotgw_database_writable") == 0 and ready.status_code == 503

            await wait_for(not_writable, timeout=22, what="a quiet gateway to see its database take no writes")
            assert await asyncio.wait_for(holder.wait(), 60) == 0

            async def writable() -> bool:
                return sample(gw, "iotgw_database_writable") == 1 and (await client.get("/ready")).status_code == 200

            await wait_for(writable, what="the database to be writable again")
