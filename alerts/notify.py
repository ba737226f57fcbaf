"""The notification sender: delivers the outbox to receivers, with retries, never losing one.

Each notification (one per alert transition, written with the transition) is fanned out to the
receivers whose severity filter admits it, as one delivery each. A delivery is retried with
exponential backoff (capped at 5 minutes) until the receiver answers 2xx: a receiver that is
down for a while gets everything when it is back. Every request carries the notification's
`Idempotency-Key` (the same on every retry), so a receiver can drop a duplicate.

Work-order notifications (alerts/dispatch.py) go through the same outbox but page one person:
they name their receiver, and silences do not apply to them (a trapped passenger is never quiet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlmodel import Session, col, select

from alerts.dispatch import WorkOrderEntryRow, WorkOrderRow
from alerts.engine import AlertRow, AlertTransitionRow, DeliveryRow, NotificationRow, SilenceRow
from alerts.rules import Receiver
from gateway.cluster import Lease, LeaseLostError
from gateway.errors import StoreError
from gateway.logs import QuietLog
from gateway.metrics import Metrics
from gateway.store import Store

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0
PD_SEVERITY = {"critical": "critical", "major": "error", "minor": "warning", "warning": "warning", "info": "info"}
PD_ACTION = {"firing": "trigger", "flapping": "trigger", "acknowledged": "acknowledge", "resolved": "resolve"}
PD_PRIORITY = {"P1": "critical", "P2": "error", "P3": "warning"}


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def build(receiver: Receiver, n: NotificationRow, alert: AlertRow, tr: AlertTransitionRow) -> dict[str, Any] | None:
    """The request body for `receiver`, or None when the receiver has no such transition."""
    facts = {
        "alert_id": alert.id, "rule": alert.rule, "device_id": alert.device_id, "site": alert.site,
        "severity": alert.severity, "status": n.status, "summary": alert.summary, "fired_at": _iso(alert.fired_at),
        "by": tr.by, "note": tr.note, "from_status": tr.from_status,
    }  # fmt: skip
    if receiver.kind in ("webhook", "log"):
        return {
            "specversion": "1.0", "id": n.key, "source": "iotgw/alerts", "type": f"iotgw.alert.{n.status}",
            "time": _iso(tr.at), "subject": alert.device_id, "datacontenttype": "application/json", "data": facts,
        }  # fmt: skip
    if receiver.kind == "alertmanager":
        if n.status == "acknowledged":
            return None  # Alertmanager knows only firing and resolved
        am_status = "resolved" if n.status == "resolved" else "firing"
        labels = {
            "alertname": alert.rule,
            "device": alert.device_id,
            "site": alert.site or "",
            "severity": alert.severity,
        }
        return {
            "version": "4", "groupKey": f"{alert.rule}:{alert.device_id}", "truncatedAlerts": 0,
            "status": am_status, "receiver": receiver.name, "groupLabels": {"alertname": alert.rule},
            "commonLabels": labels, "commonAnnotations": {"summary": alert.summary}, "externalURL": "",
            "alerts": [{
                "status": am_status, "labels": labels, "annotations": {"summary": alert.summary},
                "startsAt": _iso(alert.fired_at), "endsAt": _iso(alert.resolved_at) or "0001-01-01T00:00:00Z",
                "generatorURL": "", "fingerprint": f"iotgw-{alert.id}",
            }],
        }  # fmt: skip
    body: dict[str, Any] = {
        "routing_key": receiver.routing_key,
        "event_action": PD_ACTION[n.status],
        "dedup_key": f"iotgw-{alert.rule}-{alert.device_id}-{alert.id}",
    }
    if n.status in ("firing", "flapping"):
        body["payload"] = {
            "summary": alert.summary, "source": alert.device_id, "severity": PD_SEVERITY[alert.severity],
            "timestamp": _iso(alert.fired_at), "component": alert.rule, "group": alert.site, "custom_details": facts,
        }  # fmt: skip
    return body


def build_page(receiver: Receiver, n: NotificationRow, order: WorkOrderRow, entry: WorkOrderEntryRow) -> dict[str, Any]:
    """The request body paging a person about a work order."""
    facts = {
        "work_order_id": order.id, "step": entry.kind, "priority": order.priority, "status": order.status,
        "device_id": order.device_id, "site": order.site, "summary": order.summary, "assignee": order.assignee,
        "level": (entry.level or 0) + 1, "ack_deadline": _iso(order.ack_deadline), "note": entry.note,
    }  # fmt: skip
    if receiver.kind == "pagerduty":
        return {
            "routing_key": receiver.routing_key, "event_action": "trigger", "dedup_key": f"iotgw-workorder-{order.id}",
            "payload": {
                "summary": f"[{order.priority}] {order.summary}"[:1024], "source": order.device_id,
                "severity": PD_PRIORITY.get(order.priority, "warning"), "timestamp": _iso(entry.at),
                "component": "work-order", "group": order.site, "custom_details": facts,
            },
        }  # fmt: skip
    return {
        "specversion": "1.0", "id": n.key, "source": "iotgw/dispatch", "type": f"iotgw.workorder.{entry.kind}",
        "time": _iso(entry.at), "subject": order.device_id, "datacontenttype": "application/json", "data": facts,
    }  # fmt: skip


class Notifier:
    """Fans the outbox out to receivers and delivers it; run with `await run()`.

    `receivers` is read on every round, so a roster edited through the API takes effect at once.
    """

    def __init__(  # noqa: PLR0913
        self,
        store: Store,
        receivers: Callable[[], Sequence[Receiver]],
        metrics: Metrics,
        *,
        pagers: Callable[[], Sequence[Receiver]] = list,
        interval_s: float = 0.5,
        lease: Lease | None = None,
    ) -> None:
        self.store = store
        self._receivers = receivers  # every alert notification fans out to these
        self._pagers = pagers  # people's contacts (the roster's): only work-order pages go there
        self.receivers: dict[str, Receiver] = {}
        self.pagers: dict[str, Receiver] = {}
        self.metrics = metrics
        self.interval_s = interval_s
        # In a cluster, one instance delivers: the one holding this lease.
        self.lease = lease
        self._stopping: asyncio.Event | None = None
        self._quiet = QuietLog(log, every_s=30.0)

    async def run(self) -> None:
        """Deliver until `stop()` (the round in hand is finished) or cancelled; then give the lease up."""
        self._stopping = asyncio.Event()
        with httpx.Client(follow_redirects=False) as client:
            while not self._stopping.is_set():
                try:
                    busy = await asyncio.to_thread(self.deliver_due, client)
                except StoreError as exc:
                    self._quiet.warn("store", "notifications: database error: %s", exc)
                    busy = False
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self.interval_s)
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self.release)

    def stop(self) -> None:
        """Ask `run` to end after the round in hand (its thread holds a database session)."""
        if self._stopping is not None:
            self._stopping.set()

    def deliver_due(self, client: httpx.Client, now: datetime | None = None) -> bool:
        """Fan out new notifications and try every delivery that is due; True if any was tried."""
        now = now or datetime.now(UTC)
        if self.lease is not None and not self._hold_lease():
            return False
        self.receivers = {r.name: r for r in self._receivers()}
        self.pagers = {r.name: r for r in self._pagers()}
        for name in (*self.receivers, *self.pagers):  # series from the start: 0, not absent
            self.metrics.notifications_sent.labels(name)
            self.metrics.notifications_failed.labels(name)
        with self.store.session() as tx:
            self._fan_out(tx, now)
            pending = tx.exec(
                select(DeliveryRow).where(col(DeliveryRow.status) == "pending").order_by(col(DeliveryRow.id)).limit(200)
            ).all()
            # In order per (receiver, alert): a "resolve" must not overtake the "trigger" it ends.
            blocked: set[tuple[str, int]] = set()
            due = []
            for d in pending:
                pair = (d.receiver, d.alert_id)
                if pair in blocked:
                    continue
                if d.next_at > now:
                    blocked.add(pair)
                    continue
                due.append(d)
                self._attempt(tx, client, d, now)
                tx.commit()  # one delivery's outcome at a time: a crash repeats at most one request
                if d.status == "pending":
                    blocked.add(pair)
            self.metrics.notifications_pending.set(
                len(tx.exec(select(DeliveryRow.id).where(col(DeliveryRow.status) == "pending")).all())
            )
            return bool(due)

    def release(self) -> None:
        """Give the lease up (a clean stop: another instance may deliver at once)."""
        if self.lease is not None and self.lease.held:
            with self.store.session() as tx:
                self.lease.release(tx)
                tx.commit()

    def _hold_lease(self) -> bool:
        assert self.lease is not None  # noqa: S101
        was_held = self.lease.held
        if was_held and not self.lease.due():
            return True  # renewed a moment ago: no database round trip every round
        with self.store.session() as tx:
            try:
                self.lease.fence(tx)
            except LeaseLostError:
                if not self.lease.acquire(tx):
                    return False
            tx.commit()
        if not was_held:
            log.info("notifications are delivered by %s", self.lease.owner)
        return True

    def _fan_out(self, tx: Session, now: datetime) -> None:
        fresh = tx.exec(select(NotificationRow).where(col(NotificationRow.fanned_out).is_(False)).limit(500)).all()
        silences = list(tx.exec(select(SilenceRow).where(col(SilenceRow.ends_at) > now))) if fresh else []
        for n in fresh:
            if n.receiver is not None:  # a page for one person (dispatch): no fan-out, no silences
                tx.add(DeliveryRow(notification_id=n.id or 0, alert_id=n.alert_id, receiver=n.receiver, next_at=now))
                n.fanned_out = True
                tx.add(n)
                continue
            alert = tx.get(AlertRow, n.alert_id)
            # A silence applies to what would be sent while it lasts (transition times are device times).
            silenced = alert is not None and any(s.matches(alert, now) for s in silences)
            for r in self.receivers.values():
                if alert is None or (r.severities is not None and alert.severity not in r.severities):
                    continue
                tx.add(
                    DeliveryRow(
                        notification_id=n.id or 0, alert_id=n.alert_id, receiver=r.name, next_at=now,
                        status="silenced" if silenced else "pending",
                    )
                )  # fmt: skip
            n.fanned_out = True
            tx.add(n)
        if fresh:
            tx.commit()

    def _body(self, tx: Session, receiver: Receiver, n: NotificationRow) -> dict[str, Any] | str | None:
        """The body to send; None: nothing for this receiver; a string: why it cannot be built."""
        if n.work_order_id is not None:
            order = tx.get(WorkOrderRow, n.work_order_id)
            entry = tx.get(WorkOrderEntryRow, n.entry_id) if n.entry_id else None
            return (
                "work order no longer there"
                if order is None or entry is None
                else build_page(receiver, n, order, entry)
            )
        alert = tx.get(AlertRow, n.alert_id)
        tr = tx.get(AlertTransitionRow, n.transition_id)
        return "alert no longer there" if alert is None or tr is None else build(receiver, n, alert, tr)

    def _attempt(self, tx: Session, client: httpx.Client, d: DeliveryRow, now: datetime) -> None:
        n = tx.get(NotificationRow, d.notification_id)
        receiver = None if n is None else (self.pagers if n.receiver else self.receivers).get(d.receiver)
        body = (
            self._body(tx, receiver, n) if receiver is not None and n is not None else "receiver no longer configured"
        )
        if body is None or isinstance(body, str):
            d.status, d.last_error = "skipped", body
            tx.add(d)
            return
        assert receiver is not None and n is not None  # noqa: PT018, S101 - body was built from them
        d.attempts += 1
        if receiver.kind == "log":
            log.info("notify %s [%s]: %s", receiver.name, n.key, json.dumps(body, default=str)[:500])
            d.status, d.delivered_at, d.last_error = "delivered", now, None
            self.metrics.notifications_sent.labels(receiver.name).inc()
            tx.add(d)
            return
        assert receiver.url is not None  # noqa: S101 - validated: every kind but log has one
        try:
            r = client.post(receiver.url, json=body, headers={"Idempotency-Key": n.key}, timeout=receiver.timeout_s)
            ok, error = r.is_success, None if r.is_success else f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"[:300]
        if ok:
            d.status, d.delivered_at, d.last_error = "delivered", now, None
            self.metrics.notifications_sent.labels(receiver.name).inc()
        else:
            d.last_error = error
            d.next_at = now + timedelta(seconds=min(0.5 * 2 ** (d.attempts - 1), MAX_BACKOFF_S))
            self.metrics.notifications_failed.labels(receiver.name).inc()
            self._quiet.warn(receiver.name, "notification %s to %s failed (%s); retrying", n.key, receiver.name, error)
        tx.add(d)
