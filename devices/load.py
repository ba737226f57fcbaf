"""A load generator: many device connections publishing numbered QoS 1 telemetry as fast as acked.

Used by the tests (exact counts: device i publishes seq 1..N) and by `bench/`. Each device keeps
up to `window` publishes in flight and re-sends whatever was not acknowledged after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import aiomqtt

from devices.connect import mqtt_client
from devices.elevator import Elevator
from devices.fleet import iso_now, settle, tolerate_closed_socket_race


@dataclass(slots=True)
class LoadStats:
    """Acknowledged publishes, and the publish time of each (device, seq) for latency figures."""

    acked: int = 0
    reconnects: int = 0
    sent_at: dict[tuple[str, int], float] = field(default_factory=dict)


def telemetry_payload(seq: int, value: float, *, site: str = "hq") -> bytes:
    """A temperature reading (about 110 bytes with a short site name)."""
    body = {
        "type": "temperature",
        "seq": seq,
        "ts": iso_now(),
        "site": site,
        "data": {"value": value, "unit": "C"},
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def publish_device(  # noqa: PLR0913
    mqtt_url: str,
    device_id: str,
    count: int,
    stats: LoadStats,
    *,
    window: int = 20,
    site: str = "hq",
    interval: float = 0.0,
    offset: float = 0.0,
    script: Script | None = None,
) -> None:
    """Publish seq 1..count as `device_id`, each until the broker acknowledges it: temperature
    readings, or the state messages of `script` (seq n is `script[n - 1]`).

    With `interval` > 0 the device publishes one message per interval (a paced, live stream),
    the first `offset` seconds later than it would otherwise.
    """
    pending = list(range(1, count + 1))
    topic = f"devices/{device_id}/{script.channel if script else 'telemetry'}"
    if interval > 0:
        window = 1
    loop = asyncio.get_running_loop()
    next_at = loop.time() + offset
    while pending:
        try:
            client = mqtt_client(mqtt_url, device_id, timeout=10, max_inflight_messages=window)
            async with client:
                # A window of publishes in flight is the point here, not a warning sign.
                client.pending_calls_threshold = window + 1
                while pending:
                    if interval > 0:
                        next_at += interval
                        await asyncio.sleep(max(0.0, next_at - loop.time()))
                    chunk = pending[:window]
                    for seq in chunk:
                        stats.sent_at.setdefault((device_id, seq), time.monotonic())
                    results = await asyncio.gather(
                        *(
                            client.publish(
                                topic,
                                script.payloads[seq - 1]
                                if script
                                else telemetry_payload(seq, 20 + seq % 10, site=site),
                                qos=1,
                            )
                            for seq in chunk
                        ),
                        return_exceptions=True,
                    )
                    failed = [seq for seq, r in zip(chunk, results, strict=True) if isinstance(r, BaseException)]
                    stats.acked += len(chunk) - len(failed)
                    pending = failed + pending[len(chunk) :]
                    if failed:
                        raise aiomqtt.MqttError(f"{len(failed)} publishes not acknowledged")  # noqa: TRY301
        except (aiomqtt.MqttError, TimeoutError):
            settle(client)
            stats.reconnects += 1
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.2)


@dataclass(slots=True, frozen=True)
class Script:
    """What one device publishes, in order: seq n is `payloads[n - 1]`, on devices/{id}/{channel}."""

    channel: str
    payloads: Sequence[bytes]

    def __len__(self) -> int:
        return len(self.payloads)


def elevator_script(device_id: str, count: int, *, seed: int = 1, site: str = "site-1") -> Script:
    """`count` state messages (seq 1..count) of a seeded simulated elevator with faults, device
    times one second apart from a fixed start: the same bytes on every call."""
    car = Elevator(device_id=device_id, site=site, rng=random.Random(f"{seed}:{device_id}"), fault_rate=0.02)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    out: list[bytes] = []
    while len(out) < count:
        data = car.step()
        if data is None:
            continue
        ts = (start + timedelta(seconds=len(out))).isoformat().replace("+00:00", "Z")
        body = {"type": "elevator", "seq": len(out) + 1, "ts": ts, "site": site, "data": data}
        out.append(json.dumps(body, separators=(",", ":")).encode())
    return Script("state", out)


def sensor_script(device_id: str, count: int, *, site: str = "site-1") -> Script:
    """`count` temperature readings (seq 1..count), device times one second apart from a fixed
    start: the same bytes on every call."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rng = random.Random(device_id)
    return Script(
        "telemetry",
        [
            json.dumps(
                {
                    "type": "temperature",
                    "seq": n,
                    "ts": (start + timedelta(seconds=n)).isoformat().replace("+00:00", "Z"),
                    "site": site,
                    "data": {"value": round(rng.uniform(15, 30), 2), "unit": "C"},
                },
                separators=(",", ":"),
            ).encode()
            for n in range(1, count + 1)
        ],
    )


async def publish_scripts(mqtt_url: str, scripts: Mapping[str, Script], *, window: int = 20) -> LoadStats:
    """Each device of `scripts` publishes its messages in order (QoS 1); returns when all are acknowledged."""
    stats = LoadStats()
    with tolerate_closed_socket_race():
        await asyncio.gather(
            *(publish_device(mqtt_url, d, len(s), stats, window=window, script=s) for d, s in scripts.items())
        )
    return stats


async def publish_numbered(  # noqa: PLR0913
    mqtt_url: str,
    devices: int,
    per_device: int,
    *,
    prefix: str = "load-",
    window: int = 20,
    site: str = "hq",
    rate: float | None = None,
) -> LoadStats:
    """`devices` connections each publishing seq 1..`per_device`; returns when all are acknowledged.

    `rate` (messages per second, all devices together) paces the stream; None means flat out. The
    paced devices are spread evenly over the interval, as an unsynchronised fleet is: all at the
    same instant, a burst of `devices` messages left one Python process every interval, and the
    last of each burst was stamped 10-20 ms before it was sent (at 1,000 msg/s from 100 devices).
    """
    stats = LoadStats()
    interval = devices / rate if rate else 0.0
    with tolerate_closed_socket_race():
        await asyncio.gather(
            *(
                publish_device(
                    mqtt_url,
                    f"{prefix}{i:05d}",
                    per_device,
                    stats,
                    window=window,
                    site=site,
                    interval=interval,
                    offset=interval * i / devices,
                )
                for i in range(devices)
            )
        )
    return stats
