"""The HTTP API (FastAPI): health, readiness, metrics, devices, events, dead letters, consumers and
the audit; the plugins' routers mounted beside them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from gateway import __version__
from gateway.api.auth import VIEWER, ApiSecurity, Guard
from gateway.api.limits import ConcurrencyLimit
from gateway.api.routes import audit, consumers, dead_letters, devices, events, health, session, stream
from gateway.errors import StoreError
from gateway.log import Store
from gateway.metrics import Metrics
from gateway.plugins import Plugin
from gateway.runtime import ConsumerError, Router, UnknownConsumerError

log = logging.getLogger(__name__)
RESERVED_PATHS = ("/", "/api", "/docs", "/redoc", "/metrics", "/openapi.json", "/health", "/ready")


@dataclass(slots=True)
class AppState:
    """What the routes need from the running gateway."""

    store: Store
    metrics: Metrics
    broker_connected: Callable[[], bool]
    database_writable: Callable[[], bool]
    router: Router | None = None
    ingest: bool = True  # False: this process does not subscribe (its readiness ignores the broker)
    ingest_failure: Callable[[], str | None] = lambda: None  # why the batch writer stopped, or None
    security: ApiSecurity = field(default_factory=ApiSecurity)
    plugins: Mapping[str, Plugin] = field(default_factory=dict)  # their routes are mounted, their `live` streamed
    time_zone: str = "UTC"  # the staff page's local times (Settings.time_zone)


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def known_parameters(request: Request) -> None:
    """A query parameter the endpoint does not take is a 422 naming it: a typo (`typ=`) must
    not quietly answer with everything."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    takes = _query_names(dependant)
    unknown = sorted(set(request.query_params) - takes)
    if unknown:
        offer = ", ".join(sorted(takes)) or "none"
        raise HTTPException(
            status_code=422, detail=f"unknown query parameter {', '.join(unknown)}; this endpoint takes: {offer}"
        )


def mount_pages(app: FastAPI, plugins: Mapping[str, Plugin]) -> list[str]:
    """Serve each plugin's static pages at their paths, plugins in the order of their names; a
    path that is taken or reserved (the API's) is refused with a log line. Returns the paths served."""
    served: list[str] = []
    for name, plugin in sorted(plugins.items()):
        for path, folder in plugin.ui().items():
            where = "/" + path.strip("/")
            if where in served or where in RESERVED_PATHS or not Path(folder).is_dir():
                log.error("plugin %s: page %s not served (the path is taken, or %s is no folder)", name, where, folder)
                continue
            app.mount(where, StaticFiles(directory=folder, html=True), name=f"{name}{where.replace('/', ':')}")
            served.append(where)
    return served


def create_app(state: AppState) -> FastAPI:
    """The FastAPI application over a store, metrics and readiness probes."""
    # The API docs' scripts and styles come from the package, not a CDN: /docs works offline.
    # (ReDoc's bundle fetches its logo from its CDN: /redoc leads to /docs instead.)
    app = FastAPIOffline(
        redoc_url=None,
        title="iotgw",
        version=__version__,
        description="IoT event gateway: devices, the event log and dead letters.",
    )
    app.state.iotgw = state
    # Every /api route needs at least a viewer's key; mutations declare more (gateway/api/auth.py).
    known = [Depends(known_parameters)]
    app.include_router(health.router, dependencies=known + ([] if state.security.open_probes else VIEWER))
    for module in (devices, events, dead_letters, consumers, stream, audit, session):
        app.include_router(module.router, dependencies=[*known, *VIEWER])
    for plugin in state.plugins.values():  # mounted, not imported: the platform knows no plugin
        plugin_router = plugin.api()
        if plugin_router is not None:
            app.include_router(plugin_router, dependencies=[*known, *VIEWER])
        public = plugin.pages()
        if public is not None:
            if any(getattr(r, "path", "").startswith("/api") for r in public.routes):
                msg = f"plugin {plugin.name}: pages() routes take no API key, so none may be under /api"
                raise ValueError(msg)
            app.include_router(public, dependencies=known)
    app.add_middleware(Guard, security=state.security, store=state.store)
    if state.security.cors_origins:
        # Off unless origins are configured: the staff page is served from the gateway itself.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.security.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    # Outermost: a request over the bound is refused before anything else is done for it.
    app.add_middleware(
        ConcurrencyLimit,
        overall=state.security.max_concurrent,
        per_key=state.security.max_concurrent_per_key,
    )
    # The plugins' pages (the alerts plugin's staff page): static files, nothing from the internet.
    pages = mount_pages(app, state.plugins)
    home = f"{pages[0]}/" if pages else "/docs"

    @app.get("/", include_in_schema=False)
    async def _home() -> RedirectResponse:
        return RedirectResponse(home)

    @app.get("/redoc", include_in_schema=False)
    async def _redoc() -> RedirectResponse:
        return RedirectResponse("/docs")

    @app.exception_handler(StoreError)
    async def _store_error(_request: Request, exc: StoreError) -> JSONResponse:
        # The first line says what (a lock, a refused connection); the statement and its
        # parameters stay in the log, not in a reply to whoever asked.
        log.warning("API request failed on the database: %s", exc)
        said = str(exc).split("\n", 1)[0].split(" [SQL:", 1)[0]
        return JSONResponse(status_code=503, content={"detail": f"database unavailable: {said}"})

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
