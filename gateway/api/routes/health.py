"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import MetricsDep, StoreDep
from gateway.errors import StoreError

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "not ready; `checks` says why"}})
async def ready(request: Request, store: StoreDep) -> JSONResponse:
    """Ready when the broker session is up (if this process ingests) and the database answers and
    accepts commits."""
    state = request.app.state.iotgw
    checks: dict[str, str] = {"broker": "ok" if state.broker_connected() else "disconnected"} if state.ingest else {}
    if state.ingest and (failure := state.ingest_failure()) is not None:
        checks["ingest"] = f"stopped: {failure[:200]}"  # nothing received is stored or acknowledged
    try:
        await asyncio.to_thread(store.ping)
        checks["database"] = "ok" if state.database_writable() else "not writable"
    except StoreError as exc:
        checks["database"] = f"unreachable: {str(exc)[:200]}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        status_code=200 if ok else 503, content={"status": "ready" if ok else "not ready", "checks": checks}
    )


@router.get("/metrics", response_class=Response)
async def metrics(m: MetricsDep) -> Response:
    """Prometheus exposition format."""
    return Response(content=generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
