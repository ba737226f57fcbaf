"""One shape for every list the API answers: `{items, next_cursor}`.

A route reads one row more than `limit`; when it is there, `next_cursor` names the last row of
the page, and the next page starts after it (pass it as `cursor`). `next_cursor` is null on the
last page. Cursors are opaque to clients: a cursor from another list, or made up, is a 422.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Generic, TypeVar

from fastapi import HTTPException, Query
from pydantic import BaseModel, Field

from gateway.api.deps import MAX_ID

T = TypeVar("T")
R = TypeVar("R")


class Page(BaseModel, Generic[T]):
    """One page of a list; pass `next_cursor` as `cursor` for the next page (null at the end)."""

    items: list[T]
    next_cursor: str | None = Field(description="the cursor of the next page; null on the last page")


Cursor = Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")]
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many items (≤ 1000)")]


def bad_cursor(cursor: str) -> HTTPException:
    """The 422 for a cursor this list did not give out."""
    return HTTPException(status_code=422, detail=f"cursor: not a cursor from this list: {cursor[:40]!r}")


def id_cursor(cursor: str | None, maximum: int = MAX_ID) -> int | None:
    """A cursor that is a row id (a decimal string), or None for the first page."""
    if cursor is None:
        return None
    if not cursor.isdigit() or len(cursor) > 19 or not 1 <= int(cursor) <= maximum:
        raise bad_cursor(cursor)
    return int(cursor)


def page_of(rows: Sequence[R], limit: int, cursor_of: Callable[[R], str], public: Callable[[R], T]) -> Page[T]:
    """The page from up to `limit + 1` rows read in list order: the extra row says there is more."""
    more = len(rows) > limit
    shown = rows[:limit]
    return Page[T](items=[public(r) for r in shown], next_cursor=cursor_of(shown[-1]) if more else None)


def whole(items: Sequence[T]) -> Page[T]:
    """A list that is always answered whole (configuration-sized: consumers, rules, the roster)."""
    return Page[T](items=list(items), next_cursor=None)
