"""iotgw installed as a user installs it: a wheel in a clean virtualenv, run from elsewhere.
Its demo must find everything it needs in the package (the broker's config included)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from gateway.broker import free_port, port_open
from tests.conftest import wait_for
from tests.test_demo import _exists

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: building leaves nothing in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", ".iotgw-demo"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (built,) = out.glob("iotgw-*.whl")
    return built


def test_the_wheel_holds_the_broker_config_the_license_and_the_shipped_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("gateway/mosquitto.conf", "gateway/mosquitto.acl", "alerts/rules.yaml", "alerts/roster.yaml",
                 "gateway/ui/index.html"):  # fmt: skip
        assert name in names, name
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the license travels with the package"
    conf = zipfile.ZipFile(wheel).read("gateway/mosquitto.conf").decode()
    assert conf == (ROOT / "mosquitto.conf").read_text(), "one broker config: the repository's file is the package's"


async def test_the_demo_runs_from_a_wheel_in_a_clean_venv_and_stops_cleanly(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=900)
    away = tmp_path / "elsewhere"  # not the checkout: nothing of it can be found by accident
    away.mkdir()
    mqtt_port, http_port = free_port(), free_port()
    data_dir = away / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTGW_", "PYTHON"))}
    cmd = [str(venv / "bin" / "iotgw"), "demo", "--mqtt-url", f"mqtt://127.0.0.1:{mqtt_port}",
           "--http-port", str(http_port), "--data-dir", str(data_dir), "--rate", "5", "--duration", "120"]  # fmt: skip
    log = away / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=away, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        key_file = data_dir / "api-key"
        await wait_for(lambda: _exists(key_file, proc, log), timeout=90, what="the demo's API key")
        headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", headers=headers) as client:

            async def devices_and_events() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    devices = (await client.get("/api/devices")).json()["items"]
                    events = (await client.get("/api/events", params={"type": "elevator.*"})).json()["items"]
                except httpx.TransportError:
                    return False
                return len(devices) >= 40 and len(events) > 0

            await wait_for(devices_and_events, timeout=90, what="devices and events from the installed demo")
        os.killpg(proc.pid, signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()[-3000:]
        assert not port_open("127.0.0.1", mqtt_port), "its Mosquitto stops with it"
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_image_installs_its_dependencies_before_the_code_and_probes_liveness_on_its_port() -> None:
    steps = [line.split()[0:2] for line in (ROOT / "Dockerfile").read_text().splitlines() if line[:1].isupper()]
    copies = [i for i, (op, _) in enumerate(steps) if op == "COPY"]
    deps = next(i for i, (op, what) in enumerate(steps) if op == "COPY" and what == "pyproject.toml")
    code = next(i for i, (op, what) in enumerate(steps) if op == "COPY" and what == "gateway")
    installs = [i for i, (op, _) in enumerate(steps) if op == "RUN"]
    assert deps == copies[0], "pyproject.toml is copied first"
    assert any(deps < i < code for i in installs), "the dependencies are installed before the code is copied"
    text = (ROOT / "Dockerfile").read_text()
    health = text[text.index("HEALTHCHECK") :]
    assert "/health" in health, "liveness, not readiness"
    assert "/ready" not in health
    assert "IOTGW_HTTP_PORT" in health, "on the configured port"
