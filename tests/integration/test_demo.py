"""`iotgw demo` from the outside: it starts its own broker, shows data in the API, stops cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from gateway.cli.broker import free_port, port_open
from tests.support.gateway import ROOT, wait_for, written

pytestmark = pytest.mark.anyio


async def test_demo_shows_devices_events_dead_letters_and_work_orders_then_stops_on_ctrl_c() -> None:
    mqtt_port, http_port = free_port(), free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="iotgw-demo-test-"))
    cmd = [
        sys.executable, "-m", "gateway", "demo",
        "--mqtt-url", f"mqtt://127.0.0.1:{mqtt_port}",
        "--http-port", str(http_port),
        "--data-dir", str(data_dir),
        "--rate", "5",
        "--duration", "120",
    ]  # fmt: skip
    log = data_dir / "demo.log"
    with log.open("wb") as out:
        # Its own process group, as a command run from a terminal is: Ctrl-C reaches the group.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        key_file = data_dir / "api-key"
        await wait_for(lambda: written(key_file, proc, log), timeout=60, what="the demo's API key")
        headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        async with httpx.AsyncClient(base_url=base, headers=headers) as client:

            async def api_has_everything() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    devices = (await client.get("/api/devices")).json()["items"]
                    events = (await client.get("/api/events", params={"type": "elevator.*"})).json()["items"]
                    dead = (await client.get("/api/dead-letters")).json()["items"]
                    orders = (await client.get("/api/work-orders")).json()["items"]
                except httpx.TransportError:
                    return False
                jams = (await client.get("/api/events", params={"type": "elevator.fault.raised"})).json()["items"]
                jammed = any(e["data"].get("code") == "DOOR_JAM" for e in jams)  # the demo's own, at 10 s
                return len(devices) >= 40 and len(events) > 0 and len(dead) > 0 and len(orders) > 0 and jammed

            await wait_for(
                api_has_everything, timeout=60, what="devices, events, dead letters and work orders in the API"
            )
            assert (await client.get("/api/devices", headers={"Authorization": ""})).status_code == 401
            page = await client.get("/ui/")
            assert page.status_code == 200
            assert "Open work orders" in page.text
            assert port_open("127.0.0.1", mqtt_port), "the demo runs its own Mosquitto"
            assert (await client.get("/ready")).status_code == 200
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert not port_open("127.0.0.1", mqtt_port), "the demo's Mosquitto stops with it"
        text = log.read_text()
        assert "API docs" in text
        assert "authentication on: 41 provisioned devices" in text
        assert "not authorized" not in text.lower(), "every simulated device logs in with its own credentials"
        assert "demo stopped" in text
        # The gateway stops before its broker: Ctrl-C did not take the broker away under it.
        assert "lost the broker" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_taken_http_port_moves_the_demo_to_a_free_one_and_says_so(tmp_path: Path) -> None:
    mqtt_port = free_port()
    data_dir, tmp = tmp_path / "demo", private_tmp()
    with socket.socket() as squatter:  # something else listens on the port asked for
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        log = tmp_path / "demo.log"
        proc = start_demo(log, tmp, "--mqtt-url", f"mqtt://127.0.0.1:{mqtt_port}", "--http-port", str(taken),
                          "--data-dir", str(data_dir), "--rate", "5")  # fmt: skip
        try:
            await wait_for(lambda: written(data_dir / "api-key", proc, log), timeout=60, what="the demo's API key")
            moved = re.search(
                rf"port {taken} is taken: the demo's staff page and API are on port (\d+)", log.read_text()
            )
            assert moved, log.read_text()
            port = int(moved.group(1))
            await wait_for(lambda: asyncio.sleep(0, f"staff page  http://127.0.0.1:{port}/ui/" in log.read_text()),
                           what="the banner with the port chosen")  # fmt: skip
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.get("/health")).status_code == 200
            os.killpg(proc.pid, signal.SIGINT)
            assert await asyncio.to_thread(proc.wait, 30) == 0
            assert "Traceback" not in log.read_text()
            assert list(tmp.iterdir()) == [], "no temp folder left behind"
            tmp.rmdir()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_demo_that_fails_after_its_broker_started_leaves_nothing_behind(tmp_path: Path) -> None:
    mqtt_port, tmp = free_port(), private_tmp()
    (tmp_path / "demo" / "iotgw.db").mkdir(parents=True)  # no database can be opened there
    cmd = [sys.executable, "-m", "gateway", "demo", "--mqtt-url", f"mqtt://127.0.0.1:{mqtt_port}",
           "--http-port", str(free_port()), "--data-dir", str(tmp_path / "demo"), "--keep"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TMPDIR": str(tmp)}, check=False)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "started Mosquitto" in done.stderr, "it failed after its broker started"
    assert done.stderr.strip().splitlines()[-1].startswith("iotgw: "), "one clear line at the end"
    assert "Traceback" not in done.stderr
    assert not port_open("127.0.0.1", mqtt_port), "its broker was stopped"
    assert list(tmp.iterdir()) == [], "and its temp folder removed"
    tmp.rmdir()


def start_demo(log: Path, tmp: Path, *flags: str) -> subprocess.Popen[bytes]:
    """`iotgw demo FLAGS --duration 120` in a process group of its own (as from a terminal), its
    temp folders in `tmp`, its output in `log`."""
    cmd = [sys.executable, "-m", "gateway", "demo", *flags, "--duration", "120"]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TMPDIR": str(tmp)})  # fmt: skip


def private_tmp() -> Path:
    """A TMPDIR of the test's own, where the demo's Mosquitto (its own user) may write too."""
    tmp = Path(tempfile.mkdtemp(prefix="iotgw-test-tmp-"))
    tmp.chmod(0o755)
    return tmp


def test_a_rerun_starts_afresh_and_keep_goes_on_with_the_same_key(tmp_path: Path) -> None:
    import sqlite3  # noqa: PLC0415

    data_dir = tmp_path / "demo"

    def run(*extra: str) -> tuple[str, int]:
        cmd = [sys.executable, "-m", "gateway", "demo", "--mqtt-url", f"mqtt://127.0.0.1:{free_port()}",
               "--http-port", str(free_port()), "--data-dir", str(data_dir), "--rate", "5", "--duration", "4",
               *extra]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        with sqlite3.connect(data_dir / "iotgw.db") as db:
            keys = db.execute("select count(*) from api_keys where revoked_at is null").fetchone()[0]
        return (data_dir / "api-key").read_text().strip(), keys

    first, keys = run()
    assert keys == 1
    second, keys = run()
    assert (second != first, keys) == (True, 1), "afresh: a new database, one key"
    third, keys = run("--keep")
    assert (third, keys) == (second, 1), "--keep: the same database and the same key"


def test_a_mistyped_demo_flag_touches_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    data_dir.mkdir()
    (data_dir / "api-key").write_text("the last run's key\n")
    for argv in (["--fault-rate", "2"], ["--rate", "0"]):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", "--data-dir", str(data_dir), *argv],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1, f"one line: {done.stderr}"
        assert (data_dir / "api-key").read_text() == "the last run's key\n", "the last run is still there"
    file = tmp_path / "a-file"
    file.write_text("")
    done = subprocess.run([sys.executable, "-m", "gateway", "demo", "--data-dir", str(file)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"iotgw: --data-dir {file}: "), done.stderr
    assert "Traceback" not in done.stderr


async def test_a_demo_killed_with_sigkill_leaves_no_broker_and_no_folder_behind(tmp_path: Path) -> None:
    mqtt_port, tmp = free_port(), private_tmp()
    data_dir = tmp_path / "demo"
    log = tmp_path / "demo.log"
    proc = start_demo(log, tmp, "--mqtt-url", f"mqtt://127.0.0.1:{mqtt_port}", "--http-port", str(free_port()),
                      "--data-dir", str(data_dir))  # fmt: skip
    try:
        await wait_for(lambda: written(data_dir / "api-key", proc, log), timeout=60, what="the demo's API key")
        (folder,) = tmp.iterdir()
        broker_pid = int((folder / "mosquitto.pid").read_text())
        os.killpg(proc.pid, signal.SIGKILL)  # the demo's whole process group: no finally block runs
        proc.wait()

        async def cleaned_up() -> bool:
            try:
                os.kill(broker_pid, 0)
            except ProcessLookupError:
                return not folder.exists()
            return False

        await wait_for(cleaned_up, timeout=20, what="the killed demo's Mosquitto to stop and its folder to go")
        assert not port_open("127.0.0.1", mqtt_port)
        assert list(tmp.iterdir()) == []
        tmp.rmdir()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_a_demo_killed_with_sigkill_while_its_broker_starts_leaves_nothing_behind(tmp_path: Path) -> None:
    tmp = private_tmp()
    log = tmp_path / "demo.log"
    proc = start_demo(log, tmp, "--mqtt-url", f"mqtt://127.0.0.1:{free_port()}", "--http-port", str(free_port()),
                      "--data-dir", str(tmp_path / "demo"))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list(tmp.glob("*/mosquitto.log")):  # the broker is being started: kill now
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the demo never started its broker"
            await asyncio.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

        async def cleaned_up() -> bool:
            brokers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp) in " ".join(p.info["cmdline"] or [])]
            return not brokers and list(tmp.iterdir()) == []

        await wait_for(cleaned_up, timeout=20, what="no broker and no folder left by the demo killed at its start")
        tmp.rmdir()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def importing(proc: subprocess.Popen[bytes], _tmp: Path) -> bool:
    """Its modules are being imported (pydantic-core is loaded; the plugins are not yet)."""
    try:
        return b"pydantic_core" in Path(f"/proc/{proc.pid}/maps").read_bytes()
    except OSError:
        return False


def starting_its_broker(_proc: subprocess.Popen[bytes], tmp: Path) -> bool:
    """Its Mosquitto is being started (its log file is open), the gateway not yet."""
    return bool(list(tmp.glob("*/mosquitto.log")))


@pytest.mark.parametrize("moment", [importing, starting_its_broker])
async def test_ctrl_c_while_the_demo_starts_stops_it_quietly(
    tmp_path: Path, moment: Callable[[subprocess.Popen[bytes], Path], bool]
) -> None:
    tmp = private_tmp()
    log = tmp_path / "demo.log"
    proc = start_demo(log, tmp, "--mqtt-url", f"mqtt://127.0.0.1:{free_port()}", "--http-port", str(free_port()),
                      "--data-dir", str(tmp_path / "demo"))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not moment(proc, tmp):  # polled finely: the moment passes quickly
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the demo never got to {moment.__name__}"
            await asyncio.sleep(0.002)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in its terminal reaches its process group
        code = await asyncio.to_thread(proc.wait, 30)
        said = log.read_text()
        assert code in {0, 130}, said
        assert "Traceback" not in said
        assert "iotgw demo is running" not in said, "no banner for a demo that was asked to stop"
        await wait_for(lambda: asyncio.sleep(0, list(tmp.iterdir()) == []), timeout=20, what="its folder gone")
        tmp.rmdir()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
