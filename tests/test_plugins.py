"""The plugin of docs/plugins.md, installed as pip would install it, through a real `iotgw run`:
its consumer runs (in the consumers' own process), its route answers, its metric counts and its
setting is read from the environment, as for the built-in plugins."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import httpx
import pytest

from devices.fleet import Fleet, FleetConfig
from gateway.broker import Mosquitto, free_port
from tests.conftest import iotgw_run, kill_9, until_ready, wait_for

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
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
