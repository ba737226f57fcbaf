"""Rejected messages, each with its reason and the exact bytes received."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated

from fastapi import APIRouter, Query

from gateway.api.deps import StoreDep
from gateway.api.routes.events import decode_cursor
from gateway.api.schemas import DeadLetterPage, DeadLetterPublic
from gateway.core.protocol import Reason
from gateway.log import list_dead_letters

router = APIRouter(prefix="/api/dead-letters", tags=["dead letters"])

PREVIEW_CHARS = 200


@router.get("")
async def dead_letters(
    store: StoreDep,
    reason: Reason | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DeadLetterPage:
    """Dead letters in arrival order, optionally of one reason."""
    why = reason.value if reason else None
    rows = await asyncio.to_thread(list_dead_letters, store, reason=why, after=decode_cursor(cursor), limit=limit)
    items = [
        DeadLetterPublic(
            id=r.id or 0,
            received_at=r.received_at,
            topic=r.topic,
            reason=r.reason,
            detail=r.detail,
            size=r.size,
            payload_b64=r.payload_b64,
            payload_preview=base64.b64decode(r.payload_b64)[:PREVIEW_CHARS].decode("utf-8", "replace"),
        )
        for r in rows
    ]
    return DeadLetterPage(items=items, next_cursor=str(items[-1].id) if len(items) == limit else None)
