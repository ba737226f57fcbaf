"""Many simulated devices in one event loop, each with its own MQTT connection (aiomqtt).

Every device publishes QoS 1 with an increasing `seq` and re-sends a message until the broker
acknowledges it (across reconnects), so a broker restart loses nothing a device produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import aiomqtt

from devices.connect import mqtt_client
from devices.elevator import Elevator
from devices.sensors import SENSOR_TYPES, Sensor

log = logging.getLogger(__name__)

Model = Elevator | Sensor


@dataclass(slots=True)
class FleetStats:
    """Counters shared by every device of a fleet."""

    sent: int = 0
    connected: int = 0
    reconnects: int = 0
    devices: int = 0
    ever_connected: set[str] = field(default_factory=set)  # devices the broker let in at least once
    refused: dict[str, str] = field(default_factory=dict)  # device -> why the broker last refused it
    started: float = field(default_factory=time.monotonic)
    by_device: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class FleetConfig:
    """What `iotgw simulate` runs."""

    mqtt_url: str = "mqtt://localhost:1883"
    elevators: int = 10
    sensors: int = 30
    rate: float = 1.0
    fault_rate: float = 0.002
    seed: int = 1
    duration: float | None = None
    steps: int | None = None
    sites: int = 3
    prefix: str = ""
    seq_start: int | None = None
    telemetry_qos: int = 1
    # Provisioned devices: id -> secret (each logs in as its own id). Devices not listed use
    # the credentials in mqtt_url, if any.
    credentials: Mapping[str, str] | None = field(default=None, hash=False, compare=False)
    ca_file: str = ""  # for mqtts:// URLs

    def login(self, device_id: str) -> tuple[str, str] | None:
        """(user, password) for `device_id` when it is provisioned here, else None (the URL's)."""
        if self.credentials and device_id in self.credentials:
            return device_id, self.credentials[device_id]
        return None


def iso_now() -> str:
    """Current time as RFC 3339 with milliseconds and a Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_models(cfg: FleetConfig) -> list[Model]:
    """The fleet's devices, each with its own RNG derived from the seed (reproducible)."""
    models: list[Model] = []
    for i in range(cfg.elevators):
        did = f"{cfg.prefix}elev-{i + 1:03d}"
        models.append(
            Elevator(
                device_id=did,
                site=f"site-{i % cfg.sites + 1}",
                rng=random.Random(f"{cfg.seed}:{did}"),
                fault_rate=cfg.fault_rate,
                maintenance_rate=cfg.fault_rate / 4,
            )
        )
    for i in range(cfg.sensors):
        stype = SENSOR_TYPES[i % len(SENSOR_TYPES)]
        did = f"{cfg.prefix}{stype[:4]}-{i + 1:03d}"
        models.append(
            Sensor(
                device_id=did,
                site=f"site-{i % cfg.sites + 1}",
                type=stype,
                rng=random.Random(f"{cfg.seed}:{did}"),
                fault_rate=cfg.fault_rate,
            )
        )
    return models


class SimDevice:
    """One device: its model, its MQTT connection and its unacknowledged messages."""

    def __init__(self, model: Model, cfg: FleetConfig, stats: FleetStats, seq_start: int) -> None:
        self.model = model
        self.cfg = cfg
        self.stats = stats
        self.seq = seq_start
        self.steps = 0
        self.outbox: list[tuple[str, bytes, int, bool]] = []
        mid = model.device_id
        self.topic_status = f"devices/{mid}/status"
        self.is_elevator = isinstance(model, Elevator)
        self.topic_data = f"devices/{mid}/{'state' if self.is_elevator else 'telemetry'}"
        self.type = "elevator" if isinstance(model, Elevator) else model.type

    def next_message(self) -> None:
        """Step the model and queue what it publishes (elevators only publish changes)."""
        self.steps += 1
        data = self.model.step()
        if data is None:
            return
        self.seq += 1
        body = {"type": self.type, "seq": self.seq, "ts": iso_now(), "site": self.model.site, "data": data}
        qos = 1 if self.is_elevator else self.cfg.telemetry_qos
        self.outbox.append((self.topic_data, json.dumps(body, separators=(",", ":")).encode(), qos, False))

    def done(self) -> bool:
        """True once the configured number of steps ran and everything was acknowledged."""
        return self.cfg.steps is not None and self.steps >= self.cfg.steps and not self.outbox

    async def run(self, stop: asyncio.Event, start_delay: float) -> None:
        """Connect, publish until stopped or done, reconnecting with backoff on any MQTT error."""
        await asyncio.sleep(start_delay)
        will = aiomqtt.Will(self.topic_status, self._status(online=False), qos=1, retain=True)
        backoff = 0.2
        period = 1.0 / self.cfg.rate
        while not stop.is_set():
            client = mqtt_client(
                self.cfg.mqtt_url,
                self.model.device_id,
                login=self.cfg.login(self.model.device_id),
                ca_file=self.cfg.ca_file,
                will=will,
                keepalive=30,
                timeout=5,
            )
            try:
                async with client:
                    self.stats.connected += 1
                    self.stats.ever_connected.add(self.model.device_id)
                    self.stats.refused.pop(self.model.device_id, None)
                    try:
                        await client.publish(self.topic_status, self._status(online=True), qos=1, retain=True)
                        backoff = 0.2
                        await self._publish_loop(client, stop, period)
                        # A clean exit is not a lost connection, so say goodbye ourselves.
                        await client.publish(self.topic_status, self._status(online=False), qos=1, retain=True)
                    finally:
                        self.stats.connected -= 1
            except (aiomqtt.MqttError, TimeoutError) as exc:
                settle(client)
                if isinstance(exc, aiomqtt.MqttCodeError) and self.model.device_id not in self.stats.refused:
                    self.stats.refused[self.model.device_id] = str(exc)  # the CONNACK's reason, say
                elif not isinstance(exc, aiomqtt.MqttCodeError):
                    self.stats.refused.setdefault(self.model.device_id, f"{type(exc).__name__}: {exc}")
                self.stats.reconnects += 1
                log.debug("%s: %s; reconnecting in %.1fs", self.model.device_id, exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                return

    async def _publish_loop(self, client: aiomqtt.Client, stop: asyncio.Event, period: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not stop.is_set():
            while self.outbox:
                topic, payload, qos, retain = self.outbox[0]
                await client.publish(topic, payload, qos=qos, retain=retain)
                self.outbox.pop(0)  # only once the broker has acknowledged it
                self.stats.sent += 1
                self.stats.by_device[self.model.device_id] = self.seq
            if self.done():
                return
            if self.cfg.steps is None or self.steps < self.cfg.steps:
                next_at += period
                delay = next_at - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                else:
                    next_at = loop.time()  # fell behind: do not burst to catch up
                if not stop.is_set():
                    self.next_message()

    def _status(self, *, online: bool) -> bytes:
        return json.dumps({"online": online, "type": self.type, "site": self.model.site}).encode()


def settle(client: aiomqtt.Client) -> None:
    """Mark a lost connection's error as seen.

    On a lost connection aiomqtt's `__aexit__` returns without retrieving the error it stored,
    and asyncio later reports "Future exception was never retrieved" for it. We have handled
    the loss (by reconnecting), so we retrieve it here.
    """
    fut = client._disconnected  # noqa: SLF001 - no public accessor
    if fut.done() and not fut.cancelled():
        fut.exception()


@contextlib.contextmanager
def tolerate_closed_socket_race() -> Iterator[None]:
    """Ignore one known, harmless aiomqtt race while the block runs.

    When the broker drops a connection, aiomqtt may schedule `loop.add_writer` for the socket
    from paho's callback just before paho closes it; the late callback then fails with EBADF.
    The client has already seen the disconnect and reconnects, so the error is noise. Anything
    else goes to the loop's previous exception handler.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno == errno.EBADF and "add_writer" in repr(context.get("handle")):
            log.debug("ignored a write registration on a socket closed by a disconnect")
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)


class Fleet:
    """A whole simulated fleet: `await Fleet(cfg).run()` until duration/steps are done or `stop()`."""

    def __init__(self, cfg: FleetConfig, *, on_tick: Callable[[FleetStats], None] | None = None) -> None:
        self.cfg = cfg
        self.stats = FleetStats()
        self.on_tick = on_tick
        self._stop = asyncio.Event()
        seq_start = cfg.seq_start if cfg.seq_start is not None else time.time_ns() // 1000
        self.devices = [SimDevice(m, cfg, self.stats, seq_start) for m in build_models(cfg)]
        self.stats.devices = len(self.devices)

    def stop(self) -> None:
        """Ask every device to finish (acknowledged messages stay sent; the rest are dropped)."""
        self._stop.set()

    def force_fault(self, device_id: str, code: str, steps: int = 10) -> None:
        """Start a fault on one elevator now."""
        for d in self.devices:
            if d.model.device_id == device_id and isinstance(d.model, Elevator):
                d.model.force_fault(code, steps)
                return
        msg = f"no elevator {device_id!r} in this fleet"
        raise KeyError(msg)

    async def run(self) -> FleetStats:
        """Run until every device is done, the duration passed, or `stop()` was called."""
        spread = min(1.0, len(self.devices) / 500)  # stagger connects: no thundering herd
        tasks = [
            asyncio.create_task(d.run(self._stop, random.Random(i).uniform(0, spread)))
            for i, d in enumerate(self.devices)
        ]
        ticker = asyncio.create_task(self._tick())
        try:
            with tolerate_closed_socket_race():
                if self.cfg.duration is not None:
                    await asyncio.wait(tasks, timeout=self.cfg.duration)
                    self._stop.set()
                await asyncio.gather(*tasks)
        finally:
            self._stop.set()
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            if self.on_tick:
                self.on_tick(self.stats)
        return self.stats

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.on_tick:
                self.on_tick(self.stats)


class Progress:
    """Prints messages sent, rate and connections: one updating line on a terminal, else every 5 s."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last_sent = 0
        self.last_t = time.monotonic()
        self.last_print = 0.0

    def __call__(self, stats: FleetStats) -> None:
        now = time.monotonic()
        rate = (stats.sent - self.last_sent) / max(now - self.last_t, 1e-6)
        self.last_sent, self.last_t = stats.sent, now
        line = (
            f"simulate: {stats.sent} messages sent, {rate:,.0f} msg/s, "
            f"{stats.connected}/{stats.devices} devices connected, {stats.reconnects} reconnects, "
            f"{now - stats.started:,.0f}s"
        )
        if stats.refused:
            reason = next(iter(stats.refused.values()))
            line += f"; {len(stats.refused)} not connected ({reason[:120]})"
        if self.tty:
            self.out.write("\r" + line + "   ")
        elif now - self.last_print >= 5:
            self.out.write(line + "\n")
            self.last_print = now
        else:
            return
        self.out.flush()


def summary(stats: FleetStats) -> dict[str, Any]:
    """A short summary of a finished run."""
    elapsed = time.monotonic() - stats.started
    return {"messages": stats.sent, "seconds": round(elapsed, 1), "rate": round(stats.sent / max(elapsed, 1e-6), 1)}
