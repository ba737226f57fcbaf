"""Devices and their shadows."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from gateway.api.auth import ADMIN
from gateway.api.deps import StoreDep
from gateway.api.pages import Cursor, Limit, Page, bad_cursor, id_cursor, page_of
from gateway.api.schemas import DevicePublic, EventPublic
from gateway.core.protocol import DeviceType
from gateway.errors import GatewayError, ReservedNameError
from gateway.log import DeviceRow, cloudevent_of, get_device, list_devices, recent_events
from gateway.security import PasswordFile, provision, reload_broker, revoke

router = APIRouter(prefix="/api/devices", tags=["devices"])
DEVICE_ID = r"^[A-Za-z0-9_-]{1,64}$"


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
async def devices(
    store: StoreDep,
    type: DeviceType | None = None,  # noqa: A002
    site: str | None = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> Page[DevicePublic]:
    """Known devices by id, optionally of one type and/or site."""
    if cursor is not None and not re.fullmatch(DEVICE_ID, cursor):
        raise bad_cursor(cursor)
    kind = type.value if type else None
    rows = await asyncio.to_thread(list_devices, store, type_=kind, site=site, after=cursor, limit=limit + 1)
    return page_of(rows, limit, lambda r: r.device_id, _public)


@router.get("/{device_id}", responses={404: {"description": "no such device"}})
async def device(store: StoreDep, device_id: str = Path(pattern=DEVICE_ID)) -> DevicePublic:
    """One device."""
    row = await asyncio.to_thread(get_device, store, device_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"no device {device_id!r}")
    return _public(row)


@router.get("/{device_id}/events", responses={404: {"description": "no such device"}})
async def device_events(
    store: StoreDep,
    device_id: Annotated[str, Path(pattern=DEVICE_ID)],
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> Page[EventPublic]:
    """A device's latest events, newest first (its own, and the alerts and work orders about it)."""
    before = id_cursor(cursor)
    if await asyncio.to_thread(get_device, store, device_id) is None:
        raise HTTPException(status_code=404, detail=f"no device {device_id!r}")
    rows = await asyncio.to_thread(recent_events, store, device_id, limit + 1, before=before)
    return page_of(rows, limit, lambda r: str(r.id), lambda r: EventPublic.model_validate(cloudevent_of(r)))


class ProvisionRequest(BaseModel):
    """A device to provision."""

    id: str = Field(pattern=DEVICE_ID, description="the device id, also its broker user name")
    type: DeviceType | None = None


class Credentials(BaseModel):
    """A provisioned device's broker login; the password is shown this once."""

    device_id: str
    username: str
    password: str
    broker_reloaded: bool


def _broker_files(request: Request) -> tuple[PasswordFile, str]:
    security = request.app.state.iotgw.security
    if not security.password_file:
        raise HTTPException(status_code=503, detail="no broker password file configured (IOTGW_BROKER_PASSWORD_FILE)")
    return PasswordFile(security.password_file), security.pid_file


@router.post(
    "",
    dependencies=ADMIN,
    status_code=201,
    responses={
        409: {"description": "the id is reserved for the gateway's own broker names"},
        503: {"description": "no broker password file"},
    },
)
async def provision_device(request: Request, store: StoreDep, body: ProvisionRequest) -> Credentials:
    """Create a device's broker credentials and register it (a device provisioned again gets a new password)."""
    passwords, pid_file = _broker_files(request)
    reserved = request.app.state.iotgw.security.reserved_names
    device = {body.id: body.type.value if body.type else None}
    try:
        creds = await asyncio.to_thread(provision, store, passwords, device, reserved=reserved)
        reloaded = await asyncio.to_thread(reload_broker, pid_file)
    except ReservedNameError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    except GatewayError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    return Credentials(device_id=body.id, username=body.id, password=creds[body.id], broker_reloaded=reloaded)


@router.delete(
    "/{device_id}", dependencies=ADMIN, responses={404: {"description": "not provisioned (never, or revoked already)"}}
)
async def revoke_device(
    request: Request, store: StoreDep, device_id: Annotated[str, Path(pattern=DEVICE_ID)]
) -> dict[str, str | bool]:
    """Remove a device's broker credentials and mark it revoked (its events stay)."""
    passwords, pid_file = _broker_files(request)
    try:
        if not await asyncio.to_thread(revoke, store, passwords, device_id):
            raise HTTPException(
                status_code=404, detail=f"device {device_id!r} is not provisioned (never, or revoked already)"
            )
        reloaded = await asyncio.to_thread(reload_broker, pid_file)
    except GatewayError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    return {"device_id": device_id, "status": "revoked", "broker_reloaded": reloaded}
