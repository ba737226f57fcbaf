"""Dashboards, Prometheus rules and the compose stack, checked against what the gateway really exports.

PromQL is parsed (promql-parser), not grepped: every selector's metric must be in the `/metrics`
of a gateway that ran a seeded simulation (or be a recording rule, or Prometheus's own `up`),
with every label the selector uses; a real Prometheus then scrapes that gateway and every
dashboard query must return data.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devices.fleet import Fleet, FleetConfig
from devices.misbehave import publish_bad
from gateway.cli.broker import Mosquitto, free_port
from tests.support.gateway import ROOT, running_gateway, wait_for

DASHBOARDS = sorted((ROOT / "dashboards/grafana/dashboards").glob("*.json"))
PROMETHEUS_DIR = ROOT / "dashboards/prometheus"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$site": ".*", "$type": ".*"}
# Prometheus makes these itself, per target.
PROMETHEUS_OWN = {"up": {"job", "instance"}}


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _recorded() -> set[str]:
    return {r["record"] for r in _rules() if "record" in r}


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL with Grafana's variables filled in) for every target."""
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for var, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(var, value)
                yield board["title"], panel["title"], expr


def rule_queries() -> Iterator[tuple[str, str]]:
    for rule in _rules():
        yield rule.get("record") or rule["alert"], rule["expr"]


def selectors(node: Any) -> Iterator[tuple[str, set[str]]]:
    """(metric name, label names in its matchers) of every vector selector in a parsed expression."""
    kind = type(node).__name__
    if kind == "VectorSelector":
        labels = {m.name for m in node.matchers.matchers}
        labels |= {m.name for group in node.matchers.or_matchers for m in group}
        yield node.name, labels
    elif kind == "MatrixSelector":
        yield from selectors(node.vector_selector)
    elif kind == "BinaryExpr":
        yield from selectors(node.lhs)
        yield from selectors(node.rhs)
    elif kind == "Call":
        for arg in node.args:
            yield from selectors(arg)
    elif kind in ("AggregateExpr", "ParenExpr", "UnaryExpr", "SubqueryExpr"):
        yield from selectors(node.expr)
        if kind == "AggregateExpr" and node.param is not None:
            yield from selectors(node.param)


def test_selectors_walk_the_whole_expression() -> None:
    expr = promql_parser.parse('max(a{x="1"}) / on() (rate(b{y=~"2"}[5m]) or -histogram_quantile(0.9, c_bucket))')
    assert dict(selectors(expr)) == {"a": {"x"}, "b": {"y"}, "c_bucket": set()}


