"""Statuses that must tell the truth under attack: a replay past the log's head, a quiet gateway's
database state, a long database lock, a revoked key's open stream, bounded API work. Real
Mosquitto with the project's config, a real database, the gateway's own API."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlmodel import select

from gateway.api.limits import ConcurrencyLimit
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.log import EventRow
from gateway.security import create_api_key, revoke_api_key
from tests.support.gateway import on_postgresql, running_gateway, settled, wait_for
from tests.support.probing import (
    HOLD_LOCK,
    api,
    consumer_states,
    publish,
    reading,
    sample,
    state,
    truth,
)

pytestmark = pytest.mark.anyio


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
        # What the API says meanwhile must be true: a consumer the database refuses is not "running".
        seen: list[tuple[str, str, str]] = []
        while holder.returncode is None:
            for name, c in (await consumer_states(gw)).items():
                seen.append((name, c["state"], c["last_error"] or ""))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(holder.wait(), 0.3)
        assert await asyncio.wait_for(holder.wait(), 60) == 0
        untrue = [(n, e) for n, state, e in seen if state == "running" and e.startswith("database")]
        assert untrue == [], f"said running while the database refused it: {untrue[:3]}"
        assert any(state in ("failing", "stalled") for _, state, _ in seen), "the lock was never seen"
        # The lock is gone: ingest commits what it held, every consumer goes on by itself, and
        # the door jam is an alert.
        await settled(gw)
        await wait_for(all_running_and_current, timeout=60, what="the consumers to recover after the lock")
        async with api(gw) as client:
            alerts = (await client.get("/api/alerts", params={"rule": "door-jam"})).json()["items"]
        assert [a["device_id"] for a in alerts] == ["el-1"]
        assert sample(gw, "iotgw_consumer_stalled", {"consumer": "alerts"}) == 0


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
        await wait_for(lambda: truth(started == 2), what="two requests of key a running")
        third_of_a = await client.get("/api/events", headers=a)
        assert third_of_a.status_code == 429
        assert third_of_a.headers["retry-after"] == "1"
        assert "IOTGW_API_MAX_CONCURRENT_PER_KEY" in third_of_a.json()["detail"]
        running.append(asyncio.create_task(client.get("/api/events", headers=b)))  # another key: let in
        await wait_for(lambda: truth(started == 3), what="key b's request running")
        over = await client.get("/api/devices", headers=b)
        assert over.status_code == 429
        assert "IOTGW_API_MAX_CONCURRENT" in over.json()["detail"]
        assert started == 3, "a refused request does none of its work"
        stream = asyncio.create_task(client.get("/api/stream", headers=a))  # never bounded
        await wait_for(lambda: truth(started == 4), what="the stream, beyond the bound")
        release.set()
        assert [r.status_code for r in await asyncio.gather(*running, stream)] == [200] * 4
        assert (await client.get("/api/events", headers=a)).status_code == 200, "slots are given back"


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


async def test_a_consumer_the_database_refuses_says_failing_not_running_and_recovers(
    broker: Mosquitto, settings_for: Callable[..., Settings], database_url: str
) -> None:
    # Default handler timeout (nothing is abandoned), a stall far away: only the refusal itself
    # can make the consumer's state change while the lock is held.
    settings = settings_for(broker, consumers="analytics", consumer_stall_s=600.0)
    async with running_gateway(settings) as gw:
        await publish(broker, "t-1", reading(1), channel="telemetry")

        async def running_and_current() -> bool:
            (c,) = (await consumer_states(gw)).values()
            return c["state"] == "running" and c["lag_events"] == 0 and c["cursor"] > 0

        await wait_for(running_and_current, what="analytics to catch up")
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLD_LOCK, database_url, "20", stdout=asyncio.subprocess.PIPE
        )
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"locked\n"
        # What is refused: on PostgreSQL (the cursors table locked) the commits of new work; on
        # SQLite (the whole database) already the consumer's lease renewal. (There, new messages
        # would only queue behind ingest's own wait, refused by nobody.)
        if on_postgresql:
            await publish(broker, "t-1", *[reading(seq) for seq in range(2, 41)], channel="telemetry")
        seen: list[tuple[str, str]] = []
        while holder.returncode is None:
            (c,) = (await consumer_states(gw)).values()
            seen.append((c["state"], c["last_error"] or ""))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(holder.wait(), 0.3)
        untrue = [e for state, e in seen if state == "running" and e.startswith("database")]
        assert untrue == [], f"said running while the database refused it: {untrue[:2]}"
        assert any(state == "failing" and e.startswith("database") for state, e in seen), seen[-5:]
        await wait_for(running_and_current, timeout=60, what="analytics to say running again")
        (c,) = (await consumer_states(gw)).values()
        assert c["last_error"] is None
