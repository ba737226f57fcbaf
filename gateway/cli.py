"""The `iotgw` command: run, simulate, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr, ValidationError
from sqlalchemy import delete
from sqlalchemy.engine import make_url

from gateway import __version__
from gateway.broker import DEVICE_LISTENER, Mosquitto, free_port, port_open
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.plugins import plugin_classes
from gateway.protocol import DeviceType
from gateway.security import (
    ROLES,
    PasswordFile,
    create_api_key,
    list_api_keys,
    list_registered,
    new_secret,
    provision,
    reload_broker,
    revoke,
    revoke_api_key,
)
from gateway.store import Store
from gateway.text import plural

if TYPE_CHECKING:
    from devices.fleet import FleetConfig

log = logging.getLogger("iotgw")
DEVICE_URL = f"mqtt://localhost:{DEVICE_LISTENER}"  # the devices' listener of the project's mosquitto.conf

# CLI flag -> Settings field (the flags and IOTGW_* variables set the same fields).
_SETTING_FLAGS = {
    "mqtt_url": "--mqtt-url",
    "mqtt_client_id": "--client-id",
    "instance": "--instance",
    "database_url": "--database-url",
    "http_host": "--http-host",
    "http_port": "--http-port",
    "log_level": "--log-level",
    "consumers": "--consumers",
    "broker_password_file": "--password-file",
    "broker_pid_file": "--pid-file",
}


def _add_settings(
    p: argparse.ArgumentParser, *, fields: Sequence[str] = tuple(_SETTING_FLAGS), about: Mapping[str, str] | None = None
) -> None:
    for name in fields:
        kind = int if name == "http_port" else str
        field = Settings.model_fields[name]
        shown = f"default {field.default}" if field.default not in ("", None) else "default: none"
        said = (about or {}).get(name, field.description)
        about_it = f"{said}; " if said else ""
        help_text = f"{about_it}overrides IOTGW_{name.upper()} ({shown})".replace("%", "%%")
        p.add_argument(_SETTING_FLAGS[name], dest=name, type=kind, default=None, help=help_text)


def _fleet_args(p: argparse.ArgumentParser, *, elevators: int, sensors: int, fault_rate: float) -> None:
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


def _simulate_args(sim: argparse.ArgumentParser) -> None:
    sim.add_argument(
        "--mqtt-url",
        dest="device_url",
        default=DEVICE_URL,
        help="the broker's listener for devices (default %(default)s; the gateway's is IOTGW_MQTT_URL)",
    )
    _add_settings(sim, fields=("log_level",))
    _fleet_args(sim, elevators=10, sensors=30, fault_rate=0.002)
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="iotgw", description="IoT event gateway.")
    parser.add_argument("--version", action="version", version=f"iotgw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_settings(sub.add_parser("run", help="run the gateway: ingest, the consumers and the HTTP API"))

    # Started by `run` (IOTGW_CONSUMER_PROCESS): its settings come in the environment, its
    # instructions on stdin (gateway/apart.py). Not for people to start.
    sub.add_parser("consumer-process", help="(internal) the consumers' process that `run` starts")

    _simulate_args(sub.add_parser("simulate", help="run a fleet of simulated devices against a broker"))

    devices = sub.add_parser("devices", help="provision and revoke devices (broker credentials + registry)")
    devices_sub = devices.add_subparsers(dest="devices_command", required=True)
    prov = devices_sub.add_parser("provision", help="create credentials for devices; prints each password once")
    prov.add_argument("--id", dest="ids", action="append", required=True, help="device id (repeat for several)")
    prov.add_argument("--type", choices=[t.value for t in DeviceType], default=None, help="the device's type")
    prov.add_argument("--out", type=Path, default=None, help="append ID:PASSWORD lines here instead of printing")
    prov.add_argument(
        "--rotate", action="store_true", help="a new password for a device provisioned already (the old one stops)"
    )
    _add_settings(prov, fields=("database_url", "broker_password_file", "broker_pid_file"))
    _create_flag(prov)
    rev = devices_sub.add_parser("revoke", help="remove a device's credentials (its events stay)")
    rev.add_argument("device_id", help="the device to revoke")
    _add_settings(rev, fields=("database_url", "broker_password_file", "broker_pid_file"))
    dlist = devices_sub.add_parser("list", help="provisioned devices")
    _add_settings(dlist, fields=("database_url",))

    keys = sub.add_parser("apikeys", help="API keys (roles: viewer, technician, admin)")
    keys_sub = keys.add_subparsers(dest="apikeys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; prints it once")
    create.add_argument(
        "--role", required=True, choices=ROLES, help="what the key may do: read, act on work, or administer"
    )
    create.add_argument("--name", required=True, help="who or what uses the key (shown in the audit trail)")
    _create_flag(create)
    _add_settings(create, fields=("database_url",))
    klist = keys_sub.add_parser("list", help="keys (ids, names, roles; never the keys themselves)")
    _add_settings(klist, fields=("database_url",))
    krev = keys_sub.add_parser("revoke", help="revoke a key by id")
    krev.add_argument("key_id", help="the key's id, from `iotgw apikeys list`")
    _add_settings(krev, fields=("database_url",))

    for plugin in plugin_classes().values():  # the plugins' command groups (`iotgw rules`...)
        plugin.add_commands(sub)

    demo = sub.add_parser(
        "demo",
        help="everything on one machine: Mosquitto, gateway, API and a fleet with faults",
        description="Starts its own Mosquitto (authentication on), the gateway with every consumer, the API "
        "and staff page, and a simulated fleet of elevators and sensors with faults; prints the URLs and an "
        "admin key. Ctrl-C stops everything. Each run starts afresh unless --keep.",
    )
    # (Its own broker, database and API key: only what means something for a demo.)
    _add_settings(
        demo,
        fields=("mqtt_url", "http_host", "http_port", "log_level", "consumers"),
        about={"mqtt_url": "the demo runs its own broker on 127.0.0.1: only the port of its gateway listener is taken"},
    )
    # A building, not a disaster: most cars in service, a fault every few minutes (and one at once).
    _fleet_args(demo, elevators=10, sensors=30, fault_rate=0.003)
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


def _settings(args: argparse.Namespace, **defaults: Any) -> Settings:  # noqa: ANN401
    overrides = {k: getattr(args, k) for k in _SETTING_FLAGS if getattr(args, k, None) is not None}
    return Settings(**{**defaults, **overrides})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `iotgw` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        command = getattr(args, "func", None) or _COMMANDS[args.command]
        return int(command(args))
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            flag = _SETTING_FLAGS.get(field, field)
            print(f"iotgw: invalid {flag} (IOTGW_{field.upper()}): {err['msg']}", file=sys.stderr)  # noqa: T201
        return 2
    except GatewayError as exc:
        # One line: a database's own words come with its SQL and a link, which say nothing more.
        said = str(exc) or type(exc).__name__
        if not hasattr(exc, "problems"):  # (a file's problems are one per line: all of them)
            said = said.splitlines()[0]
        print(f"iotgw: {said}", file=sys.stderr)  # noqa: T201
        return 1


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings.log_level)
    return asyncio.run(_run(settings))


def _cmd_consumer_process(_args: argparse.Namespace) -> int:
    from gateway.apart import serve  # noqa: PLC0415 - keeps the other commands light

    settings = Settings()
    _logging(settings.log_level, process="consumers")
    return asyncio.run(serve(settings))


def _cmd_simulate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings.log_level)
    return asyncio.run(_simulate(args))


def _cmd_demo(args: argparse.Namespace) -> int:
    _check_fleet(args.elevators, args.sensors, args.rate, args.fault_rate)  # before anything is touched
    _check_demo(args)
    try:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        lock = _demo_lock(args.data_dir)  # held until this process ends, however it ends
        if not args.keep:  # a demo starts afresh: no open alerts and overdue orders from the last run
            for name in ("iotgw.db", "iotgw.db-wal", "iotgw.db-shm", "api-key"):
                (args.data_dir / name).unlink(missing_ok=True)
    except OSError as exc:
        msg = f"--data-dir {args.data_dir}: {exc.strerror or exc}"
        raise GatewayError(msg) from None
    settings = _settings(args, database_url=f"sqlite:///{args.data_dir / 'iotgw.db'}")
    _logging(settings.log_level)
    with lock:
        return asyncio.run(_demo(args, settings))


def _demo_lock(data_dir: Path) -> Any:  # noqa: ANN401 - an open file
    """An exclusive lock on the data dir: a second demo on it would delete the first one's
    database under it. Refused in one line naming the demo that holds it."""
    lock = (data_dir / "demo.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        msg = f"another demo (pid {holder}) runs on {data_dir}: stop it, or give this one its own --data-dir"
        raise GatewayError(msg) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "consumer-process": _cmd_consumer_process,
    "simulate": _cmd_simulate,
    "demo": _cmd_demo,
    "devices": lambda args: _devices(args, _settings(args)),
    "apikeys": lambda args: _apikeys(args, _settings(args)),
}


def _create_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--create-database",
        action="store_true",
        help="make the database if there is none yet (default: refuse; a new one is no gateway's)",
    )


def _store(settings: Settings, *, create: bool = False) -> Store:
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


def _reload_note(settings: Settings) -> str:
    if reload_broker(settings.broker_pid_file):
        return f"broker reloaded (SIGHUP to the pid in {settings.broker_pid_file})"
    return "now make the broker reload its password file: kill -HUP its pid (or set IOTGW_BROKER_PID_FILE)"


def _devices(args: argparse.Namespace, settings: Settings) -> int:
    """`iotgw devices provision|revoke|list`."""
    store = _store(settings, create=getattr(args, "create_database", False))
    passwords = PasswordFile(settings.broker_password_file)
    if args.devices_command == "list":
        for row in list_registered(store):
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            print(f"{row.device_id}\t{row.type or '-'}\t{state}")  # noqa: T201
        return 0
    if args.devices_command == "revoke":
        if not revoke(store, passwords, args.device_id):
            print(f"iotgw: device {args.device_id!r} is not provisioned (never, or revoked already)", file=sys.stderr)  # noqa: T201
            return 1
        print(f"revoked {args.device_id}; {_reload_note(settings)}")  # noqa: T201
        return 0
    active = {row.device_id for row in list_registered(store) if row.revoked_at is None}
    again = [device_id for device_id in args.ids if device_id in active]
    if again and not args.rotate:
        msg = (
            f"{', '.join(again)}: provisioned already (its password stays as it is); --rotate gives it a "
            "new password, and the old one stops working"
        )
        raise GatewayError(msg)
    # A reserved id (the gateway's own names) raises: main() prints why and exits 1, nothing written.
    creds = provision(store, passwords, dict.fromkeys(args.ids, args.type), reserved=settings.reserved_names)
    if args.out is not None:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.writelines(f"{device_id}:{secret}\n" for device_id, secret in creds.items())
        print(f"provisioned {len(creds)} device(s); credentials appended to {args.out}")  # noqa: T201
    else:
        for device_id, secret in creds.items():
            print(f"provisioned {device_id}\n  username {device_id}\n  password {secret}   (shown once)")  # noqa: T201
    print(_reload_note(settings))  # noqa: T201
    return 0


def _apikeys(args: argparse.Namespace, settings: Settings) -> int:
    """`iotgw apikeys create|list|revoke`."""
    store = _store(settings, create=getattr(args, "create_database", False))
    if args.apikeys_command == "create":
        key_id, key = create_api_key(store, args.name, args.role)
        print(f"API key {key_id} for {args.name} ({args.role}); shown once, keep it safe:\n{key}")  # noqa: T201
        return 0
    if args.apikeys_command == "list":
        for row in list_api_keys(store):
            state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
            print(f"{row.id}\t{row.role}\t{row.name}\tcreated {row.created_at:%Y-%m-%d %H:%M}\t{state}")  # noqa: T201
        return 0
    if not revoke_api_key(store, args.key_id):
        print(f"iotgw: no active API key {args.key_id!r}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"revoked API key {args.key_id}")  # noqa: T201
    return 0


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


def _logging(level: str, process: str = "") -> None:
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


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _run(settings: Settings) -> int:
    from gateway.api.limits import worker_threads  # noqa: PLC0415
    from gateway.service import Gateway  # noqa: PLC0415 - keeps `iotgw simulate` light

    stop = _stop_event()
    asyncio.get_running_loop().set_default_executor(worker_threads(settings.api_nice))
    gw = Gateway(settings)
    await gw.start()
    try:
        await stop.wait()
    finally:
        log.info("stopping: committing and acknowledging what was received")
        await gw.stop()
    return 0


async def _simulate(args: argparse.Namespace) -> int:
    from devices.fleet import Fleet, Progress, build_models, summary  # noqa: PLC0415

    url = urlsplit(args.device_url)
    if url.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not url.hostname:
        msg = f"--mqtt-url must look like mqtt://host:port or mqtts://host:port, got {args.device_url!r}"
        raise GatewayError(msg)

    cfg = _fleet_config(args, args.device_url, duration=args.duration, steps=args.steps, prefix=args.prefix)
    if args.print_ids:
        print("\n".join(m.device_id for m in build_models(cfg)))  # noqa: T201
        return 0
    if args.credentials is not None:
        cfg = dataclasses.replace(cfg, credentials=_read_credentials(args.credentials))
    fleet = Fleet(cfg, on_tick=Progress())
    where = _safe_url(cfg.mqtt_url)
    print(f"simulate: {plural(len(fleet.devices), 'device')} publishing to {where}", file=sys.stderr, flush=True)  # noqa: T201
    stop = _stop_event()
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


def _safe_url(url: str) -> str:
    """The URL without a password in it."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _fleet_config(args: argparse.Namespace, device_url: str, **extra: Any) -> FleetConfig:  # noqa: ANN401
    """The fleet the command line describes (validated), on the broker's devices' listener `device_url`."""
    from devices.fleet import FleetConfig  # noqa: PLC0415

    _check_fleet(args.elevators, args.sensors, args.rate, args.fault_rate)
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


