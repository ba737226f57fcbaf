"""Silences: stop notifications for matching alerts for a while (the alerts themselves still fire),
or in recurring maintenance windows (`schedule`)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field, field_validator, model_validator
from sqlmodel import col, select

from alerts import windows
from alerts.notify.receivers import parse_duration
from alerts.tables import SilenceRow
from gateway.api.auth import ADMIN
from gateway.api.deps import MAX_ROW_ID, RowId, StoreDep
from gateway.api.pages import Cursor, Limit, Page, id_cursor, page_of

router = APIRouter(prefix="/api/silences", tags=["silences"])
MATCHER_FIELDS = ("rule", "device_id", "site", "severity")


class Schedule(BaseModel):
    """Windows on some days of the week, from `start` to `end` (local time in `time_zone`; an end
    not after the start runs into the next day)."""

    days: list[str] = Field(min_length=1, description="mon, tue, wed, thu, fri, sat, sun", examples=[["tue"]])
    start: str = Field(description="HH:MM", examples=["02:00"])
    end: str = Field(description="HH:MM (24:00: midnight)", examples=["04:00"])
    time_zone: str = Field(description="an IANA time zone", examples=["Europe/Berlin"])

    @model_validator(mode="after")
    def _valid(self) -> Schedule:
        windows.check(self.model_dump())
        return self


FOREVER = datetime(9999, 12, 31, tzinfo=UTC)  # a schedule without an end


class SilenceCreate(BaseModel):
    """Matchers (fnmatch patterns on rule, device_id, site, severity), until when, who and why; with
    `schedule`, a recurring maintenance window (in force in its windows only, until `duration` or
    `ends_at` if given)."""

    matchers: dict[str, str] = Field(min_length=1)
    duration: str | None = Field(default=None, description="e.g. 2h; or give ends_at")
    ends_at: datetime | None = None
    schedule: Schedule | None = None
    by: str = Field(min_length=1, max_length=100)
    comment: str = Field(min_length=1, max_length=1000)

    @field_validator("matchers")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(MATCHER_FIELDS))
        if unknown:
            msg = f"unknown matcher field(s) {unknown}; use {', '.join(MATCHER_FIELDS)}"
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _one_end(self) -> SilenceCreate:
        if self.duration is not None and self.ends_at is not None:
            msg = "give one of duration and ends_at"
            raise ValueError(msg)
        if self.schedule is None and self.duration is None and self.ends_at is None:
            msg = "give one of duration and ends_at (or a schedule: a recurring window)"
            raise ValueError(msg)
        if self.duration is not None:
            parse_duration(self.duration)
        if self.ends_at is not None and self.ends_at.tzinfo is None:
            msg = "ends_at needs a time zone"
            raise ValueError(msg)
        return self


class SilencePublic(BaseModel):
    """A silence."""

    id: int
    matchers: dict[str, str]
    created_by: str
    comment: str
    starts_at: datetime
    ends_at: datetime
    schedule: Schedule | None = None
    active: bool = Field(description="not over yet")
    in_force: bool = Field(description="holding notifications back now (a schedule: in one of its windows)")


def _public(row: SilenceRow, now: datetime) -> SilencePublic:
    return SilencePublic(
        **row.model_dump(exclude={"matchers", "schedule"}), matchers=row.matchers,
        schedule=Schedule(**row.schedule) if row.schedule else None, active=row.ends_at > now,
        in_force=row.in_force(now),
    )  # fmt: skip


@router.get("")
async def silences(
    store: StoreDep, *, active: Annotated[bool, Query()] = True, cursor: Cursor = None, limit: Limit = 100
) -> Page[SilencePublic]:
    """Silences in the order they were made, active ones by default (`active=false`: all)."""
    now = datetime.now(UTC)
    after = id_cursor(cursor, MAX_ROW_ID)

    def read() -> list[SilenceRow]:
        stmt = select(SilenceRow).order_by(col(SilenceRow.id)).limit(limit + 1)
        if active:
            stmt = stmt.where(col(SilenceRow.ends_at) > now)
        if after is not None:
            stmt = stmt.where(col(SilenceRow.id) > after)
        with store.session() as tx:
            return list(tx.exec(stmt))

    return page_of(await asyncio.to_thread(read), limit, lambda r: str(r.id), lambda r: _public(r, now))


@router.post("", dependencies=ADMIN, status_code=201)
async def create(store: StoreDep, body: SilenceCreate) -> SilencePublic:
    """Create a silence starting now (with `schedule`: a recurring maintenance window)."""
    now = datetime.now(UTC)
    if body.ends_at is not None:
        ends = body.ends_at
    elif body.duration is not None:
        ends = now + timedelta(seconds=parse_duration(body.duration))
    else:
        ends = FOREVER
    if ends <= now:
        raise HTTPException(status_code=422, detail="ends_at: the silence would already be over")
    schedule = body.schedule.model_dump() if body.schedule is not None else None
    row = SilenceRow(
        matchers=body.matchers, created_by=body.by, comment=body.comment, starts_at=now, ends_at=ends,
        schedule=schedule,
    )  # fmt: skip

    def write() -> SilenceRow:
        with store.session() as tx:
            tx.add(row)
            tx.commit()
            tx.refresh(row)
            return row

    return _public(await asyncio.to_thread(write), now)


@router.delete("/{silence_id}", dependencies=ADMIN, responses={404: {"description": "no such silence"}})
async def expire(store: StoreDep, silence_id: RowId) -> dict[str, Any]:
    """End a silence now."""

    def write() -> bool:
        with store.session() as tx:
            row = tx.get(SilenceRow, silence_id)
            if row is None:
                return False
            row.ends_at = min(row.ends_at, datetime.now(UTC))
            tx.add(row)
            tx.commit()
            return True

    if not await asyncio.to_thread(write):
        raise HTTPException(status_code=404, detail=f"no silence {silence_id}")
    return {"id": silence_id, "active": False}
