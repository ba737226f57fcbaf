"""The `iotgw` command: its parser and entry point; each command group is a module of this package
(`run`, `simulate`, `admin` for devices and API keys, `demo`); plugins add theirs (`iotgw rules`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from gateway import __version__
from gateway.cli.admin import cmd_apikeys, cmd_devices
from gateway.cli.common import SETTING_FLAGS, add_settings, create_flag, fleet_args, settings_from
from gateway.cli.demo import cmd_demo
from gateway.cli.run import cmd_consumer_process, cmd_run
from gateway.cli.simulate import cmd_simulate, simulate_args
from gateway.core.protocol import DeviceType
from gateway.errors import ConfigError, GatewayError
from gateway.plugins import plugin_classes
from gateway.security import ROLES

__all__ = ["SETTING_FLAGS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="iotgw", description="IoT event gateway.")
    parser.add_argument("--version", action="version", version=f"iotgw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    add_settings(sub.add_parser("run", help="run the gateway: ingest, the consumers and the HTTP API"))

    # Started by `run` (IOTGW_CONSUMER_PROCESS): its settings come in the environment, its
    # instructions on stdin (gateway/runtime/apart.py). Not for people to start.
    sub.add_parser("consumer-process", help="(internal) the consumers' process that `run` starts")

    simulate_args(sub.add_parser("simulate", help="run a fleet of simulated devices against a broker"))

    devices = sub.add_parser("devices", help="provision and revoke devices (broker credentials + registry)")
    devices_sub = devices.add_subparsers(dest="devices_command", required=True)
    prov = devices_sub.add_parser("provision", help="create credentials for devices; prints each password once")
    prov.add_argument("--id", dest="ids", action="append", required=True, help="device id (repeat for several)")
    prov.add_argument("--type", choices=[t.value for t in DeviceType], default=None, help="the device's type")
    prov.add_argument("--out", type=Path, default=None, help="append ID:PASSWORD lines here instead of printing")
    prov.add_argument(
        "--rotate", action="store_true", help="a new password for a device provisioned already (the old one stops)"
    )
    add_settings(prov, fields=("database_url", "broker_password_file", "broker_pid_file"))
    create_flag(prov)
    rev = devices_sub.add_parser("revoke", help="remove a device's credentials (its events stay)")
    rev.add_argument("device_id", help="the device to revoke")
    add_settings(rev, fields=("database_url", "broker_password_file", "broker_pid_file"))
    dlist = devices_sub.add_parser("list", help="provisioned devices")
    add_settings(dlist, fields=("database_url",))

    keys = sub.add_parser("apikeys", help="API keys (roles: viewer, technician, admin)")
    keys_sub = keys.add_subparsers(dest="apikeys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; prints it once")
    create.add_argument(
        "--role", required=True, choices=ROLES, help="what the key may do: read, act on work, or administer"
    )
    create.add_argument("--name", required=True, help="who or what uses the key (shown in the audit trail)")
    create_flag(create)
    add_settings(create, fields=("database_url",))
    klist = keys_sub.add_parser("list", help="keys (ids, names, roles; never the keys themselves)")
    add_settings(klist, fields=("database_url",))
    krev = keys_sub.add_parser("revoke", help="revoke a key by id")
    krev.add_argument("key_id", help="the key's id, from `iotgw apikeys list`")
    add_settings(krev, fields=("database_url",))

    for name, plugin in plugin_classes().items():  # the plugins' command groups (`iotgw rules`...)
        try:
            plugin.add_commands(sub)
        except argparse.ArgumentError as exc:
            msg = f"plugin {name!r}: {exc}"
            raise ConfigError(msg) from None

    demo = sub.add_parser(
        "demo",
        help="everything on one machine: Mosquitto, gateway, API and a fleet with faults",
        description="Starts its own Mosquitto (authentication on), the gateway with every consumer, the API "
        "and staff page, and a simulated fleet of elevators and sensors with faults; prints the URLs and an "
        "admin key. Ctrl-C stops everything. Each run starts afresh unless --keep.",
    )
    # (Its own broker, database and API key: only what means something for a demo.)
    add_settings(
        demo,
        fields=("mqtt_url", "http_host", "http_port", "log_level", "consumers", "time_zone"),
        about={"mqtt_url": "the demo runs its own broker on 127.0.0.1: only the port of its gateway listener is taken"},
    )
    # A building, not a disaster: most cars in service, a fault every few minutes (and one at once).
    fleet_args(demo, elevators=10, sensors=30, fault_rate=0.003)
    demo.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)"
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".iotgw-demo"),
        help="where the demo keeps its files (default %(default)s)",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="go on from the last run's database (alerts, work orders, its API key); default: start afresh",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `iotgw` command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)  # (a plugin that cannot be loaded: one line, below)
        command = getattr(args, "func", None) or _COMMANDS[args.command]
        return int(command(args))
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            flag = SETTING_FLAGS.get(field, field)
            print(f"iotgw: invalid {flag} (IOTGW_{field.upper()}): {err['msg']}", file=sys.stderr)  # noqa: T201
        return 2
    except GatewayError as exc:
        # One line: a database's own words come with its SQL and a link, which say nothing more.
        said = str(exc) or type(exc).__name__
        if not hasattr(exc, "problems"):  # (a file's problems are one per line: all of them)
            said = said.splitlines()[0]
        print(f"iotgw: {said}", file=sys.stderr)  # noqa: T201
        return 1


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "consumer-process": cmd_consumer_process,
    "simulate": cmd_simulate,
    "demo": cmd_demo,
    "devices": lambda args: cmd_devices(args, settings_from(args)),
    "apikeys": lambda args: cmd_apikeys(args, settings_from(args)),
}
