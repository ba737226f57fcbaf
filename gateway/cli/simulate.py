"""`iotgw simulate`: a fleet of simulated devices against a broker."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway.cli.common import (
    DEVICE_URL,
    add_settings,
    fleet_args,
    fleet_config,
    safe_url,
    settings_from,
    setup_logging,
    stop_event,
)
from gateway.errors import GatewayError
from gateway.text import plural

if TYPE_CHECKING:
    pass


def simulate_args(sim: argparse.ArgumentParser) -> None:
    sim.add_argument(
        "--mqtt-url",
        dest="device_url",
        default=DEVICE_URL,
        help="the broker's listener for devices (default %(default)s; the gateway's is IOTGW_MQTT_URL)",
    )
    add_settings(sim, fields=("log_level",))
    fleet_args(sim, elevators=10, sensors=30, fault_rate=0.002)
    sim.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default: run until Ctrl-C)"
    )
    sim.add_argument("--steps", type=int, default=None, help="stop each device after this many steps")
    sim.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        help="exit 1, saying why (the broker's refusal), when no device could connect within this many "
        "seconds (default %(default)s)",
    )
    sim.add_argument("--prefix", default="", help="prefix for device ids (several fleets on one broker)")
    sim.add_argument(
        "--credentials",
        type=Path,
        default=None,
        help="file of ID:PASSWORD lines (iotgw devices provision --out): each device logs in as itself",
    )
    sim.add_argument("--print-ids", action="store_true", help="print the fleet's device ids and exit")


def cmd_simulate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings.log_level)
    return asyncio.run(_simulate(args))


def _read_credentials(path: Path) -> dict[str, str]:
    """ID:PASSWORD lines (as `iotgw devices provision --out` writes them)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        msg = f"cannot read credentials file {path}: {exc.strerror}"
        raise GatewayError(msg) from exc
    creds: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        device_id, sep, secret = line.partition(":")
        if not sep or not device_id or not secret:
            msg = f"{path}:{n}: expected ID:PASSWORD"
            raise GatewayError(msg)
        creds[device_id.strip()] = secret.strip()
    return creds


async def _simulate(args: argparse.Namespace) -> int:
    from devices.fleet import Fleet, Progress, build_models, summary  # noqa: PLC0415

    url = urlsplit(args.device_url)
    if url.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not url.hostname:
        msg = f"--mqtt-url must look like mqtt://host:port or mqtts://host:port, got {args.device_url!r}"
        raise GatewayError(msg)

    cfg = fleet_config(args, args.device_url, duration=args.duration, steps=args.steps, prefix=args.prefix)
    if args.print_ids:
        print("\n".join(m.device_id for m in build_models(cfg)))  # noqa: T201
        return 0
    if args.credentials is not None:
        cfg = dataclasses.replace(cfg, credentials=_read_credentials(args.credentials))
    fleet = Fleet(cfg, on_tick=Progress())
    where = safe_url(cfg.mqtt_url)
    print(f"simulate: {plural(len(fleet.devices), 'device')} publishing to {where}", file=sys.stderr, flush=True)  # noqa: T201
    stop = stop_event()
    watcher = asyncio.create_task(stop.wait())
    watcher.add_done_callback(lambda _: fleet.stop())
    nobody: list[bool] = []

    async def give_up() -> None:  # no device let in within the timeout: say why, and stop
        await asyncio.sleep(args.connect_timeout)
        if not fleet.stats.ever_connected:
            nobody.append(True)
            fleet.stop()

    giving_up = asyncio.create_task(give_up())
    try:
        stats = await fleet.run()
    finally:
        watcher.cancel()
        giving_up.cancel()
    print("\n" + json.dumps(summary(stats)), file=sys.stderr)  # noqa: T201
    if nobody or not stats.ever_connected:
        why = next(iter(stats.refused.values()), "no answer")
        hint = (
            "; each device logs in as itself: --credentials FILE (ID:PASSWORD lines)"
            if (args.credentials is None and "authori" in why.lower())
            else ""
        )
        msg = f"no device could connect to {where} within {args.connect_timeout:g} s: {why}{hint}"
        raise GatewayError(msg)
    return 0
