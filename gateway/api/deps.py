"""Dependencies for the routes, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from gateway.metrics import Metrics
from gateway.router import Router
from gateway.store import Store


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


StoreDep = Annotated[Store, Depends(get_store)]
RouterDep = Annotated[Router, Depends(get_router)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
