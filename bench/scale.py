"""Scale: many connected devices at once. Does the gateway hold them, and at what memory and CPU?

Run by `make bench` (not part of the tests' pass/fail). For each fleet size (default 1k, 5k and
10k sensors), one `iotgw simulate` process connects them all (one MQTT connection each, a
reading every 5 s per device), and the gateway (all consumers on) is watched for `--hold`
seconds once every device is online: its RSS, its CPU (percent of one core), the readings it
stored per second, and the largest consumer lag seen. Printed as a table and written to
bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ingest as base  # noqa: E402

from gateway.cli.broker import Mosquitto, free_port  # noqa: E402


def _metrics(http_port: int) -> dict[str, float]:
    """Sums per metric name of the gateway's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("iotgw_consumer_lag_events",):
                sums[s.name] = max(sums.get(s.name, 0.0), s.value)
            else:
                sums[s.name] = sums.get(s.name, 0.0) + s.value
    return sums


def _simulate(mqtt_url: str, devices: int, prefix: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "gateway", "simulate", "--mqtt-url", mqtt_url,
        "--elevators", "0", "--sensors", str(devices), "--rate", "0.2", "--fault-rate", "0",
        "--prefix", prefix, "--log-level", "WARNING",
    ]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with base.workspace("scale") as (work, broker):
        return _run(args, work, broker)


def _run(args: argparse.Namespace, work: Path, broker: Mosquitto) -> dict[str, Any]:
    db, log, http_port = work / "scale.db", work / "gateway.log", free_port()
    results: dict[str, Any] = {"sizes": []}
    gw = base._gateway(broker.gateway_port, db, http_port, log, client_id="scale-gateway")  # noqa: SLF001
    try:
        base._wait_ready(http_port, gw)  # noqa: SLF001
        proc = psutil.Process(gw.pid)
        for size in args.sizes:
            sim = _simulate(broker.url_as("bench"), size, f"scale{size}-", work / "simulator.log")
            t0 = time.monotonic()
            try:
                while (online := _metrics(http_port).get("iotgw_devices_online", 0.0)) < size:
                    if sim.poll() is not None or time.monotonic() - t0 > args.timeout:
                        raise SystemExit(f"only {online:.0f} of {size:,} devices online; see {work}")
                    time.sleep(1.0)
                connect_s = time.monotonic() - t0
                start = _metrics(http_port)
                cpu_from = base.gateway_cpu_s(proc)  # with its consumers' process
                rss, lag, held_from = 0, 0.0, time.monotonic()
                while time.monotonic() - held_from < args.hold:
                    time.sleep(1.0)
                    rss = max(rss, base.gateway_rss(proc))
                    lag = max(lag, _metrics(http_port).get("iotgw_consumer_lag_events", 0.0))
                cpu = 100 * (base.gateway_cpu_s(proc) - cpu_from) / (time.monotonic() - held_from)
                end = _metrics(http_port)
                stored = end.get("iotgw_events_total", 0.0) - start.get("iotgw_events_total", 0.0)
                row = {
                    "devices": size,
                    "online": round(end.get("iotgw_devices_online", 0.0)),
                    "connect_s": round(connect_s, 1),
                    "events_per_s": round(stored / args.hold),
                    "gateway_rss_mb": round(rss / 2**20, 1),
                    "gateway_cpu_percent": round(cpu),
                    "max_consumer_lag": round(lag),
                }
                results["sizes"].append(row)
                print(f"  {size:,} devices: {row}", file=sys.stderr, flush=True)
            finally:
                sim.terminate()
                try:
                    sim.wait(60)
                except subprocess.TimeoutExpired:
                    sim.kill()
                    sim.wait()
    finally:
        base._stop(gw)  # noqa: SLF001
    return results


def main() -> None:
    """Parse flags, run, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", type=lambda s: [int(x) for x in base.numbers(s)], default=[1_000, 5_000, 10_000],
        help="fleet sizes, comma-separated (default 1000,5000,10000)",
    )  # fmt: skip
    p.add_argument("--hold", type=float, default=20.0, help="seconds to watch each fleet once all are online")
    p.add_argument("--timeout", type=float, default=300.0, help="give up when a fleet is not online by then")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = p.parse_args()
    print(f"iotgw scale: fleets of {', '.join(f'{n:,}' for n in args.sizes)} devices", file=sys.stderr)
    r = run(args)
    print()
    print("| devices | online at the gateway | all online after | events/s | gateway RSS | gateway CPU | max lag |")
    print("|---|---|---|---|---|---|---|")
    for row in r["sizes"]:
        print(
            f"| {row['devices']:,} | {row['online']:,} | {row['connect_s']} s | {row['events_per_s']:,} "
            f"| {row['gateway_rss_mb']} MB | {row['gateway_cpu_percent']} % | {row['max_consumer_lag']:,} |"
        )
    base.save(args.out, r)


if __name__ == "__main__":
    main()
