"""One gateway process: ingest, (later) the consumer router, and the HTTP API in one asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import uvicorn
from prometheus_client import CollectorRegistry, ProcessCollector

from gateway.apart import ConsumerProcess
from gateway.api import AppState, create_app
from gateway.api.auth import ApiSecurity
from gateway.cluster import Lease
from gateway.config import Settings
from gateway.errors import ConfigError, GatewayError, StoreError
from gateway.ingest import Ingest
from gateway.metrics import Metrics
from gateway.router import Consumer, Router, load_consumers
from gateway.security import PasswordFile, has_api_keys, reserved_in_use
from gateway.sequencer import Sequencer
from gateway.store import Store
from gateway.tasks import stop_task

if TYPE_CHECKING:
    from alerts.notify import Links

log = logging.getLogger(__name__)


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
        # The consumers in a process of their own (gateway/apart.py): this one ingests and serves.
        self.apart = settings.consumer_process and settings.ingest and bool(settings.consumer_names)
        if self.apart and extra_consumers:
            msg = "consumers given in code run in the gateway's process: set consumer_process=False"
            raise ConfigError(msg)
        self.metrics = Metrics(registry, handled_elsewhere=self.apart)
        self.consumer_process: ConsumerProcess | None = None
        self.store = Store(settings.database_url)
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
        self.app = create_app(
            AppState(
                store=self.store,
                metrics=self.metrics,
                broker_connected=lambda: self.ingest.connected,
                database_writable=lambda: self.ingest.database_ok,
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
            )
        )
        self.serve_http = serve_http
        self._server: _EmbeddedServer | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._notifier_task: asyncio.Task[None] | None = None
        self._notifier: Any = None
        # Periodic jobs' threads: stop() waits for them, so none holds a connection past close().
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="iotgw-background")
        self._alert_metrics_task: asyncio.Task[None] | None = None

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
        alerts = self.router.runners.get("alerts")
        if alerts is not None and self.settings.ingest and not self.apart:  # apart: the link tells the child
            alerts.consumer.broker_connected = lambda: self.ingest.connected  # type: ignore[attr-defined]
        if alerts is not None or "dispatch" in self.router.runners:
            self._start_notifier()
            self._alert_metrics_task = asyncio.create_task(self._publish_alert_metrics(), name="iotgw-alert-metrics")
        if "analytics" in self.router.runners:
            self._metrics_task = asyncio.create_task(self._publish_analytics(), name="iotgw-analytics-metrics")
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
            log.warning("the API needs a key and none exists yet: iotgw apikeys create --role admin --name NAME")
        log.info(
            "iotgw up: broker %s, database %s, API http://%s:%d",
            self.settings.mqtt_url_safe,
            self.settings.database_url,
            self.settings.http_host,
            self.settings.http_port,
        )

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
        if self._notifier is not None and self._notifier_task is not None:
            # Let it finish the round in hand: its thread must not hold a connection past close().
            self._notifier.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._notifier_task), 15)
        for task in (self._metrics_task, self._notifier_task, self._alert_metrics_task):
            await stop_task(task)
        await asyncio.to_thread(self._background.shutdown, wait=True)
        await self.router.stop()
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._server_task, return_exceptions=True)
        self.store.close()

    async def _publish_analytics(self) -> None:
        from gateway.analytics import publish_metrics  # noqa: PLC0415 - only with the analytics consumer

        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._background,
                    functools.partial(
                        publish_metrics,
                        self.store,
                        self.metrics,
                        max_device_series=self.settings.analytics_device_series_max,
                    ),
                )
            except StoreError as exc:
                log.debug("analytics metrics not refreshed: %s", exc)
            await asyncio.sleep(10.0)

    def receivers(self) -> list[Any]:
        """Where every alert notification goes: the rules file's receivers."""
        runner = self.router.runners.get("alerts")
        return list(getattr(runner.consumer, "receivers", None) or []) if runner is not None else []

    def pagers(self) -> list[Any]:
        """People's contacts for work-order pages: the roster's receivers (read afresh: the API may edit it)."""
        runner = self.router.runners.get("dispatch")
        roster = getattr(runner.consumer, "roster", None) if runner is not None else None
        return list(getattr(roster, "receivers", None) or [])

    def _links(self) -> Links:
        """The staff page's address and the alert rules, for what notifications link and label."""
        from alerts.notify import Links  # noqa: PLC0415 - only with the alert engine or dispatch

        s = self.settings
        base = s.public_url.rstrip("/") or f"http://{s.http_host}:{s.http_port}"
        runner = self.router.runners.get("alerts")
        rules = getattr(runner.consumer, "rules", None) if runner is not None else None
        return Links(base, {r.name: r for r in rules or ()})

    def _start_notifier(self) -> None:
        from alerts.notify import Notifier  # noqa: PLC0415 - only with the alert engine or dispatch

        names = [r.name for r in self.receivers()] + [r.name for r in self.pagers()]
        if names:
            lease = Lease("notifier", self.settings.instance_name, self.settings.lease_s)
            notifier = Notifier(
                self.store, self.receivers, self.metrics, pagers=self.pagers, lease=lease,
                max_age_s=self.settings.notify_max_age_s, links=self._links,
            )  # fmt: skip
            self._notifier = notifier
            self._notifier_task = asyncio.create_task(notifier.run(), name="iotgw-notifier")
            log.info("notifications to %s", ", ".join(names))

    async def _publish_alert_metrics(self) -> None:
        from alerts.dispatch import WorkOrderMetrics  # noqa: PLC0415 - only with the alert engine or dispatch
        from alerts.engine import AlertMetrics  # noqa: PLC0415

        publishers: list[Any] = []
        if "alerts" in self.router.runners:
            publishers.append(AlertMetrics())
        dispatch = self.router.runners.get("dispatch")
        if dispatch is not None:
            roster = getattr(dispatch.consumer, "roster", None)
            levels = max((len(p.levels) for p in getattr(roster, "policies", [])), default=0)
            publishers.append(WorkOrderMetrics(levels))

        def once() -> None:
            with self.store.session() as tx:
                for publisher in publishers:
                    publisher.publish(tx, self.metrics)

        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(self._background, once)
            except StoreError as exc:
                log.debug("alert metrics not refreshed: %s", exc)
            await asyncio.sleep(2.0)
