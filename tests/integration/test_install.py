"""iotgw installed as a user installs it: a wheel in a clean virtualenv, run from elsewhere.
Its demo must find everything it needs in the package (the broker's config included)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.cli.broker import free_port, port_open
from tests.support.gateway import ROOT, wait_for, written

pytestmark = pytest.mark.anyio


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
    for name in ("gateway/mosquitto.conf", "gateway/mosquitto.acl", "alerts/rules.yaml", "alerts/dispatch/roster.yaml",
                 "alerts/ui/index.html"):  # fmt: skip
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
        await wait_for(lambda: written(key_file, proc, log), timeout=90, what="the demo's API key")
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
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        if service.get("image") == "iotgw:local" and "healthcheck" in service:
            assert "IOTGW_HTTP_PORT" in str(service["healthcheck"]), f"{name}: a health check on a fixed port"


class Image:
    """The Dockerfile's steps run in a folder standing for the image's root: no daemon runs here,
    so its COPY, WORKDIR, ENV and RUN steps are played as `docker build` would, with a clean
    virtualenv's python and pip first on the PATH in place of the base image's."""

    def __init__(self, root: Path, venv: Path) -> None:
        self.root, self.venv = root, venv
        self.env: dict[str, str] = {}
        self.workdir = root
        self.healthcheck = ""
        self.cmd: list[str] = []
        self.skipped: list[str] = []

    def inside(self, text: str) -> str:
        """Absolute paths of the image, as paths under its root here."""
        for top in ("/src", "/var/lib/iotgw"):
            text = text.replace(top, f"{self.root}{top}")
        return text

    def steps(self) -> list[tuple[str, str]]:
        joined = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
        lines = [line.strip() for line in joined.splitlines()]
        return [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]

    def copy(self, *sources_and_dest: str) -> None:
        """COPY from the build context (the checkout, less what .dockerignore leaves out)."""
        *sources, dest = sources_and_dest
        for source in sources:
            target = self.workdir / dest / source if dest.endswith("/") else self.workdir / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.db"))
            else:
                shutil.copy(ROOT / source, target)

    def build(self) -> None:
        host = {k: v for k, v in os.environ.items() if not k.startswith(("IOTGW_", "PYTHON", "VIRTUAL_ENV"))}
        for op, arg in self.steps():
            if op == "FROM":
                assert arg.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}-"), arg
            elif op == "ENV":
                for pair in shlex.split(arg):
                    name, _, value = pair.partition("=")
                    self.env[name] = self.inside(value)
            elif op == "WORKDIR":
                self.workdir = Path(self.inside(arg))
                self.workdir.mkdir(parents=True, exist_ok=True)
            elif op == "COPY":
                self.copy(*arg.split())
            elif op == "RUN" and arg.startswith("useradd"):
                self.skipped.append(arg)  # a system account: root's business on this machine, not the test's
            elif op == "RUN":
                env = {**host, **self.env, "PATH": f"{self.venv / 'bin'}:{host['PATH']}"}
                done = subprocess.run(["/bin/bash", "-c", self.inside(arg)], cwd=self.workdir, env=env,
                                      capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
                assert done.returncode == 0, f"RUN {arg[:80]}: {done.stderr[-2000:]}"
            elif op == "HEALTHCHECK":
                self.healthcheck = arg.split(" CMD ", 1)[1]
            elif op == "CMD":
                self.cmd = json.loads(arg)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("image")
    venv = root / "usr-local"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    built = Image(root, venv)
    built.build()
    return built


async def test_the_images_python_layers_build_and_its_healthcheck_passes_with_the_broker_away(image: Image) -> None:
    assert not (image.root / "src").exists(), "the sources are gone: the image runs the installed package"
    assert image.skipped == ["useradd --system --uid 10001 --create-home --home-dir /var/lib/iotgw iotgw"]
    http_port, away = free_port(), free_port()  # no broker listens on `away`
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTGW_", "PYTHON", "VIRTUAL_ENV"))}
    env |= {**image.env, "PATH": f"{image.venv / 'bin'}:{env['PATH']}", "IOTGW_HTTP_PORT": str(http_port),
            "IOTGW_HTTP_HOST": "127.0.0.1", "IOTGW_MQTT_URL": f"mqtt://127.0.0.1:{away}"}  # fmt: skip
    log = image.workdir / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(image.cmd, cwd=image.workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        async def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            cmd = ["/bin/bash", "-c", image.healthcheck]
            probe = await asyncio.to_thread(subprocess.run, cmd, env=env, capture_output=True, timeout=9, check=False)
            return probe.returncode == 0

        await wait_for(healthy, timeout=60, what="the image's HEALTHCHECK to pass")
        ready = httpx.get(f"http://127.0.0.1:{http_port}/ready", timeout=5)
        assert ready.status_code == 503, "the broker is away: not ready, yet healthy"
        assert (image.workdir / "iotgw.db").exists(), "its database where the image's ENV puts it"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()[-3000:]