def _check_fleet(elevators: int, sensors: int, rate: float, fault_rate: float) -> None:
    if elevators < 0 or sensors < 0 or elevators + sensors == 0:
        msg = "--elevators and --sensors must be >= 0, and not both 0"
        raise GatewayError(msg)
    if rate <= 0:
        msg = "--rate must be > 0 (steps per second per device)"
        raise GatewayError(msg)
    if not 0 <= fault_rate <= 1:
        msg = "--fault-rate is a probability per step, between 0 and 1"
        raise GatewayError(msg)


def _check_demo(args: argparse.Namespace) -> None:
    """What means something for a demo, which runs its own broker on this machine."""
    if args.duration is not None and args.duration <= 0:
        msg = "--duration must be > 0 seconds (leave it out to run until Ctrl-C)"
        raise GatewayError(msg)
    if args.mqtt_url is not None:
        url = urlsplit(args.mqtt_url)
        if url.scheme not in ("mqtt", "tcp") or url.hostname not in ("localhost", "127.0.0.1") or url.username:
            msg = (
                "--mqtt-url: the demo runs its own broker on this machine; the URL only sets the port of "
                "its gateway listener (mqtt://127.0.0.1:PORT, no credentials, no TLS)"
            )
            raise GatewayError(msg)


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from devices.elevator import Elevator  # noqa: PLC0415
    from devices.fleet import Fleet, build_models  # noqa: PLC0415
    from devices.misbehave import publish_bad  # noqa: PLC0415
    from gateway.service import Gateway  # noqa: PLC0415

    # Its own broker, authentication on: every device logs in with provisioned credentials.
    port, gateway_port, settings = _demo_ports(settings)
    gateway_secret = new_secret()
    # In /tmp, not the data dir: mosquitto drops to its own user, who may not reach a home dir.
    broker = Mosquitto(
        Path(tempfile.mkdtemp(prefix="iotgw-demo-mqtt-")),
        port,
        gateway_port=gateway_port,
        users={settings.mqtt_username: gateway_secret},
        dies_with_parent=True,
    )
    stop = _stop_event()
    gw: Gateway | None = None
    fleet: Fleet | None = None
    fleet_task: asyncio.Task[Any] | None = None
    try:  # whatever fails from here, nothing is left behind: no broker, no temp folder
        await asyncio.to_thread(broker.start)
        log.info(
            "started Mosquitto with mosquitto.conf and mosquitto.acl: devices on port %d, the gateway on %d",
            port,
            gateway_port,
        )
        settings = settings.model_copy(
            update={
                "mqtt_url": broker.url,
                "mqtt_password": SecretStr(gateway_secret),
                "broker_password_file": str(broker.passwords.path),
                "broker_pid_file": str(broker.data_dir / "mosquitto.pid"),
                "require_registered_devices": True,
                "device_rate": max(settings.device_rate, 20.0),
            }
        )
        gw = Gateway(settings)
        await asyncio.to_thread(gw.store.create_schema)
        if args.keep:  # a new broker every run: the gateway's session there is new, not lost
            await asyncio.to_thread(_forget_broker_sessions, gw.store)
        fleet_cfg = _fleet_config(args, broker.device_url, prefix="demo-")
        rogue = "demo-rogue-001"
        devices = {m.device_id: getattr(m, "type", "elevator") for m in build_models(fleet_cfg)} | {rogue: None}
        reserved = settings.reserved_names
        creds = await asyncio.to_thread(provision, gw.store, broker.passwords, devices, reserved=reserved)
        await asyncio.to_thread(broker.reload)
        key_file = args.data_dir / "api-key"
        key = await asyncio.to_thread(_demo_key, gw.store, key_file)
        await gw.start()
        fleet = Fleet(dataclasses.replace(fleet_cfg, credentials=creds))
        fleet_task = asyncio.create_task(fleet.run())
        first = next((d.model.device_id for d in fleet.devices if isinstance(d.model, Elevator)), None)
        if first is not None:  # something to see in the first minute: a door jam, then its work order
            asyncio.get_running_loop().call_later(10, fleet.force_fault, first, "DOOR_JAM", 30)
        if stop.is_set():  # Ctrl-C while it started: no banner for a demo that is stopping
            return 0
        shown_host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host  # noqa: S104
        base = f"http://{shown_host}:{settings.http_port}"
        _print_banner(base, broker, settings, key=key, key_file=key_file, devices=len(creds))
        # The rogue device's messages must find the gateway subscribed, or the demo shows none.
        await asyncio.wait_for(gw.ingest.subscribed.wait(), 30)
        await publish_bad(broker.device_url, rogue, seq=int(time.time()), password=creds[rogue])
        await _demo_status(gw, fleet, stop, args.duration)
    finally:
        # The gateway first: devices going away as the demo ends are no news (no offline alerts).
        if gw is not None:
            await gw.stop()
        if fleet is not None and fleet_task is not None:
            fleet.stop()
            await asyncio.gather(fleet_task, return_exceptions=True)
        await asyncio.to_thread(broker.stop)
        shutil.rmtree(broker.data_dir, ignore_errors=True)
        print("\niotgw demo stopped.", file=sys.stderr)  # noqa: T201
    return 0


