"""Maintenance dispatch: a consumer of alert events that opens work orders and gets people moving.

An `alert.firing` event (from the alert engine, through the log) that qualifies opens a work
order for the device, or is attached to the device's open order. The order is assigned at once
to the on-shift person of the first escalation level (fewest open orders wins) and paged through
the notification outbox; not acknowledged by its deadline, it escalates to the next level (the
`tick`, on an injectable clock). Technicians acknowledge, go en route, arrive and resolve with a
callback record (problem found, corrective action). Every step is a timeline entry, a
`workorder.*` event in the log and, when somebody must act, a notification: all in the
transaction of the step, so nothing is half done after a crash.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import JSON, Column, Integer, event, func
from sqlmodel import Field, Session, SQLModel, col, select

from alerts.roster import (
    SHIPPED_ROSTER,
    Assignment,
    Priority,
    Roster,
    RosterError,
    Technician,
    load_roster,
    more_urgent,
    plan,
    priority_of,
    qualifies,
)
from alerts.tables import NotificationRow
from gateway.clock import utcnow
from gateway.errors import GatewayError
from gateway.events import Event
from gateway.router import BaseConsumer
from gateway.store import append_event, datetime_field

log = logging.getLogger(__name__)

WORK_ORDER_SOURCE = "iotgw/dispatch"


class OrderStatus(StrEnum):
    """unassigned (nobody on shift) / assigned -> acknowledged -> en_route -> on_site -> resolved."""

    UNASSIGNED = "unassigned"
    ASSIGNED = "assigned"
    ACKNOWLEDGED = "acknowledged"
    EN_ROUTE = "en_route"
    ON_SITE = "on_site"
    RESOLVED = "resolved"


OPEN_ORDER = tuple(s.value for s in OrderStatus if s is not OrderStatus.RESOLVED)

_version = Column("version", Integer, nullable=False)


class WorkOrderRow(SQLModel, table=True):
    """A work order: one fault episode of one device, and who is on it."""

    __tablename__ = "work_orders"
    # Every update checks the version it read: a technician's click and an escalation that
    # race cannot overwrite each other (the loser gets StaleDataError and retries or reports).
    __mapper_args__ = {"version_id_col": _version}

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True)
    site: str | None = Field(default=None, index=True)
    device_type: str | None = None
    priority: str = Field(index=True)
    status: str = Field(index=True)
    summary: str
    skill: str | None = None
    level: int = 0  # escalation level (0: the first)
    assignee: str | None = Field(default=None, index=True)
    first_alert_id: int
    created_at: datetime = datetime_field(nullable=False)
    updated_at: datetime = datetime_field(nullable=False)
    assigned_at: datetime | None = datetime_field()
    ack_deadline: datetime | None = datetime_field(index=True)
    acked_at: datetime | None = datetime_field()
    acked_by: str | None = None
    recovered_at: datetime | None = datetime_field()
    resolved_at: datetime | None = datetime_field()
    resolved_by: str | None = None
    problem: str | None = None  # the callback record: what was found...
    action: str | None = None  # ...and what was done
    # Who was paged last, and at which contact: their page is followed (acknowledged, resolved,
    # or resolved when the order passes to someone else), so every incident opened is closed.
    paged: str | None = None
    paged_contact: str | None = None
    version: int | None = Field(default=None, sa_column=_version)


class WorkOrderAlertRow(SQLModel, table=True):
    """An alert attached to a work order (each alert to at most one)."""

    __tablename__ = "work_order_alerts"

    alert_id: int = Field(primary_key=True)
    work_order_id: int = Field(index=True)
    rule: str
    severity: str
    summary: str
    attached_at: datetime = datetime_field(nullable=False)
    resolved_at: datetime | None = datetime_field()


class WorkOrderEntryRow(SQLModel, table=True):
    """One step in a work order's timeline."""

    __tablename__ = "work_order_entries"

    id: int | None = Field(default=None, primary_key=True)
    work_order_id: int = Field(index=True)
    at: datetime = datetime_field(nullable=False)
    kind: str  # created, assigned, escalated, renotified, unassigned, acknowledged, en_route, ...
    status: str  # the order's status after this step
    by: str  # "dispatch" or the person
    assignee: str | None = None
    level: int | None = None
    note: str | None = None