def test_dashboards_are_valid_grafana_json_on_the_provisioned_datasource() -> None:
    datasources = yaml.safe_load((ROOT / "dashboards/grafana/provisioning/datasources/prometheus.yml").read_text())
    (uid,) = [d["uid"] for d in datasources["datasources"]]
    assert len(DASHBOARDS) == 3
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert isinstance(board["schemaVersion"], int)
        assert board["schemaVersion"] >= 36
        assert board["uid"] not in uids
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in board["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, (path.name, panel["title"])
            assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
            refs = [t["refId"] for t in panel["targets"]]
            assert refs
            assert len(refs) == len(set(refs))
            assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] == uid
            assert re.fullmatch(r"label_values\(\w+, \w+\)", variable["query"]["query"])
    provider = yaml.safe_load((ROOT / "dashboards/grafana/provisioning/dashboards/iotgw.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make test` installs Debian's prometheus package"
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"]):
        done = subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_is_valid_and_mounts_only_files_of_the_repository() -> None:
    compose = Path(__import__("compose").__file__).parent / "docker-compose"  # the static Compose v2 binary
    for profile in ([], ["--profile", "cluster"]):
        done = subprocess.run(
            [str(compose), "-f", "docker-compose.yml", *profile, "config", "-q"], cwd=ROOT, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    # The cluster profile: PostgreSQL and a second instance of the same image, on its own name.
    second = doc["services"]["gateway-2"]
    assert second["profiles"] == ["cluster"] == doc["services"]["postgres"]["profiles"]
    assert second["environment"]["IOTGW_INSTANCE"] == "gw-2"
    assert second["environment"]["IOTGW_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert second["image"] == doc["services"]["gateway"]["image"]
    mounted = [
        volume.split(":")[0]
        for service in doc["services"].values()
        for volume in service.get("volumes", [])
        if isinstance(volume, str) and volume.startswith(".")
    ]
    assert mounted
    for source in mounted:
        assert (ROOT / source).exists(), f"docker-compose.yml mounts {source}, which is not in the repository"
    assert (ROOT / doc["services"]["gateway"]["build"]["dockerfile"]).exists()
    # The broker's password file is made from this list: it must be the simulator's devices.
    args = doc["services"]["simulator"]["command"][1:]
    ids = subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--print-ids"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert ids == (ROOT / "dashboards" / "simulator-devices.txt").read_text()


@pytest.mark.anyio
async def test_every_query_uses_real_metrics_and_a_real_prometheus_gets_data_for_each(
    broker: Mosquitto, settings_for: Any
) -> None:
    settings = settings_for(broker, http_port=free_port())
    async with running_gateway(settings, serve_http=True):
        fleet = Fleet(
            FleetConfig(mqtt_url=broker.url_as("tester"), elevators=6, sensors=9, rate=5, fault_rate=0.05, seed=7)
        )
        running = asyncio.create_task(fleet.run())
        try:
            await publish_bad(broker.url_as("tester"), "rogue-1", seq=1)
            base = f"http://127.0.0.1:{settings.http_port}"
            families: dict[str, set[str]] = {}

            async def simulated() -> bool:
                # Analytics gauges are published every 10 s; alerts and work orders need faults.
                async with httpx.AsyncClient() as c:
                    text = (await c.get(f"{base}/metrics")).text
                families.clear()
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        families.setdefault(sample.name, set()).update(sample.labels)
                    families.setdefault(family.name, set())
                seen = {n for n in families if families[n]}
                wanted = ("iotgw_site_elevator_trips", "iotgw_elevator_availability_ratio", "iotgw_work_orders_open")
                return all(n in seen for n in wanted)

            await wait_for(simulated, timeout=60, what="a simulation with trips, alerts and work orders")
            recorded = _recorded()
            problems = []
            queries = [(f"{b} / {p}", e) for b, p, e in dashboard_queries()] + list(rule_queries())
            for where, expr in queries:
                for name, labels in selectors(promql_parser.parse(expr)):
                    if name in recorded:
                        continue
                    known = PROMETHEUS_OWN.get(name, families.get(name))
                    if known is None:
                        problems.append(f"{where}: {name} is not in /metrics")
                    elif missing := labels - known:
                        problems.append(f"{where}: {name} has no label {sorted(missing)} (it has {sorted(known)})")
            assert not problems, "\n".join(problems)
            await _prometheus_returns_data(settings.http_port)
        finally:
            fleet.stop()
            await asyncio.gather(running, return_exceptions=True)


async def _prometheus_returns_data(gateway_port: int) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus missing: `make test` installs Debian's prometheus package"
    work = Path(tempfile.mkdtemp(prefix="iotgw-prom-"))
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{gateway_port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROMETHEUS_DIR / "rules.yml", work / "rules.yml")
    port = free_port()
    with (work / "prometheus.log").open("wb") as log_file:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
    try:
        queries = list(dashboard_queries())
        empty: list[str] = []

        async def every_panel_has_data() -> bool:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            empty.clear()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                    for board, panel, expr in queries:
                        r = await c.get("/api/v1/query", params={"query": expr})
                        if r.status_code != 200 or not r.json()["data"]["result"]:
                            empty.append(f"{board} / {panel}: {expr}")
            except httpx.TransportError:
                return False
            return not empty

        started = time.monotonic()
        try:
            await wait_for(every_panel_has_data, timeout=60, what="Prometheus to have data for every panel")
        finally:
            print(f"prometheus: {len(queries) - len(empty)}/{len(queries)} queries with data after "  # noqa: T201
                  f"{time.monotonic() - started:.1f} s; empty: {empty}")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
