"""The consumers in a process of their own (IOTGW_CONSUMER_PROCESS, the default of `iotgw run`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from devices.connect import mqtt_client
from devices.load import publish_numbered
from gateway.cli.broker import Mosquitto, free_port
from gateway.config import Settings
from gateway.service import Gateway
from tests.support.elevators import state
from tests.support.gateway import install_plugin, iotgw_run, kill_9, query, running_gateway, until_ready, wait_for

pytestmark = pytest.mark.anyio


def consumer_processes(parent: int | None = None) -> list[psutil.Process]:
    """The consumers' processes started by `parent` (default: this test process)."""
    found = []
    for child in psutil.Process(parent or os.getpid()).children():
        # A child just killed is a zombie until its parent reaps it: no longer one of them.
        with contextlib.suppress(psutil.NoSuchProcess):
            if "consumer-process" in child.cmdline():
                found.append(child)
    return found


def metric_samples(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(gw.metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def api(gw: Gateway, method: str, url: str, **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as c:
        return await c.request(method, url, **kw)


async def consumers(gw: Gateway) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in (await api(gw, "GET", "/api/consumers")).json()["items"]}


async def handled_all(gw: Gateway) -> bool:
    """Every consumer has handled something and has nothing left to handle."""
    states = await consumers(gw)
    return bool(states) and all(s["lag_events"] == 0 and s["cursor"] > 0 for s in states.values())


async def test_consumers_run_apart_and_the_gateway_shows_and_steers_them(
    broker: Mosquitto, settings_for: Callable[..., Settings], database_url: str
) -> None:
    async with running_gateway(settings_for(broker, consumer_process=True)) as gw:
        (child,) = consumer_processes()
        assert child.nice() == psutil.Process().nice() + 10, "the consumers yield the CPU to ingestion"
        seen = gw.router.changes.version
        async with mqtt_client(broker.url_as("tester"), "el-2") as c:
            await c.publish("devices/el-2/state", state(1), qos=1)
            await c.publish("devices/el-2/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)
        await publish_numbered(broker.url_as("tester"), 4, 50)

        all_handled = functools.partial(handled_all, gw)

        await wait_for(all_handled, what="the consumers' process to handle everything")
        alerts = (await api(gw, "GET", "/api/alerts", params={"rule": "door-jam"})).json()["items"]
        assert [a["device_id"] for a in alerts] == ["el-2"], "the alert engine ran (in the other process)"
        assert gw.router.changes.version > seen, "its new alert woke the gateway's live views"
        states = await consumers(gw)
        assert {s["instance"] for s in states.values()} == {"default"}
        assert {s["state"] for s in states.values()} == {"running"}
        figures = (await api(gw, "GET", "/api/analytics/devices/load-00000")).json()
        assert figures, "analytics ran"

        # The gateway's /metrics carries what the consumers' process counts, once.
        async def counted() -> bool:
            samples = metric_samples(gw)
            return all(
                samples.get(("iotgw_consumer_events_total", (("consumer", name),)), 0) > 0
                for name in ("alerts", "analytics", "dispatch")
            )

        await wait_for(counted, what="the consumers' counts in the gateway's metrics")
        samples = metric_samples(gw)
        assert samples[("iotgw_consumer_process_up", ())] == 1
        assert samples[("iotgw_consumers_process_cpu_seconds_total", ())] > 0
        text = generate_latest(gw.metrics.registry).decode()
        assert text.count("# TYPE iotgw_consumer_events_total counter") == 1

        # Pause in the gateway's API: the other process stops handling at once (the alert engine
        # writes nothing for ordinary readings, so no failed commit would tell it); resume: it catches up.
        r = await api(gw, "POST", "/api/consumers/alerts/pause")
        assert r.json()["state"] == "paused"
        await publish_numbered(broker.url_as("tester"), 2, 50, prefix="more-")

        async def others_done_alerts_behind() -> bool:
            states = await consumers(gw)
            return states["analytics"]["lag_events"] == 0 and states["alerts"]["lag_events"] >= 100

        await wait_for(others_done_alerts_behind, what="analytics caught up while alerts is paused")
        paused_at = query(database_url, "select position from consumer_cursors where name = 'alerts'")
        await asyncio.sleep(0.5)  # the paused consumer must not move meanwhile (no condition to wait for)
        assert query(database_url, "select position from consumer_cursors where name = 'alerts'") == paused_at
        r = await api(gw, "POST", "/api/consumers/alerts/resume")
        assert r.json()["state"] == "running"
        await wait_for(all_handled, what="the alert engine to catch up after resume")
    assert consumer_processes() == [], "the consumers' process stops with the gateway"


async def test_the_gateway_starts_its_consumers_process_again_and_asks_it_to_retry(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker, consumer_process=True)) as gw:
        (child,) = consumer_processes()
        await publish_numbered(broker.url_as("tester"), 2, 50)

        all_handled = functools.partial(handled_all, gw)

        await wait_for(all_handled, what="the consumers' process to handle everything")
        # A retry is answered by the process where the consumer runs.
        r = await api(gw, "POST", "/api/consumers/analytics/dead-letters/999/retry")
        assert r.status_code == 409
        assert "no parked event 999" in r.json()["detail"]

        # The consumers' process dies: the gateway starts it again and it goes on from its cursors.
        kill_9_process(child)

        async def restarted() -> bool:
            again = consumer_processes()
            return (
                len(again) == 1
                and again[0].pid != child.pid
                and gw.consumer_process is not None
                and (metric_samples(gw).get(("iotgw_consumer_process_up", ())) == 1)
            )

        await wait_for(restarted, what="a new consumers' process")
        assert metric_samples(gw)[("iotgw_consumer_process_restarts_total", ())] == 1
        await publish_numbered(broker.url_as("tester"), 2, 50, prefix="after-")
        await wait_for(all_handled, what="the new consumers' process to handle the rest")
        after = await consumers(gw)
        assert after["analytics"]["cursor"] == max(s["cursor"] for s in after.values())
    assert consumer_processes() == [], "the consumers' process stops with the gateway"


def kill_9_process(proc: psutil.Process) -> None:
    proc.kill()
    proc.wait(10)


async def test_the_consumers_process_ends_when_the_gateway_dies(broker: Mosquitto, database_url: str) -> None:
    port = free_port()
    gateway = iotgw_run(broker.url, database_url, port, "--client-id", "iotgw-apart-test")
    try:
        await until_ready(port, gateway)
        (child,) = consumer_processes(gateway.pid)
        gateway.kill()  # the gateway alone: its child must not live on, orphaned
        gateway.wait()
        # Its stdin closed: it stops its consumers (saving their cursors) and exits.
        await asyncio.to_thread(child.wait, 30)
        assert not child.is_running()
    finally:
        kill_9(gateway)


ROSTER = """
timezone: UTC
receivers:
  - {name: pager, kind: webhook, url: "http://127.0.0.1:9/page"}
technicians:
  - {id: ed, name: Ed, contact: pager, sites: [hq], skills: [escalator], shifts: [{start: "00:00", end: "24:00"}]}
policies:
  - name: default
    levels:
      - {role: technician, ack_timeout: 5m}
"""


async def test_a_roster_edit_in_the_api_reaches_dispatch_in_the_consumers_process(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    roster = tmp_path / "roster.yaml"
    roster.write_text(ROSTER)
    settings = settings_for(broker, consumer_process=True, consumers="alerts,dispatch", roster_file=str(roster))
    async with running_gateway(settings) as gw:
        async with mqtt_client(broker.url_as("tester"), "el-2") as c:
            await c.publish("devices/el-2/state", state(1), qos=1)
            await c.publish("devices/el-2/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)

        async def order_is(status: str, assignee: str | None = None) -> bool:
            orders = (await api(gw, "GET", "/api/work-orders")).json()["items"]
            return [(o["status"], o["assignee"]) for o in orders] == [(status, assignee)]

        # Nobody on the roster mends elevators: the order waits for somebody.
        await wait_for(functools.partial(order_is, "unassigned"), what="an unassigned work order")
        ed = {"id": "ed", "name": "Ed", "contact": "pager", "sites": ["hq"], "skills": ["escalator"],
              "shifts": [{"start": "00:00", "end": "24:00"}]}  # fmt: skip
        zoe = {**ed, "id": "zoe", "name": "Zoe", "skills": ["elevator"]}
        r = await api(gw, "PUT", "/api/technicians", params={"by": "sue"}, json=[ed, zoe])
        assert r.status_code == 200, r.text
        # Dispatch runs in the other process: it takes the edited roster on and gives Zoe the order.
        await wait_for(functools.partial(order_is, "assigned", "zoe"), what="the order assigned to the new technician")


FLAKY_PACKAGE = """
import os
from pathlib import Path

from gateway.runtime import BaseConsumer


class Flaky(BaseConsumer):
    '''Fails on device bad-00000 until the file FLAKY_FIXED exists; notes what it handled in FLAKY_SEEN.'''

    name = "flaky"
    types = ("sensor.reading",)
    max_attempts = 3
    retry_base_s = 0.5

    def handle(self, events, tx):
        for e in events:
            if e.subject == "bad-00000" and not Path(os.environ["FLAKY_FIXED"]).exists():
                raise RuntimeError("bad device")
        with open(os.environ["FLAKY_SEEN"], "a") as seen:
            seen.writelines(e.subject + "\\n" for e in events)
        print("flaky handled", len(events), "events")  # a plug-in may print: not onto the link
"""


async def test_a_failing_consumer_in_its_own_process_shows_as_failing_and_its_parked_event_is_retried_there(
    broker: Mosquitto,
    settings_for: Callable[..., Settings],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A plug-in consumer as pip would install it, found by the gateway and by its consumers' process.
    install_plugin(tmp_path, "flaky", FLAKY_PACKAGE, "Flaky", monkeypatch)
    fixed, seen = tmp_path / "fixed", tmp_path / "seen"
    monkeypatch.setenv("FLAKY_FIXED", str(fixed))
    monkeypatch.setenv("FLAKY_SEEN", str(seen))
    async with running_gateway(settings_for(broker, consumer_process=True, consumers="flaky")) as gw:
        await publish_numbered(broker.url_as("tester"), 1, 1, prefix="bad-")

        async def failing() -> bool:
            flaky = (await consumers(gw))["flaky"]
            return flaky["state"] == "failing" and "bad device" in (flaky["last_error"] or "")

        await wait_for(failing, what="the gateway's API to show the child's failing consumer")
        await publish_numbered(broker.url_as("tester"), 1, 1, prefix="good-")

        async def parked_and_moved_on() -> bool:
            flaky = (await consumers(gw))["flaky"]
            return flaky["dead_letters"] == 1 and flaky["lag_events"] == 0 and flaky["state"] == "running"

        await wait_for(parked_and_moved_on, what="the event parked and the consumer going on")
        assert seen.read_text().split() == ["good-00000"]
        (dead,) = (await api(gw, "GET", "/api/consumers/flaky/dead-letters")).json()["items"]
        assert (dead["subject"], dead["attempts"]) == ("bad-00000", 3)
        assert "bad device" in dead["error"]
        r = await api(gw, "POST", f"/api/consumers/flaky/dead-letters/{dead['id']}/retry")
        assert r.status_code == 409, "still broken: the child says so"
        assert "failed again" in r.json()["detail"]
        fixed.touch()
        r = await api(gw, "POST", f"/api/consumers/flaky/dead-letters/{dead['id']}/retry")
        assert r.status_code == 200, r.text
        assert seen.read_text().split() == ["good-00000", "bad-00000"]
        (dead,) = (await api(gw, "GET", "/api/consumers/flaky/dead-letters")).json()["items"]
        assert dead["status"] == "retried"
    assert not [r for r in caplog.records if "unreadable" in r.getMessage()], "what it printed stayed off the link"


async def test_a_frozen_consumers_process_is_reported_stalled_then_killed_and_started_again(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(broker, consumer_process=True, consumer_process_timeout_s=4.0, consumer_stall_s=60.0)
    async with running_gateway(settings) as gw:
        (child,) = consumer_processes()
        await publish_numbered(broker.url_as("tester"), 2, 20)
        all_handled = functools.partial(handled_all, gw)
        await wait_for(all_handled, what="the consumers' process to handle everything")
        child.suspend()  # SIGSTOP: alive to every exit-based check, doing nothing
        try:
            await publish_numbered(broker.url_as("tester"), 2, 50, prefix="frozen-")

            async def stalled() -> bool:
                states = await consumers(gw)
                return all(
                    s["state"] == "stalled" and "has not answered" in (s["last_error"] or "") for s in states.values()
                )

            await wait_for(stalled, what="the API to report every consumer stalled, with why")
            assert metric_samples(gw)[("iotgw_consumer_stalled", (("consumer", "alerts"),))] == 1

            async def replaced() -> bool:
                again = consumer_processes()
                return len(again) == 1 and again[0].pid != child.pid

            await wait_for(replaced, what="the gateway to kill the frozen process and start another")
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        await wait_for(all_handled, what="the new consumers' process to handle what waited")
        states = await consumers(gw)
        assert {s["state"] for s in states.values()} == {"running"}
        assert metric_samples(gw)[("iotgw_consumer_process_restarts_total", ())] == 1
        # And a door jam still becomes an alert.
        async with mqtt_client(broker.url_as("tester"), "el-9") as c:
            await c.publish("devices/el-9/state", state(1), qos=1)
            await c.publish("devices/el-9/state", state(2, mode="fault", fault="DOOR_JAM"), qos=1)

        async def alerted() -> bool:
            alerts = (await api(gw, "GET", "/api/alerts", params={"rule": "door-jam"})).json()["items"]
            return [a["device_id"] for a in alerts] == ["el-9"]

        await wait_for(alerted, what="the door jam's alert")
