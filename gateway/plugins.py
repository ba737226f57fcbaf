"""The plugin contract: what a package adds to the gateway beside its consumers.

A consumer alone is a class under the entry point group `iotgw.consumers` (gateway/runtime/).
A package that needs more (HTTP routes, metrics, a part of the live stream, background work in
the gateway's process, commands) registers a `Plugin` subclass under `iotgw.plugins`, and its
settings (a pydantic model whose fields join the gateway's) under `iotgw.settings`:

    [project.entry-points."iotgw.plugins"]
    door_cycles = "my_package.plugin:DoorCyclesPlugin"
    [project.entry-points."iotgw.settings"]
    door_cycles = "my_package.settings:DoorCyclesSettings"

The gateway knows no plugin by name: alerts, dispatch and analytics are plugins of this kind, and
nothing they do is closed to a third-party package (docs/plugins.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry

from gateway.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from fastapi import APIRouter
    from sqlmodel import Session

    from gateway.log import Store

log = logging.getLogger(__name__)
PLUGIN_GROUP = "iotgw.plugins"


@dataclass(slots=True)
class Host:
    """What the gateway gives a plugin when it starts it."""

    settings: Any  # gateway.config.Settings: the gateway's own fields and every plugin's
    store: Store
    registry: CollectorRegistry  # the registry /metrics serves: a plugin's families go here
    # The consumers this gateway runs, by entry point name (when they run in the consumers' own
    # process, the gateway's configured copies, for what they were configured with).
    consumers: Mapping[str, Any]
    background: Executor  # a thread for blocking work (database reads), shared by the plugins
    public_url: str  # the staff page's base address as people reach it
    # What the plugins of this gateway are, by name (a plugin may use another's public parts).
    plugins: Mapping[str, Plugin] = field(default_factory=dict)
    # Tell the gateway that the plugin appended to the log or changed what its live view shows
    # (from any thread): consumers and the live stream wake.
    changed: Callable[[], None] = lambda: None

    async def every(self, seconds: float, job: Callable[[], None], what: str) -> None:
        """Run the blocking `job` on the background thread now and every `seconds` until cancelled;
        a database that fails for now is logged (at debug, as `what`) and tried again next time."""
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(self.background, job)
            except StoreError as exc:
                log.debug("%s not refreshed: %s", what, exc)
            except Exception:  # a bug in the job: said, and tried again next time
                log.exception("%s failed", what)
            await asyncio.sleep(seconds)


class Plugin:
    """A package's additions to the gateway. Every hook is optional; the defaults add nothing."""

    name: ClassVar[str] = ""
    # The entry point names of its consumers (`iotgw.consumers`): see `active`.
    consumers: ClassVar[tuple[str, ...]] = ()
    # The event types its consumers append to the log (`x.*` for a family): the API filters on them.
    event_types: ClassVar[tuple[str, ...]] = ()
    # The package whose `versions/` folder holds its Alembic revisions: one branch, labelled with
    # the plugin's name, whose base depends on the platform revision it builds on. They run with
    # the platform's at every start (gateway/log/).
    migrations: ClassVar[str | None] = None

    def __init__(self, host: Host) -> None:
        self.host = host
        self.metrics = self.define_metrics(host.registry)

    @property
    def active(self) -> bool:
        """Whether `run` belongs in this gateway: one of its consumers runs here (or it has none).
        Its routes, metrics and live view are there in every gateway, which may serve what another
        process's consumers write."""
        return not self.consumers or any(name in self.host.consumers for name in self.consumers)

    def ui(self) -> Mapping[str, Path]:
        """Static web pages the gateway serves, by URL path (`{"/ui": folder}`): files only, with
        nothing fetched from another host. A path another plugin serves (plugins are taken in the
        order of their names) or the API's is refused; `/` leads to the first page served."""
        return {}

    @classmethod
    def define_metrics(cls, registry: CollectorRegistry) -> Any:  # noqa: ANN401 - the plugin's own families
        """Create the plugin's metric families on `registry` and return them (kept as `self.metrics`)."""
        del registry
        return None

    @classmethod
    def add_commands(cls, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        """Add command groups to `iotgw` (each parser sets `func(args) -> exit code` as its default)."""

    def api(self) -> APIRouter | None:
        """Routes mounted on the gateway's app (paths under /api/...; every one needs a viewer's key,
        mutations declare more with gateway.api.auth's dependencies)."""
        return None

    def pages(self) -> APIRouter | None:
        """Routes mounted without an API key, outside /api: each checks a credential of its own (a
        signed link, say) before it shows or changes anything."""
        return None

    def live(self, tx: Session) -> dict[str, Any]:
        """What the plugin adds to each snapshot of the live stream (/api/stream), as JSON values."""
        del tx
        return {}

    async def run(self) -> None:
        """Background work in the gateway's process while it runs (cancelled at stop if still going)."""

    async def stop(self) -> None:
        """Finish what `run` has in hand, before the gateway closes the store."""


def plugin_classes() -> dict[str, type[Plugin]]:
    """The plugin classes registered under `iotgw.plugins`, by entry point name."""
    found: dict[str, type[Plugin]] = {}
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:
            msg = f"plugin {ep.name!r} could not be loaded: {exc}"
            raise ConfigError(msg) from exc
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            msg = f"plugin {ep.name!r} ({ep.value}) is not a gateway.plugins.Plugin subclass"
            raise ConfigError(msg)
        if cls.name != ep.name:
            msg = f"plugin entry point {ep.name!r} names a plugin called {cls.name!r}: make them the same"
            raise ConfigError(msg)
        found[ep.name] = cls
    return found


def start_plugins(host: Host, classes: Mapping[str, type[Plugin]]) -> dict[str, Plugin]:
    """One instance of each plugin, sharing `host` (whose `plugins` they then find each other in)."""
    plugins: dict[str, Plugin] = {}
    host.plugins = plugins
    for name, cls in classes.items():
        try:
            plugins[name] = cls(host)
        except ConfigError:
            raise
        except Exception as exc:
            msg = f"plugin {name!r} could not start: {exc}"
            raise ConfigError(msg) from exc
    return plugins
