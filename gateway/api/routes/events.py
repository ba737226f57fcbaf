"""The event log, read in log order with cursor pagination."""

from __future__ import annotations

import asyncio
import difflib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from sqlmodel import col, select

from gateway.api.deps import StoreDep, zoned
from gateway.api.pages import id_cursor
from gateway.api.schemas import EventPage
from gateway.core.events import EVENT_TYPES
from gateway.log import EventQuery, EventRow, Store, cloudevent_of, list_events
from gateway.plugins import Plugin

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


def known_types(plugins: Mapping[str, Plugin]) -> tuple[list[str], list[str]]:
    """The log's types: the devices' events and those the plugins say their consumers append;
    as exact types, and prefixes (from patterns ending in `*`)."""
    declared = [*EVENT_TYPES, *(t for p in plugins.values() for t in p.event_types)]
    return [t for t in declared if not t.endswith("*")], [t[:-1] for t in declared if t.endswith("*")]


def _in_log(store: Store, wanted: str) -> bool:
    """Whether the log holds an event of this type (or, for `x.*`, of this prefix): types of
    consumers that did not declare them (an index seek, not a scan)."""
    with store.session() as tx:
        if wanted.endswith(".*"):
            prefix = wanted[:-1]
            hit = tx.exec(
                select(EventRow.id).where(col(EventRow.type) >= prefix, col(EventRow.type) < prefix + "\uffff")
            )
        else:
            hit = tx.exec(select(EventRow.id).where(col(EventRow.type) == wanted))
        return hit.first() is not None


def _check_type(wanted: str, exact: list[str], prefixes: list[str]) -> bool:
    """Whether the type (or `x.*` prefix) is one the gateway knows of."""
    if wanted.endswith(".*"):
        prefix = wanted[:-1]
        return any(t.startswith(prefix) for t in exact) or any(p.startswith(prefix) or prefix.startswith(p)
                                                               for p in prefixes)  # fmt: skip
    return wanted in exact or wanted.startswith(tuple(prefixes))


def _unknown_type(wanted: str, exact: list[str], prefixes: list[str]) -> HTTPException:
    """A type no event has is a 422 listing the known ones (a typo must not answer "nothing")."""
    families = sorted({t.split(".")[0] + ".*" for t in exact} | {p + "*" for p in prefixes})
    close = difflib.get_close_matches(wanted, families if wanted.endswith(".*") else exact, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    known = ", ".join([*exact, *(p + "*" for p in prefixes)])
    return HTTPException(status_code=422, detail=f"type: no event is of type {wanted!r}; {hint}known: {known}")


@router.get("", response_model=EventPage)
async def events(  # noqa: PLR0913, PLR0917 - one parameter per documented filter
    request: Request,
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
    zoned(since=since, until=until)
    if type is not None:
        exact, prefixes = known_types(request.app.state.iotgw.plugins)
        if not _check_type(type, exact, prefixes) and not await asyncio.to_thread(_in_log, store, type):
            raise _unknown_type(type, exact, prefixes)
    q = EventQuery(device_id, type, since, until, decode_cursor(cursor), limit, newest_first=order == "desc")
    return Response(await asyncio.to_thread(_page, store, q), media_type="application/json")
