"""The HTTP API (FastAPI): health, readiness, metrics and read access to devices, events and dead letters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gateway import __version__
from gateway.api.routes import alerts, analytics, consumers, dead_letters, devices, events, health, silences
from gateway.errors import StoreError
from gateway.metrics import Metrics
from gateway.router import ConsumerError, Router, UnknownConsumerError
from gateway.store import Store


@dataclass(slots=True)
class AppState:
    """What the routes need from the running gateway."""

    store: Store
    metrics: Metrics
    broker_connected: Callable[[], bool]
    database_writable: Callable[[], bool]
    router: Router | None = None


def create_app(state: AppState) -> FastAPI:
    """The FastAPI application over a store, metrics and readiness probes."""
    app = FastAPI(
        title="iotgw",
        version=__version__,
        description="IoT event gateway: devices, the event log and dead letters.",
    )
    app.state.iotgw = state
    for module in (health, devices, events, dead_letters, consumers, analytics, alerts, silences):
        app.include_router(module.router)

    @app.exception_handler(StoreError)
    async def _store_error(_request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": f"database unavailable: {exc}"})

    @app.exception_handler(UnknownConsumerError)
    async def _unknown_consumer(_request: Request, exc: UnknownConsumerError) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(ConsumerError)
    async def _consumer_error(_request: Request, exc: ConsumerError) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", "invalid"), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(status_code=422, content={"detail": f"{where}: {first['msg']}", "errors": errors})

    return app
