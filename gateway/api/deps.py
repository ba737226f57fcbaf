"""Dependencies for the routes, as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.metrics import Metrics
from gateway.store import Store


def get_store(request: Request) -> Store:
    """The gateway's store."""
    store: Store = request.app.state.iotgw.store
    return store


def get_metrics(request: Request) -> Metrics:
    """The gateway's metrics."""
    metrics: Metrics = request.app.state.iotgw.metrics
    return metrics


StoreDep = Annotated[Store, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
