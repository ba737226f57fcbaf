"""Dispatch through the real pipeline: a stuck car in, a work order, pages and escalations out.

Time is simulated: the dispatch consumer runs on a clock the test moves; devices stamp their
messages with the same clock, so "within a second of the alert" is measured in that time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from alerts.dispatch.consumer import Dispatch
from alerts.dispatch.roster import load_roster
from alerts.tables import NotificationRow
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.log import EventRow
from gateway.service import Gateway
from tests.support.dispatching import (
    ROSTER,
    RULES,
    WED_10_BERLIN,
    Clock,
    api,
    detail,
    dispatcher,
    message,
    one_order,
    orders,
    publish,
    ticked,
    trap,
)
from tests.support.gateway import running_gateway, wait_for
from tests.support.peers import Hooks, serving

pytestmark = pytest.mark.anyio


WED_20_BERLIN = datetime(2026, 11, 25, 19, 0, tzinfo=UTC)  # no technician on shift


@pytest.fixture
def pager() -> Iterator[Hooks]:
    with serving(fail_first=0) as server:
        yield server


@pytest.fixture
def dispatch_settings(tmp_path: Path, settings_for: Callable[..., Settings]) -> Callable[[Mosquitto], Settings]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return lambda broker: settings_for(broker, consumers="alerts", rules_file=str(rules))


def pages(pager: Hooks, step: str) -> list[dict[str, Any]]:
    return [r["body"] for r in pager.ok() if r["body"]["type"] == f"workorder.{step}"]


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_entrapment_is_p1_assigned_to_the_on_shift_technician_and_paged_at_once(
    broker: Mosquitto, dispatch_settings: Callable[[Mosquitto], Settings], pager: Hooks
) -> None:
    clock = Clock(WED_10_BERLIN)
    d = dispatcher(pager, clock)
    async with running_gateway(dispatch_settings(broker), consumers=[d]) as gw:
        await trap(broker, clock)
        order = await one_order(gw, "the entrapment's work order", lambda o: o["status"] == "assigned")
        assert (order["priority"], order["assignee"], order["level"]) == ("P1", "tina", 0)  # abe: off shift
        assert order["summary"] == "el-1 stuck at floor 3 with 80 kg inside"
        fired = ts((await detail(gw, order["id"]))["timeline"][0]["at"])
        assert ts(order["assigned_at"]) - fired <= timedelta(seconds=1)
        assert ts(order["ack_deadline"]) == clock.now + timedelta(minutes=5)
        await wait_for(lambda: asyncio.sleep(0, bool(pages(pager, "assigned"))), what="the page to tina")
        (page,) = pages(pager, "assigned")
        assert page["data"]["assignee"] == "tina"
        assert page["data"]["priority"] == "P1"
        assert ts(page["time"]) == clock.now  # paged in the same simulated instant
        # People are paged for work orders only: alert notifications go to the rules' receivers.
        assert {r["body"]["source"] for r in pager.ok()} == {"iotgw/dispatch"}


async def test_unacknowledged_order_escalates_exactly_at_the_timeout_and_pages_once(
    broker: Mosquitto, dispatch_settings: Callable[[Mosquitto], Settings], pager: Hooks
) -> None:
    clock = Clock(WED_10_BERLIN)
    d = dispatcher(pager, clock)
    async with running_gateway(dispatch_settings(broker), consumers=[d]) as gw:
        await trap(broker, clock)
        order = await one_order(gw, "a work order")
        deadline = WED_10_BERLIN + timedelta(minutes=5)
        await ticked(d, clock, deadline - timedelta(milliseconds=1))
        assert (await detail(gw, order["id"]))["assignee"] == "tina"
        await ticked(d, clock, deadline)
        got = await detail(gw, order["id"])
        assert (got["assignee"], got["level"], got["status"]) == ("sue", 1, "assigned")
        (escalation,) = [e for e in got["timeline"] if e["kind"] == "escalated"]
        assert ts(escalation["at"]) == deadline
        assert ts(got["ack_deadline"]) == deadline + timedelta(minutes=10)
        await ticked(d, clock, deadline + timedelta(seconds=30))
        await wait_for(lambda: asyncio.sleep(0, bool(pages(pager, "escalated"))), what="the escalation page")
        await ticked(d, clock, deadline + timedelta(seconds=31))
        (page,) = pages(pager, "escalated")
        assert (page["data"]["assignee"], page["data"]["level"]) == ("sue", 1)
        sample = gw.metrics.registry.get_sample_value

        async def counted() -> bool:
            return sample("iotgw_work_order_escalations_total", {"level": "2"}) == 1

        await wait_for(counted, what="the escalation in the metrics")
        assert sample("iotgw_work_orders_open", {"priority": "P1", "status": "assigned"}) == 1
        assert sample("iotgw_work_order_time_to_assign_seconds_count") == 1
        assert sample("iotgw_work_order_time_to_assign_seconds_sum") == 0  # assigned in the same instant


async def test_nobody_on_shift_goes_to_the_next_level_at_once(
    broker: Mosquitto, dispatch_settings: Callable[[Mosquitto], Settings], pager: Hooks
) -> None:
    clock = Clock(WED_20_BERLIN)
    d = dispatcher(pager, clock)
    async with running_gateway(dispatch_settings(broker), consumers=[d]) as gw:
        await trap(broker, clock)
        order = await one_order(gw, "a work order", lambda o: o["status"] == "assigned")
        assert (order["assignee"], order["level"]) == ("sue", 1)
        assert ts(order["assigned_at"]) == clock.now
        timeline = (await detail(gw, order["id"]))["timeline"]
        assert "nobody on shift at level 1" in timeline[-1]["note"]


async def test_two_alerts_on_one_device_make_one_order_and_recovery_only_annotates_it(
    broker: Mosquitto, dispatch_settings: Callable[[Mosquitto], Settings], pager: Hooks
) -> None:
    clock = Clock(WED_10_BERLIN)
    d = dispatcher(pager, clock)
    async with running_gateway(dispatch_settings(broker), consumers=[d]) as gw:
        t = clock.now
        jam = {"mode": "fault", "fault": "DOOR_JAM", "door": "opening", "load_kg": 80}
        await publish(broker, "el-1", message(1, t), message(2, t, **jam))
        order = await one_order(gw, "the door-jam order")
        assert order["priority"] == "P3"
        # Taken out of service with the door still jammed: a second alert while the order is open.
        await publish(broker, "el-1", message(3, t + timedelta(seconds=1), **{**jam, "mode": "out_of_service"}))

        async def attached() -> bool:
            return len((await detail(gw, order["id"]))["alerts"]) == 2

        await wait_for(attached, what="the second alert on the same order")
        assert [o["id"] for o in await orders(gw)] == [order["id"]]
        got = await detail(gw, order["id"])
        assert got["priority"] == "P2"  # out of service is more urgent than a door jam
        assert got["summary"] == "el-1 is out of service", "the order reads as its most urgent alert"
        assert got["recovered_at"] is None
        await publish(broker, "el-1", message(4, t + timedelta(seconds=2)))  # fault cleared

        async def recovered() -> bool:
            return (await detail(gw, order["id"]))["recovered_at"] is not None

        await wait_for(recovered, what="the recovery annotation")
        got = await detail(gw, order["id"])
        assert got["status"] == "assigned"  # still open: a technician has to resolve it
        assert [e["kind"] for e in got["timeline"]].count("device_recovered") == 1


async def test_acknowledging_an_order_acknowledges_its_firing_alerts_as_the_same_person(
    broker: Mosquitto, dispatch_settings: Callable[[Mosquitto], Settings], pager: Hooks
) -> None:
    clock = Clock(WED_10_BERLIN)
    d = dispatcher(pager, clock)
    async with running_gateway(dispatch_settings(broker), consumers=[d]) as gw:
        t = clock.now
        jam = {"mode": "fault", "fault": "DOOR_JAM", "door": "opening", "load_kg": 0}
        await publish(broker, "el-1", message(1, t), message(2, t, **jam),
                      message(3, t + timedelta(seconds=1), **{**jam, "mode": "out_of_service"}))  # fmt: skip
        order = await one_order(gw, "the order")

        async def both_attached() -> bool:
            return len((await detail(gw, order["id"]))["alerts"]) == 2

        await wait_for(both_attached, what="both alerts on the order")
        async with api(gw) as client:
            before = {
                a["rule"]: a for a in (await client.get("/api/alerts", params={"device_id": "el-1"})).json()["items"]
            }
            assert {r: a["status"] for r, a in before.items()} == {"door-jam": "firing", "out-of-service": "firing"}
            done = await client.post(f"/api/work-orders/{order['id']}/ack", json={"by": "tina"})
            assert done.status_code == 200, done.text
            after = {
                a["rule"]: a for a in (await client.get("/api/alerts", params={"device_id": "el-1"})).json()["items"]
            }
        assert {r: (a["status"], a["acked_by"]) for r, a in after.items()} == {
            "door-jam": ("acknowledged", "tina"), "out-of-service": ("acknowledged", "tina"),
        }  # fmt: skip
        with gw.store.session() as tx:
            acks = tx.exec(select(EventRow).where(col(EventRow.type) == "alert.acknowledged")).all()
        assert len(acks) == 2, "each alert's acknowledgement is in the log, once"


async def test_restart_during_an_open_escalation_keeps_the_deadline(
    broker: Mosquitto, dispatch_settings: Callable[[Mosquitto], Settings], pager: Hooks
) -> None:
    settings = dispatch_settings(broker)
    clock = Clock(WED_10_BERLIN)
    async with running_gateway(settings, consumers=[dispatcher(pager, clock)]) as gw:
        await trap(broker, clock)
        order = await one_order(gw, "a work order")
    deadline = WED_10_BERLIN + timedelta(minutes=5)
    clock = Clock(deadline - timedelta(minutes=1))
    d = dispatcher(pager, clock)  # a new process: nothing in memory
    async with running_gateway(settings, consumers=[d]) as gw:
        await ticked(d, clock, deadline - timedelta(seconds=1))
        assert (await detail(gw, order["id"]))["level"] == 0
        await ticked(d, clock, deadline)
        got = await detail(gw, order["id"])
        assert (got["assignee"], got["level"]) == ("sue", 1)
        assert [ts(e["at"]) for e in got["timeline"] if e["kind"] == "escalated"] == [deadline]


async def test_technician_steps_stop_escalation_and_resolve_needs_the_callback_record(
    broker: Mosquitto, dispatch_settings: Callable[[Mosquitto], Settings], pager: Hooks
) -> None:
    clock = Clock(WED_10_BERLIN)
    d = dispatcher(pager, clock)
    async with running_gateway(dispatch_settings(broker), consumers=[d]) as gw, api(gw) as c:
        await trap(broker, clock)
        oid = (await one_order(gw, "a work order"))["id"]
        # The record says who did it: a name nobody in the roster has is refused, and nothing changes.
        r = await c.post(f"/api/work-orders/{oid}/ack", json={"by": "mallory"})
        assert r.status_code == 422, r.text
        assert "'mallory' is not in the roster" in r.json()["detail"]
        assert (await detail(gw, oid))["status"] == "assigned"
        r = await c.post(f"/api/work-orders/{oid}/ack", json={"by": "tina"})
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["acked_by"]) == ("acknowledged", "tina")
        assert (await c.post(f"/api/work-orders/{oid}/ack", json={"by": "tina"})).status_code == 409
        await ticked(d, clock, WED_10_BERLIN + timedelta(hours=1))  # long past the deadline
        assert (await detail(gw, oid))["assignee"] == "tina"  # acknowledged: no escalation
        for step in ("en-route", "on-site"):
            r = await c.post(f"/api/work-orders/{oid}/{step}", json={"by": "tina"})
            assert r.status_code == 200, r.text
        r = await c.post(f"/api/work-orders/{oid}/resolve", json={"by": "tina", "problem": "   ", "action": " \n"})
        assert r.status_code == 422, "a blank callback record is no record"
        r = await c.post(f"/api/work-orders/{oid}/resolve", json={"by": "tina", "problem": "roller"})
        assert r.status_code == 422
        assert "action" in r.json()["detail"]
        r = await c.post(f"/api/work-orders/{oid}/reassign", json={"by": "sue", "to": "nobody"})
        assert (r.status_code, r.json()["detail"]) == (409, "no technician 'nobody' in the roster")
        record = {"by": "tina", "problem": "worn guide roller", "action": "replaced roller, test run ok"}
        r = await c.post(f"/api/work-orders/{oid}/resolve", json=record)
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["status"], got["problem"], got["action"]) == ("resolved", record["problem"], record["action"])
        assert [e["kind"] for e in got["timeline"]] == [
            "created", "assigned", "acknowledged", "en_route", "on_site", "resolved",
        ]  # fmt: skip
        assert (await c.post(f"/api/work-orders/{oid}/on-site", json={"by": "tina"})).status_code == 409
        # Found by when it was opened; a time with no zone is refused, not guessed.
        opened = got["created_at"]
        for since, until, found in ((opened, None, [oid]), (None, opened, []), ("2026-01-01T00:00:00Z", None, [oid])):
            bounds = {k: v for k, v in (("since", since), ("until", until)) if v}
            params = {"status": "resolved", **bounds}
            r = await c.get("/api/work-orders", params=params)
            assert [o["id"] for o in r.json()["items"]] == found, (since, until, r.text)
        r = await c.get("/api/work-orders", params={"since": "2026-11-25T10:00:00"})
        assert (r.status_code, r.json()["detail"]) == (422, "since: needs a time zone, e.g. 2026-11-28T10:00:00Z")
        for path in ("/api/work-orders", "/api/alerts", "/api/events"):  # no time in UTC: a 422, not the database's
            r = await c.get(path, params={"since": "9999-12-31T23:59:59-23:00", "until": "0001-01-01T00:00:00+14:00"})
            assert (r.status_code, r.json()["detail"]) == (422, "since: out of range in UTC"), (path, r.text)
        assert (await c.post("/api/work-orders/999/ack", json={"by": "tina"})).status_code == 404
        kinds = [e["type"] async for e in _events(c, "el-1")]
        assert "workorder.resolved" in kinds
        assert "alert.firing" in kinds


async def _events(c: httpx.AsyncClient, device: str) -> Any:
    r = await c.get(f"/api/devices/{device}/events", params={"limit": 50})
    assert r.status_code == 200, r.text
    for e in r.json()["items"]:
        yield e


async def test_technicians_can_be_edited_through_the_api_and_survive_a_restart(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    roster_file = tmp_path / "roster.yaml"
    roster_file.write_text(ROSTER.format(url="http://127.0.0.1:9/page"))
    settings = settings_for(broker, consumers="dispatch", roster_file=str(roster_file))
    async with running_gateway(settings) as gw, api(gw) as c:
        people = (await c.get("/api/technicians")).json()["items"]
        assert [p["technician"]["id"] for p in people] == ["abe", "tina", "sue", "max"]
        bad = [*[p["technician"] for p in people], {"id": "zoe", "name": "Zoe", "contact": "sms", "shifts": []}]
        r = await c.put("/api/technicians", params={"by": "sue"}, json=bad)
        assert r.status_code == 422
        assert "shifts" in r.json()["detail"]
        zoe = {"id": "zoe", "name": "Zoe", "contact": "pager", "skills": ["elevator"],
               "shifts": [{"start": "00:00", "end": "24:00"}]}  # fmt: skip
        r = await c.put("/api/technicians", params={"by": "sue"}, json=[people[1]["technician"], zoe])
        assert r.status_code == 200, r.text
        assert [(p["technician"]["id"], p["on_shift"]) for p in r.json()["items"]][1] == ("zoe", True)
    async with running_gateway(settings) as gw, api(gw) as c:
        assert [p["technician"]["id"] for p in (await c.get("/api/technicians")).json()["items"]] == ["tina", "zoe"]
    roster_file.write_text(ROSTER.format(url="http://127.0.0.1:9/page") + "\n# edited\n")
    async with running_gateway(settings) as gw, api(gw) as c:
        # The file changed since: it is the roster again.
        assert len((await c.get("/api/technicians")).json()["items"]) == 4


async def test_replaying_the_alert_engine_rebuilds_it_silently_and_rewrites_no_history(
    broker: Mosquitto, dispatch_settings: Callable[[Mosquitto], Settings], pager: Hooks
) -> None:
    clock = Clock(WED_10_BERLIN)
    d = dispatcher(pager, clock)
    async with running_gateway(dispatch_settings(broker), consumers=[d]) as gw, api(gw) as c:
        await trap(broker, clock)
        order = await one_order(gw, "a work order")
        await wait_for(lambda: asyncio.sleep(0, bool(pages(pager, "assigned"))), what="the page")
        before = await detail(gw, order["id"])
        (alert,) = (await c.get("/api/alerts")).json()["items"]
        derived = derived_events(gw)
        notifications = notification_count(gw)
        paged = len(pager.ok())
        r = await c.post("/api/consumers/alerts/replay", json={"from_position": 1})
        assert r.status_code == 200, r.text

        async def rebuilt() -> bool:
            (alerts,) = [s for s in (await c.get("/api/consumers")).json()["items"] if s["name"] == "alerts"]
            return alerts["lag_events"] == 0 and alerts["cursor"] > 0

        await wait_for(rebuilt, what="the alert engine to rebuild its state")
        assert (await c.get("/api/alerts")).json()["items"] == [alert], "the same alert, under the same id"
        assert derived_events(gw) == derived, "no alert or work-order event appended again"
        assert notification_count(gw) == notifications, "no notification made again"
        await asyncio.sleep(1.0)  # dispatch and the sender had the time to act on anything new
        assert len(pager.ok()) == paged, "nobody paged again"
        after = await detail(gw, order["id"])
        assert (after["alerts"], after["timeline"]) == (before["alerts"], before["timeline"])
        assert len(await orders(gw)) == 1
        # The replay is over: what happens now is new, and reaches the order as before.
        await publish(broker, "el-1", message(3, clock.now))

        async def recovered() -> bool:
            timeline = (await detail(gw, order["id"]))["timeline"]
            return [e["kind"] for e in timeline].count("device_recovered") == 1

        await wait_for(recovered, what="the live recovery on the same order")


def derived_events(gw: Gateway) -> list[tuple[str, str]]:
    with gw.store.session() as tx:
        rows = tx.exec(select(EventRow).where(col(EventRow.source).in_(["iotgw/alerts", "iotgw/dispatch"])))
        return sorted((r.ce_id, r.type) for r in rows)


def notification_count(gw: Gateway) -> int:
    with gw.store.session() as tx:
        return len(tx.exec(select(NotificationRow)).all())


async def test_a_technicians_contacts_take_the_priorities_they_list(
    broker: Mosquitto, dispatch_settings: Callable[[Mosquitto], Settings], pager: Hooks
) -> None:
    base = f"http://127.0.0.1:{pager.server_address[1]}"
    # Tina's desk is quiet from 09:00 to 12:00 Berlin; the simulated clock stands at 10:00.
    roster = (
        ROSTER.format(url=f"{base}/page")
        .replace(
            "{id: tina, name: Tina, contact: pager,",
            "{id: tina, name: Tina, contacts: [{receiver: pager}, {receiver: desk, priorities: [P1, P3],"
            ' quiet: [{start: "09:00", end: "12:00"}]}],',
        )
        .replace("receivers:\n", f'receivers:\n  - {{name: desk, kind: webhook, url: "{base}/desk"}}\n')
    )
    clock = Clock(WED_10_BERLIN)
    d = Dispatch(load_roster(roster), clock=clock)
    async with running_gateway(dispatch_settings(broker), consumers=[d]) as gw:
        await trap(broker, clock)  # P1: through the desk's quiet hours
        order = await one_order(gw, "the entrapment's order", lambda o: o["status"] == "assigned")
        await wait_for(lambda: asyncio.sleep(0, len(pages(pager, "assigned")) == 2), what="two pages")
        t = clock.now
        jam = {"mode": "fault", "fault": "DOOR_JAM", "door": "opening", "load_kg": 0}
        await publish(broker, "el-2", message(1, t), message(2, t, **jam))  # P3: the desk is quiet
        jammed = await one_order(gw, "the door-jam order", lambda o: o["device_id"] == "el-2")
        await wait_for(lambda: asyncio.sleep(0, len(pages(pager, "assigned")) == 3), what="the P3 page")
        await asyncio.sleep(0.5)  # (a page to the desk would be out by now)
    by_path = sorted((r["path"], r["body"]["data"]["work_order_id"]) for r in pager.ok())
    assert by_path == sorted([("/page", order["id"]), ("/desk", order["id"]), ("/page", jammed["id"])])
    assert jammed["priority"] == "P3"
    with gw.store.session() as tx:
        keys = [n.key for n in tx.exec(select(NotificationRow).where(NotificationRow.work_order_id == order["id"]))]
    assert len(keys) == len(set(keys)) == 2  # one notification a contact
