"""Alerts: list, detail with history, acknowledge, resolve; and the rules in force."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import ColumnElement
from sqlmodel import Session, col, select

from alerts.lifecycle import AlertActionError, act_by_hand
from alerts.tables import OPEN, AlertRow, AlertStatus, AlertTransitionRow, DeliveryRow, NotificationRow
from gateway.api.auth import TECHNICIAN
from gateway.api.deps import MAX_ROW_ID, RowId, Since, StoreDep, Until, changed, filtered, within
from gateway.api.pages import Cursor, Limit, Page, id_cursor, page_of, whole
from gateway.core.clock import utcnow

router = APIRouter(prefix="/api", tags=["alerts"])


class AlertPublic(BaseModel):
    """An alert and its current status."""

    id: int
    rule: str
    device_id: str
    site: str | None
    severity: str
    status: str
    summary: str
    fired_at: datetime
    updated_at: datetime
    acked_at: datetime | None
    acked_by: str | None
    resolved_at: datetime | None
    resolved_by: str | None
    note: str | None


class TransitionPublic(BaseModel):
    """One change of status."""

    at: datetime
    from_status: str | None
    to_status: str
    by: str
    note: str | None


class DeliveryPublic(BaseModel):
    """One notification of this alert to one receiver."""

    key: str
    status: str  # the alert status it announces
    receiver: str
    delivery: str  # pending | delivered | failed (last_error says why) | skipped | silenced
    attempts: int
    last_error: str | None
    delivered_at: datetime | None
    sent_as: str | None  # its last try's Idempotency-Key (its own key or its group message's), or Message-ID


def deliveries_of(tx: Session, *where: ColumnElement[bool]) -> list[DeliveryPublic]:
    """The deliveries of the notifications matching `where`, oldest first."""
    rows = tx.exec(
        select(NotificationRow, DeliveryRow)
        .join(DeliveryRow, col(DeliveryRow.notification_id) == col(NotificationRow.id))
        .where(*where)
        .order_by(col(DeliveryRow.id))
    ).all()
    return [
        DeliveryPublic(
            key=n.key, status=n.status, receiver=d.receiver, delivery=d.status, attempts=d.attempts,
            last_error=d.last_error, delivered_at=d.delivered_at, sent_as=d.sent_as,
        )
        for n, d in rows
    ]  # fmt: skip


class AlertDetail(AlertPublic):
    """An alert with its full history and its notifications."""

    history: list[TransitionPublic]
    notifications: list[DeliveryPublic]


class Action(BaseModel):
    """Who does it, and why (a note is required to resolve by hand)."""

    by: str = Field(min_length=1, max_length=100)
    note: str | None = Field(default=None, max_length=2000)


def _public(row: AlertRow) -> AlertPublic:
    return AlertPublic.model_validate(row, from_attributes=True)


@router.get("/alerts")
async def alerts(  # noqa: PLR0913, PLR0917 - one parameter per filter
    store: StoreDep,
    status: Literal["open", "firing", "acknowledged", "flapping", "resolved"] | None = None,
    severity: Literal["critical", "major", "minor", "warning", "info"] | None = None,
    device_id: str | None = None,
    site: str | None = None,
    rule: str | None = None,
    since: Since = None,
    until: Until = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> Page[AlertPublic]:
    """Alerts, newest first; `status=open` means firing or acknowledged; `since`/`until` bound when they fired."""
    before = id_cursor(cursor, MAX_ROW_ID)

    def read() -> list[AlertRow]:
        stmt = filtered(
            select(AlertRow),
            (AlertRow.status, status, OPEN),
            [(AlertRow.severity, severity), (AlertRow.device_id, device_id), (AlertRow.site, site),
             (AlertRow.rule, rule)],
        )  # fmt: skip
        stmt = within(stmt, AlertRow.fired_at, since, until)
        if before is not None:
            stmt = stmt.where(col(AlertRow.id) < before)
        with store.session() as tx:
            return list(tx.exec(stmt.order_by(col(AlertRow.id).desc()).limit(limit + 1)))

    return page_of(await asyncio.to_thread(read), limit, lambda r: str(r.id), _public)


def _detail(store: Any, alert_id: int) -> AlertDetail:  # noqa: ANN401 - Store
    with store.session() as tx:
        row = tx.get(AlertRow, alert_id)
        if row is None:
            raise HTTPException(status_code=404, detail=f"no alert {alert_id}")
        history = tx.exec(
            select(AlertTransitionRow)
            .where(col(AlertTransitionRow.alert_id) == alert_id)
            .order_by(col(AlertTransitionRow.id))
        ).all()
        deliveries = deliveries_of(
            tx, col(NotificationRow.alert_id) == alert_id, col(NotificationRow.work_order_id).is_(None)
        )
        return AlertDetail(
            **_public(row).model_dump(),
            history=[TransitionPublic.model_validate(h, from_attributes=True) for h in history],
            notifications=deliveries,
        )  # fmt: skip


@router.get("/alerts/{alert_id}", responses={404: {"description": "no such alert"}})
async def alert(store: StoreDep, alert_id: RowId) -> AlertDetail:
    """One alert with its history."""
    return await asyncio.to_thread(_detail, store, alert_id)


ACTION_STATUS = {"unknown": 404, "state": 409, "note": 422}


def _act(store: Any, alert_id: int, body: Action, *, to: AlertStatus) -> AlertDetail:  # noqa: ANN401 - Store
    with store.session() as tx:
        try:
            act_by_hand(tx, alert_id, to, by=body.by, note=body.note, at=utcnow())
        except AlertActionError as exc:
            raise HTTPException(status_code=ACTION_STATUS[exc.kind], detail=str(exc)) from None
        tx.commit()
    return _detail(store, alert_id)


@router.post(
    "/alerts/{alert_id}/ack",
    dependencies=TECHNICIAN,
    responses={404: {"description": "no such alert"}, 409: {"description": "not firing"}},
)
async def ack(request: Request, store: StoreDep, alert_id: RowId, body: Action) -> AlertDetail:
    """Acknowledge a firing alert (who, and an optional note)."""
    detail = await asyncio.to_thread(_act, store, alert_id, body, to=AlertStatus.ACKNOWLEDGED)
    changed(request)
    return detail


@router.post(
    "/alerts/{alert_id}/resolve",
    dependencies=TECHNICIAN,
    responses={404: {"description": "no such alert"}, 409: {"description": "not open"}},
)
async def resolve_alert(request: Request, store: StoreDep, alert_id: RowId, body: Action) -> AlertDetail:
    """Resolve an open alert by hand (who, and a required note)."""
    detail = await asyncio.to_thread(_act, store, alert_id, body, to=AlertStatus.RESOLVED)
    changed(request)
    return detail


@router.get("/rules")
async def rules(request: Request) -> Page[dict[str, Any]]:
    """The alert rules in force, the whole list (empty when the alerts consumer is not running)."""
    runner = getattr(request.app.state.iotgw.router, "runners", {}).get("alerts")
    if runner is None:
        return whole([])
    return whole([r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in runner.consumer.rules])