class RosterRow(SQLModel, table=True):
    """The roster in force: the file's, or the file's as edited through the API."""

    __tablename__ = "roster"

    id: int = Field(default=1, primary_key=True)
    document: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    file_sha256: str  # of the file it came from: a changed file replaces API edits at start
    updated_at: datetime = datetime_field(nullable=False)
    updated_by: str


class DispatchError(GatewayError):
    """A work-order action that cannot be done now (the caller's mistake: 409)."""


class UnknownWorkOrderError(DispatchError):
    """No such work order (404)."""


class Dispatch(BaseConsumer):
    """Turns alert events into work orders, assigns and escalates them (consumer `dispatch`)."""

    name = "dispatch"
    types = ("alert.*",)
    linger_s = 0.05  # like the alert engine: a trapped passenger waits 50 ms at most for a batch
    tick_s = 1.0

    def __init__(self, roster: Roster | None = None, *, clock: Callable[[], datetime] | None = None) -> None:
        self.roster_path = SHIPPED_ROSTER
        self._file_text = SHIPPED_ROSTER.read_text(encoding="utf-8") if roster is None else None
        self.roster = roster or load_roster(self._file_text or "", str(SHIPPED_ROSTER))
        self.clock: Callable[[], datetime] = clock or utcnow
        self.last_tick: datetime | None = None  # the clock value of the last committed tick

    def configure(self, settings: Any) -> None:  # noqa: ANN401 - gateway.config.Settings
        """Load the configured roster file (or the shipped one)."""
        self.roster_path = Path(settings.roster_file) if settings.roster_file else SHIPPED_ROSTER
        try:
            self._file_text = self.roster_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RosterError(str(self.roster_path), [(None, f"cannot read: {exc.strerror}")]) from None
        self.roster = load_roster(self._file_text, str(self.roster_path))
        log.info("dispatch: %d people from %s", len(self.roster.technicians), self.roster_path)

    def prepare(self, tx: Session) -> None:
        """At start: the roster in force is the file's, unless the API edited it since the file last changed."""
        if self._file_text is None:
            return  # given in code (tests): that roster it is
        sha = hashlib.sha256(self._file_text.encode()).hexdigest()
        row = tx.get(RosterRow, 1)
        if row is not None and row.file_sha256 == sha:
            try:
                self.roster = Roster.model_validate(row.document)
                log.info("dispatch: roster as last edited by %s at %s", row.updated_by, row.updated_at)
            except ValidationError as exc:
                log.warning("dispatch: the stored roster is no longer valid (%s); using %s", exc, self.roster_path)
            else:
                return
        self._store_roster(tx, self.roster, sha, "file")
        tx.commit()

    def _store_roster(self, tx: Session, roster: Roster, sha: str, by: str) -> None:
        document = roster.model_dump(mode="json", by_alias=True, exclude_none=True)
        tx.merge(RosterRow(id=1, document=document, file_sha256=sha, updated_at=utcnow(), updated_by=by))

    def set_technicians(self, tx: Session, technicians: Sequence[dict[str, Any]], by: str) -> Roster:
        """Replace the technicians (validated with the rest of the roster); kept across restarts."""
        document = self.roster.model_dump(mode="json", by_alias=True, exclude_none=True)
        roster = Roster.model_validate({**document, "technicians": list(technicians)})
        row = tx.get(RosterRow, 1)
        self._store_roster(tx, roster, row.file_sha256 if row else "", by)
        tx.commit()
        self.roster = roster
        return roster

    # -- the consumer ------------------------------------------------------------------------------

    def handle(self, events: Sequence[Event], tx: Session) -> None:
        """Open, attach and annotate work orders from alert events."""
        now = self.clock()
        for e in events:
            if e.type == "alert.firing":
                self._on_firing(tx, e, now)
            elif e.type == "alert.resolved":
                self._on_resolved(tx, e, now)

    def tick(self, tx: Session, now: datetime) -> None:
        """Escalate what is overdue; try again to assign orders nobody was on shift for."""
        overdue = tx.exec(
            select(WorkOrderRow)
            .where(col(WorkOrderRow.status) == OrderStatus.ASSIGNED.value, col(WorkOrderRow.ack_deadline) <= now)
            .order_by(col(WorkOrderRow.ack_deadline))
        ).all()
        for order in overdue:
            self._escalate(tx, order, now)
        for order in tx.exec(select(WorkOrderRow).where(col(WorkOrderRow.status) == OrderStatus.UNASSIGNED.value)):
            self._assign(tx, order, 0, now, kind="assigned", quiet=True)
        event.listen(tx, "after_commit", lambda _s: setattr(self, "last_tick", now), once=True)

    def _on_firing(self, tx: Session, e: Event, now: datetime) -> None:
        d = e.data
        alert_id = int(d["alert_id"])
        if tx.get(WorkOrderAlertRow, alert_id) is not None:
            return  # seen already (a replay)
        rule, severity = str(d.get("rule")), str(d.get("severity"))
        device_type = d.get("device_type")
        if not qualifies(self.roster.dispatch, severity=severity, device_type=device_type, rule=rule):
            return
        priority = priority_of(self.roster.dispatch, rule, d.get("state") or {})
        order = tx.exec(
            select(WorkOrderRow).where(
                col(WorkOrderRow.device_id) == e.subject, col(WorkOrderRow.status).in_(OPEN_ORDER)
            )
        ).first()
        summary = str(d.get("summary") or rule)
        if order is None:
            order = WorkOrderRow(
                device_id=e.subject, site=e.site, device_type=device_type, priority=priority.value,
                status=OrderStatus.UNASSIGNED.value, summary=summary[:500], skill=device_type,
                first_alert_id=alert_id, created_at=now, updated_at=now,
            )  # fmt: skip
            tx.add(order)
            tx.flush()
            self._attach(tx, order, alert_id, d, now)
            record_step(tx, order, "created", now, note=f"{priority.value}: {summary}"[:2000])
            self._assign(tx, order, 0, now, kind="assigned")
            return
        self._attach(tx, order, alert_id, d, now)
        order.recovered_at = None  # faulty again
        record_step(tx, order, "alert_attached", now, note=f"alert {alert_id} ({rule}): {summary}"[:2000])
        if more_urgent(priority, Priority(order.priority)):
            order.priority = priority.value
            to = self._person(order.assignee) if order.status == OrderStatus.ASSIGNED.value else None
            if to is not None:
                # A more urgent policy may want a shorter deadline; never a longer one.
                level = self.roster.policy_for(order.site, priority).levels
                timeout = level[min(order.level, len(level) - 1)].ack_timeout
                deadline = now + timedelta(seconds=timeout)
                if order.ack_deadline is None or deadline < order.ack_deadline:
                    order.ack_deadline = deadline
            record_step(
                tx,
                order,
                "priority_raised",
                now,
                note=f"now {priority.value}: {summary}"[:2000],
                notify=to,
                follow=self._follows(to),
            )
        order.updated_at = now
        tx.add(order)

    def _attach(self, tx: Session, order: WorkOrderRow, alert_id: int, d: dict[str, Any], now: datetime) -> None:
        assert order.id is not None  # noqa: S101 - flushed
        tx.add(
            WorkOrderAlertRow(
                alert_id=alert_id, work_order_id=order.id, rule=str(d.get("rule")), severity=str(d.get("severity")),
                summary=str(d.get("summary") or "")[:500], attached_at=now,
            )
        )  # fmt: skip

    def _on_resolved(self, tx: Session, e: Event, now: datetime) -> None:
        link = tx.get(WorkOrderAlertRow, int(e.data["alert_id"]))
        if link is None or link.resolved_at is not None:
            return
        link.resolved_at = e.time
        tx.add(link)
        order = tx.get(WorkOrderRow, link.work_order_id)
        if order is None or order.status not in OPEN_ORDER:
            return
        by = str(e.data.get("by") or "engine")
        tx.flush()
        unresolved = tx.exec(
            select(func.count())
            .select_from(WorkOrderAlertRow)
            .where(col(WorkOrderAlertRow.work_order_id) == order.id, col(WorkOrderAlertRow.resolved_at).is_(None))
        ).one()
        if by == "engine" and unresolved == 0:
            # The device says it is fine again; a technician still has to confirm and record it.
            order.recovered_at = e.time
            order.updated_at = now
            tx.add(order)
            note = f"device recovered (alert {link.alert_id} {link.rule} cleared); open until a technician resolves it"
            record_step(tx, order, "device_recovered", now, note=note)
        else:
            record_step(tx, order, "alert_resolved", now, note=f"alert {link.alert_id} ({link.rule}) resolved by {by}")

    # -- assignment and escalation ---------------------------------------------------------------

    def _person(self, tech_id: str | None) -> Technician | None:
        return self.roster.technician(tech_id) if tech_id else None

    def open_counts(self, tx: Session) -> dict[str, int]:
        """Open work orders per assignee."""
        rows = tx.exec(
            select(WorkOrderRow.assignee, func.count())
            .where(col(WorkOrderRow.status).in_(OPEN_ORDER), col(WorkOrderRow.assignee).is_not(None))
            .group_by(col(WorkOrderRow.assignee))
        ).all()
        return {str(a): int(n) for a, n in rows}

    def _plan(self, tx: Session, order: WorkOrderRow, from_level: int, now: datetime) -> Assignment | None:
        policy = self.roster.policy_for(order.site, Priority(order.priority))
        return plan(
            self.roster,
            policy,
            from_level,
            site=order.site,
            skill=order.skill,
            at=now,
            open_orders=self.open_counts(tx),
        )

    def _assign(  # noqa: PLR0913
        self, tx: Session, order: WorkOrderRow, from_level: int, now: datetime, *, kind: str, quiet: bool = False
    ) -> bool:
        """Give the order to the first level from `from_level` with somebody on shift, and page them."""
        found = self._plan(tx, order, from_level, now)
        if found is None:
            if not quiet:
                order.status, order.assignee, order.ack_deadline, order.updated_at = "unassigned", None, None, now
                tx.add(order)
                note = "nobody on shift at any escalation level; assigned as soon as somebody is"
                record_step(tx, order, "unassigned", now, note=note)
                log.warning("work order %s (%s, %s): nobody on shift", order.id, order.device_id, order.site)
            return False
        self._apply(tx, order, found, now, kind=kind)
        return True

    def _apply(self, tx: Session, order: WorkOrderRow, a: Assignment, now: datetime, *, kind: str) -> None:
        order.level, order.assignee, order.status = a.level, a.technician.id, OrderStatus.ASSIGNED.value
        order.ack_deadline, order.updated_at = a.deadline, now
        order.assigned_at = order.assigned_at or now
        tx.add(order)
        note = f"level {a.level + 1}: {a.technician.role} {a.technician.name}; acknowledge by {a.deadline:%H:%M:%S}Z"
        if a.skipped:
            note += f" (nobody on shift at level {', '.join(str(i + 1) for i in a.skipped)})"
        record_step(tx, order, kind, now, note=note, notify=a.technician, follow=self._follows(a.technician))

    def _follows(self, person: Technician | None) -> bool:
        """Whether a page to this person opens an incident that the order's steps then follow."""
        if person is None:
            return False
        contact = next((r for r in self.roster.receivers if r.name == person.contact), None)
        return contact is not None and contact.kind == "pagerduty"

    def _escalate(self, tx: Session, order: WorkOrderRow, now: datetime) -> None:
        policy = self.roster.policy_for(order.site, Priority(order.priority))
        missed = order.assignee
        found = self._plan(tx, order, order.level + 1, now) if order.level + 1 < len(policy.levels) else None
        if found is not None:
            self._apply(tx, order, found, now, kind="escalated")
            log.info("work order %s escalated to %s (not acknowledged by %s)", order.id, found.technician.id, missed)
            return
        # Nobody further up: page the current level again (from the first level if its person left).
        person = self._person(order.assignee)
        level = min(order.level, len(policy.levels) - 1)
        if person is None or not person.on_shift(now, self.roster.timezone):
            again = self._plan(tx, order, 0, now)
            if again is None:
                self._assign(tx, order, 0, now, kind="renotified")
            else:
                self._apply(tx, order, again, now, kind="renotified")
            return
        order.ack_deadline = now + timedelta(seconds=policy.levels[level].ack_timeout)
        order.updated_at = now
        tx.add(order)
        note = f"still not acknowledged; paging {person.name} again (last level)"
        record_step(tx, order, "renotified", now, note=note, notify=person, follow=self._follows(person))

    # -- people's actions (the API) ----------------------------------------------------------------

    def act(  # noqa: PLR0913
        self,
        tx: Session,
        order_id: int,
        action: str,
        by: str,
        *,
        note: str | None = None,
        problem: str | None = None,
        corrective: str | None = None,
        to: str | None = None,
    ) -> WorkOrderRow:
        """Apply a technician's action; raise `DispatchError` when it does not fit the order's status."""
        order = tx.get(WorkOrderRow, order_id)
        if order is None:
            msg = f"no work order {order_id}"
            raise UnknownWorkOrderError(msg)
        if order.status == OrderStatus.RESOLVED.value:
            msg = f"work order {order_id} is resolved already"
            raise DispatchError(msg)
        allowed = _ALLOWED_FROM[action]
        if order.status not in allowed:
            msg = f"work order {order_id} is {order.status}: cannot {action.replace('_', ' ')}"
            raise DispatchError(msg)
        now = self.clock()
        notify = None
        if action == "reassign":
            person = self._person(to)
            if person is None:
                msg = f"no technician {to!r} in the roster"
                raise DispatchError(msg)
            policy = self.roster.policy_for(order.site, Priority(order.priority))
            level = min(order.level, len(policy.levels) - 1)
            order.assignee, order.status = person.id, OrderStatus.ASSIGNED.value
            order.ack_deadline = now + timedelta(seconds=policy.levels[level].ack_timeout)
            order.acked_at, order.acked_by = None, None
            order.assigned_at = order.assigned_at or now
            note = f"to {person.name}" + (f": {note}" if note else "")
            notify = person
        else:
            order.status = _ACTION_STATUS[action]
            order.ack_deadline = None  # somebody has it: escalation stops
            if order.acked_at is None:
                order.acked_at, order.acked_by = now, by
            if action == "resolve":
                if not (problem and corrective):
                    msg = "resolving needs the problem found and the corrective action (the callback record)"
                    raise DispatchError(msg)
                order.resolved_at, order.resolved_by = now, by
                order.problem, order.action = problem, corrective
                note = f"problem: {problem}; action: {corrective}" + (f"; {note}" if note else "")
        order.updated_at = now
        tx.add(order)
        record_step(
            tx, order, _STEP_OF_ACTION[action], now, by=by, note=note, notify=notify, follow=self._follows(notify)
        )
        return order


