"""One gateway process: ingest, the consumer router, the plugins and the HTTP API in one asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from prometheus_client import CollectorRegistry, ProcessCollector

from gateway.api import AppState, create_app
from gateway.api.auth import ApiSecurity
from gateway.config import Settings
from gateway.errors import ConfigError, GatewayError
from gateway.ingest.client import Ingest
from gateway.log import Store
from gateway.metrics import Metrics
from gateway.plugins import Host, plugin_classes, start_plugins
from gateway.runtime import Consumer, Router, load_consumers
from gateway.runtime.apart import ConsumerProcess
from gateway.runtime.sequencer import Sequencer
from gateway.security import PasswordFile, has_api_keys, reserved_in_use
from gateway.tasks import stop_task

log = logging.getLogger(__name__)
DEFAULT_DATABASE = Settings.model_fields["database_url"].default


def _plugin_ended(name: str, task: asyncio.Task[None]) -> None:
    """A plugin's background work that ends by itself is said, with why when it failed."""
    if task.cancelled():
        return
    if (exc := task.exception()) is not None:
        log.error("plugin %s: its background work failed and stopped: %r", name, exc, exc_info=exc)
    else:
        log.info("plugin %s: its background work ended", name)


class _EmbeddedServer(uvicorn.Server):
    # The gateway owns SIGINT/SIGTERM; uvicorn must not take them over.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Gateway:
    """Start with `await start()`, stop with `await stop()`; `ingest` and `store` are public for tests."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        serve_http: bool = True,
        extra_consumers: Sequence[Consumer] = (),
    ) -> None:
        self.settings = settings
        registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(namespace="iotgw", registry=registry)
        # The consumers in a process of their own (gateway/runtime/apart.py): this one ingests and serves.
        self.apart = settings.consumer_process and settings.ingest and bool(settings.consumer_names)
        if self.apart and extra_consumers:
            msg = "consumers given in code run in the gateway's process: set consumer_process=False"
            raise ConfigError(msg)
        self.metrics = Metrics(registry, handled_elsewhere=self.apart)
        self.consumer_process: ConsumerProcess | None = None
        self.store = Store(settings.database_url, idle_in_transaction_s=settings.idle_in_transaction_s)
        # Loaded before the schema is created, so their tables are created with it.
        self.router = Router(
            self.store,
            self.metrics,
            [*load_consumers(settings.consumer_names, settings), *extra_consumers],
            # The log may grow in another process (a cluster, or a separate ingest): a short slow poll.
            poll_s=(
                min(settings.consumer_poll_s, 0.2)
                if settings.clustered or not settings.ingest
                else settings.consumer_poll_s
            ),
            instance=settings.instance_name,
            lease_s=settings.lease_s,
            handler_timeout_s=settings.consumer_timeout_s or None,
            stall_s=settings.consumer_stall_s,
        )
        # In a cluster, ingest fills the inbox and the sequencer (on one instance) makes the events.
        self.sequencer = (
            Sequencer(settings, self.store, self.metrics, on_commit=self.router.notify) if settings.clustered else None
        )
        self.ingest = Ingest(
            settings,
            self.store,
            self.metrics,
            on_commit=self.router.notify,
            on_inbox=self.sequencer.notify if self.sequencer is not None else None,
        )
        # Every installed plugin: its routes, metrics and live view; its background work (`run`)
        # only where one of its consumers runs (Plugin.active).
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="iotgw-background")
        if not settings.public_url and settings.http_host in ("0.0.0.0", "::", ""):  # noqa: S104 - what it compares with
            log.warning("IOTGW_PUBLIC_URL is not set: links in notifications point to http://%s:%s, which no "
                        "phone can open; set it to the address people reach the gateway at",
                        settings.http_host, settings.http_port)  # fmt: skip
        host = Host(
            settings=settings,
            store=self.store,
            registry=registry,
            consumers={name: runner.consumer for name, runner in self.router.runners.items()},
            background=self._background,
            public_url=settings.public_url.rstrip("/") or f"http://{settings.http_host}:{settings.http_port}",
            changed=self.router.log_grew_threadsafe,
        )
        self.plugins = start_plugins(host, plugin_classes())
        self._plugin_tasks: list[asyncio.Task[None]] = []
        self.app = create_app(
            AppState(
                store=self.store,
                metrics=self.metrics,
                broker_connected=lambda: self.ingest.connected,
                database_writable=lambda: self.ingest.database_ok,
                ingest_failure=lambda: self.ingest.writer.failure,
                router=self.router,
                ingest=settings.ingest,
                security=ApiSecurity(
                    auth=settings.api_auth,
                    open_probes=settings.api_open_probes,
                    cors_origins=tuple(settings.cors_origin_list),
                    max_body_bytes=settings.max_body_bytes,
                    password_file=settings.broker_password_file,
                    pid_file=settings.broker_pid_file,
                    reserved_names=settings.reserved_names,
                    max_concurrent=settings.api_max_concurrent,
                    max_concurrent_per_key=settings.api_max_concurrent_per_key,
                ),
                plugins=self.plugins,
                time_zone=settings.time_zone,
            )
        )
        self.serve_http = serve_http
        self._server: _EmbeddedServer | None = None
        self._server_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Create the schema, start ingest and the API."""
        await asyncio.to_thread(self.store.create_schema)
        await asyncio.to_thread(self._check_reserved)
        if not self.settings.clustered:
            await asyncio.to_thread(self._finish_inbox)
        await self._start_router()
        if self.sequencer is not None:
            await self.sequencer.start()
        if self.settings.ingest:
            await self.ingest.start()
        if self.consumer_process is not None:
            await self.consumer_process.ready()
        if self.settings.ingest and not self.apart:  # apart: the link tells the consumers' process
            for runner in self.router.runners.values():
                if hasattr(runner.consumer, "broker_connected"):
                    runner.consumer.broker_connected = lambda: self.ingest.connected
        self._start_plugins()
        if self.serve_http:
            config = uvicorn.Config(
                self.app,
                host=self.settings.http_host,
                port=self.settings.http_port,
                log_level="warning",
                lifespan="off",
                access_log=False,
                timeout_graceful_shutdown=3,  # an open event stream must not hold up a stop
            )
            self._server = _EmbeddedServer(config)
            self._server_task = asyncio.create_task(self._serve(self._server), name="iotgw-http")
            while not self._server.started:
                if self._server_task.done():
                    self._server_task = None  # (its failure is this error)
                    msg = (
                        f"the API could not listen on {self.settings.http_host}:{self.settings.http_port}"
                        " (in use? IOTGW_HTTP_PORT / --http-port)"
                    )
                    raise GatewayError(msg)
                await asyncio.sleep(0.02)
        if self.settings.api_auth and not await asyncio.to_thread(has_api_keys, self.store):
            where = (
                ""
                if self.settings.database_url == DEFAULT_DATABASE
                else f" --database-url '{self.settings.database_url_safe}'"
            )
            log.warning(
                "the API needs a key and none exists yet: iotgw apikeys create --role admin --name NAME%s", where
            )
        log.info(
            "iotgw up: broker %s, database %s, API http://%s:%d",
            self.settings.mqtt_url_safe,
            self.settings.database_url_safe,
            self.settings.http_host,
            self.settings.http_port,
        )

    def _start_plugins(self) -> None:
        """The background work of the plugins whose consumers run here."""
        for name, plugin in self.plugins.items():
            if plugin.active:
                task = asyncio.create_task(plugin.run(), name=f"iotgw-plugin-{name}")
                task.add_done_callback(functools.partial(_plugin_ended, name))
                self._plugin_tasks.append(task)

    def _check_reserved(self) -> None:
        # A device provisioned under the gateway's client id would, on the devices' listener, get
        # that very id: it would knock the gateway off and take its session.
        s = self.settings
        passwords = PasswordFile(s.broker_password_file) if s.broker_password_file else None
        clashes = reserved_in_use(self.store, passwords, s.reserved_names)
        if clashes and s.ingest:
            msg = (
                f"provisioned devices have names reserved for the gateway's broker account or client ids "
                f"({', '.join(clashes[:5])}): revoke them (iotgw devices revoke ID) or choose another "
                f"IOTGW_MQTT_CLIENT_ID / IOTGW_MQTT_USERNAME"
            )
            raise ConfigError(msg)

    async def _start_router(self) -> None:
        """The consumers in this process; or (apart) launch their own process, which starts while
        ingest does, and let this router stand by for the API."""
        if not self.apart:
            await self.router.start()
            return
        self.consumer_process = ConsumerProcess(
            self.settings, self.router, self.metrics, broker_connected=lambda: self.ingest.connected
        )
        await self.router.start(elsewhere=self.consumer_process)
        self.consumer_process.launch()

    def _finish_inbox(self) -> None:
        """A gateway on its own makes the events of messages a cluster left in the inbox, first."""
        if self.store.inbox_size() == 0:
            return
        sequencer = Sequencer(self.settings, self.store, self.metrics)
        log.warning("the inbox holds messages a cluster left; making their events before ingest starts")
        left = sequencer.drain()
        if left:
            msg = f"{left} inbox messages could not be made into events (another instance holds the sequencer lease?)"
            raise GatewayError(msg)

    @staticmethod
    async def _serve(server: uvicorn.Server) -> None:
        # uvicorn ends with SystemExit when it cannot bind: that must not end the event loop.
        with contextlib.suppress(SystemExit):
            await server.serve()

    async def stop(self) -> None:
        """Flush and acknowledge what was received, leave the broker, stop the API."""
        await self.ingest.stop()
        if self.sequencer is not None:
            await self.sequencer.stop()
        if self.consumer_process is not None:
            await self.consumer_process.stop()
        for name, plugin in self.plugins.items():
            if plugin.active:
                try:
                    await plugin.stop()
                except Exception:  # one plugin's failure must not keep the gateway from stopping cleanly
                    log.exception("plugin %s failed to stop", name)
        for task in self._plugin_tasks:
            await stop_task(task)
        await asyncio.to_thread(self._background.shutdown, wait=True)
        await self.router.stop()
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._server_task, return_exceptions=True)
        self.store.close()
