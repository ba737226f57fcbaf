"""Devices and their shadows."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from gateway.api.deps import StoreDep
from gateway.api.routes.events import event_public
from gateway.api.schemas import DevicePublic, EventPublic
from gateway.store import DeviceRow, get_device, list_devices, recent_events

router = APIRouter(prefix="/api/devices", tags=["devices"])


def _public(row: DeviceRow) -> DevicePublic:
    return DevicePublic(
        device_id=row.device_id,
        type=row.type,
        site=row.site,
        online=row.online,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        last_seq=row.last_seq,
        state=row.state,
    )


@router.get("")
async def devices(store: StoreDep, type: str | None = None, site: str | None = None) -> list[DevicePublic]:  # noqa: A002
    """Every known device, optionally of one type and/or site."""
    rows = await asyncio.to_thread(list_devices, store, type_=type, site=site)
    return [_public(r) for r in rows]


@router.get("/{device_id}", responses={404: {"description": "no such device"}})
async def device(store: StoreDep, device_id: str = Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")) -> DevicePublic:
    """One device."""
    row = await asyncio.to_thread(get_device, store, device_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"no device {device_id!r}")
    return _public(row)


@router.get("/{device_id}/events")
async def device_events(
    store: StoreDep,
    device_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")],
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> list[EventPublic]:
    """A device's latest events, newest first (its own, and the alerts and work orders about it)."""
    return [event_public(r) for r in await asyncio.to_thread(recent_events, store, device_id, limit)]
