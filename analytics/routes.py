"""Fleet and device analytics (from the analytics consumer)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Path

from analytics import consumer as an
from gateway.api.deps import StoreDep

router = APIRouter(prefix="/api/analytics", tags=["analytics"])


@router.get("/fleet")
async def fleet(store: StoreDep) -> dict[str, Any]:
    """Elevator KPIs per site and for the fleet: trips, door cycles, availability, MTBF, MTTR..."""
    return await asyncio.to_thread(an.fleet, store)


@router.get("/devices/{device_id}", responses={404: {"description": "no figures for this device yet"}})
async def device(store: StoreDep, device_id: str = Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")) -> dict[str, Any]:
    """One elevator's KPIs, or a sensor's min/max/mean over the last 1 h and 24 h of its readings."""
    out = await asyncio.to_thread(an.device, store, device_id)
    if out is None:
        raise HTTPException(status_code=404, detail=f"no analytics for device {device_id!r}")
    return out
