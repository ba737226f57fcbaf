"""The plugin of docs/plugins.md, installed as pip would install it, through a real `iotgw run`:
its consumer runs (in the consumers' own process), its route answers, its metric counts and its
setting is read from the environment, as for the built-in plugins."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from devices.fleet import Fleet, FleetConfig
from gateway.api.routes.stream import snapshot
from gateway.cli.broker import Mosquitto, free_port
from gateway.config import Settings
from tests.support.gateway import ROOT, install_plugin, iotgw_run, kill_9, running_gateway, until_ready, wait_for

pytestmark = pytest.mark.anyio
BLOCK = re.compile(r"```(python|toml)\n(.*?)```", re.DOTALL)


def install_docs_plugin(where: Path) -> None:
    """The page's modules (a block's first line names its file) and a dist-info with its entry points."""
    modules: dict[str, str] = {}
    entry_points = ""
    for lang, code in BLOCK.findall((ROOT / "docs" / "plugins.md").read_text()):
        first = code.splitlines()[0]
        if lang == "python":
            name = re.match(r"# (\w+\.py)", first)
            assert name, first
            modules[name.group(1)] = modules.get(name.group(1), "") + code
        else:
            groups = tomllib.loads(code)["project"]["entry-points"]
            entry_points = "".join(
                f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items()
            )
    assert set(modules) == {"door_cycles.py", "door_cycles_settings.py"}
    for name, code in modules.items():
        (where / name).write_text(code)
    info = where / "door_cycles-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: door-cycles\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


async def test_the_documented_plugin_runs_serves_counts_and_is_configured(
    broker: Mosquitto, database_url: str, tmp_path: Path
) -> None:
    install_docs_plugin(tmp_path)
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "IOTGW_DOOR_CYCLES_BUSY": "5"}
    log = tmp_path / "gateway.log"
    flags = ("--client-id", "iotgw-plugin-test", "--consumers", "door_cycles")
    gateway = iotgw_run(broker.url, database_url, port, *flags, log=log, env=env, cwd=tmp_path)
    try:
        await until_ready(port, gateway)
        await Fleet(
            FleetConfig(mqtt_url=broker.url_as("tester"), elevators=2, sensors=0, rate=200, steps=80, seq_start=0)
        ).run()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:

            async def counted() -> bool:
                r = await client.get("/api/door-cycles")
                assert r.status_code == 200, (r.text, log.read_text()[-3000:])
                return sum(r.json()["sites"].values()) > 0

            await wait_for(counted, what="door cycles counted by the plugin's consumer")
            figures = (await client.get("/api/door-cycles")).json()
            assert set(figures["sites"]) <= {"site-1", "site-2"}
            # IOTGW_DOOR_CYCLES_BUSY=5, not the default 1000: the sites with 5 or more are busy.
            assert figures["busy"] == sorted(s for s, n in figures["sites"].items() if n >= 5)
            assert figures["busy"], figures
            consumers = (await client.get("/api/consumers")).json()["items"]
            assert [c["name"] for c in consumers] == ["door_cycles"]
            metrics = (await client.get("/metrics")).text
            reads = re.search(r"^door_cycles_reads_total (\S+)$", metrics, re.MULTILINE)
            assert reads, "its metric on the gateway's registry"
            assert float(reads.group(1)) >= 2
            spec = (await client.get("/openapi.json")).json()
            assert "/api/door-cycles" in spec["paths"]
    finally:
        kill_9(gateway)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    ("entry_points", "code", "said"),
    [
        (
            "[iotgw.plugins]\nbroken = broken_plugin:Nope\n",
            "raise ImportError('no such thing')\n",
            "plugin 'broken' could not be loaded: no such thing",
        ),
        (
            "[iotgw.settings]\nbroken = broken_plugin:Clash\n",
            "from pydantic import BaseModel\nclass Clash(BaseModel):\n    http_port: int = 1\n",
            "setting 'http_port' of 'broken' is taken by the gateway",
        ),
        (
            "[iotgw.plugins]\nbroken = broken_plugin:P\n",
            "from gateway.plugins import Plugin\nclass P(Plugin):\n    name = 'other'\n",
            "plugin entry point 'broken' names a plugin called 'other'",
        ),
        (
            "[iotgw.plugins]\nbroken = broken_plugin:P\n",
            "from gateway.plugins import Plugin\nclass P(Plugin):\n    name = 'broken'\n"
            "    @classmethod\n    def add_commands(cls, commands):\n        commands.add_parser('run')\n",
            "plugin 'broken': ",
        ),
    ],
)
def test_a_broken_plugin_is_one_clear_line_for_every_command(
    tmp_path: Path, entry_points: str, code: str, said: str
) -> None:
    (tmp_path / "broken_plugin.py").write_text(code)
    info = tmp_path / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    for argv in (["--version"], ["run", "--help"]):
        done = subprocess.run([sys.executable, "-m", "gateway", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 1, (argv, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert said in done.stderr, done.stderr


FAILING_PLUGIN = """
from gateway.plugins import Plugin


