"""The notification sender: delivers the outbox to receivers, with retries, never losing one.

Each notification (one per alert transition, written with the transition) is fanned out to the
receivers whose severity filter admits it, as one delivery each. Every receiver is a lane of its
own, run side by side with the others: a receiver that fails, or hangs until its timeout, holds
up nobody else's deliveries (a technician's page included). A transient failure (5xx, 408, 425,
429, a timeout, a refused connection) is retried with exponential backoff (capped at 5 minutes;
`Retry-After` is honoured) until the receiver answers 2xx or the delivery is older than the
maximum age (`IOTGW_NOTIFY_MAX_AGE_S`, 24 h): a receiver that is down for a while gets
everything when it is back. A permanent one (any other 4xx: the receiver refuses this request
and would refuse it again; a URL that cannot be requested) fails the delivery at once, with the
status and the start of the answer, and is not retried. Every request carries the
notification's `Idempotency-Key` (the same on every retry), so a receiver can drop a duplicate.

Work-order notifications (alerts/dispatch/consumer.py) go through the same outbox but page one person:
they name their receiver, and silences do not apply to them (a trapped passenger is never quiet).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from alerts.dispatch.orders import WorkOrderEntryRow, WorkOrderRow
from alerts.metrics import AlertFamilies
from alerts.notify import groups, mail, push
from alerts.notify.alertmanager import AlertmanagerSync
from alerts.notify.bodies import Links, build, build_page, cloudevent_request
from alerts.notify.http import OUTCOME_RANK, Request, post, readable
from alerts.notify.push import Push
from alerts.notify.receivers import Receiver
from alerts.tables import (
    OPEN,
    AlertDeviceRow,
    AlertRow,
    AlertTransitionRow,
    DeliveryRow,
    NotificationGroupRow,
    NotificationRow,
    SilenceRow,
)
from gateway.errors import StoreError
from gateway.log import Store, event_at
from gateway.logs import QuietLog
from gateway.runtime.leases import Hold, Lease, release_now
from gateway.runtime.loop import WakeLoop

log = logging.getLogger(__name__)


MAX_BACKOFF_S = 300.0


LANE_BATCH = 100  # deliveries one lane tries per round at most


Result = tuple[str, str | None, float | None]  # a try's outcome, error and Retry-After


FAILURE_REASONS = ("rejected", "unreachable", "expired")  # iotgw_notifications_failed_total{reason}


class Notifier:
    """Fans the outbox out to receivers and delivers it; run with `await run()`.

    `receivers` is read on every round, so a roster edited through the API takes effect at once.
    """

    def __init__(  # noqa: PLR0913
        self,
        store: Store,
        receivers: Callable[[], Sequence[Receiver]],
        metrics: AlertFamilies,
        *,
        pagers: Callable[[], Sequence[Receiver]] = list,
        interval_s: float = 0.5,
        lease: Lease | None = None,
        max_age_s: float = 86400.0,
        links: Callable[[], Links] = Links,
    ) -> None:
        self.store = store
        self._receivers = receivers  # every alert notification fans out to these
        self._pagers = pagers  # people's contacts (the roster's): only work-order pages go there
        self.receivers: dict[str, Receiver] = {}
        self.pagers: dict[str, Receiver] = {}
        self.metrics = metrics
        self.max_age_s = max_age_s
        self.links = links  # the staff page's address and the rules (read afresh: they may change)
        self.alertmanager = AlertmanagerSync(store, metrics, links)
        # In a cluster, one instance delivers: the one holding this lease.
        self.lease = lease
        self.wakeloop = WakeLoop("notifications", interval_s, retry_s=interval_s)
        self._quiet = QuietLog(log, every_s=30.0)

    async def run(self) -> None:
        """Deliver until `stop()` (the rounds in hand are finished) or cancelled; then give the lease up.

        Every round fans out what is new; each receiver with deliveries waiting then has a round
        of its own in its own thread, started again once its previous one is over."""
        lanes: dict[str, asyncio.Task[bool]] = {}
        try:
            await self.wakeloop.run(lambda: self._round(lanes))
        finally:
            if lanes:
                await asyncio.wait(lanes.values())  # each ends after the request in hand (its timeout at most)
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self.release)

    async def _round(self, lanes: dict[str, asyncio.Task[bool]]) -> bool:
        names = await asyncio.to_thread(self.fan_out)
        for name in names:
            lane = lanes.get(name)
            if lane is None or lane.done():
                lanes[name] = asyncio.create_task(asyncio.to_thread(self._lane_round, name))
        if self.lease is None or self.lease.held:
            for receiver in self.alertmanager.due(self.receivers.values()):  # the whole state, beside its lane
                sync = lanes.get(f"sync:{receiver.name}")
                if sync is None or sync.done():
                    lanes[f"sync:{receiver.name}"] = asyncio.create_task(
                        asyncio.to_thread(self.alertmanager.round, receiver)
                    )
        return False  # one round a wake-up (or interval)

    def stop(self) -> None:
        """Ask `run` to end after the rounds in hand (their threads hold database sessions)."""
        self.wakeloop.stop()

    def fan_out(self, now: datetime | None = None) -> list[str]:
        """Fan new notifications out to deliveries; the receivers with deliveries pending."""
        now = now or datetime.now(UTC)
        if self.lease is not None and not self._hold_lease():
            return []
        self.receivers = {r.name: r for r in self._receivers()}
        self.pagers = {r.name: r for r in self._pagers()}
        for name in (*self.receivers, *self.pagers):  # series from the start: 0, not absent
            self.metrics.notifications_sent.labels(name)
            self.metrics.notification_retries.labels(name)
            self.metrics.notification_receiver_failing.labels(name)
            for reason in FAILURE_REASONS:
                self.metrics.notifications_failed.labels(name, reason)
        with self.store.session() as tx:
            self._fan_out(tx, now)
            pending = tx.exec(
                select(DeliveryRow.receiver, func.count())
                .where(col(DeliveryRow.status) == "pending")
                .group_by(col(DeliveryRow.receiver))
            ).all()
            grouped = [r.name for r in self.receivers.values() if r.grouped]
            repeating = (
                tx.exec(
                    select(NotificationGroupRow.receiver)
                    .where(col(NotificationGroupRow.receiver).in_(grouped))
                    .distinct()
                ).all()
                if grouped
                else []
            )  # (their open groups are sent again every repeat_interval)
        self.metrics.notifications_pending.set(sum(n for _, n in pending))
        return sorted({name for name, _ in pending} | set(repeating))

    def _lane_round(self, receiver: str) -> bool:
        try:
            return self.deliver_lane(receiver)
        except StoreError as exc:
            self._quiet.warn("store", "notifications to %s: database error: %s", receiver, exc)
        except Exception:  # a bug must not end the sender: said, and tried again next round
            log.exception("notifications to %s: unexpected error", receiver)
        return False

    def deliver_lane(self, receiver: str, now: datetime | None = None) -> bool:
        """Try the due deliveries to one receiver, oldest first; True if any was tried.

        In order per alert: a "resolve" must not overtake the "trigger" it ends (a delivery
        waits while an older one of its alert waits out its backoff). Deliveries waiting out a
        backoff do not hold up due ones of other alerts. Those past the maximum age fail as
        expired without another try. The round ends at the first transient failure: the
        receiver is failing, and the rest of its lane waits for the next round rather than each
        request waiting for the same timeout."""
        if self.lease is not None and not self.lease.held:
            return False
        tried = False
        start = now or datetime.now(UTC)
        mine = (col(DeliveryRow.status) == "pending", col(DeliveryRow.receiver) == receiver)
        with self.store.session() as tx:
            self._expire(tx, receiver, start)
            waiting = {
                alert: first
                for alert, first in tx.exec(
                    select(DeliveryRow.alert_id, func.min(DeliveryRow.id))
                    .where(*mine, col(DeliveryRow.next_at) > start)
                    .group_by(col(DeliveryRow.alert_id))
                ).all()
                if first is not None
            }
            grouped = self.receivers.get(receiver)
            grouped = grouped if grouped is not None and grouped.grouped else None
            one_by_one = select(DeliveryRow).where(*mine, col(DeliveryRow.next_at) <= start)
            if grouped is not None:  # its alerts' notifications go in groups; pages one by one, at once
                one_by_one = one_by_one.where(
                    col(DeliveryRow.notification_id).in_(
                        select(NotificationRow.id).where(col(NotificationRow.work_order_id).is_not(None))
                    )
                )
            due = tx.exec(
                one_by_one.order_by(col(DeliveryRow.id))
                .limit(LANE_BATCH)
                # PostgreSQL: rows another instance has in hand (one that froze mid-round, say)
                # are left to it, not sent a second time while it holds them.
                .with_for_update(skip_locked=True)
            ).all()
            for d in due:
                if self.wakeloop.stopped:
                    break
                own = d.id or 0
                first = waiting.get(d.alert_id)
                if first is not None and first < own:
                    continue
                # Still ours, before the request and before writing its outcome (read, not renewed:
                # a lock held across the request would hold up every other lane): an instance that
                # lost the lease, having stalled, sends nothing more and writes over nothing.
                if not self._still_delivering(tx, receiver):
                    break
                tried = True
                transient = self._attempt(tx, d, now or datetime.now(UTC))
                if not self._still_delivering(tx, receiver):
                    tx.rollback()
                    break
                tx.commit()  # one delivery's outcome at a time: a crash repeats at most one request
                if d.status == "pending":
                    waiting[d.alert_id] = min(first or own, own)
                if transient:
                    return True
            if grouped is not None and not self.wakeloop.stopped:
                tried = self._deliver_groups(tx, grouped, start, now) or tried
        return tried

    def _deliver_groups(self, tx: Session, receiver: Receiver, start: datetime, now: datetime | None) -> bool:
        """A grouped receiver's due groups, each as one message (alerts/notify/groups.py); then
        the repeats of groups still open. True if any was tried."""
        rows = tx.exec(
            select(DeliveryRow, AlertRow)
            .join(NotificationRow, col(NotificationRow.id) == col(DeliveryRow.notification_id))
            .outerjoin(AlertRow, col(AlertRow.id) == col(DeliveryRow.alert_id))
            .where(
                col(DeliveryRow.status) == "pending",
                col(DeliveryRow.receiver) == receiver.name,
                col(NotificationRow.work_order_id).is_(None),
            )
            .order_by(col(DeliveryRow.id))
            .limit(groups.GROUP_BATCH)
            .with_for_update(skip_locked=True, of=DeliveryRow)  # (PostgreSQL: as the lane's, above)
        ).all()
        mine = col(NotificationGroupRow.receiver) == receiver.name
        existing = {g.key: g for g in tx.exec(select(NotificationGroupRow).where(mine))}
        types = self._types(tx, {a.device_id for _, a in rows if a is not None})
        pending: dict[str, list[tuple[DeliveryRow, AlertRow]]] = {}
        gone = [d for d, alert in rows if alert is None]
        for d, alert in rows:
            if alert is not None:
                key = groups.key(groups.labels(receiver, alert, types.get(alert.device_id)))
                pending.setdefault(key, []).append((d, alert))
        for d in gone:
            d.status, d.last_error = "skipped", "alert no longer there"
            tx.add(d)
        if gone:
            tx.commit()
        repeats = [g for k, g in existing.items() if k not in pending and self._repeat_due(receiver, g, start)]
        tried = False
        for key, items in pending.items():
            group = existing.get(key)
            first = min(d.created_at or d.next_at for d, _ in items)
            sent_at, retry_at = (group.sent_at, group.next_at) if group is not None else (None, None)
            if start < groups.due(receiver, first, sent_at, retry_at):
                continue
            if self.wakeloop.stopped or not self._still_delivering(tx, receiver.name):
                return tried
            if group is None:
                group = NotificationGroupRow(receiver=receiver.name, key=key)
                tx.add(group)
                # Committed before the send: its id (the message's key and thread, its link) is
                # the same when a crash makes the message go again.
                tx.commit()
            tried = True
            ds, changed = [d for d, _ in items], list({a.id: a for _, a in items}.values())  # an alert once
            if self._send_group(tx, receiver, group, ds, changed, now or datetime.now(UTC)):
                return tried
        for group in repeats:
            if self.wakeloop.stopped or not self._still_delivering(tx, receiver.name):
                return tried
            tried = True
            if self._send_group(tx, receiver, group, [], [], now or datetime.now(UTC)):
                return tried
        return tried

    @staticmethod
    def _repeat_due(receiver: Receiver, group: NotificationGroupRow, now: datetime) -> bool:
        if group.sent_at is None or now < group.sent_at + timedelta(seconds=receiver.repeat_s):
            return False
        return group.next_at is None or now >= group.next_at

    @staticmethod
    def _types(tx: Session, devices: set[str]) -> dict[str, str | None]:
        if not devices:
            return {}
        found = tx.exec(
            select(AlertDeviceRow.device_id, AlertDeviceRow.type).where(col(AlertDeviceRow.device_id).in_(devices))
        )
        return dict(found.all())

    def _send_group(  # noqa: PLR0913, PLR0917
        self,
        tx: Session,
        receiver: Receiver,
        group: NotificationGroupRow,
        ds: list[DeliveryRow],
        changed: list[AlertRow],
        now: datetime,
    ) -> bool:
        """One message of `group`: the alerts whose deliveries `ds` it carries (`changed`) and
        those still open from its earlier messages (a repeat, with no `ds`: those alone, less the
        silenced); committed with its outcome. True when it failed for now (the round ends)."""
        listed, held = self._listed(tx, group, changed, repeat=not ds, now=now)
        # The same on every try of the same message; another when what it says has changed.
        said = hashlib.sha256(",".join(f"{a.id}:{a.status}" for a in listed).encode()).hexdigest()[:12]
        key = f"iotgw-group-{group.id}-{group.messages + 1}-{said}"
        request: Request | EmailMessage | Push | str | None = None
        if listed and not (receiver.kind == "alertmanager-webhook" and ds and self._only_acks(tx, ds)):
            try:
                request = self._group_request(tx, receiver, group, listed, now)
            except Exception as exc:  # as for one notification: this message fails, not the lane
                log.exception("notifications to %s: a message of group %s cannot be built", receiver.name, group.key)
                request = f"its message cannot be built: {type(exc).__name__}: {exc}"[:300]
        if request is None:  # nothing to say: its alerts are gone, or only acknowledged (Alertmanager's format)
            for d in ds:
                d.status, d.last_error = "skipped", "nothing this receiver's format says of it"
                tx.add(d)
            self._settle(tx, group, [*listed, *held], now, sent=False)
            if not ds and held:
                group.sent_at = now  # a repeat with all of it held: the next one, a repeat_interval on
            tx.commit()
            return False
        if isinstance(request, str):
            result: Result = ("rejected", request, None)
        else:
            for d in ds:
                d.attempts += 1
            tries = max((d.attempts for d in ds), default=group.attempts + 1)
            result = self._send(patient(receiver, tries), request, key)
            if not self._still_delivering(tx, receiver.name):
                tx.rollback()
                return True
        transient = self._group_outcome(tx, receiver, group, ds, [*listed, *held], key, result, now)
        if isinstance(request, EmailMessage):
            for d in ds:
                d.sent_as = str(request["Message-ID"])  # what a mail log knows it by
        tx.commit()
        return transient

    def _listed(
        self, tx: Session, group: NotificationGroupRow, changed: list[AlertRow], *, repeat: bool, now: datetime
    ) -> tuple[list[AlertRow], list[AlertRow]]:
        """What a message of `group` lists (`changed`, and its earlier ones still open), and what
        it leaves out for now but the group keeps: in a repeat, the open alerts a silence holds
        (in the group's repeats again once it is over)."""
        ids = {a.id for a in changed}
        earlier = [i for i in group.open if i not in ids]
        still = [a for a in tx.exec(select(AlertRow).where(col(AlertRow.id).in_(earlier))) if a.status in OPEN]
        held: list[AlertRow] = []
        if repeat:
            silences = list(tx.exec(select(SilenceRow).where(col(SilenceRow.ends_at) > now)))
            held = [a for a in still if any(s.matches(a, now) for s in silences)]
            still = [a for a in still if all(a.id != h.id for h in held)]
        return groups.ordered([*changed, *still]), held

    def _group_outcome(  # noqa: PLR0913, PLR0917
        self,
        tx: Session,
        receiver: Receiver,
        group: NotificationGroupRow,
        ds: list[DeliveryRow],
        listed: list[AlertRow],
        key: str,
        result: Result,
        now: datetime,
    ) -> bool:
        """A group message's outcome into its deliveries and the group; True when it is to be retried."""
        outcome, error, _ = result
        if ds:
            transient = self._outcome(tx, ds, receiver, key, result, now)
        else:  # a repeat: no delivery of its own
            transient = outcome == "transient"
            self.metrics.notification_receiver_failing.labels(receiver.name).set(int(outcome != "delivered"))
            if transient:
                self.metrics.notification_retries.labels(receiver.name).inc()
            if outcome != "delivered":
                self._quiet.warn(receiver.name, "notification %s to %s failed (%s)", key, receiver.name, error)
        if outcome == "delivered":
            self._settle(tx, group, listed, now, sent=True)
            return False
        if transient:
            group.attempts += 1
            group.next_at = ds[0].next_at if ds else now + timedelta(seconds=backoff(group.attempts))
            group.last_error = error
            tx.add(group)
            return True
        # Failed for good: its alerts stay the group's, listed in its next message or repeat
        # (a repeat_interval on).
        self._settle(tx, group, listed, now, sent=False)
        group.sent_at, group.last_error = now, error
        return False

    @staticmethod
    def _only_acks(tx: Session, ds: list[DeliveryRow]) -> bool:
        ids = [d.notification_id for d in ds]
        return all(
            s == "acknowledged" for s in tx.exec(select(NotificationRow.status).where(col(NotificationRow.id).in_(ids)))
        )

    @staticmethod
    def _settle(tx: Session, group: NotificationGroupRow, listed: list[AlertRow], now: datetime, *, sent: bool) -> None:
        """After a message (or none needed): the group's open alerts; a group with none ends."""
        group.open = [a.id for a in listed if a.status in OPEN and a.id is not None]
        group.attempts, group.next_at, group.last_error = 0, None, None
        if sent:
            group.sent_at, group.messages = now, group.messages + 1
        if group.open:
            tx.add(group)
        else:
            tx.delete(group)

    def _group_request(
        self, tx: Session, receiver: Receiver, group: NotificationGroupRow, listed: list[AlertRow], now: datetime
    ) -> Request | EmailMessage | Push:
        """The message of a group listing `listed`, in the receiver's kind."""
        links = self.links()
        values = groups.unkey(group.key)
        devices = {
            r.device_id: r
            for r in tx.exec(
                select(AlertDeviceRow).where(col(AlertDeviceRow.device_id).in_({a.device_id for a in listed}))
            )
        }
        if receiver.kind == "alertmanager-webhook":
            body = groups.am_webhook(receiver, group.key, values, listed, devices, links)
            return json.dumps(body, separators=(",", ":")).encode(), {"Content-Type": "application/json"}
        firing = any(a.status in groups.FIRING for a in listed)
        ack = links.ack("group", group.id, receiver.name, now) if firing else None
        facts = groups.facts(listed, devices, values, links, ack)
        if receiver.kind == "apprise":
            return push.push(receiver, facts, grouped=True)
        if receiver.kind == "log":
            return f"group {values}: {facts['summary']}".encode(), {}
        thread = f"iotgw.group-{group.id}"
        own = thread if group.messages == 0 else f"{thread}.{group.messages + 1}"
        return mail.message(receiver, facts, own, None if group.messages == 0 else thread, now, grouped=True)

    def _still_delivering(self, tx: Session, receiver: str) -> bool:
        if self.lease is None or self.lease.confirmed(tx):
            return True
        log.info("notifications to %s: the lease %s is another instance's now; its lane is left to it",
                 receiver, self.lease.name)  # fmt: skip
        return False

    def _expire(self, tx: Session, receiver: str, now: datetime) -> None:
        """Fail the receiver's deliveries older than the maximum age, without another try."""
        old = tx.exec(
            select(DeliveryRow).where(
                col(DeliveryRow.status) == "pending",
                col(DeliveryRow.receiver) == receiver,
                col(DeliveryRow.created_at) <= now - timedelta(seconds=self.max_age_s),
            )
        ).all()
        for d in old:
            d.status = "failed"
            d.last_error = f"{d.last_error or 'not delivered'}; retried for {self.max_age_s:g} s"
            tx.add(d)
            self.metrics.notifications_failed.labels(receiver, "expired").inc()
        grouped = self.receivers.get(receiver)
        if old and grouped is not None and grouped.grouped:
            self._keep_in_groups(tx, grouped, old, now)
        if old:
            tx.commit()
            self._quiet.warn(receiver, "%d notifications to %s expired undelivered", len(old), receiver)

    def _keep_in_groups(self, tx: Session, receiver: Receiver, expired: Sequence[DeliveryRow], now: datetime) -> None:
        """The open alerts of a grouped receiver's expired deliveries stay in their groups, as
        after a message refused for good: its next message or repeat (a repeat_interval on) lists them."""
        ids = {d.alert_id for d in expired}
        alerts = [a for a in tx.exec(select(AlertRow).where(col(AlertRow.id).in_(ids))) if a.status in OPEN]
        types = self._types(tx, {a.device_id for a in alerts})
        mine = col(NotificationGroupRow.receiver) == receiver.name
        existing = {g.key: g for g in tx.exec(select(NotificationGroupRow).where(mine))}
        for a in alerts:
            key = groups.key(groups.labels(receiver, a, types.get(a.device_id)))
            group = existing.setdefault(key, NotificationGroupRow(receiver=receiver.name, key=key))
            if a.id is not None and a.id not in group.open:
                group.open = [*group.open, a.id]
            group.sent_at = now  # (its repeat a repeat_interval on, as after a message refused for good)
            group.attempts, group.next_at = 0, None
            tx.add(group)

    def release(self) -> None:
        """Give the lease up (a clean stop: another instance may deliver at once)."""
        if self.lease is not None:
            release_now(self.lease, self.store.session)

    def _hold_lease(self) -> bool:
        assert self.lease is not None  # noqa: S101
        held = self.lease.hold(self.store.session)
        if held is Hold.TAKEN:
            log.info("notifications are delivered by %s", self.lease.owner)
        return bool(held)

    def _fan_out(self, tx: Session, now: datetime) -> None:
        fresh = tx.exec(
            select(NotificationRow)
            .where(col(NotificationRow.fanned_out).is_(False))
            .order_by(col(NotificationRow.id))  # a resolve's deliveries after its trigger's
            .limit(500)
        ).all()
        silences = list(tx.exec(select(SilenceRow).where(col(SilenceRow.ends_at) > now))) if fresh else []
        for n in fresh:
            if n.receiver is not None:  # a page for one person (dispatch): no fan-out, no silences
                tx.add(
                    DeliveryRow(
                        notification_id=n.id or 0, alert_id=n.alert_id, receiver=n.receiver, next_at=now, created_at=now
                    )
                )
                n.fanned_out = True
                tx.add(n)
                continue
            alert = tx.get(AlertRow, n.alert_id)
            # A silence applies to what would be sent while it lasts (transition times are device times).
            silenced = alert is not None and any(s.matches(alert, now) for s in silences)
            for r in self.receivers.values():
                if alert is None or (r.severities is not None and alert.severity not in r.severities):
                    continue
                # What a receiver was told, it is told the end of: an alert it knows of (a PagerDuty
                # incident, say) is not left open by a silence that came after.
                told = (
                    silenced
                    and tx.exec(
                        select(DeliveryRow.id)
                        .where(
                            col(DeliveryRow.alert_id) == n.alert_id,
                            col(DeliveryRow.receiver) == r.name,
                            col(DeliveryRow.status).not_in(("silenced", "skipped")),
                        )
                        .limit(1)
                    ).first()
                    is not None
                )
                tx.add(
                    DeliveryRow(
                        notification_id=n.id or 0, alert_id=n.alert_id, receiver=r.name, next_at=now, created_at=now,
                        status="silenced" if silenced and not told else "pending",
                    )
                )  # fmt: skip
            n.fanned_out = True
            tx.add(n)
        released = self._release(tx, now)
        if fresh or released:
            if self.lease is not None:
                self.lease.fence(tx)  # committed only while the lease is ours: a stale instance writes nothing
            tx.commit()
        if released:
            log.info("%d notifications held back by a silence are sent now that it is over", released)

    def _release(self, tx: Session, now: datetime) -> int:
        """Deliveries a silence held back, of alerts still open that no silence holds now: pending
        again, to go out at once (a receiver learns of an alert still firing when the silence or
        maintenance window is over). Those of alerts that resolved meanwhile stay held."""
        held = tx.exec(
            select(DeliveryRow, AlertRow)
            .join(AlertRow, col(AlertRow.id) == col(DeliveryRow.alert_id))
            .where(col(DeliveryRow.status) == "silenced", col(AlertRow.status).in_(OPEN))
            .order_by(col(DeliveryRow.id))
        ).all()
        if not held:
            return 0
        silences = list(tx.exec(select(SilenceRow).where(col(SilenceRow.ends_at) > now)))
        released = 0
        for d, alert in held:
            if d.receiver in self.receivers and not any(s.matches(alert, now) for s in silences):
                d.status, d.next_at = "pending", min(d.next_at, now)  # due since it was made
                tx.add(d)
                released += 1
        return released

    def _request(
        self, tx: Session, receiver: Receiver, n: NotificationRow
    ) -> Request | EmailMessage | Push | str | None:
        """The request (body, headers) to send, the e-mail or the apprise message; None: nothing for
        this receiver; a string: why it cannot be built."""
        if receiver.kind in ("email", "apprise"):
            return self._mail(tx, receiver, n)
        return self._http_request(tx, receiver, n)

    def _http_request(self, tx: Session, receiver: Receiver, n: NotificationRow) -> Request | str | None:
        if receiver.kind in ("webhook", "log"):
            stored = event_at(tx, n.event_position) if n.event_position is not None else None
            if stored is None:
                return "its event is not in the log"
            return cloudevent_request(receiver, stored.to_cloudevent())
        body: dict[str, Any] | list[dict[str, Any]] | None
        links = self.links()
        rows = _rows(tx, n)
        if isinstance(rows, str):
            return rows
        if n.work_order_id is not None:
            order, entry = rows
            body = build_page(receiver, n, order, entry, links)
        else:
            alert, tr = rows
            seen = tx.get(AlertDeviceRow, alert.device_id)
            body = build(receiver, n, alert, tr, links, seen.type if seen is not None else None)
        if body is None:
            return None
        return json.dumps(body, separators=(",", ":")).encode(), {"Content-Type": "application/json"}

    def _mail(self, tx: Session, receiver: Receiver, n: NotificationRow) -> EmailMessage | Push | str:
        """The e-mail of a notification, threaded under the first one of its alert (a page: of its
        work order and person); or its apprise message."""
        links = self.links()
        rows = _rows(tx, n)
        if isinstance(rows, str):
            return rows
        if n.work_order_id is not None:
            order, entry = rows
            facts = mail.page_facts(n, order, entry, links)
            same = (col(NotificationRow.work_order_id) == order.id, col(NotificationRow.person) == n.person)
            thread = f"iotgw.order-{order.id}.{n.person or 'all'}"
        else:
            alert, tr = rows
            facts = mail.alert_facts(n, alert, tr, tx.get(AlertDeviceRow, alert.device_id), links, receiver.name)
            same = (col(NotificationRow.alert_id) == alert.id, col(NotificationRow.work_order_id).is_(None))
            thread = f"iotgw.alert-{alert.id}"
        if receiver.kind == "apprise":
            return push.push(receiver, facts)
        first = tx.exec(select(func.min(NotificationRow.id)).where(*same)).one()
        root = first is None or first == n.id
        own = thread if root else n.key  # (iotgw-alert-... or iotgw-workorder-...: ours, and unique)
        return mail.message(receiver, facts, own, None if root else thread, datetime.now(UTC))

    def _attempt(self, tx: Session, d: DeliveryRow, now: datetime) -> bool:
        """One try of `d` (its outcome in `tx`); True when it failed for now and is to be retried."""
        n = tx.get(NotificationRow, d.notification_id)
        receiver = None if n is None else (self.pagers if n.receiver else self.receivers).get(d.receiver)
        request = self._built(tx, d, receiver, n)
        if request is None:
            return False  # settled without a try: skipped or failed
        assert receiver is not None and n is not None  # noqa: PT018, S101 - the request was built from them
        if receiver.kind == "alertmanager" and n.work_order_id is None and self._silenced_now(tx, n.alert_id, now):
            d.status = "silenced"  # a retry sends the current state: not while a silence of ours covers it
            tx.add(d)
            return False
        d.attempts += 1
        transient = self._outcome(
            tx, [d], receiver, n.key, self._send(patient(receiver, d.attempts), request, n.key), now
        )
        if isinstance(request, EmailMessage):
            d.sent_as = str(request["Message-ID"])  # what a mail log knows it by
        return transient

    def _built(
        self, tx: Session, d: DeliveryRow, receiver: Receiver | None, n: NotificationRow | None
    ) -> Request | EmailMessage | Push | None:
        """What to send for `d`; None when there is nothing (`d` skipped) or it cannot be built
        (`d` failed: the lane goes on with the next)."""
        try:
            request = (
                self._request(tx, receiver, n)
                if receiver is not None and n is not None
                else "receiver no longer configured"
            )
        except Exception as exc:  # a bug or a fact no message can carry: this one fails, not the lane
            log.exception("notification %s to %s: its message cannot be built", d.notification_id, d.receiver)
            d.status, d.last_error = "failed", f"its message cannot be built: {type(exc).__name__}: {exc}"[:300]
            tx.add(d)
            self.metrics.notifications_failed.labels(d.receiver, "rejected").inc()
            return None
        if request is None or isinstance(request, str):
            d.status, d.last_error = "skipped", request
            tx.add(d)
            return None
        return request

    @staticmethod
    def _send(receiver: Receiver, request: Request | EmailMessage | Push, key: str) -> Result:
        """Send once: (outcome, error, retry after), as `alerts.notify.http.post` says it."""
        if isinstance(request, EmailMessage):
            return mail.send(receiver, request)
        if isinstance(request, Push):
            return push.send(receiver, request)
        content, headers = request
        if receiver.kind == "log":
            log.info("notify %s: %s", receiver.name, readable(content))
            return "delivered", None, None
        # Every target (both of an Alertmanager HA pair) must take it; the worst outcome counts.
        results = [post(url, content, {**headers, "Idempotency-Key": key}, receiver.timeout_s)
                   for url in receiver.targets]  # fmt: skip
        return max(results, key=lambda x: OUTCOME_RANK[x[0]])

    def _outcome(  # noqa: PLR0913, PLR0917
        self,
        tx: Session,
        ds: Sequence[DeliveryRow],
        receiver: Receiver,
        key: str,
        result: Result,
        now: datetime,
    ) -> bool:
        """The try's outcome into the deliveries it carried (one, or a group's); True when it
        failed for now and is to be retried."""
        outcome, error, retry_after = result
        for d in ds:
            d.sent_as = key
            tx.add(d)
        if outcome == "delivered":
            for d in ds:
                self._delivered(d, receiver, now)
            return False
        self.metrics.notification_receiver_failing.labels(receiver.name).set(1)
        first = min(d.created_at or d.next_at for d in ds)
        if outcome == "transient" and (now - first).total_seconds() >= self.max_age_s:
            outcome, error = "expired", f"{error}; retried for {self.max_age_s:g} s"
        for d in ds:
            d.last_error = error
        if outcome != "transient":
            for d in ds:
                d.status = "failed"
            self.metrics.notifications_failed.labels(receiver.name, outcome).inc(len(ds))
            self._quiet.warn(receiver.name, "notification %s to %s failed for good: %s", key, receiver.name, error)
            return False
        wait = max(backoff(max(d.attempts for d in ds)), min(retry_after or 0.0, MAX_BACKOFF_S))
        next_at = now + timedelta(seconds=wait)
        for d in ds:
            d.next_at = next_at
        self.metrics.notification_retries.labels(receiver.name).inc()
        self._quiet.warn(receiver.name, "notification %s to %s failed (%s); retrying", key, receiver.name, error)
        return True

    @staticmethod
    def _silenced_now(tx: Session, alert_id: int, now: datetime) -> bool:
        alert = tx.get(AlertRow, alert_id)
        if alert is None or alert.status == "resolved":
            return False  # an end is always told
        silences = tx.exec(select(SilenceRow).where(col(SilenceRow.ends_at) > now))
        return any(s.matches(alert, now) for s in silences)

    def _delivered(self, d: DeliveryRow, receiver: Receiver, now: datetime) -> None:
        d.status, d.delivered_at, d.last_error = "delivered", now, None
        self.metrics.notifications_sent.labels(receiver.name).inc()
        self.metrics.notification_receiver_failing.labels(receiver.name).set(0)


PATIENT_MAX_S = 60.0  # the longest a retry to a receiver without an idempotency key waits


def patient(receiver: Receiver, attempts: int) -> Receiver:
    """The receiver as its `attempts`-th try sees it: e-mail and apprise have no idempotency
    key, so a service slower than `timeout_s` that took the message anyway would get it again
    at every retry; each retry waits twice as long as the one before (up to PATIENT_MAX_S)."""
    if receiver.kind not in ("email", "apprise") or attempts <= 1 or receiver.timeout_s >= PATIENT_MAX_S:
        return receiver
    longer = min(receiver.timeout_s * 2.0 ** (attempts - 1), PATIENT_MAX_S)
    return receiver.model_copy(update={"timeout_s": longer})


def backoff(attempts: int) -> float:
    """Seconds to wait after the `attempts`-th failed try in a row: 0.5, 1, 2... up to MAX_BACKOFF_S."""
    return min(0.5 * 2.0 ** (max(attempts, 1) - 1), MAX_BACKOFF_S)


def _rows(tx: Session, n: NotificationRow) -> tuple[Any, Any] | str:
    """What a notification speaks of: its work order and step (a page), or its alert and
    transition; or why they cannot be had."""
    if n.work_order_id is not None:
        order = tx.get(WorkOrderRow, n.work_order_id)
        entry = tx.get(WorkOrderEntryRow, n.entry_id) if n.entry_id else None
        return "work order no longer there" if order is None or entry is None else (order, entry)
    alert = tx.get(AlertRow, n.alert_id)
    tr = tx.get(AlertTransitionRow, n.transition_id)
    return "alert no longer there" if alert is None or tr is None else (alert, tr)