_ACTION_STATUS = {
    "acknowledge": OrderStatus.ACKNOWLEDGED.value,
    "en_route": OrderStatus.EN_ROUTE.value,
    "on_site": OrderStatus.ON_SITE.value,
    "resolve": OrderStatus.RESOLVED.value,
}
_ALLOWED_FROM = {
    "acknowledge": (OrderStatus.ASSIGNED.value,),
    "en_route": (OrderStatus.ASSIGNED.value, OrderStatus.ACKNOWLEDGED.value),
    "on_site": (OrderStatus.ASSIGNED.value, OrderStatus.ACKNOWLEDGED.value, OrderStatus.EN_ROUTE.value),
    "resolve": OPEN_ORDER,
    "reassign": OPEN_ORDER,
}
_STEP_OF_ACTION = {
    "acknowledge": "acknowledged", "en_route": "en_route", "on_site": "on_site", "resolve": "resolved",
    "reassign": "reassigned",
}  # fmt: skip


def record_step(  # noqa: PLR0913
    tx: Session,
    order: WorkOrderRow,
    kind: str,
    at: datetime,
    *,
    by: str = "dispatch",
    note: str | None = None,
    notify: Technician | None = None,
    follow: bool = False,
) -> WorkOrderEntryRow:
    """One timeline entry, its `workorder.<kind>` event in the log and, for `notify`, a page."""
    assert order.id is not None  # noqa: S101 - flushed before
    entry = WorkOrderEntryRow(
        work_order_id=order.id, at=at, kind=kind, status=order.status, by=by, assignee=order.assignee,
        level=order.level, note=note,
    )  # fmt: skip
    tx.add(entry)
    tx.flush()
    key = f"iotgw-workorder-{order.id}-{entry.id}"
    data = {
        "work_order_id": order.id, "kind": kind, "status": order.status, "priority": order.priority,
        "summary": order.summary, "device_id": order.device_id, "site": order.site, "assignee": order.assignee,
        "level": order.level, "by": by, "note": note,
        "ack_deadline": _iso(order.ack_deadline),
    }  # fmt: skip
    position = append_event(
        tx, ce_id=key, source=WORK_ORDER_SOURCE, type=f"workorder.{kind}", subject=order.device_id, time=at,
        site=order.site, data=data,
    )  # fmt: skip

    def page(person: str, contact: str, status: str, suffix: str = "") -> None:
        tx.add(
            NotificationRow(
                key=key + suffix, alert_id=order.first_alert_id, transition_id=0, status=status, created_at=at,
                work_order_id=order.id, entry_id=entry.id, receiver=contact, person=person, event_position=position,
            )
        )  # fmt: skip

    previous = (order.paged, order.paged_contact) if order.paged and order.paged_contact else None
    if notify is not None:  # the page is this event (same id), to one person's contact
        if previous is not None and previous != (notify.id, notify.contact):
            # The order is someone else's now, or reaches its person elsewhere (a new contact).
            page(*previous, HANDED_OVER, "-handover")
            order.paged = order.paged_contact = None
        page(notify.id, notify.contact, kind)
        if follow:  # an incident (PagerDuty), to be acknowledged and resolved as the order goes
            order.paged, order.paged_contact = notify.id, notify.contact
        tx.add(order)
    elif previous is not None and kind == "unassigned":
        page(*previous, HANDED_OVER, "-handover")  # nobody has it now: not that person either
        order.paged = order.paged_contact = None
        tx.add(order)
    elif previous is not None and kind in FOLLOWED_STEPS:
        page(*previous, kind)  # the person paged learns the order moved on
        if kind == "resolved":
            order.paged = order.paged_contact = None
            tx.add(order)
    return entry


