"""What Mosquitto's autosave_interval costs: the broker's rates with 30 s against the shipped 1 s.

Run by `make bench`. With the gateway away its persistent session queues every message, and
Mosquitto rewrites its whole persistence file every autosave_interval seconds, so a shorter
interval means more writing while the queue is long. For each setting (alternating, --repeat
times): a private Mosquitto runs the project's mosquitto.conf with only autosave_interval changed;
a persistent session subscribes and leaves; C publishers (`mosquitto_pub -l`, QoS 1) queue
--messages into it (the queueing rate: until the last publisher has its acknowledgements); then
the session comes back (`mosquitto_sub -c`) and drains the queue (the drain rate), and the broker
process's CPU time for both is read from /proc. Results go to bench/results/autosave.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ingest import BENCH_ACL, SITE, USERS, _blast, _write_streams, login  # noqa: E402

from gateway.cli.broker import PROJECT_CONF, Mosquitto, free_port  # noqa: E402

SESSION = "bench-autosave-gw"


def one_run(interval: int, devices: int, per_device: int) -> dict[str, float]:
    """Queue and drain devices * per_device messages on a broker saving every `interval` seconds."""
    work = Path(tempfile.mkdtemp(prefix="iotgw-autosave-"))
    conf = work / "mosquitto.conf"
    conf.write_text(re.sub(r"(?m)^autosave_interval\s+\d+$", f"autosave_interval {interval}", PROJECT_CONF.read_text()))
    broker = Mosquitto(
        Path(tempfile.mkdtemp(prefix="iotgw-autosave-mqtt-")), free_port(), conf=conf, users=USERS, extra_acl=BENCH_ACL
    )
    broker.start()
    try:
        assert broker.proc is not None
        proc = psutil.Process(broker.proc.pid)
        sub = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.gateway_port), *login(), "-q", "1", "-c",
               "-i", SESSION, "-t", "devices/+/+"]  # fmt: skip
        subprocess.run([*sub, "-W", "1"], capture_output=True, check=False)  # subscribe, then leave
        total = devices * per_device
        streams = _write_streams(work, "bench-autosave-", devices, per_device, SITE)
        cpu0 = sum(proc.cpu_times()[:2])
        started = _blast(broker.gateway_port, streams)
        queued_s = time.time() - started
        cpu1 = sum(proc.cpu_times()[:2])
        started = time.time()
        subprocess.run([*sub, "-C", str(total)], capture_output=True, check=True, timeout=600)
        drained_s = time.time() - started
        cpu2 = sum(proc.cpu_times()[:2])
        size = (broker.data_dir / "mosquitto.db").stat().st_size if (broker.data_dir / "mosquitto.db").exists() else 0
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(broker.data_dir, ignore_errors=True)
    return {
        "queue_rate": total / queued_s,
        "drain_rate": total / drained_s,
        "broker_cpu_us_per_message": (cpu2 - cpu0) / total * 1e6,
        "queue_cpu_s": cpu1 - cpu0,
        "db_bytes_after": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs: dict[int, list[dict[str, float]]] = {30: [], 1: []}
    for _ in range(args.repeat):
        for interval, done in runs.items():
            done.append(one_run(interval, args.devices, args.messages // args.devices))
            print(f"  autosave_interval {interval}: {done[-1]}", file=sys.stderr, flush=True)
    results: dict[str, Any] = {"messages": args.messages, "devices": args.devices, "repeat": args.repeat}
    for interval, rs in runs.items():
        results[f"autosave_{interval}s"] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    slow, fast = results["autosave_1s"], results["autosave_30s"]
    results["queue_rate_ratio_1s_to_30s"] = slow["queue_rate"] / fast["queue_rate"]
    results["drain_rate_ratio_1s_to_30s"] = slow["drain_rate"] / fast["drain_rate"]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "autosave.json").write_text(json.dumps(results, indent=2))
    print(f"{'':22}{'30 s':>12}{'1 s':>12}")
    for key in ("queue_rate", "drain_rate", "broker_cpu_us_per_message"):
        print(f"{key:22}{fast[key]:>12,.1f}{slow[key]:>12,.1f}")
    queue, drain = results["queue_rate_ratio_1s_to_30s"], results["drain_rate_ratio_1s_to_30s"]
    print(f"with autosave_interval 1: queueing {queue:.2f}x, draining {drain:.2f}x the rate with 30")


if __name__ == "__main__":
    main()
