"""The event log, read in log order with cursor pagination."""

from __future__ import annotations

import asyncio
import difflib
import json
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response

from gateway.api.deps import StoreDep
from gateway.api.pages import id_cursor
from gateway.api.schemas import EventPage
from gateway.events import EVENT_TYPES
from gateway.store import EventQuery, Store, cloudevent_of, list_events

router = APIRouter(prefix="/api/events", tags=["events"])


def decode_cursor(cursor: str | None) -> int:
    """A cursor is the last log position seen, as a decimal string (0: from the start)."""
    return id_cursor(cursor) or 0


def _page(store: Store, q: EventQuery) -> bytes:
    """The page as JSON, built in the caller's thread: a 1,000-event page serialised in the event
    loop held up ingestion's receiving and acknowledging there."""
    items = [cloudevent_of(r) for r in list_events(store, q)]
    next_cursor = str(items[-1]["position"]) if len(items) == q.limit else None
    return json.dumps({"items": items, "next_cursor": next_cursor}, separators=(",", ":")).encode()


# The types of the log: the devices' events, and those the gateway derives (any `workorder.<step>`).
KNOWN_TYPES = (*EVENT_TYPES, "alert.firing", "alert.acknowledged", "alert.flapping", "alert.resolved")
DERIVED_PREFIXES = ("workorder.",)


def _check_type(wanted: str) -> None:
    """A type no event has is a 422 listing the known ones (a typo must not answer "nothing")."""
    prefix = wanted[:-1] if wanted.endswith(".*") else None
    if prefix is not None:
        if any(t.startswith(prefix) for t in (*KNOWN_TYPES, *DERIVED_PREFIXES)) or "workorder.".startswith(prefix):
            return
    elif wanted in KNOWN_TYPES or wanted.startswith(DERIVED_PREFIXES):
        return
    families = sorted({t.split(".")[0] + ".*" for t in KNOWN_TYPES} | {"workorder.*"})
    close = difflib.get_close_matches(wanted, families if prefix is not None else KNOWN_TYPES, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    known = ", ".join(KNOWN_TYPES)
    raise HTTPException(
        status_code=422, detail=f"type: no event is of type {wanted!r}; {hint}known: {known}, workorder.*"
    )


@router.get("", response_model=EventPage)
async def events(  # noqa: PLR0913, PLR0917 - one parameter per documented filter
    store: StoreDep,
    device_id: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = None,
    type: Annotated[str | None, Query(max_length=100, description="exact type, or a prefix ending in .*")] = None,  # noqa: A002
    since: Annotated[datetime | None, Query(description="event time >= since (RFC 3339)")] = None,
    until: Annotated[datetime | None, Query(description="event time < until (RFC 3339)")] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    order: Annotated[
        Literal["asc", "desc"], Query(description="asc: oldest first (log order); desc: the newest first")
    ] = "asc",
) -> Response:
    """Events in log order (or the newest first: `order=desc`), filtered; at most `limit` (≤ 1000) per page."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise HTTPException(status_code=422, detail=f"{name}: needs a time zone, e.g. 2026-11-28T10:00:00Z")
    if type is not None:
        _check_type(type)
    q = EventQuery(device_id, type, since, until, decode_cursor(cursor), limit, newest_first=order == "desc")
    return Response(await asyncio.to_thread(_page, store, q), media_type="application/json")
