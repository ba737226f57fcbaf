"""`iotgw demo` from the outside: it starts its own broker, shows data in the API, stops cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from gateway.broker import free_port, port_open
from tests.conftest import wait_for

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


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
        await wait_for(lambda: _exists(key_file, proc, log), timeout=60, what="the demo's API key")
        headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        async with httpx.AsyncClient(base_url=base, headers=headers) as client:

            async def api_has_everything() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    devices = (await client.get("/api/devices")).json()
                    events = (await client.get("/api/events", params={"type": "elevator.*"})).json()["items"]
                    dead = (await client.get("/api/dead-letters")).json()["items"]
                    orders = (await client.get("/api/work-orders")).json()
                except httpx.TransportError:
                    return False
                return len(devices) >= 40 and len(events) > 0 and len(dead) > 0 and len(orders) > 0

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


async def _exists(path: Path, proc: subprocess.Popen[bytes], log: Path) -> bool:
    assert proc.poll() is None, log.read_text()
    return path.exists() and bool(path.read_text().strip())
