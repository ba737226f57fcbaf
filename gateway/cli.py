"""The `iotgw` command: run, simulate, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gateway import __version__
from gateway.broker import Mosquitto, port_open
from gateway.config import Settings
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from devices.fleet import FleetConfig

log = logging.getLogger("iotgw")

# CLI flag -> Settings field (the flags and IOTGW_* variables set the same fields).
_SETTING_FLAGS = {
    "mqtt_url": "--mqtt-url",
    "mqtt_client_id": "--client-id",
    "database_url": "--database-url",
    "http_host": "--http-host",
    "http_port": "--http-port",
    "log_level": "--log-level",
    "consumers": "--consumers",
}


def _add_settings(p: argparse.ArgumentParser, *, fields: Sequence[str] = tuple(_SETTING_FLAGS)) -> None:
    for name in fields:
        kind = int if name == "http_port" else str
        p.add_argument(_SETTING_FLAGS[name], dest=name, type=kind, default=None, help=f"overrides IOTGW_{name.upper()}")


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
    p.add_argument("--seed", type=int, default=1, help="random seed: the same seed gives the same device behaviour")
    p.add_argument("--sites", type=int, default=3, help="devices are spread over this many sites (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="iotgw", description="IoT event gateway.")
    parser.add_argument("--version", action="version", version=f"iotgw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway: ingest and the HTTP API")
    _add_settings(run)

    sim = sub.add_parser("simulate", help="run a fleet of simulated devices against a broker")
    _add_settings(sim, fields=("mqtt_url", "log_level"))
    _fleet_args(sim, elevators=10, sensors=30, fault_rate=0.002)
    sim.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default: run until Ctrl-C)"
    )
    sim.add_argument("--steps", type=int, default=None, help="stop each device after this many steps")
    sim.add_argument("--prefix", default="", help="prefix for device ids (several fleets on one broker)")

    rules = sub.add_parser("rules", help="alert rules")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate a rules file; errors name their line")
    check.add_argument("file", type=Path)

    roster = sub.add_parser("roster", help="the maintenance roster")
    roster_sub = roster.add_subparsers(dest="roster_command", required=True)
    roster_check = roster_sub.add_parser("check", help="validate a roster file; errors name their line")
    roster_check.add_argument("file", type=Path)

    demo = sub.add_parser("demo", help="everything on one machine: Mosquitto, gateway, API and a fleet with faults")
    _add_settings(demo)
    _fleet_args(demo, elevators=10, sensors=30, fault_rate=0.01)
    demo.add_argument(
        "--duration", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)"
    )
    demo.add_argument("--data-dir", type=Path, default=Path(".iotgw-demo"), help="where the demo keeps its files")
    return parser


def _settings(args: argparse.Namespace, **defaults: Any) -> Settings:  # noqa: ANN401
    overrides = {k: getattr(args, k) for k in _SETTING_FLAGS if getattr(args, k, None) is not None}
    return Settings(**{**defaults, **overrides})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `iotgw` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            settings = _settings(args)
            _logging(settings.log_level)
            return asyncio.run(_run(settings))
        if args.command in ("rules", "roster"):
            return _check_file(args.command, args.file)
        if args.command == "simulate":
            settings = _settings(args)
            _logging(settings.log_level)
            return asyncio.run(_simulate(args, settings))
        args.data_dir.mkdir(parents=True, exist_ok=True)
        settings = _settings(args, database_url=f"sqlite:///{args.data_dir / 'iotgw.db'}")
        _logging(settings.log_level)
        return asyncio.run(_demo(args, settings))
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            flag = _SETTING_FLAGS.get(field, field)
            print(f"iotgw: invalid {flag} (IOTGW_{field.upper()}): {err['msg']}", file=sys.stderr)  # noqa: T201
        return 2
    except GatewayError as exc:
        print(f"iotgw: {exc}", file=sys.stderr)  # noqa: T201
        return 1


def _check_file(kind: str, path: Path) -> int:
    """`iotgw rules check` / `iotgw roster check`: 0 and a summary, or 1 and every problem with its line."""
    from alerts.roster import load_roster_file  # noqa: PLC0415
    from alerts.rules import FileProblemsError, load_rules_file  # noqa: PLC0415

    try:
        if kind == "rules":
            ruleset = load_rules_file(path)
            kinds = ", ".join(sorted({r.kind for r in ruleset.rules}))
            summary = f"{len(ruleset.rules)} rules OK ({kinds})"
        else:
            roster = load_roster_file(path)
            roles = ", ".join(
                f"{sum(t.role == r for t in roster.technicians)} {r}" for r in ("technician", "supervisor", "manager")
            )
            summary = f"OK ({roles}; {len(roster.policies)} escalation policies)"
    except FileProblemsError as exc:
        print(exc, file=sys.stderr)  # noqa: T201
        return 1
    print(f"{path}: {summary}")  # noqa: T201
    return 0


def _logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # gmqtt logs every packet at INFO; only its warnings matter to an operator.
    for name in ("iotgw.mqtt", "gmqtt"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _run(settings: Settings) -> int:
    from gateway.service import Gateway  # noqa: PLC0415 - keeps `iotgw simulate` light

    stop = _stop_event()
    gw = Gateway(settings)
    await gw.start()
    try:
        await stop.wait()
    finally:
        log.info("stopping: committing and acknowledging what was received")
        await gw.stop()
    return 0


async def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from devices.fleet import Fleet, Progress, summary  # noqa: PLC0415

    cfg = _fleet_config(args, settings, duration=args.duration, steps=args.steps, prefix=args.prefix)
    fleet = Fleet(cfg, on_tick=Progress())
    stop = _stop_event()
    watcher = asyncio.create_task(stop.wait())
    watcher.add_done_callback(lambda _: fleet.stop())
    try:
        stats = await fleet.run()
    finally:
        watcher.cancel()
    print("\n" + json.dumps(summary(stats)), file=sys.stderr)  # noqa: T201
    return 0


def _fleet_config(args: argparse.Namespace, settings: Settings, **extra: Any) -> FleetConfig:  # noqa: ANN401
    """The fleet the command line describes (validated)."""
    from devices.fleet import FleetConfig  # noqa: PLC0415

    _check_fleet(args.elevators, args.sensors, args.rate, args.fault_rate)
    return FleetConfig(
        mqtt_url=settings.mqtt_url,
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


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from devices.fleet import Fleet  # noqa: PLC0415
    from devices.misbehave import publish_bad  # noqa: PLC0415
    from gateway.service import Gateway  # noqa: PLC0415

    fleet_cfg = _fleet_config(args, settings, prefix="demo-")
    broker: Mosquitto | None = None
    if not port_open(settings.mqtt_host, settings.mqtt_port):
        # In /tmp, not the data dir: mosquitto drops to its own user, who may not reach a home dir.
        broker = Mosquitto(Path(tempfile.mkdtemp(prefix="iotgw-demo-mqtt-")), settings.mqtt_port)
        await asyncio.to_thread(broker.start)
        log.info("started Mosquitto with mosquitto.conf on port %d", settings.mqtt_port)
    else:
        log.info("using the broker already listening at %s", settings.mqtt_url)
    stop = _stop_event()
    gw = Gateway(settings)
    fleet: Fleet | None = None
    fleet_task: asyncio.Task[Any] | None = None
    try:
        await gw.start()
        fleet = Fleet(fleet_cfg)
        fleet_task = asyncio.create_task(fleet.run())
        base = f"http://{settings.http_host}:{settings.http_port}"
        _print_banner(base, settings)
        # The rogue device's messages must find the gateway subscribed, or the demo shows none.
        await asyncio.wait_for(gw.ingest.subscribed.wait(), 30)
        await publish_bad(settings.mqtt_url, "demo-rogue-001", seq=int(time.time()))
        await _demo_status(gw, fleet, stop, args.duration)
    finally:
        if fleet is not None and fleet_task is not None:
            fleet.stop()
            await asyncio.gather(fleet_task, return_exceptions=True)
        await gw.stop()
        if broker is not None:
            await asyncio.to_thread(broker.stop)
            shutil.rmtree(broker.data_dir, ignore_errors=True)
        print("\niotgw demo stopped.", file=sys.stderr)  # noqa: T201
    return 0


def _print_banner(base: str, settings: Settings) -> None:
    print(  # noqa: T201
        f"""
iotgw demo is running (Ctrl-C to stop)
  staff page  {base}/ui/   (alerts and work orders, live; acknowledge to stop escalation)
  broker      {settings.mqtt_url}
  database    {settings.database_url}
  API docs    {base}/docs
  devices     {base}/api/devices
  events      {base}/api/events?limit=20
  faults      {base}/api/events?type=elevator.fault.raised
  dead letters {base}/api/dead-letters
  consumers   {base}/api/consumers
  analytics   {base}/api/analytics/fleet
  alerts      {base}/api/alerts?status=open
  work orders {base}/api/work-orders?status=open
  roster      {base}/api/technicians
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
        live = await asyncio.to_thread(snapshot, gw.store)
        m = gw.metrics
        rejected = sum(s.value for s in m.messages_rejected.collect()[0].samples if s.name.endswith("_total"))
        print(  # noqa: T201
            f"demo: {fleet.stats.connected}/{fleet.stats.devices} devices connected, "
            f"{fleet.stats.sent} messages sent, {events} events stored, {int(rejected)} dead letters, "
            f"{len(live['alerts'])} open alerts, {len(live['work_orders'])} open work orders",
            flush=True,
        )
        if duration is not None and time.monotonic() - started >= duration:
            return