def _forget_broker_sessions(store: Store) -> None:
    from gateway.store import BrokerSessionRow  # noqa: PLC0415

    with store.session() as tx:
        tx.exec(delete(BrokerSessionRow))
        tx.commit()


def _demo_ports(settings: Settings) -> tuple[int, int, Settings]:
    """The broker's two ports and the HTTP port: the usual ones, or free ones when taken (said)."""
    port = DEVICE_LISTENER if not port_open("127.0.0.1", DEVICE_LISTENER) else free_port()
    gateway_port = settings.mqtt_port if not port_open("127.0.0.1", settings.mqtt_port) else free_port()
    check_host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host  # noqa: S104
    if port_open(check_host, settings.http_port):  # taken: another port, said in the banner
        taken, http_port = settings.http_port, free_port()
        log.warning("port %d is taken: the demo's staff page and API are on port %d", taken, http_port)
        settings = settings.model_copy(update={"http_port": http_port})
    return port, gateway_port, settings


def _demo_key(store: Any, key_file: Path) -> str:  # noqa: ANN401
    """The demo's admin key: the one it made last time if that still holds (--keep), else a new one."""
    from gateway.security import verify_api_key  # noqa: PLC0415

    if key_file.exists():
        old = key_file.read_text().strip()
        if verify_api_key(store, old) is not None:
            return old
    key = create_api_key(store, "demo", "admin")[1]
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    return key


