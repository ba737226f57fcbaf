"""Consumers of the log: state and lag, pause, resume, replay, parked events."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field, model_validator
from sqlmodel import col, select

from gateway.api.auth import ADMIN
from gateway.api.deps import MAX_ID, MAX_ROW_ID, RouterDep, RowId, StoreDep
from gateway.api.pages import Cursor, Limit, Page, id_cursor, page_of, whole
from gateway.errors import ReplayRangeError
from gateway.log import ConsumerDeadLetterRow

router = APIRouter(prefix="/api/consumers", tags=["consumers"])


class ConsumerPublic(BaseModel):
    """A consumer's state (running, paused, failing), the instance running it, cursor, lag and parked events."""

    name: str
    state: str
    instance: str | None  # the gateway instance running it now (None: nobody holds its lease)
    cursor: int
    lag_events: int
    lag_seconds: float
    dead_letters: int
    last_error: str | None


class ReplayRequest(BaseModel):
    """Where to replay from: an event position, or a time (events at or after it)."""

    from_position: int | None = Field(default=None, ge=1, le=MAX_ID, strict=True)
    from_time: datetime | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ReplayRequest:
        if (self.from_position is None) == (self.from_time is None):
            msg = "give exactly one of from_position and from_time"
            raise ValueError(msg)
        if self.from_position is not None and self.from_position < 1:
            msg = "from_position starts at 1"
            raise ValueError(msg)
        if self.from_time is not None and self.from_time.tzinfo is None:
            msg = "from_time needs a time zone"
            raise ValueError(msg)
        if self.from_time is not None:
            try:
                self.from_time.astimezone(UTC)
            except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00 is in the year 10000 in UTC
                msg = "from_time is out of range (years 1-9999 in UTC)"
                raise ValueError(msg) from None
        return self


class ReplayResult(BaseModel):
    """The cursor after a replay; `reset` says the consumer rebuilt its state from the start."""

    name: str
    cursor: int
    reset: bool


class ParkedEvent(BaseModel):
    """An event a consumer gave up on, with the error."""

    id: int
    position: int
    event_type: str
    subject: str
    error: str
    attempts: int
    parked_at: datetime
    status: str
    retried_at: datetime | None


async def _status(r: RouterDep, name: str | None = None) -> list[ConsumerPublic]:
    if name is not None:
        r.get(name)
    rows = await asyncio.to_thread(r.status)
    return [
        ConsumerPublic(
            name=s.name,
            state=s.state,
            instance=s.owner,
            cursor=s.position,
            lag_events=s.lag_events,
            lag_seconds=round(s.lag_seconds, 3),
            dead_letters=s.parked,
            last_error=s.last_error,
        )
        for s in rows
        if name is None or s.name == name
    ]


@router.get("")
async def consumers(r: RouterDep) -> Page[ConsumerPublic]:
    """Every consumer (the whole list) with its state, cursor, lag and parked events."""
    return whole(await _status(r))


@router.post("/{name}/pause", dependencies=ADMIN, responses={404: {"description": "no such consumer"}})
async def pause(r: RouterDep, name: str) -> ConsumerPublic:
    """Stop handling events (persisted; ingestion and other consumers go on)."""
    await r.get(name).set_paused(True)
    return (await _status(r, name))[0]


@router.post("/{name}/resume", dependencies=ADMIN, responses={404: {"description": "no such consumer"}})
async def resume(r: RouterDep, name: str) -> ConsumerPublic:
    """Resume from the cursor."""
    await r.get(name).set_paused(False)
    return (await _status(r, name))[0]


@router.post(
    "/{name}/replay",
    dependencies=ADMIN,
    responses={404: {"description": "no such consumer"}, 422: {"description": "a position beyond the log's head"}},
)
async def replay(r: RouterDep, name: str, body: ReplayRequest) -> ReplayResult:
    """Move the cursor back; a consumer that keeps derived state rebuilds it from the start."""
    runner = r.get(name)
    try:
        cursor = await runner.replay(from_position=body.from_position, from_time=body.from_time)
    except ReplayRangeError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return ReplayResult(name=name, cursor=cursor, reset=bool(getattr(runner.consumer, "replay_resets_state", False)))


@router.get("/{name}/dead-letters", responses={404: {"description": "no such consumer"}})
async def parked(  # noqa: PLR0913, PLR0917 - one parameter per filter
    r: RouterDep,
    store: StoreDep,
    name: str,
    status: Literal["parked", "retried"] | None = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> Page[ParkedEvent]:
    """Events the consumer parked after too many failures, in the order they were parked."""
    r.get(name)
    after = id_cursor(cursor, MAX_ROW_ID)

    def read() -> list[ConsumerDeadLetterRow]:
        stmt = select(ConsumerDeadLetterRow).where(col(ConsumerDeadLetterRow.consumer) == name)
        if status:
            stmt = stmt.where(col(ConsumerDeadLetterRow.status) == status)
        if after is not None:
            stmt = stmt.where(col(ConsumerDeadLetterRow.id) > after)
        with store.session() as tx:
            return list(tx.exec(stmt.order_by(col(ConsumerDeadLetterRow.id)).limit(limit + 1)))

    def parked_event(row: ConsumerDeadLetterRow) -> ParkedEvent:
        return ParkedEvent.model_validate(row, from_attributes=True)

    return page_of(await asyncio.to_thread(read), limit, lambda row: str(row.id), parked_event)


@router.post(
    "/{name}/dead-letters/{dead_letter_id}/retry",
    dependencies=ADMIN,
    responses={404: {"description": "no such consumer"}, 409: {"description": "it failed again, or is not parked"}},
)
async def retry(r: RouterDep, name: str, dead_letter_id: RowId) -> dict[str, str]:
    """Hand one parked event to the consumer again."""
    await r.get(name).retry_parked(dead_letter_id)  # ConsumerError -> 409 with the reason
    return {"status": "retried"}
