"""Ingest benchmark: the broker's ceiling vs the gateway's stored rate, latency and memory.

Run by `make bench` (not part of the tests' pass/fail). One run:

1. start a private Mosquitto with the project's mosquitto.conf;
2. create two persistent QoS 1 sessions on devices/+/+ -- `mosquitto_sub` (Mosquitto's own C
   client, the ceiling) and the gateway -- then take both offline;
3. publish N QoS 1 messages (~250 bytes) from many device connections; the broker queues the
   same stream for both sessions;
4. drain: time `mosquitto_sub` receiving all N, then time `iotgw run` storing all N
   (ack-after-commit), and report both rates and their ratio;
5. live: with the gateway running, publish a paced stream and report device->stored latency
   p50/p99/max from the stored rows, and the gateway's RSS.

Results are printed as a table and written to bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devices.load import publish_numbered, telemetry_payload  # noqa: E402
from gateway.broker import Mosquitto, free_port  # noqa: E402

SUB_ID = "bench-mosquitto-sub"
GW_ID = "bench-gateway"
SITE = "campus-north/building-07/floor-12/plant-room-b"
PREFIX = "bench-temperature-sensor-"


def _mosquitto_sub(port: int, count: int | None, timeout: float | None = None) -> subprocess.Popen[bytes]:
    cmd = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-c", "-i", SUB_ID, "-t", "devices/+/+"]
    if count is not None:
        cmd += ["-C", str(count)]
    if timeout is not None:
        cmd += ["-W", str(int(timeout))]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _gateway(port: int, db: Path, http_port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "gateway", "run",
        "--mqtt-url", f"mqtt://127.0.0.1:{port}",
        "--database-url", f"sqlite:///{db}",
        "--http-port", str(http_port),
        "--client-id", GW_ID,
        "--log-level", "WARNING",
    ]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def _wait_ready(http_port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("gateway exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit("gateway never became ready")


def _count(db: Path) -> int:
    with sqlite3.connect(db, timeout=30) as conn:
        return int(conn.execute("select count(*) from events where type='sensor.reading'").fetchone()[0])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _progress(label: str, done: int, total: int, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-6)
    end = "\r" if sys.stderr.isatty() else "\n"
    sys.stderr.write(f"  {label}: {done:,}/{total:,} ({rate:,.0f} msg/s)   {end}")
    sys.stderr.flush()


def _latencies(db: Path, after_id: int) -> list[float]:
    with sqlite3.connect(db, timeout=30) as conn:
        rows = conn.execute(
            "select time, received_at from events where id > ? and type='sensor.reading'", (after_id,)
        ).fetchall()
    return [
        (datetime.fromisoformat(stored) - datetime.fromisoformat(device)).total_seconds() * 1000
        for device, stored in rows
    ]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="iotgw-bench-"))
    broker = Mosquitto(Path(tempfile.mkdtemp(prefix="iotgw-bench-mqtt-")), free_port())
    broker.start()
    db, log, http_port = work / "bench.db", work / "gateway.log", free_port()
    sample = telemetry_payload(123456, 21.5, site=args.site)
    topic = f"devices/{PREFIX}00000/telemetry"
    results: dict[str, Any] = {
        "messages": args.messages,
        "devices": args.devices,
        "message_bytes": len(sample) + len(topic),
    }
    try:
        print(f"iotgw ingest benchmark: {args.messages:,} QoS 1 messages from {args.devices} devices", file=sys.stderr)
        # 2. both sessions exist, then go offline.
        _mosquitto_sub(broker.port, None, timeout=1).wait()
        gw = _gateway(broker.port, db, http_port, log)
        _wait_ready(http_port, gw)
        _stop(gw)
        # 3. the stream, queued for both.
        per_device = args.messages // args.devices
        total = per_device * args.devices
        t0 = time.monotonic()
        stats = asyncio.run(publish_numbered(broker.url, args.devices, per_device, prefix=PREFIX, site=args.site))
        results["publish_rate"] = round(stats.acked / (time.monotonic() - t0))
        print(f"  published {stats.acked:,} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        # 4a. ceiling: mosquitto_sub drains the same stream.
        t0 = time.monotonic()
        sub = _mosquitto_sub(broker.port, total)
        sub.wait(600)
        ceiling = total / (time.monotonic() - t0)
        results["ceiling_msg_s"] = round(ceiling)
        print(f"  mosquitto_sub received {total:,} at {ceiling:,.0f} msg/s", file=sys.stderr)
        # 4b. the gateway drains and stores it, acknowledging after each commit.
        t0 = time.monotonic()
        gw = _gateway(broker.port, db, http_port, log)
        proc = psutil.Process(gw.pid)
        peak_rss = 0
        shown = time.monotonic()
        while (done := _count(db)) < total:
            if gw.poll() is not None:
                raise SystemExit(f"gateway died; see {log}")
            peak_rss = max(peak_rss, proc.memory_info().rss)
            if time.monotonic() - shown > 2:
                _progress("gateway stored", done, total, t0)
                shown = time.monotonic()
            if time.monotonic() - t0 > args.timeout:
                raise SystemExit(f"gateway stored only {done:,} of {total:,} in {args.timeout:.0f}s; see {log}")
            time.sleep(0.2)
        stored = total / (time.monotonic() - t0)
        sys.stderr.write("\n")
        results["gateway_msg_s"] = round(stored)
        results["ratio"] = round(stored / ceiling, 3)
        # 5. live latency at a fixed offered load, gateway running.
        with sqlite3.connect(db) as conn:
            last_id = int(conn.execute("select max(id) from events").fetchone()[0])
        live_total = int(args.live_rate * args.live_seconds)
        live_per_device = max(1, live_total // args.devices)
        print(f"  live stream: {args.live_rate:,.0f} msg/s for {args.live_seconds:.0f}s", file=sys.stderr)
        asyncio.run(
            publish_numbered(
                broker.url, args.devices, live_per_device, prefix=PREFIX + "live-", site=args.site, rate=args.live_rate
            )
        )
        expected = total + live_per_device * args.devices
        deadline = time.monotonic() + 60
        while _count(db) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        lat = _latencies(db, last_id)
        peak_rss = max(peak_rss, proc.memory_info().rss)
        results["live_rate_msg_s"] = args.live_rate
        results["latency_ms"] = {
            "p50": round(statistics.median(lat), 1),
            "p99": round(_pct(lat, 0.99), 1),
            "max": round(max(lat), 1),
        }
        results["gateway_rss_mb"] = round(peak_rss / 2**20, 1)
        _stop(gw)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(broker.data_dir, ignore_errors=True)
    return results


def main() -> None:
    """Parse flags, run, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--site", default=SITE, help="site name in every message (sets the message size)")
    p.add_argument("--live-rate", type=float, default=1000.0, help="offered load for the latency phase, msg/s")
    p.add_argument("--live-seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=300.0, help="give up on a phase after this many seconds")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    args = p.parse_args()
    r = run(args)
    lat = r["latency_ms"]
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| messages (QoS 1, {r['message_bytes']} B with topic) | {r['messages']:,} from {r['devices']} devices |")
    print(f"| ceiling: mosquitto_sub receive rate | {r['ceiling_msg_s']:,} msg/s |")
    print(f"| gateway stored rate (ack-after-commit) | {r['gateway_msg_s']:,} msg/s |")
    print(f"| ratio | {r['ratio']:.0%} |")
    live = f"{r['live_rate_msg_s']:,.0f} msg/s"
    print(f"| device -> stored latency at {live} | p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms |")
    print(f"| gateway peak RSS | {r['gateway_rss_mb']} MB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2))
    print(f"\nresults written to {args.out}")


if __name__ == "__main__":
    main()