class Failing(Plugin):
    name = "failing"

    async def run(self):
        raise RuntimeError("the background work broke")

    def live(self, tx):
        raise RuntimeError("the live view broke")

    async def stop(self):
        raise RuntimeError("stopping broke")
"""


async def test_a_plugin_that_fails_is_said_and_harms_nothing_else(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    install_plugin(tmp_path, "failing", FAILING_PLUGIN, "Failing", monkeypatch, group="iotgw.plugins")
    async with running_gateway(settings_for(broker, consumers="alerts")) as gw:
        assert "failing" in gw.plugins

        async def said() -> bool:
            return "plugin failing: its background work failed and stopped" in caplog.text

        await wait_for(said, what="the failed background work to be logged")
        live = await asyncio.to_thread(snapshot, gw.store, gw.plugins)
        assert set(live) == {"alerts", "work_orders"}, "the other plugins' parts are there"
        assert "plugin failing: its live view failed" in caplog.text
    assert "plugin failing failed to stop" in caplog.text


WAKING_PLUGIN = """
import asyncio
from gateway.plugins import Plugin

class Waking(Plugin):
    name = "waking"

    def __init__(self, host):
        super().__init__(host)
        self.go = asyncio.Event()

    async def run(self):
        await self.go.wait()
        await asyncio.to_thread(self.host.changed)  # from a thread, as a plugin's blocking work would
        await asyncio.Event().wait()
"""


async def test_a_plugin_tells_the_gateway_its_view_changed_and_the_live_stream_wakes(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    install_plugin(tmp_path, "waking", WAKING_PLUGIN, "Waking", monkeypatch, group="iotgw.plugins")
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        changes = gw.router.changes
        seen = changes.version
        assert not await changes.wait(seen, 0.5), "nothing changed yet: a wake-up now would be the test's fault"
        gw.plugins["waking"].go.set()
        assert await changes.wait(seen, 10), "the live stream was not woken by host.changed()"


PAGES_PLUGIN = """
from pathlib import Path
from gateway.plugins import Plugin

HERE = Path(__file__).resolve().parent

class Pages(Plugin):
    name = "pages"

    def ui(self):
        return {"/door-cycles": HERE / "door_pages", "/ui": HERE / "door_pages", "/api": HERE / "door_pages"}
"""


async def test_a_plugin_serves_its_own_page_and_cannot_take_a_path_already_served(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    (tmp_path / "door_pages").mkdir()
    (tmp_path / "door_pages" / "index.html").write_text("<h1>door cycles</h1>")
    install_plugin(tmp_path, "pages", PAGES_PLUGIN, "Pages", monkeypatch, group="iotgw.plugins")
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        transport = httpx.ASGITransport(app=gw.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            own = await client.get("/door-cycles/")
            assert own.status_code == 200
            assert "door cycles" in own.text
            staff = await client.get("/ui/")
            assert staff.status_code == 200
            assert "door cycles" not in staff.text, "the alerts plugin's staff page keeps /ui"
            home = await client.get("/")
            assert home.headers["location"] == "/ui/"  # the first page served
    assert "plugin pages: page /ui not served" in caplog.text
    assert "plugin pages: page /api not served" in caplog.text
