"""The page an acknowledge link opens (`/ack/<token>`): what it acknowledges and as whom, and a
button that does it (a GET changes nothing: mail scanners and link previews open links too)."""

from __future__ import annotations

import asyncio
import html
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm.exc import StaleDataError
from sqlmodel import Session, col, select

from alerts.dispatch.orders import DispatchError, WorkOrderRow
from alerts.lifecycle import AlertActionError, act_by_hand
from alerts.notify.acklinks import Grant, LinkError, verify
from alerts.notify.groups import FIRING
from alerts.notify.mail import flat
from alerts.tables import AlertRow, AlertStatus, NotificationGroupRow
from gateway.api.deps import changed
from gateway.core.clock import utcnow

router = APIRouter(tags=["acknowledge links"])


def _page(title: str, text: str, *, status: int = 200, button: str | None = None) -> HTMLResponse:
    title, text = flat(title), flat(text)  # (a device's words: no control character of theirs)
    form = f'<form method="post"><button type="submit">{html.escape(button)}</button></form>' if button else ""
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} · iotgw</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem;line-height:1.5;"
        "color:#111;background:#fff}button{font-size:1.2rem;padding:.8rem 1.4rem;border-radius:.4rem;"
        "border:0;background:#0b5fff;color:#fff;min-height:48px}"
        "</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>{form}</main></body></html>"
    )
    return HTMLResponse(
        body, status_code=status, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    )


def _grant(request: Request, token: str) -> Grant | HTMLResponse:
    plugin: Any = request.app.state.iotgw.plugins.get("alerts")
    key = plugin.links().ack_key if plugin is not None else ""
    try:
        return verify(key, token, datetime.now(UTC))
    except LinkError as exc:
        return _page("Link expired" if exc.expired else "Link not valid", str(exc), status=410 if exc.expired else 403)


def _what(request: Request, grant: Grant) -> tuple[str, bool, str]:  # noqa: PLR0911 - one per case
    """What the link is about, whether it can still be acknowledged, and why not."""
    store = request.app.state.iotgw.store
    with store.session() as tx:
        if grant.kind == "group":
            return _what_group(tx, grant)
        if grant.kind == "alert":
            alert = tx.get(AlertRow, grant.id)
            if alert is None:
                return f"Alert {grant.id}", False, "There is no such alert any more."
            what = f"Alert {alert.id}: {alert.summary}"
            if alert.status == AlertStatus.ACKNOWLEDGED:
                return what, False, f"Already acknowledged by {alert.acked_by}."
            if alert.status == AlertStatus.RESOLVED:
                return what, False, "It is resolved."
            return what, True, f"It is {alert.status}, since {alert.fired_at:%Y-%m-%d %H:%M} UTC."
        order = tx.get(WorkOrderRow, grant.id)
        if order is None:
            return f"Work order {grant.id}", False, "There is no such work order any more."
        what = f"Work order {order.id} [{order.priority}]: {order.summary}"
        if order.status != "assigned":
            by = f" by {order.acked_by}" if order.acked_by else ""
            return what, False, f"It is {order.status.replace('_', ' ')}{by}."
        if order.assignee != grant.person:  # passed on since the page: the link was for its former assignee
            return what, False, f"It is assigned to {order.assignee} now, not to {grant.person}."
        return what, True, f"It is assigned to {order.assignee}."


def _firing(tx: Session, grant: Grant) -> list[AlertRow]:
    """A group link's alerts that can be acknowledged: those of the group that fire."""
    group = tx.get(NotificationGroupRow, grant.id)
    if group is None or group.receiver != grant.person or not group.open:
        return []
    found = tx.exec(select(AlertRow).where(col(AlertRow.id).in_(group.open)).order_by(col(AlertRow.id)))
    return [a for a in found if a.status in FIRING]


def _what_group(tx: Session, grant: Grant) -> tuple[str, bool, str]:
    firing = _firing(tx, grant)
    if not firing:
        group = tx.get(NotificationGroupRow, grant.id)
        ids = group.open if group is not None and group.receiver == grant.person else []
        by = sorted({a.acked_by or "?" for a in tx.exec(select(AlertRow).where(col(AlertRow.id).in_(ids)))
                     if a.status == AlertStatus.ACKNOWLEDGED})  # fmt: skip
        said = f"They are acknowledged, by {', '.join(by)}." if by else "None of them is open now."
        return "Alerts of a group", False, f"None of the group's alerts fires now: nothing to acknowledge. {said}"
    listed = "; ".join(f"{a.device_id}: {a.summary}" for a in firing[:20]) + ("; ..." if len(firing) > 20 else "")
    return f"{len(firing)} alerts firing", True, listed


@router.get("/ack/{token}", response_class=HTMLResponse, include_in_schema=False)
async def confirm(request: Request, token: str) -> HTMLResponse:
    """What the link acknowledges, and the button."""
    grant = _grant(request, token)
    if isinstance(grant, HTMLResponse):
        return grant
    what, open_, why = await asyncio.to_thread(_what, request, grant)
    return _page(what, why, button=f"Acknowledge as {grant.person}" if open_ else None)


@router.post("/ack/{token}", response_class=HTMLResponse, include_in_schema=False)
async def acknowledge(request: Request, token: str) -> HTMLResponse:
    """Acknowledge as the person the link was sent to."""
    grant = _grant(request, token)
    if isinstance(grant, HTMLResponse):
        return grant
    try:
        await asyncio.to_thread(_acknowledge, request, grant)
    except (AlertActionError, DispatchError, StaleDataError):
        what, _, why = await asyncio.to_thread(_what, request, grant)
        return _page(what, why, status=409)
    changed(request)
    what, _, _ = await asyncio.to_thread(_what, request, grant)
    return _page(what, f"Acknowledged by {grant.person}. Thank you.")


def _acknowledge(request: Request, grant: Grant) -> None:
    store = request.app.state.iotgw.store
    with store.session() as tx:
        try:
            _acknowledge_in(tx, request, grant, "acknowledged from the notification's link")
            tx.commit()
        except StaleDataError:  # another click (or person) changed the work order meanwhile
            raise DispatchError(f"work order {grant.id} changed meanwhile") from None


def _acknowledge_in(tx: Session, request: Request, grant: Grant, note: str) -> None:
    if grant.kind == "group":
        done = 0
        for alert in _firing(tx, grant):  # (in id order: two group links at once lock alike)
            try:
                act_by_hand(tx, alert.id or 0, AlertStatus.ACKNOWLEDGED, by=grant.person, note=note, at=utcnow())
                done += 1
            except AlertActionError:
                continue  # acknowledged (or resolved) meanwhile
        if not done:
            raise AlertActionError("state", "none of the group's alerts fires")
    elif grant.kind == "alert":
        act_by_hand(tx, grant.id, AlertStatus.ACKNOWLEDGED, by=grant.person, note=note, at=utcnow())
    else:
        live = request.app.state.iotgw.router
        runner = live.runners.get("dispatch") if live is not None else None
        if runner is None:
            raise DispatchError("this gateway does not run the dispatch consumer")
        order = tx.get(WorkOrderRow, grant.id)
        if order is not None and order.assignee != grant.person:
            raise DispatchError(f"work order {grant.id} is assigned to {order.assignee} now")
        runner.consumer.act(tx, grant.id, "acknowledge", grant.person, note=note)
