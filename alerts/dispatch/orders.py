"""Work orders: their tables, statuses and steps (which step may follow which), each step recorded
in the order's timeline, appended to the log as `workorder.<step>` and paged to its person."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Integer
from sqlmodel import Field, Session, SQLModel

from alerts.dispatch.roster import (
    Technician,
)
from alerts.tables import NotificationRow
from gateway.core.clock import iso_z
from gateway.errors import GatewayError
from gateway.log import append_event, datetime_field

log = logging.getLogger("alerts.dispatch.consumer")


_version = Column("version", Integer, nullable=False)


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


class UnknownTechnicianError(DispatchError):
    """An action in the name of somebody not in the roster (422)."""


class UnknownWorkOrderError(DispatchError):
    """No such work order (404)."""


ACTION_STATUS = {
    "acknowledge": OrderStatus.ACKNOWLEDGED.value,
    "en_route": OrderStatus.EN_ROUTE.value,
    "on_site": OrderStatus.ON_SITE.value,
    "resolve": OrderStatus.RESOLVED.value,
}


ALLOWED_FROM = {
    "acknowledge": (OrderStatus.ASSIGNED.value,),
    "en_route": (OrderStatus.ASSIGNED.value, OrderStatus.ACKNOWLEDGED.value),
    "on_site": (OrderStatus.ASSIGNED.value, OrderStatus.ACKNOWLEDGED.value, OrderStatus.EN_ROUTE.value),
    "resolve": OPEN_ORDER,
    "reassign": OPEN_ORDER,
}


STEP_OF_ACTION = {
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
    reach: Sequence[str] | None = None,
    follow: str | None = None,
) -> WorkOrderEntryRow:
    """One timeline entry, its `workorder.<kind>` event in the log and, for `notify`, a page to
    each of the receivers in `reach` (default: the person's contact); `follow`: the one of them
    whose incident the order's later steps follow (PagerDuty)."""
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
        "ack_deadline": iso_z(order.ack_deadline),
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
    if notify is not None:  # the page is this event (same id), to the person's contacts
        contacts = list(reach) if reach is not None else [notify.contact]
        if previous is not None and (previous[0] != notify.id or (follow is not None and previous[1] != follow)):
            # The order is someone else's now, or reaches its person elsewhere (a new contact).
            page(*previous, HANDED_OVER, "-handover")
            order.paged = order.paged_contact = None
        for i, contact in enumerate(contacts):
            page(notify.id, contact, kind, "" if i == 0 else f"-{contact}")
        if follow is not None:  # an incident (PagerDuty), to be acknowledged and resolved as the order goes
            order.paged, order.paged_contact = notify.id, follow
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
