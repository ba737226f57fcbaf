"""Live updates for the staff page: server-sent events with what the plugins show live (the alerts
plugin: the open alerts and work orders)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from gateway.api.deps import RouterDep, StoreDep
from gateway.log import Store
from gateway.plugins import Plugin
from gateway.security import Principal, key_in_force

router = APIRouter(prefix="/api", tags=["live"])
log = logging.getLogger(__name__)

KEEP_ALIVE_S = 15.0
KEY_RECHECK_S = 5.0  # an open stream ends this soon after its API key is revoked
COALESCE_S = 0.2  # a burst of changes becomes one message


def snapshot(store: Store, plugins: Mapping[str, Plugin]) -> dict[str, Any]:
    """What every plugin shows live, in one transaction."""
    out: dict[str, Any] = {}
    with store.session() as tx:
        for name, plugin in plugins.items():
            try:
                part = plugin.live(tx)
            except Exception:  # one plugin's failure leaves its part out, not the stream
                log.exception("plugin %s: its live view failed", name)
                tx.rollback()
                continue
            for key, value in part.items():
                if key in out:
                    log.warning("plugin %s: live key %r is another plugin's; left out", name, key)
                    continue
                out[key] = value
    return out


@router.get("/stream", response_class=StreamingResponse)
async def stream(request: Request, store: StoreDep, live: RouterDep) -> StreamingResponse:
    """Server-sent events: a `snapshot` (open alerts and work orders) now and after every change."""
    plugins = request.app.state.iotgw.plugins

    principal: Principal | None = getattr(request.state, "principal", None)
    key_id = principal.key_id if principal is not None else ""

    async def events() -> AsyncIterator[str]:
        last = None
        said = time.monotonic()
        while not live.changes.closed and not await request.is_disconnected():
            if key_id and not await asyncio.to_thread(key_in_force, store, key_id):
                # Revoked (or deleted) since the stream opened: no more snapshots for it.
                yield 'event: revoked\ndata: {"detail":"the API key of this stream was revoked"}\n\n'
                return
            version = live.changes.version
            body = json.dumps(await asyncio.to_thread(snapshot, store, plugins), separators=(",", ":"))
            if body != last:
                yield f"event: snapshot\ndata: {body}\n\n"
                last, said = body, time.monotonic()
            if not await live.changes.wait(version, KEY_RECHECK_S) and time.monotonic() - said >= KEEP_ALIVE_S:
                yield ": keep-alive\n\n"  # proxies and phones drop silent connections
                said = time.monotonic()
            await asyncio.sleep(COALESCE_S)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
