"""The consumers in a process of their own, beside ingestion (`IOTGW_CONSUMER_PROCESS`, on by default).

Ingestion and the consumers share nothing but the database, yet in one process they share one
interpreter lock: the consumers' Python work (parsing events, alert rules, aggregates) took a
fifth of ingestion's rate away under a flood. So `iotgw run` starts `python -m gateway
consumer-process`, a child that runs the consumers (their runners, leases and cursors exactly
as in one process) at a lower CPU priority (`IOTGW_CONSUMER_NICE`). The gateway process keeps
ingest, the API, the notifier and the metrics; its router stands by (`Router.start(elsewhere)`):
the API's operations write the database as in a cluster, then tell the child.

The link is the child's stdin and stdout, one JSON object per line:

- gateway -> consumers: `{"new": [types] | null}` after a commit (the wake-up), `{"reload": name}`
  after an operation changed a consumer's cursor or state, `{"retry": [request, name, id]}` (a
  parked event, handled where the consumer's memory is), `{"broker": bool}` (the alert engine
  says nothing of silent devices while the gateway hears nothing);
- consumers -> gateway: `{"ready": true}`, `{"grew": true}` (derived events appended: live views
  wake), `{"status": {name: [position, failing, last_error]}}`, `{"metrics": [family...]}` (what
  the consumers count: the gateway's /metrics shows it), `{"retried": [request, error | null]}`.

The child ends when its stdin closes: the gateway stopped, or died. A child that ends while the
gateway runs is started again (1 s, doubling up to 30 s); its consumers go on from their cursors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from pydantic import SecretStr

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.runtime import ConsumerError, Router
from gateway.tasks import stop_task

log = logging.getLogger(__name__)

LINE_LIMIT = 16 * 2**20  # a metrics line is some 20 KB; this is only a bound
STATUS_EVERY_S = 0.2
METRICS_EVERY_S = 1.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
RESTART_MAX_S = 30.0
WAKE_BACKLOG_BYTES = 64 * 1024


def child_environment(settings: Settings) -> dict[str, str]:
    """The child's environment: these settings as IOTGW_* (flags included), consumers only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTGW_")}
    for field, value in settings.model_dump().items():
        if value is None:
            continue  # unset: the child takes the same default
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | dict | tuple):
            text = json.dumps(value)  # how pydantic-settings reads a complex value from the environment
        else:
            text = str(value)
        env[f"IOTGW_{field.upper()}"] = text
    # It never connects to the broker and never runs a child of its own.
    env.update(IOTGW_INGEST="false", IOTGW_CONSUMER_PROCESS="false", IOTGW_MQTT_PASSWORD="")
    return env


def encode_line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def metric_families(registry: CollectorRegistry) -> list[list[Any]]:
    return [
        [f.name, f.documentation, f.type, f.unit, [[s.name, s.labels, s.value] for s in f.samples]]
        for f in registry.collect()
    ]


def _rebuild(families: Iterable[list[Any]]) -> list[Metric]:
    out = []
    for name, documentation, typ, unit, samples in families:
        metric = Metric(name, documentation, typ, unit)
        for sample_name, labels, value in samples:
            metric.add_sample(sample_name, labels, value)
        out.append(metric)
    return out


