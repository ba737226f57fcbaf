"""The audit trail: every API mutation, who made it and how it ended (admins only)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from gateway.api.auth import ADMIN
from gateway.api.deps import MAX_ROW_ID, StoreDep
from gateway.api.pages import Cursor, Limit, Page, id_cursor, page_of
from gateway.security import list_audit

router = APIRouter(prefix="/api/audit", tags=["security"])


class AuditEntry(BaseModel):
    """One mutation: the key's name and role, the request, its response status, and when."""

    id: int
    at: datetime
    who: str
    role: str
    method: str
    path: str
    query: str
    status: int


@router.get("", dependencies=ADMIN)
async def audit(
    store: StoreDep,
    who: Annotated[str | None, Query(max_length=100)] = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> Page[AuditEntry]:
    """Audit entries, newest first."""
    before = id_cursor(cursor, MAX_ROW_ID)
    rows = await asyncio.to_thread(list_audit, store, who=who, before=before, limit=limit + 1)
    return page_of(rows, limit, lambda r: str(r.id), lambda r: AuditEntry.model_validate(r, from_attributes=True))
