"""Launching the gateway (in-process or as `iotgw run`), its broker and database, and waiting for it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.pool import NullPool

from gateway.cli.broker import Mosquitto, free_port
from gateway.config import Settings
from gateway.runtime import Consumer
from gateway.service import Gateway

# Every test broker runs the project's mosquitto.conf and mosquitto.acl: authentication on.
# The gateway logs in as `iotgw`; tests publish as `tester`, which this block (tests only)
# allows on every device's topics. Provisioned devices (tests/integration/test_security.py) log in as
# themselves and get the project's ACL alone.
GATEWAY_PASSWORD = "gateway-test-secret"


TEST_USERS = {"iotgw": GATEWAY_PASSWORD, "tester": "tester-test-secret"}


TESTER_ACL = "# tests only: a publisher allowed on every device's topics\nuser tester\ntopic write devices/#\n"


# For gateways run as `iotgw run` processes (crash tests): the broker login, and no API keys.
TEST_CLOCK_SKEW_S = 100 * 365 * 86400.0


GATEWAY_ENV = {
    "IOTGW_MQTT_PASSWORD": GATEWAY_PASSWORD,
    "IOTGW_API_AUTH": "false",
    "IOTGW_MAX_CLOCK_SKEW_S": str(TEST_CLOCK_SKEW_S),
}


def new_broker(**options: Any) -> Mosquitto:
    """A Mosquitto with the project's config on a free port, in a fresh dir (not started)."""
    # Not under pytest's 0700 tmp dirs: mosquitto drops to its own user and must reach the dir.
    data_dir = Path(tempfile.mkdtemp(prefix="iotgw-mqtt-"))
    return Mosquitto(data_dir, free_port(), users=TEST_USERS, extra_acl=TESTER_ACL, **options)


# The store the gateways of the tests run on: SQLite (the default) or, with
# IOTGW_TEST_DATABASE=postgresql, PostgreSQL (`make test` runs the suite on both; the database is
# made by scripts/setup-system.sh --test). Each test gets its own schema there.
TEST_DATABASE = os.environ.get("IOTGW_TEST_DATABASE", "sqlite")


PG_URL = os.environ.get("IOTGW_TEST_PG_URL", "postgresql+psycopg://iotgw:iotgw@127.0.0.1:5432/iotgw_test")


on_postgresql = TEST_DATABASE == "postgresql"


@contextmanager
def fresh_database(directory: Path, name: str = "iotgw", *, postgresql: bool = on_postgresql) -> Iterator[str]:
    """The URL of a new, empty database: an SQLite file in `directory`, or a PostgreSQL schema
    (`postgresql`: whichever database the run tests, unless a test needs PostgreSQL itself)."""
    if not postgresql:
        yield f"sqlite:///{directory / f'{name}.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.dispose()


def query(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Rows of one SQL query on the database at `url` (empty while its tables do not exist yet)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    except (OperationalError, ProgrammingError):  # the gateway has not created the schema yet
        return []
    finally:
        engine.dispose()


@asynccontextmanager
async def running_gateway(
    settings: Settings, *, serve_http: bool = False, consumers: Sequence[Consumer] = ()
) -> AsyncIterator[Gateway]:
    """A started gateway, subscribed, stopped on exit."""
    gw = Gateway(settings, registry=CollectorRegistry(), serve_http=serve_http, extra_consumers=consumers)
    await gw.start()
    try:
        await asyncio.wait_for(gw.ingest.subscribed.wait(), 10)
        yield gw
    finally:
        await gw.stop()


async def settled(gw: Gateway) -> None:
    """Wait until everything the gateway received is committed (nothing pending)."""

    async def idle() -> bool:
        return gw.metrics.registry.get_sample_value("iotgw_ingest_pending_messages") == 0

    await wait_for(idle, what="the gateway to commit everything it received")


async def wait_for(check: Callable[[], Awaitable[bool]], *, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `check` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def install_plugin(
    where: Path,
    name: str,
    code: str,
    attribute: str,
    monkeypatch: pytest.MonkeyPatch,
    *,
    group: str = "iotgw.consumers",
) -> None:
    """A distribution `iotgw_<name>` in `where`, as pip would install it, with an entry point
    `<name>` -> `iotgw_<name>:<attribute>` in `group`; on this process's path and its children's."""
    (where / f"iotgw_{name}.py").write_text(code)
    info = where / f"iotgw_{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: iotgw-{name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = iotgw_{name}:{attribute}\n")
    monkeypatch.syspath_prepend(str(where))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(where), os.environ.get("PYTHONPATH", "")]))


ROOT = Path(__file__).resolve().parents[2]


def iotgw_run(
    mqtt_url: str,
    database_url: str,
    http_port: int,
    *flags: str,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> subprocess.Popen[bytes]:
    """`iotgw run` as a process of its own (to kill -9 or freeze it), with the tests' gateway
    login and no API keys; `flags` and `env` add to that; its output is appended to `log`."""
    cmd = [sys.executable, "-m", "gateway", "run", "--mqtt-url", mqtt_url, "--database-url", database_url,
           "--http-port", str(http_port), *flags]  # fmt: skip
    environment = {**os.environ, **GATEWAY_ENV, **(env or {})}
    if log is None:
        return subprocess.Popen(cmd, cwd=cwd, env=environment)
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=environment)


def kill_9(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL an `iotgw run` process and its consumers' process (a crash of the whole gateway)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    proc.wait()
    psutil.wait_procs(family, timeout=10)


async def until_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until the `iotgw run` process `proc` answers /ready on `port` with 200."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the gateway exited during start-up"
            try:
                if (await client.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    pytest.fail("gateway never became ready")


def start_gateway(broker: Mosquitto, db: str, http_port: int, log: Path) -> subprocess.Popen[bytes]:
    """`iotgw run` on `broker` with a fixed client id (its broker session outlives a kill -9)."""
    return iotgw_run(broker.url, db, http_port, "--client-id", "iotgw-crash-test", log=log)


async def written(path: Path, proc: subprocess.Popen[bytes], log: Path) -> bool:
    """Whether `path` has content yet; fails with the log if `proc` ended meanwhile."""
    assert proc.poll() is None, log.read_text()
    return path.exists() and bool(path.read_text().strip())
