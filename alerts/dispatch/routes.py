"""Work orders (list, detail with timeline, technicians' actions) and the technician roster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field, StringConstraints, ValidationError
from sqlalchemy import ColumnElement, and_, case, or_
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import Session, col, select

from alerts.dispatch.orders import (
    OPEN_ORDER,
    DispatchError,
    UnknownTechnicianError,
    UnknownWorkOrderError,
    WorkOrderAlertRow,
    WorkOrderEntryRow,
    WorkOrderRow,
)
from alerts.dispatch.roster import Technician
from alerts.routes.alerts import DeliveryPublic, deliveries_of
from alerts.tables import NotificationRow
from gateway.api.auth import ADMIN, TECHNICIAN
from gateway.api.deps import RowId, Since, StoreDep, Until, changed, filtered, within
from gateway.api.pages import Cursor, Limit, Page, bad_cursor, page_of, whole
from gateway.log import Store

router = APIRouter(prefix="/api", tags=["work orders"])


def get_dispatch(request: Request) -> Any:  # noqa: ANN401 - alerts.dispatch.consumer.Dispatch
    """The dispatch consumer (503 when this gateway does not run it)."""
    live = request.app.state.iotgw.router
    runner = live.runners.get("dispatch") if live is not None else None
    if runner is None:
        raise HTTPException(status_code=503, detail="this gateway does not run the dispatch consumer")
    return runner.consumer


DispatchDep = Annotated[Any, Depends(get_dispatch)]
T = TypeVar("T")


class WorkOrderPublic(BaseModel):
    """A work order and where it stands."""

    id: int
    device_id: str
    site: str | None
    device_type: str | None
    priority: str
    status: str
    summary: str
    level: int
    assignee: str | None
    created_at: datetime
    updated_at: datetime
    assigned_at: datetime | None
    ack_deadline: datetime | None
    acked_at: datetime | None
    acked_by: str | None
    recovered_at: datetime | None
    resolved_at: datetime | None
    resolved_by: str | None
    problem: str | None
    action: str | None


class TimelineEntry(BaseModel):
    """One step of a work order."""

    at: datetime
    kind: str
    status: str
    by: str
    assignee: str | None
    level: int | None
    note: str | None


class AttachedAlert(BaseModel):
    """An alert the work order covers."""

    alert_id: int
    rule: str
    severity: str
    summary: str
    attached_at: datetime
    resolved_at: datetime | None


class WorkOrderDetail(WorkOrderPublic):
    """A work order with its timeline, its alerts and the pages sent about it."""

    timeline: list[TimelineEntry]
    alerts: list[AttachedAlert]
    pages: list[DeliveryPublic]


# A record that says something: blank is refused, surrounding spaces are dropped.
Record = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class StepBody(BaseModel):
    """Who does it, with an optional note."""

    by: str = Field(min_length=1, max_length=100)
    note: str | None = Field(default=None, max_length=2000)


class ResolveBody(StepBody):
    """The callback record: what was found and what was done (both required)."""

    problem: Record
    action: Record


class ReassignBody(StepBody):
    """To whom (a technician id)."""

    to: str = Field(min_length=1, max_length=64)


class TechnicianPublic(BaseModel):
    """A person in the roster, whether they are on shift now, and their open work orders."""

    technician: Technician
    on_shift: bool
    open_orders: int


def public(row: WorkOrderRow) -> WorkOrderPublic:
    """The API form of a work order."""
    return WorkOrderPublic.model_validate(row, from_attributes=True)


@router.get("/work-orders")
async def work_orders(  # noqa: PLR0913, PLR0917 - one parameter per filter
    store: StoreDep,
    status: Literal["open", "unassigned", "assigned", "acknowledged", "en_route", "on_site", "resolved"] | None = None,
    priority: Literal["P1", "P2", "P3"] | None = None,
    device_id: str | None = None,
    site: str | None = None,
    assignee: str | None = None,
    since: Since = None,
    until: Until = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> Page[WorkOrderPublic]:
    """Work orders, most urgent open ones first (then newest); `status=open` is everything not resolved;
    `since`/`until` bound when they were opened."""
    after = _order_cursor(cursor)

    def read() -> list[WorkOrderRow]:
        stmt = filtered(
            select(WorkOrderRow),
            (WorkOrderRow.status, status, OPEN_ORDER),
            [(WorkOrderRow.priority, priority), (WorkOrderRow.device_id, device_id), (WorkOrderRow.site, site),
             (WorkOrderRow.assignee, assignee)],
        )  # fmt: skip
        stmt = within(stmt, WorkOrderRow.created_at, since, until)
        if after is not None:
            stmt = stmt.where(_after(*after))
        order = (resolved_rank, col(WorkOrderRow.priority), col(WorkOrderRow.id).desc())
        with store.session() as tx:
            return list(tx.exec(stmt.order_by(*order).limit(limit + 1)))

    return page_of(await asyncio.to_thread(read), limit, _cursor_of, public)


# The list's order: open before resolved, then by priority, then the newest first. A cursor is the
# last row's place in it, `<0|1>.<priority>.<id>`.
resolved_rank = case((col(WorkOrderRow.status) == "resolved", 1), else_=0)
PRIORITIES = ("P1", "P2", "P3")


def _cursor_of(row: WorkOrderRow) -> str:
    return f"{int(row.status == 'resolved')}.{row.priority}.{row.id}"


def _order_cursor(cursor: str | None) -> tuple[int, str, int] | None:
    if cursor is None:
        return None
    rank, _, rest = cursor.partition(".")
    priority, _, order_id = rest.partition(".")
    if rank not in {"0", "1"} or priority not in PRIORITIES or not order_id.isdigit() or len(order_id) > 10:
        raise bad_cursor(cursor)
    return int(rank), priority, int(order_id)


def _after(rank: int, priority: str, order_id: int) -> ColumnElement[bool]:
    """Rows after (rank, priority, id) in the list's order (id descending)."""
    return or_(
        resolved_rank > rank,
        and_(resolved_rank == rank, col(WorkOrderRow.priority) > priority),
        and_(resolved_rank == rank, col(WorkOrderRow.priority) == priority, col(WorkOrderRow.id) < order_id),
    )


