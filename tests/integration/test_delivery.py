"""Deliveries cannot block each other: each receiver is a lane, a refusal is final, a hang is one lane's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import col, select

from alerts.dispatch.consumer import Dispatch
from alerts.dispatch.roster import load_roster
from alerts.lifecycle import ALERT_SOURCE
from alerts.loading import RulesError, load_rules
from alerts.tables import AlertRow, AlertTransitionRow, DeliveryRow, NotificationRow
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.log import append_event
from gateway.runtime.leases import LEASES
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
    publish,
    ticked,
    trap,
)
from tests.support.gateway import running_gateway, wait_for
from tests.support.peers import PD_KEY, Hooks, serving

pytestmark = pytest.mark.anyio

QUEUED = 500
HOUR = timedelta(hours=1)
log = logging.getLogger(__name__)


def receivers(broken: Hooks, hanging: Hooks, healthy: Hooks) -> str:
    def url(h: Hooks) -> str:
        return f"http://127.0.0.1:{h.server_address[1]}/hook"

    return f"""
receivers:
  - {{name: broken, kind: webhook, url: "{url(broken)}"}}
  - {{name: hanging, kind: webhook, url: "{url(hanging)}", timeout_s: 2s}}
  - {{name: healthy, kind: webhook, url: "{url(healthy)}"}}
"""


def queue_for(gw: Gateway, receiver: str, count: int, later: timedelta = timedelta(0)) -> None:
    """`count` deliveries waiting for `receiver`, of the one alert there is (as a backlog would be),
    due `later` (a backoff)."""
    now = datetime.now(UTC)
    with gw.store.session() as tx:
        tr = tx.exec(select(AlertTransitionRow)).first()
        assert tr is not None
        for i in range(count):
            key = f"queued-{receiver}-{i}"
            position = append_event(
                tx, ce_id=key, source=ALERT_SOURCE, type="alert.acknowledged", subject="el-2", time=now, site="hq",
                data={"alert_id": tr.alert_id},
            )  # fmt: skip
            n = NotificationRow(
                key=key, alert_id=tr.alert_id, transition_id=tr.id or 0, status="acknowledged", created_at=now,
                fanned_out=True, event_position=position,
            )  # fmt: skip
            tx.add(n)
            tx.flush()
            tx.add(DeliveryRow(notification_id=n.id or 0, alert_id=tr.alert_id + 1000 + i, receiver=receiver,
                               next_at=now + later, created_at=now))  # fmt: skip
        tx.commit()


def rules_to(where: Path, hook: Hooks) -> Path:
    """The scenario's rules with one webhook receiver, `hook`."""
    rules = where / "rules.yaml"
    rules.write_text(f"""{RULES}
receivers:
  - {{name: hook, kind: webhook, url: "http://127.0.0.1:{hook.server_address[1]}/hook"}}
""")
    return rules


def deliveries_to(gw: Gateway, receiver: str) -> dict[str, str]:
    """Notification key -> delivery status, of every delivery to `receiver`."""
    with gw.store.session() as tx:
        rows = tx.exec(
            select(NotificationRow.key, DeliveryRow.status)
            .join(DeliveryRow, col(DeliveryRow.notification_id) == col(NotificationRow.id))
            .where(col(DeliveryRow.receiver) == receiver)
        ).all()
    return dict(rows)


def refused_all(gw: Gateway) -> bool:
    return "pending" not in deliveries_to(gw, "broken").values()


def keys(h: Hooks, *, prefix: str = "") -> list[str]:
    with h.lock:
        return [str(r["key"]) for r in h.requests if str(r["key"]).startswith(prefix)]


