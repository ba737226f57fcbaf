"""`iotgw demo`: its own broker, the gateway and a fleet on this machine, cleaned up however it ends."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from sqlalchemy import delete

from gateway.cli.broker import DEVICE_LISTENER, Mosquitto, free_port, port_open
from gateway.cli.common import check_fleet, fleet_config, log, run_loop, settings_from, setup_logging, stop_event
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.log import Store
from gateway.security import (
    create_api_key,
    new_secret,
    provision,
)

if TYPE_CHECKING:
    pass


def cmd_demo(args: argparse.Namespace) -> int:
    check_fleet(args.elevators, args.sensors, args.rate, args.fault_rate)  # before anything is touched
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
    settings = settings_from(args, database_url=f"sqlite:///{args.data_dir / 'iotgw.db'}")
    setup_logging(settings.log_level)
    with lock:
        return run_loop(_demo(args, settings), settings)


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
    stop = stop_event()
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
        fleet_cfg = fleet_config(args, broker.device_url, prefix="demo-")
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
    from gateway.log import BrokerSessionRow  # noqa: PLC0415

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
        shown = "".join(
            f", {len(items)} open {name.replace('_', ' ')}" for name, items in live.items() if isinstance(items, list)
        )
        rejected = await asyncio.to_thread(gw.store.count_dead_letters)  # the database's, as the events count
        print(  # noqa: T201
            f"demo: {fleet.stats.connected}/{fleet.stats.devices} devices connected, "
            f"{fleet.stats.sent} messages sent, {events} events stored, {int(rejected)} dead letters{shown}",
            flush=True,
        )
        if duration is not None and time.monotonic() - started >= duration:
            return
