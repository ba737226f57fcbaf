"""Who the caller is: the name and role of the API key presented, and what that role may do (the
staff page shows actions it may not take disabled, with the reason, instead of failing on tap)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from gateway.api.auth import require
from gateway.security import ROLES, Principal

router = APIRouter(prefix="/api", tags=["security"])


class SessionPublic(BaseModel):
    """The key's name and role, the roles it includes (`viewer` < `technician` < `admin`), and the
    gateway's time zone (the staff page shows local times in it)."""

    name: str
    role: str
    may: list[str]
    time_zone: str


@router.get("/session")
async def session(request: Request, principal: Annotated[Principal, Depends(require("viewer"))]) -> SessionPublic:
    """The key this request came with: its name, its role and the roles that role includes."""
    return SessionPublic(
        name=principal.name,
        role=principal.role,
        may=[r for r in ROLES if principal.may(r)],
        time_zone=request.app.state.iotgw.time_zone,
    )
