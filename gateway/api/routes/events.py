"""The event log, read in log order with cursor pagination."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response

from gateway.api.deps import MAX_ID, StoreDep
from gateway.api.schemas import EventPage, EventPublic
from gateway.store import EventQuery, EventRow, Store, list_events

router = APIRouter(prefix="/api/events", tags=["events"])


def decode_cursor(cursor: str | None) -> int:
    """A cursor is the last log position seen, as a decimal string."""
    if cursor is None:
        return 0
    if not cursor.isdigit() or len(cursor) > 19 or int(cursor) > MAX_ID:
        raise HTTPException(status_code=422, detail=f"cursor: not a cursor from this API: {cursor[:40]!r}")
    return int(cursor)


def event_public(r: EventRow) -> EventPublic:
    """The API form of a stored event."""
    return EventPublic(
        position=r.id or 0, id=r.ce_id, source=r.source, type=r.type, time=r.time, subject=r.subject,
        sequence=r.sequence, site=r.site, received_at=r.received_at, data=r.data,
    )  # fmt: skip


def _page(store: Store, q: EventQuery) -> bytes:
    """The page as JSON, built in the caller's thread: a 1,000-event page serialised in the event
    loop held up ingestion's receiving and acknowledging there."""
    items = [event_public(r) for r in list_events(store, q)]
    next_cursor = str(items[-1].position) if len(items) == q.limit else None
    return EventPage(items=items, next_cursor=next_cursor).model_dump_json().encode()


@router.get("", response_model=EventPage)
async def events(  # noqa: PLR0913, PLR0917 - one parameter per documented filter
    store: StoreDep,
    device_id: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = None,
    type: Annotated[str | None, Query(max_length=100, description="exact type, or a prefix ending in .*")] = None,  # noqa: A002
    since: Annotated[datetime | None, Query(description="event time >= since (RFC 3339)")] = None,
    until: Annotated[datetime | None, Query(description="event time < until (RFC 3339)")] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Events in log order, filtered; at most `limit` (≤ 1000) per page."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise HTTPException(status_code=422, detail=f"{name}: needs a time zone, e.g. 2026-11-28T10:00:00Z")
    q = EventQuery(device_id, type, since, until, decode_cursor(cursor), limit)
    return Response(await asyncio.to_thread(_page, store, q), media_type="application/json")