def _print_banner(base: str, broker: Mosquitto, settings: Settings, *, key: str, key_file: Path, devices: int) -> None:  # noqa: PLR0913
    print(  # noqa: T201
        f"""
iotgw demo is running (Ctrl-C to stop)
  staff page  {base}/ui/   (alerts and work orders, live; acknowledge to stop escalation)
  API key     {key}
              (admin; also in {key_file}: the staff page asks for it, curl sends
               -H "Authorization: Bearer $(cat {key_file})")
  broker      devices {broker.device_url}, gateway {broker.url}
              (authentication on: {devices} provisioned devices, ACL per device: {devices - 1}
               simulated, and one that misbehaves on purpose; the WARNING lines about its
               rejected messages are expected, they are the dead letters below)
  database    {settings.database_url}
  devices'    password file {settings.broker_password_file}, broker pid file {settings.broker_pid_file}
              (another device: iotgw devices provision --id ID --database-url {settings.database_url}
               --password-file {settings.broker_password_file} --pid-file {settings.broker_pid_file})
              (another key: iotgw apikeys create --role viewer --name NAME --database-url {settings.database_url})
  API docs    {base}/docs
  devices     {base}/api/devices
  events      {base}/api/events?order=desc&limit=20   (the newest)
  faults      {base}/api/events?type=elevator.fault.raised
  dead letters {base}/api/dead-letters
  consumers   {base}/api/consumers
  analytics   {base}/api/analytics/fleet
  alerts      {base}/api/alerts?status=open
  work orders {base}/api/work-orders?status=open
  roster      {base}/api/technicians
  audit       {base}/api/audit
  metrics     {base}/metrics
  readiness   {base}/ready
""",
        flush=True,
    )


async def _demo_status(gw: Any, fleet: Any, stop: asyncio.Event, duration: float | None) -> None:  # noqa: ANN401
    from gateway.api.routes.stream import snapshot  # noqa: PLC0415

    started = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 5)
        events = await asyncio.to_thread(gw.store.count_events)
        live = await asyncio.to_thread(snapshot, gw.store, gw.plugins)  # what the staff page shows: open ones
        shown = "".join(f", {len(items)} open {name.replace('_', ' ')}" for name, items in live.items())
        rejected = await asyncio.to_thread(gw.store.count_dead_letters)  # the database's, as the events count
        print(  # noqa: T201
            f"demo: {fleet.stats.connected}/{fleet.stats.devices} devices connected, "
            f"{fleet.stats.sent} messages sent, {events} events stored, {int(rejected)} dead letters{shown}",
            flush=True,
        )
        if duration is not None and time.monotonic() - started >= duration:
            return