def _detail(store: Store, order_id: int) -> WorkOrderDetail:
    with store.session() as tx:
        row = tx.get(WorkOrderRow, order_id)
        if row is None:
            raise HTTPException(status_code=404, detail=f"no work order {order_id}")
        timeline = tx.exec(
            select(WorkOrderEntryRow)
            .where(col(WorkOrderEntryRow.work_order_id) == order_id)
            .order_by(col(WorkOrderEntryRow.id))
        ).all()
        attached = tx.exec(
            select(WorkOrderAlertRow)
            .where(col(WorkOrderAlertRow.work_order_id) == order_id)
            .order_by(col(WorkOrderAlertRow.alert_id))
        ).all()
        return WorkOrderDetail(
            **public(row).model_dump(),
            timeline=[TimelineEntry.model_validate(e, from_attributes=True) for e in timeline],
            alerts=[AttachedAlert.model_validate(a, from_attributes=True) for a in attached],
            pages=deliveries_of(tx, col(NotificationRow.work_order_id) == order_id),
        )


@router.get("/work-orders/{order_id}", responses={404: {"description": "no such work order"}})
async def work_order(store: StoreDep, order_id: RowId) -> WorkOrderDetail:
    """One work order with its timeline and the alerts it covers."""
    return await asyncio.to_thread(_detail, store, order_id)


async def _act(request: Request, store: Store, work: Callable[[Session], T]) -> T:
    """Run an action in a transaction; 404/409 for the caller's mistakes; wake the live views."""

    def run() -> T:
        with store.session() as tx:
            try:
                result = work(tx)
                tx.commit()
            except UnknownWorkOrderError as exc:
                raise HTTPException(status_code=404, detail=str(exc)) from None
            except UnknownTechnicianError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from None
            except DispatchError as exc:
                raise HTTPException(status_code=409, detail=str(exc)) from None
            except StaleDataError:
                raise HTTPException(status_code=409, detail="the work order changed meanwhile; reload") from None
            return result

    result = await asyncio.to_thread(run)
    changed(request)
    return result


_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such work order"},
    409: {"description": "not possible in the order's status"},
    422: {"description": "`by` is nobody in the roster"},
}


