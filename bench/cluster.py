"""Scale-out: one vs two gateway instances on PostgreSQL, sharing one MQTT subscription.

Run by `make bench` (not part of the tests' pass/fail). On a private Mosquitto (the project's
config) and a fresh PostgreSQL schema per run, an identical flat-out stream of N QoS 1
readings (one `mosquitto_pub -l` C client per device) is stored by:

1. one gateway on its own (`iotgw run`, PostgreSQL, no cluster);
2. a cluster of one instance (`--instance gw-1`: inbox and sequencer, no partner);
3. a cluster of two instances (`gw-1`, `gw-2`, `$share/iotgw/devices/+/+`).

All consumers run in each. A rate counts from the moment the publishers start to the last
event stored; the broker's ceiling (Mosquitto's own C subscriber) is measured first. Printed
as a table and written to bench/results/cluster.json. PostgreSQL: $IOTGW_BENCH_PG_URL (default
the test database `scripts/setup-system.sh --test` creates).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ingest as base  # noqa: E402

from gateway.cli.broker import Mosquitto, free_port  # noqa: E402

PG_URL = os.environ.get("IOTGW_BENCH_PG_URL", "postgresql+psycopg://iotgw:iotgw@127.0.0.1:5432/iotgw_test")


def _instance(broker: Mosquitto, db: str, log: Path, instance: str | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "gateway", "run",
        "--mqtt-url", f"mqtt://127.0.0.1:{broker.gateway_port}",
        "--database-url", db,
        "--http-port", str(port),
        "--client-id", "bench-cluster",
        "--log-level", "WARNING",
    ]  # fmt: skip
    if instance:
        cmd += ["--instance", instance]
    env = {**os.environ, "IOTGW_MQTT_PASSWORD": base.USERS["iotgw"], "IOTGW_API_AUTH": "false"}
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    base._wait_ready(port, proc)  # noqa: SLF001
    return proc, port


def _stored(db: str) -> tuple[int, float]:
    engine = create_engine(db, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            n, last = conn.execute(
                text("select count(*), max(received_at) from events where type = 'sensor.reading'")
            ).one()
    finally:
        engine.dispose()
    return int(n), last.timestamp() if last else 0.0


def _run_once(args: argparse.Namespace, work: Path, broker: Mosquitto, instances: list[str | None]) -> float:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    db = f"{PG_URL}?options=-csearch_path%3D{schema}"
    per_device = args.messages // args.devices
    total = per_device * args.devices
    procs = []
    try:
        procs = [_instance(broker, db, work / "gateway.log", name) for name in instances]
        prefix = f"{base.PREFIX}{schema}-"
        streams = base._write_streams(work, prefix, args.devices, per_device, args.site)  # noqa: SLF001
        started = base._blast(broker.gateway_port, streams)  # noqa: SLF001
        while (done := _stored(db))[0] < total:
            if any(p.poll() is not None for p, _ in procs) or time.time() - started > args.timeout:
                raise SystemExit(f"stored only {done[0]:,} of {total:,}; see {work / 'gateway.log'}")
            base._progress("stored", done[0], total, time.monotonic() - (time.time() - started))  # noqa: SLF001
            time.sleep(0.5)
        return total / (done[1] - started)
    finally:
        for proc, _ in procs:
            base._stop(proc)  # noqa: SLF001
        # Their persistent sessions would queue every later stream.
        for name in instances:
            base._forget_session(broker.gateway_port, f"bench-cluster-{name}" if name else "bench-cluster")  # noqa: SLF001
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.dispose()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The three set-ups on identical streams; rates and ratios."""
    with base.workspace("cluster") as (work, broker):
        per_device = args.messages // args.devices
        print(f"iotgw scale-out benchmark: {per_device * args.devices:,} QoS 1 messages, PostgreSQL", file=sys.stderr)
        ceiling = base.broker_ceiling(work, broker, args.devices, per_device, args.site, args.timeout)
        results: dict[str, Any] = {"messages": per_device * args.devices, "ceiling_msg_s": round(ceiling)}
        for key, label, instances in (
            ("single", "one gateway, no cluster", [None]),
            ("cluster_1", "cluster of one instance", ["gw-1"]),
            ("cluster_2", "cluster of two instances", ["gw-1", "gw-2"]),
        ):
            rate = _run_once(args, work, broker, instances)
            results[key] = {"msg_s": round(rate), "of_ceiling": round(rate / ceiling, 3)}
            print(f"  {label}: {rate:,.0f} msg/s ({rate / ceiling:.0%} of the ceiling)", file=sys.stderr)
        results["two_vs_one"] = round(results["cluster_2"]["msg_s"] / results["cluster_1"]["msg_s"], 3)
        return results


def main() -> None:
    """Parse flags, run, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=40_000)
    p.add_argument("--devices", type=int, default=40)
    p.add_argument("--site", default=base.SITE)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster.json")
    args = p.parse_args()
    r = run(args)
    print()
    print("| PostgreSQL, all consumers | stored msg/s | of the broker ceiling |")
    print("|---|---|---|")
    print(f"| broker ceiling (mosquitto_sub) | {r['ceiling_msg_s']:,} | 100% |")
    for key, label in (("single", "one gateway, no cluster"), ("cluster_1", "cluster, 1 instance"),
                       ("cluster_2", "cluster, 2 instances")):  # fmt: skip
        print(f"| {label} | {r[key]['msg_s']:,} | {r[key]['of_ceiling']:.0%} |")
    print(f"\n2 instances vs 1: {r['two_vs_one']:.2f}x")
    base.save(args.out, r)


if __name__ == "__main__":
    main()
