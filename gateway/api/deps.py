"""Dependencies for the routes, as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Path, Query, Request
from sqlmodel import col
from sqlmodel.sql.expression import SelectOfScalar

from gateway.log import Store
from gateway.metrics import Metrics
from gateway.runtime import Router


def get_store(request: Request) -> Store:
    """The gateway's store."""
    store: Store = request.app.state.iotgw.store
    return store


def get_metrics(request: Request) -> Metrics:
    """The gateway's metrics."""
    metrics: Metrics = request.app.state.iotgw.metrics
    return metrics


def get_router(request: Request) -> Router:
    """The consumer router (503 when this process runs none)."""
    router: Router | None = request.app.state.iotgw.router
    if router is None:
        raise HTTPException(status_code=503, detail="this gateway runs no consumers")
    return router


# Ids in parameters: what the database column holds (a larger number is a 422, not an overflow).
MAX_ID = 2**63 - 1  # log positions (BIGINT)
MAX_ROW_ID = 2**31 - 1  # alerts, work orders, silences, parked events, audit rows (INTEGER)
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]

StoreDep = Annotated[Store, Depends(get_store)]
RouterDep = Annotated[Router, Depends(get_router)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def changed(request: Request) -> None:
    """Tell the gateway an API action appended to the log (wakes consumers and live views)."""
    router: Router | None = request.app.state.iotgw.router
    if router is not None:
        router.log_grew_threadsafe()


S = TypeVar("S", bound=SelectOfScalar[Any])


def filtered(stmt: S, status: tuple[Any, str | None, Sequence[str]], equal: Sequence[tuple[Any, str | None]]) -> S:
    """A list route's query narrowed by its filters: `status` is (column, asked, the open statuses)
    where `open` means any open one; `equal` pairs a column with the value asked for (None: any)."""
    column, asked, open_statuses = status
    if asked == "open":
        stmt = stmt.where(col(column).in_(open_statuses))
    elif asked:
        stmt = stmt.where(col(column) == asked)
    for column, value in equal:
        if value:
            stmt = stmt.where(col(column) == value)
    return stmt


Since = Annotated[datetime | None, Query(description="opened at or after this time (RFC 3339, with its zone)")]
Until = Annotated[datetime | None, Query(description="opened before this time (RFC 3339, with its zone)")]


def zoned(**times: datetime | None) -> None:
    """A 422 for a time given without its zone (which zone a bare time means is a guess), or one
    that is no time in UTC (9999-12-31T23:00-23:00 is past the year 9999)."""
    for name, value in times.items():
        if value is None:
            continue
        if value.tzinfo is None:
            raise HTTPException(status_code=422, detail=f"{name}: needs a time zone, e.g. 2026-11-28T10:00:00Z")
        try:
            value.astimezone(UTC)
        except OverflowError:
            raise HTTPException(status_code=422, detail=f"{name}: out of range in UTC") from None


def within(stmt: S, column: Any, since: datetime | None, until: datetime | None) -> S:  # noqa: ANN401 - a column
    """A list route's query narrowed to `since <= column < until` (either may be open)."""
    zoned(since=since, until=until)
    if since is not None:
        stmt = stmt.where(col(column) >= since)
    if until is not None:
        stmt = stmt.where(col(column) < until)
    return stmt
