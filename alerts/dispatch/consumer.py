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
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import event, func
from sqlmodel import Session, col, select

from alerts.dispatch.orders import (
    ACTION_STATUS,
    ALLOWED_FROM,
    OPEN_ORDER,
    STEP_OF_ACTION,
    DispatchError,
    OrderStatus,
    RosterRow,
    UnknownTechnicianError,
    UnknownWorkOrderError,
    WorkOrderAlertRow,
    WorkOrderRow,
    record_step,
)
from alerts.dispatch.roster import (
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
from alerts.lifecycle import acknowledge
from alerts.tables import AlertRow, AlertStatus
from gateway.core.clock import utcnow
from gateway.core.events import Event
from gateway.runtime import BaseConsumer

log = logging.getLogger(__name__)


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
            order.summary = summary[:500]  # the order reads as its most urgent alert
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
                **self._reach(to, order, now),
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
        record_step(tx, order, kind, now, note=note, notify=a.technician, **self._reach(a.technician, order, now))

    def _reach(self, person: Technician | None, order: WorkOrderRow, now: datetime) -> dict[str, Any]:
        """Where a page to this person goes now (the contacts that take the order's priority, out
        of their quiet hours), and which of them opens an incident the order's steps then follow."""
        if person is None:
            return {}
        reach = person.reach(order.priority, now, self.roster.timezone)
        kinds = {r.name: r.kind for r in self.roster.receivers}
        return {"reach": reach, "follow": next((c for c in reach if kinds.get(c) == "pagerduty"), None)}

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
        record_step(tx, order, "renotified", now, note=note, notify=person, **self._reach(person, order, now))

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
        allowed = ALLOWED_FROM[action]
        if order.status not in allowed:
            msg = f"work order {order_id} is {order.status}: cannot {action.replace('_', ' ')}"
            raise DispatchError(msg)
        if self._person(by) is None:  # the record says who did it: a name nobody has is refused
            known = ", ".join(t.id for t in self.roster.technicians)
            msg = f"{by!r} is not in the roster (one of: {known}); choose who you are from it"
            raise UnknownTechnicianError(msg)
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
            order.status = ACTION_STATUS[action]
            order.ack_deadline = None  # somebody has it: escalation stops
            if order.acked_at is None:
                order.acked_at, order.acked_by = now, by
                acknowledge_alerts(tx, order, now, by)
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
            tx, order, STEP_OF_ACTION[action], now, by=by, note=note, notify=notify, **self._reach(notify, order, now)
        )
        return order


def acknowledge_alerts(tx: Session, order: WorkOrderRow, at: datetime, by: str) -> None:
    """One fault episode, one acknowledgement: acknowledging a work order acknowledges its alerts
    that are still firing (or flapping), as the same person."""
    links = tx.exec(
        select(WorkOrderAlertRow).where(
            col(WorkOrderAlertRow.work_order_id) == order.id, col(WorkOrderAlertRow.resolved_at).is_(None)
        )
    ).all()
    for link in links:
        alert = tx.get(AlertRow, link.alert_id)
        if alert is not None and alert.status in (AlertStatus.FIRING.value, AlertStatus.FLAPPING.value):
            acknowledge(tx, alert, at, by, f"with work order #{order.id}")