HANDED_OVER = "handed_over"  # a page's status: the order passed from this person to another
FOLLOWED_STEPS = ("acknowledged", "en_route", "on_site", "resolved")  # told to the person paged


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat().replace("+00:00", "Z")


class WorkOrderMetrics:
    """Work-order gauges and histograms, read from the timeline (the consumer stays metric-free)."""

    def __init__(self, levels: int = 0) -> None:
        self.last_entry = 0
        self.seen_open: set[tuple[str, str]] = set()
        self.levels = levels  # escalation levels of the longest policy: their series exist from the start

    def publish(self, tx: Session, metrics: Any) -> None:  # noqa: ANN401 - alerts.metrics.AlertFamilies
        """Observe the steps written since the last call, and set the open-order gauges."""
        for level in range(1, self.levels + 1):
            metrics.work_order_escalations.labels(str(level))
        rows = tx.exec(
            select(WorkOrderEntryRow, WorkOrderRow)
            .join(WorkOrderRow, col(WorkOrderRow.id) == col(WorkOrderEntryRow.work_order_id))
            .where(col(WorkOrderEntryRow.id) > self.last_entry)
            .order_by(col(WorkOrderEntryRow.id))
        ).all()
        for entry, order in rows:
            spent = max((entry.at - order.created_at).total_seconds(), 0.0)
            if entry.kind == "assigned" and order.assigned_at == entry.at:
                metrics.work_order_time_to_assign.observe(spent)
            elif entry.kind in ("escalated", "renotified"):
                metrics.work_order_escalations.labels(str((entry.level or 0) + 1)).inc()
            if entry.kind in ("acknowledged", "en_route", "on_site", "resolved") and order.acked_at == entry.at:
                metrics.work_order_time_to_ack.observe(spent)
            if entry.kind == "resolved":
                metrics.work_order_time_to_resolve.observe(spent)
            self.last_entry = entry.id or self.last_entry
        counts: dict[tuple[str, str], int] = {}
        for o in tx.exec(select(WorkOrderRow).where(col(WorkOrderRow.status).in_(OPEN_ORDER))):
            k = (o.priority, o.status)
            counts[k] = counts.get(k, 0) + 1
        for k in self.seen_open | set(counts):
            metrics.work_orders_open.labels(*k).set(counts.get(k, 0))
        self.seen_open |= set(counts)