async def test_a_refusing_and_a_hanging_receiver_delay_neither_an_alert_nor_a_page(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    clock = Clock(WED_10_BERLIN)
    with serving(always=400) as broken, serving(delay_s=4) as hanging, serving() as healthy, serving() as pager:
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES + receivers(broken, hanging, healthy))
        settings = settings_for(broker, consumers="alerts", rules_file=str(rules))
        async with running_gateway(settings, consumers=[dispatcher(pager, clock)]) as gw:
            await publish(broker, "el-2", message(1, clock.now), message(2, clock.now, mode="fault", fault="DOOR_JAM"))
            await wait_for(lambda: asyncio.sleep(0, len(healthy.ok()) == 1), what="the first alert")
            await asyncio.to_thread(queue_for, gw, "broken", QUEUED)
            await asyncio.to_thread(queue_for, gw, "hanging", 50)
            started = time.monotonic()
            await trap(broker, clock)

            def firing_stuck() -> bool:
                return any(r["body"]["data"]["rule"] == "stuck" for r in healthy.ok())

            await wait_for(lambda: asyncio.sleep(0, firing_stuck()), timeout=10, what="the entrapment alert")
            alert_s = time.monotonic() - started
            await wait_for(lambda: asyncio.sleep(0, bool(pager.ok())), timeout=10, what="the technician's page")
            page_s = time.monotonic() - started
            log.warning("with %d refused and 50 hanging deliveries queued: alert after %.2f s, page after %.2f s",
                        QUEUED, alert_s, page_s)  # fmt: skip
            assert alert_s <= 2.0, f"the healthy receiver got the alert after {alert_s:.2f} s"
            assert page_s <= 2.0, f"the page arrived after {page_s:.2f} s"

            await wait_for(
                lambda: asyncio.to_thread(refused_all, gw), timeout=90, what="every refused delivery to fail"
            )
            await asyncio.sleep(2.0)  # a retry, if there were one, would come within this
            sent, failed = keys(broken), await asyncio.to_thread(deliveries_to, gw, "broken")
            assert len(failed) > QUEUED
            assert set(failed.values()) == {"failed"}
            assert sorted(sent) == sorted(failed), "each refused delivery tried once, never again"
            order = await one_order(gw, "the entrapment's work order", lambda o: o["device_id"] == "el-1")
            pages = (await detail(gw, order["id"]))["pages"]
            assert [p["delivery"] for p in pages] == ["delivered"]
            async with api(gw) as c:
                alerts = (await c.get("/api/alerts", params={"rule": "stuck"})).json()["items"]
                shown = (await c.get(f"/api/alerts/{alerts[0]['id']}")).json()["notifications"]
                metrics = (await c.get("/metrics")).text
            by_receiver = {n["receiver"]: n for n in shown}
            assert by_receiver["broken"]["delivery"] == "failed"
            assert by_receiver["broken"]["last_error"] == "HTTP 400: refused: answer 400"
            assert by_receiver["healthy"]["delivery"] == "delivered"
            assert by_receiver["hanging"]["delivery"] == "pending", "a timeout is retried, not given up"
            with gw.store.session() as tx:
                errors = tx.exec(select(DeliveryRow.last_error).where(col(DeliveryRow.receiver) == "hanging")).all()
            assert "no complete answer within 2 s" in errors
            assert "failed" not in (await asyncio.to_thread(deliveries_to, gw, "hanging")).values()
            assert f'iotgw_notifications_failed_total{{reason="rejected",receiver="broken"}} {len(failed)}.0' in metrics
            assert 'iotgw_notification_receiver_failing{receiver="broken"} 1.0' in metrics
            assert 'iotgw_notification_receiver_failing{receiver="healthy"} 0.0' in metrics
            assert 'iotgw_notification_receiver_failing{receiver="hanging"} 1.0' in metrics