class ConsumerProcess:
    """The gateway's side: starts the child, keeps it running, and is the router's `elsewhere`.

    Registered in the gateway's metrics registry as a collector: it yields the child's
    `Metrics.handled_here` families (this process's zeros until the child first reports) and the
    child's process figures.
    """

    def __init__(
        self, settings: Settings, router: Router, metrics: Metrics, *, broker_connected: Callable[[], bool]
    ) -> None:
        self.settings = settings
        self.router = router
        self.metrics = metrics
        self.broker_connected = broker_connected
        self._proc: asyncio.subprocess.Process | None = None
        self._families: list[Metric] = []
        self._requests: dict[int, asyncio.Future[str | None]] = {}
        self._next_request = 0
        self._ready = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._broker_task: asyncio.Task[None] | None = None
        self._broker_sent: bool | None = None
        self._heard_at = time.monotonic()  # the child's last line (it reports every second)
        self._proc_ready = False
        self._watchdog: asyncio.Task[None] | None = None
        metrics.registry.register(self)

    # -- prometheus_client collector -------------------------------------------------------------

    def collect(self) -> list[Metric]:
        """The child's last report (or this process's zeros until there is one)."""
        return list(self._families) or list(self.metrics.handled_here.collect())

    # -- life ------------------------------------------------------------------------------------

    def launch(self) -> None:
        """Start the child (`ready()` waits until its consumers run)."""
        self._supervisor = asyncio.create_task(self._supervise(), name="iotgw-consumer-process")

    async def ready(self) -> None:
        """Wait until the child's consumers run; `GatewayError` if it ends or times out first."""
        assert self._supervisor is not None  # noqa: S101 - launch() first
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({ready, self._supervisor}, timeout=START_TIMEOUT_S, return_when="FIRST_COMPLETED")
        if ready not in done:
            ready.cancel()
            code = self._proc.returncode if self._proc is not None else None
            await self.stop()
            msg = f"the consumer process did not start (exit code {code}); its log is above"
            raise GatewayError(msg)
        self._broker_task = asyncio.create_task(self._follow_broker(), name="iotgw-consumer-process-broker")
        self._watchdog = asyncio.create_task(self._watch(), name="iotgw-consumer-process-watchdog")

    async def stop(self) -> None:
        """Close the child's stdin (it stops its consumers, saving their cursors) and wait for it."""
        self._stopping = True
        await stop_task(self._watchdog)
        await stop_task(self._broker_task)
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("the consumer process did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
                proc.kill()
                await proc.wait()
        await stop_task(self._supervisor)
        self.metrics.consumer_process_up.set(0)

    async def _supervise(self) -> None:
        delay = 1.0
        while True:
            started = time.monotonic()
            proc = self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "consumer-process",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=child_environment(self.settings), limit=LINE_LIMIT,
            )  # fmt: skip
            self._broker_sent = None
            self._heard_at = time.monotonic()
            self._proc_ready = False  # this child has not said ready yet: it is still starting
            await self._read(proc)
            code = await proc.wait()
            self.metrics.consumer_process_up.set(0)
            for future in self._requests.values():
                if not future.done():
                    future.set_result("the consumer process ended before it answered; try again")
            self._requests.clear()
            if self._stopping or not self._ready.is_set():
                return  # a stop, or a child that never started (ready() reports it)
            log.error("the consumer process ended (exit code %s); starting it again in %.0f s", code, delay)
            self.metrics.consumer_process_restarts.inc()
            await asyncio.sleep(delay)
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, RESTART_MAX_S)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None  # noqa: S101 - stdout=PIPE
        try:
            while line := await proc.stdout.readline():
                self._heard_at = time.monotonic()
                try:
                    message = json.loads(line)
                    self._take(message)
                except (ValueError, TypeError, KeyError) as exc:
                    log.warning("the consumer process said something unreadable (%s): %.200r", exc, line)
        except Exception:
            # A link that cannot be read is no link: end the child, and the supervisor starts another.
            log.exception("lost the link to the consumer process; ending it")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def _take(self, message: dict[str, Any]) -> None:
        if "status" in message:
            for name, (position, failing, last_error) in message["status"].items():
                runner = self.router.runners.get(name)
                if runner is not None:
                    runner.position, runner.failing, runner.last_error = int(position), bool(failing), last_error
        if "metrics" in message:
            self._families = _rebuild(message["metrics"])
        if message.get("grew"):
            self.router.changes.bump()  # live views; the child woke its own consumers
        if "retried" in message:
            request, error = message["retried"]
            future = self._requests.pop(int(request), None)
            if future is not None and not future.done():
                future.set_result(error)
        if message.get("ready"):
            self._proc_ready = True
            self.metrics.consumer_process_up.set(1)
            self._ready.set()
            self._send({"broker": self.broker_connected()})
            log.info("consumers run in process %d (nice +%d)", self._proc.pid if self._proc else 0,
                     self.settings.consumer_nice)  # fmt: skip

    def silent_for(self) -> float:
        """Seconds since the child last said anything (0 while none runs: the supervisor's business)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return 0.0
        return time.monotonic() - self._heard_at

    def unresponsive(self) -> str | None:
        """Why the child is not running the consumers now (it has not reported for a while), or None."""
        silent = self.silent_for()
        if silent < 3 * METRICS_EVERY_S:
            return None
        return f"the consumers' process has not answered for {silent:.0f} s (it reports every {METRICS_EVERY_S:g} s)"

    async def _watch(self) -> None:
        """Kill a child that stopped answering (frozen, or hung with its event loop blocked): the
        supervisor starts another, which takes the consumers on from their cursors. An exit alone
        is no proof of life: a SIGSTOPped child never exits."""
        running_limit = self.settings.consumer_process_timeout_s
        while True:
            await asyncio.sleep(min(running_limit / 4, 1.0))
            proc = self._proc
            # A child still starting (imports, connections, its consumers' preparation) may take
            # longer on a busy machine before its first line: it is given START_TIMEOUT_S.
            limit = running_limit if self._proc_ready else max(running_limit, START_TIMEOUT_S)
            if proc is None or proc.returncode is not None or self.silent_for() < limit:
                continue
            log.error(
                "the consumer process %d has not answered for %.0f s (IOTGW_CONSUMER_PROCESS_TIMEOUT_S=%g); "
                "killing it to start another",
                proc.pid,
                self.silent_for(),
                limit,
            )
            self.metrics.consumer_process_up.set(0)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # SIGKILL ends a stopped process too
            await proc.wait()

    async def _follow_broker(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            connected = self.broker_connected()
            if connected != self._broker_sent:
                self._send({"broker": connected})

    def _send(self, message: dict[str, Any]) -> bool:
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None or proc.stdin.is_closing():
            return False
        if "broker" in message:
            self._broker_sent = message["broker"]
        proc.stdin.write(encode_line(message))
        return True

    # -- Router.elsewhere --------------------------------------------------------------------------

    def notify(self, types: Collection[str] | None) -> None:
        """New events are in the log: wake the child's consumers (those that read `types`)."""
        stdin = self._proc.stdin if self._proc is not None else None
        if stdin is not None and stdin.transport.get_write_buffer_size() > WAKE_BACKLOG_BYTES:
            return  # the child is not reading: wake-ups would only pile up (its slow poll covers them)
        self._send({"new": sorted(types) if types is not None else None})

    async def reload(self, name: str) -> None:
        """An operation changed consumer `name` in the database: the child takes it on afresh."""
        self._send({"reload": name})

    async def retry(self, name: str, dead_letter_id: int) -> None:
        """Have the child retry a parked event; `ConsumerError` with its reason if that fails."""
        self._next_request += 1
        request = self._next_request
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._requests[request] = future
        if not self._send({"retry": [request, name, dead_letter_id]}):
            self._requests.pop(request, None)
            msg = "the consumer process is not running (it is being started again); try again shortly"
            raise ConsumerError(msg)
        error = await future
        if error is not None:
            raise ConsumerError(error)
