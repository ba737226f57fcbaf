"""What the commands share: settings from flags, logging, the database a command may touch, the fleet."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import uvloop
from sqlalchemy.engine import make_url

from gateway.cli.broker import DEVICE_LISTENER
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.log import Store

if TYPE_CHECKING:
    from devices.fleet import FleetConfig


log = logging.getLogger("iotgw")


DEVICE_URL = f"mqtt://localhost:{DEVICE_LISTENER}"  # the devices' listener of the project's mosquitto.conf


# CLI flag -> Settings field (the flags and IOTGW_* variables set the same fields).
SETTING_FLAGS = {
    "mqtt_url": "--mqtt-url",
    "mqtt_client_id": "--client-id",
    "instance": "--instance",
    "database_url": "--database-url",
    "http_host": "--http-host",
    "http_port": "--http-port",
    "log_level": "--log-level",
    "time_zone": "--time-zone",
    "consumers": "--consumers",
    "broker_password_file": "--password-file",
    "broker_pid_file": "--pid-file",
}


def add_settings(
    p: argparse.ArgumentParser, *, fields: Sequence[str] = tuple(SETTING_FLAGS), about: Mapping[str, str] | None = None
) -> None:
    for name in fields:
        kind = int if name == "http_port" else str
        field = Settings.model_fields[name]
        shown = f"default {field.default}" if field.default not in ("", None) else "default: none"
        said = (about or {}).get(name, field.description)
        about_it = f"{said}; " if said else ""
        help_text = f"{about_it}overrides IOTGW_{name.upper()} ({shown})".replace("%", "%%")
        p.add_argument(SETTING_FLAGS[name], dest=name, type=kind, default=None, help=help_text)


def fleet_args(p: argparse.ArgumentParser, *, elevators: int, sensors: int, fault_rate: float) -> None:
    p.add_argument("--elevators", type=int, default=elevators, help="number of elevators (default %(default)s)")
    p.add_argument("--sensors", type=int, default=sensors, help="number of sensors (default %(default)s)")
    p.add_argument("--rate", type=float, default=1.0, help="steps per second per device (default %(default)s)")
    p.add_argument(
        "--fault-rate",
        type=float,
        default=fault_rate,
        help="chance per step that a device starts a fault (default %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=1, help="random seed: the same seed gives the same device behaviour (default 1)"
    )
    p.add_argument("--sites", type=int, default=3, help="devices are spread over this many sites (default %(default)s)")


def settings_from(args: argparse.Namespace, **defaults: Any) -> Settings:  # noqa: ANN401
    overrides = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k, None) is not None}
    return Settings(**{**defaults, **overrides})


def create_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--create-database",
        action="store_true",
        help="make the database if there is none yet (default: refuse; a new one is no gateway's)",
    )


def open_store(settings: Settings, *, create: bool = False) -> Store:
    """The gateway's database, for a command that reads it or adds to it: never a new one made by
    mistake (a key or a device in a database no gateway reads is refused in silence later)."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database)
        if not path.exists() and not create:
            msg = (
                f"no database at {path.resolve()} (IOTGW_DATABASE_URL / --database-url); "
                "name the one the gateway uses (the demo's: --database-url sqlite:///.iotgw-demo/iotgw.db), "
                "or --create-database to make it"
            )
            raise GatewayError(msg)
    store = Store(settings.database_url)
    store.create_schema()
    return store


def setup_logging(level: str, process: str = "") -> None:
    """Log lines on stderr; the consumers' process says so in each of its lines."""
    where = f"[{process}] " if process else ""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")
    # gmqtt logs every packet at INFO; only its warnings matter to an operator.
    for name in ("iotgw.mqtt", "gmqtt"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # Alembic says which dialect it uses at every start; what an operator wants is the migrations run.
    logging.getLogger("alembic.runtime.migration").addFilter(
        lambda record: record.levelno > logging.INFO or record.getMessage().startswith("Running ")
    )


def run_loop(main: Coroutine[Any, Any, int], settings: Settings) -> int:
    """Run `main` to its end on the event loop the settings choose (IOTGW_EVENT_LOOP)."""
    factory = uvloop.new_event_loop if settings.event_loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def safe_url(url: str) -> str:
    """The URL without a password in it."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def fleet_config(args: argparse.Namespace, device_url: str, **extra: Any) -> FleetConfig:  # noqa: ANN401
    """The fleet the command line describes (validated), on the broker's devices' listener `device_url`."""
    from devices.fleet import FleetConfig  # noqa: PLC0415

    check_fleet(args.elevators, args.sensors, args.rate, args.fault_rate)
    return FleetConfig(
        mqtt_url=device_url,
        elevators=args.elevators,
        sensors=args.sensors,
        rate=args.rate,
        fault_rate=args.fault_rate,
        seed=args.seed,
        sites=args.sites,
        **extra,
    )


def check_fleet(elevators: int, sensors: int, rate: float, fault_rate: float) -> None:
    if elevators < 0 or sensors < 0 or elevators + sensors == 0:
        msg = "--elevators and --sensors must be >= 0, and not both 0"
        raise GatewayError(msg)
    if rate <= 0:
        msg = "--rate must be > 0 (steps per second per device)"
        raise GatewayError(msg)
    if not 0 <= fault_rate <= 1:
        msg = "--fault-rate is a probability per step, between 0 and 1"
        raise GatewayError(msg)