async def test_which_failures_are_final_and_how_long_others_are_retried(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    clock = Clock(WED_10_BERLIN)
    with (
        serving(always=404) as gone,
        serving(always=429) as busy,
        serving(always=503) as down,
        serving(always=301) as moved,
    ):

        def url(h: Hooks) -> str:
            return f"http://127.0.0.1:{h.server_address[1]}/hook"

        rules = tmp_path / "rules.yaml"
        rules.write_text(f"""{RULES}
receivers:
  - {{name: gone, kind: webhook, url: "{url(gone)}"}}
  - {{name: busy, kind: webhook, url: "{url(busy)}"}}
  - {{name: down, kind: webhook, url: "{url(down)}"}}
  - {{name: moved, kind: webhook, url: "{url(moved)}"}}
""")
        settings = settings_for(broker, consumers="alerts", rules_file=str(rules), notify_max_age_s=3.0)
        async with running_gateway(settings) as gw:
            await publish(broker, "el-2", message(1, clock.now), message(2, clock.now, mode="fault", fault="DOOR_JAM"))

            async def settled() -> bool:
                states = {r: await asyncio.to_thread(deliveries_to, gw, r) for r in ("gone", "down", "busy", "moved")}
                return all(s and set(s.values()) == {"failed"} for s in states.values())

            await wait_for(settled, timeout=20, what="the final failures and the expiry")
            async with api(gw) as c:
                metrics = (await c.get("/metrics")).text
        assert len(gone.requests) == 1, "a 404 is final: asked once"
        assert len(busy.requests) >= 2, "a 429 is retried until the maximum age"
        assert len(down.requests) >= 2, "a 503 is retried until the maximum age"
        for receiver, reason in (
            ("gone", "rejected"),
            ("down", "expired"),
            ("busy", "expired"),
        ):
            assert f'iotgw_notifications_failed_total{{reason="{reason}",receiver="{receiver}"}} 1.0' in metrics
        with gw.store.session() as tx:
            errors = dict(tx.exec(select(DeliveryRow.receiver, DeliveryRow.last_error)).all())
        assert errors["gone"] == "HTTP 404: refused: answer 404"
        assert errors["down"] == "HTTP 503: refused: answer 503; retried for 3 s"
        assert errors["moved"] == "HTTP 301 to http://127.0.0.1:9/moved: set that as the receiver's url"
        assert len(moved.requests) == 1, "a redirect is final, and not followed"


@pytest.mark.parametrize("url", ["http://exa mple.org/hook", "http://[::1/hook", "http:///hook"])
def test_a_receiver_url_no_request_could_use_is_refused_when_the_rules_load(url: str) -> None:
    with pytest.raises(RulesError, match=r"receivers\.0: url '"):
        load_rules(f"rules: []\nreceivers:\n  - {{name: typo, kind: webhook, url: '{url}'}}\n")


async def test_pagerduty_incidents_follow_the_work_order_and_every_one_opened_is_closed(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    clock = Clock(WED_10_BERLIN)
    with serving() as pd:
        url = f"http://127.0.0.1:{pd.server_address[1]}/v2/enqueue"
        contact = f'{{{{name: pager, kind: pagerduty, url: "{url}", routing_key: {PD_KEY}}}}}'
        roster = ROSTER.replace('{{name: pager, kind: webhook, url: "{url}"}}', contact)
        d = Dispatch(load_roster(roster.format()), clock=clock)
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES)
        settings = settings_for(broker, consumers="alerts", rules_file=str(rules), public_url="https://gw.example")
        async with running_gateway(settings, consumers=[d]) as gw, api(gw) as c:
            await trap(broker, clock)
            order = await one_order(gw, "the entrapment's work order")
            oid = order["id"]

            def sent() -> list[tuple[str, str]]:
                return [(r["body"]["event_action"], r["body"]["dedup_key"]) for r in pd.ok()]

            await wait_for(lambda: asyncio.sleep(0, len(sent()) == 1), what="tina's incident")
            await ticked(d, clock, WED_10_BERLIN + timedelta(minutes=5))  # not acknowledged: on to sue
            await wait_for(lambda: asyncio.sleep(0, len(sent()) == 3), what="the hand-over")
            for step, path in (("acknowledge", "ack"), ("en_route", "en-route"), ("on_site", "on-site")):
                r = await c.post(f"/api/work-orders/{oid}/{path}", json={"by": "sue"})
                assert r.status_code == 200, (step, r.text)
            r = await c.post(
                f"/api/work-orders/{oid}/resolve", json={"by": "sue", "problem": "door", "action": "fixed"}
            )
            assert r.status_code == 200, r.text
            await wait_for(lambda: asyncio.sleep(0, len(sent()) == 7), what="every step told")
            pages = (await detail(gw, oid))["pages"]
        tina, sue = f"iotgw-workorder-{oid}-tina", f"iotgw-workorder-{oid}-sue"
        assert sent() == [
            ("trigger", tina),
            ("resolve", tina), ("trigger", sue),  # handed over: tina's incident closed, sue's opened
            ("acknowledge", sue), ("acknowledge", sue), ("acknowledge", sue),
            ("resolve", sue),
        ]  # fmt: skip
        opened = {k for a, k in sent() if a == "trigger"}
        assert opened == {k for a, k in sent() if a == "resolve"}, "every incident opened is closed"
        assert [p["delivery"] for p in pages] == ["delivered"] * 7
        first = pd.ok()[0]["body"]
        assert first["routing_key"] == PD_KEY
        payload = first["payload"]
        assert (payload["group"], payload["class"], payload["severity"]) == ("hq", "work-order P1", "critical")
        assert first["links"] == [{"href": f"https://gw.example/ui/?work_order={oid}",
                                   "text": "The work order on the staff page"}]  # fmt: skip
        assert (first["client"], first["client_url"]) == ("iotgw", "https://gw.example/ui/")


def test_a_pagerduty_routing_key_is_checked_when_the_rules_load() -> None:
    with pytest.raises(RulesError, match="32 characters"):
        load_rules(
            "rules: []\nreceivers:\n  - {name: pd, kind: pagerduty, url: 'https://events.pagerduty.com/v2/enqueue',"
            " routing_key: KEY}\n"
        )


@contextmanager
def trickling(every_s: float = 0.5) -> Iterator[tuple[int, list[float]]]:
    """A receiver that answers 200 one header line at a time, for ever (a slow-loris peer)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[float] = []
    done = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(time.monotonic())
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    def drip(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not done.is_set():
                conn.sendall(b"X-Wait: 1\r\n")
                time.sleep(every_s)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        done.set()
        thread.join(5)
        server.close()


async def test_a_receiver_that_trickles_its_answer_is_timed_out_as_a_whole_and_stops_nothing(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    clock = Clock(WED_10_BERLIN)
    with trickling() as (port, accepted), serving() as healthy:
        rules = tmp_path / "rules.yaml"
        rules.write_text(f"""{RULES}
receivers:
  - {{name: loris, kind: webhook, url: "http://127.0.0.1:{port}/hook", timeout_s: 1s}}
  - {{name: healthy, kind: webhook, url: "http://127.0.0.1:{healthy.server_address[1]}/hook"}}
""")
        settings = settings_for(broker, consumers="alerts", rules_file=str(rules))
        gw_cm = running_gateway(settings)
        gw = await gw_cm.__aenter__()
        try:
            await publish(broker, "el-2", message(1, clock.now), message(2, clock.now, mode="fault", fault="DOOR_JAM"))
            await wait_for(lambda: asyncio.sleep(0, len(healthy.ok()) == 1), what="the healthy receiver")

            async def timed_out() -> bool:
                with gw.store.session() as tx:
                    d = tx.exec(select(DeliveryRow).where(col(DeliveryRow.receiver) == "loris")).first()
                return d is not None and d.attempts >= 2 and d.status == "pending"

            await wait_for(timed_out, timeout=20, what="the trickled request given up and tried again")
            with gw.store.session() as tx:
                d = tx.exec(select(DeliveryRow).where(col(DeliveryRow.receiver) == "loris")).one()
            assert d.last_error == "no complete answer within 1 s"
            assert len(accepted) >= 2
        finally:
            started = time.monotonic()
            await gw_cm.__aexit__(None, None, None)
            stopped_s = time.monotonic() - started
        assert stopped_s < 10, f"the gateway took {stopped_s:.1f} s to stop"


async def test_deliveries_waiting_out_a_backoff_do_not_hold_up_new_ones(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    clock = Clock(WED_10_BERLIN)
    with serving() as hook:
        settings = settings_for(broker, consumers="alerts", rules_file=str(rules_to(tmp_path, hook)))
        async with running_gateway(settings) as gw:
            await publish(broker, "el-2", message(1, clock.now), message(2, clock.now, mode="fault", fault="DOOR_JAM"))
            await wait_for(lambda: asyncio.sleep(0, len(hook.ok()) == 1), what="the first alert")
            await asyncio.to_thread(queue_for, gw, "hook", 300, later=timedelta(hours=1))  # all in backoff
            await publish(broker, "el-3", message(1, clock.now), message(2, clock.now, mode="fault", fault="DOOR_JAM"))
            await wait_for(lambda: asyncio.sleep(0, len(hook.ok()) == 2), timeout=10,
                           what="the new alert past 300 deliveries waiting")  # fmt: skip


async def test_a_receiver_told_of_an_alert_is_told_its_end_under_a_later_silence(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    clock = Clock(WED_10_BERLIN)
    with serving() as pd:
        rules = tmp_path / "rules.yaml"
        rules.write_text(f"""{RULES}
receivers:
  - {{name: pd, kind: pagerduty, url: "http://127.0.0.1:{pd.server_address[1]}/v2/enqueue", routing_key: {PD_KEY}}}
""")
        settings = settings_for(broker, consumers="alerts", rules_file=str(rules))
        async with running_gateway(settings) as gw, api(gw) as c:
            jam = {"mode": "fault", "fault": "DOOR_JAM"}
            await publish(broker, "el-2", message(1, clock.now), message(2, clock.now, **jam))
            await wait_for(lambda: asyncio.sleep(0, len(pd.ok()) == 1), what="the incident")
            silence = {"matchers": {"device_id": "el-*"}, "duration": "1h", "by": "ana", "comment": "works"}
            assert (await c.post("/api/silences", json=silence)).status_code == 201
            await publish(broker, "el-2", message(3, clock.now))  # cleared
            await publish(broker, "el-4", message(1, clock.now), message(2, clock.now, **jam))  # new, silenced
            await wait_for(lambda: asyncio.sleep(0, len(pd.ok()) == 2), timeout=10, what="the resolve")

            def el4_decided() -> bool:  # the new alert's delivery is fanned out, and held back
                with gw.store.session() as tx:
                    alert = tx.exec(select(AlertRow).where(col(AlertRow.device_id) == "el-4")).first()
                    if alert is None:
                        return False
                    rows = tx.exec(select(DeliveryRow.status).where(col(DeliveryRow.alert_id) == alert.id)).all()
                return list(rows) == ["silenced"]

            await wait_for(lambda: asyncio.to_thread(el4_decided), timeout=10, what="the silenced alert's delivery")
        actions = [(r["body"]["event_action"], r["body"]["dedup_key"]) for r in pd.ok()]
        assert [a for a, _ in actions] == ["trigger", "resolve"], "the silenced new alert is not sent"
        assert actions[0][1] == actions[1][1], "the incident opened is the one closed"


async def test_a_notifier_that_lost_its_lease_mid_lane_sends_nothing_more(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    # An instance that stalled (frozen, say) past its lease resumes in the middle of a lane: the
    # deliveries left in its hands are another instance's now, and it must not send them again.
    clock = Clock(WED_10_BERLIN)
    with serving(delay_s=0.3) as hook:
        settings = settings_for(broker, consumers="alerts", rules_file=str(rules_to(tmp_path, hook)))
        async with running_gateway(settings) as gw:
            await publish(broker, "el-2", message(1, clock.now), message(2, clock.now, mode="fault", fault="DOOR_JAM"))
            await wait_for(lambda: asyncio.sleep(0, len(hook.ok()) == 1), what="the first alert")
            await asyncio.to_thread(queue_for, gw, "hook", 20)  # a lane of 20, 0.3 s each
            await wait_for(lambda: asyncio.sleep(0, len(keys(hook, prefix="queued-")) >= 2), what="the lane going")
            with gw.store.session() as tx:  # another instance takes the notifier over
                tx.connection().execute(
                    update(LEASES)
                    .where(LEASES.c.name == "notifier")
                    .values(
                        owner="gw-elsewhere",
                        epoch=LEASES.c.epoch + 1,
                        expires_at=datetime.now(UTC) + timedelta(hours=1),
                    )
                )
                tx.commit()
            sent = len(keys(hook, prefix="queued-"))
            await asyncio.sleep(2.0)  # what the lane would send meanwhile: some 6 more
            after = len(keys(hook, prefix="queued-"))
            assert after <= sent + 1, f"{after - sent} sent after the lease was taken (one may have been in flight)"
            assert "pending" in deliveries_to(gw, "hook").values(), "the rest is left to the new holder"