async def _step(
    request: Request,
    store: Store,
    dispatch: Any,  # noqa: ANN401 - alerts.dispatch.consumer.Dispatch
    order_id: RowId,
    action: str,
    **kw: Any,  # noqa: ANN401
) -> WorkOrderDetail:
    await _act(request, store, lambda tx: dispatch.act(tx, order_id, action, **kw))
    return await asyncio.to_thread(_detail, store, order_id)


@router.post("/work-orders/{order_id}/ack", dependencies=TECHNICIAN, responses=_RESPONSES)
async def ack(
    request: Request, store: StoreDep, dispatch: DispatchDep, order_id: RowId, body: StepBody
) -> WorkOrderDetail:
    """Acknowledge an assigned work order: escalation stops."""
    return await _step(request, store, dispatch, order_id, "acknowledge", by=body.by, note=body.note)


@router.post("/work-orders/{order_id}/en-route", dependencies=TECHNICIAN, responses=_RESPONSES)
async def en_route(
    request: Request, store: StoreDep, dispatch: DispatchDep, order_id: RowId, body: StepBody
) -> WorkOrderDetail:
    """The technician is on the way (acknowledges too, if not yet)."""
    return await _step(request, store, dispatch, order_id, "en_route", by=body.by, note=body.note)


@router.post("/work-orders/{order_id}/on-site", dependencies=TECHNICIAN, responses=_RESPONSES)
async def on_site(
    request: Request, store: StoreDep, dispatch: DispatchDep, order_id: RowId, body: StepBody
) -> WorkOrderDetail:
    """The technician has arrived."""
    return await _step(request, store, dispatch, order_id, "on_site", by=body.by, note=body.note)


@router.post("/work-orders/{order_id}/resolve", dependencies=TECHNICIAN, responses=_RESPONSES)
async def resolve(
    request: Request, store: StoreDep, dispatch: DispatchDep, order_id: RowId, body: ResolveBody
) -> WorkOrderDetail:
    """Close the order with the callback record (problem found, corrective action)."""
    return await _step(
        request, store, dispatch, order_id, "resolve", by=body.by, note=body.note, problem=body.problem,
        corrective=body.action,
    )  # fmt: skip


@router.post("/work-orders/{order_id}/reassign", dependencies=TECHNICIAN, responses=_RESPONSES)
async def reassign(
    request: Request, store: StoreDep, dispatch: DispatchDep, order_id: RowId, body: ReassignBody
) -> WorkOrderDetail:
    """Give the order to another technician (paged, with a fresh acknowledgement deadline)."""
    return await _step(request, store, dispatch, order_id, "reassign", by=body.by, note=body.note, to=body.to)


def _technicians(store: Store, dispatch: Any) -> Page[TechnicianPublic]:  # noqa: ANN401
    roster = dispatch.roster
    now = dispatch.clock()
    with store.session() as tx:
        counts = dispatch.open_counts(tx)
    return whole(
        [
            TechnicianPublic(technician=t, on_shift=t.on_shift(now, roster.timezone), open_orders=counts.get(t.id, 0))
            for t in roster.technicians
        ]
    )


@router.get("/technicians")
async def technicians(store: StoreDep, dispatch: DispatchDep) -> Page[TechnicianPublic]:
    """The people in the roster (the whole list), who is on shift now, and how many open orders each has."""
    return await asyncio.to_thread(_technicians, store, dispatch)


@router.put("/technicians", dependencies=ADMIN, responses={422: {"description": "the roster would be invalid"}})
async def put_technicians(
    request: Request,
    store: StoreDep,
    dispatch: DispatchDep,
    body: list[dict[str, Any]],
    by: Annotated[str, Query(min_length=1, max_length=100, description="who edits the roster")],
) -> Page[TechnicianPublic]:
    """Replace the technicians (validated with the rest of the roster; kept until the roster file changes)."""

    def write() -> None:
        with store.session() as tx:
            try:
                dispatch.set_technicians(tx, body, by)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ()))
                detail = f"{where}: {first['msg']}" if where else first["msg"]
                raise HTTPException(status_code=422, detail=detail) from None

    await asyncio.to_thread(write)
    # Whichever process (or instance) runs dispatch takes the edited roster on before its next step.
    await request.app.state.iotgw.router.get("dispatch").reload_holder()
    return await asyncio.to_thread(_technicians, store, dispatch)
