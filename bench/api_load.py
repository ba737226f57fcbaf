"""Ingest beside a heavy API read load: what the API's concurrency bound buys.

Run by `make bench`. A private Mosquitto with the project's config and `iotgw run` (SQLite, no
consumers: ingest and the API alone). The log is filled with --fill readings first, so that
`GET /api/events?limit=1000` returns full pages. Then, three times on a fresh database each:

1. alone: C publishers (`mosquitto_pub -l`, QoS 1) send --messages; the stored rate is timed from
   the first publish to the last stored event;
2. readers, bound on (the defaults, IOTGW_API_MAX_CONCURRENT=8, ..._PER_KEY=4): the same, while
   --readers parallel loops (one process of their own, httpx) request
   `/api/events?limit=1000` over and over, all with one identity;
3. readers, bound off (both limits 1000): the same.

It prints the stored rates, their ratios to the run alone, and the readers' responses by status;
results go to bench/results/api_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ingest as base  # noqa: E402

from gateway.cli.broker import free_port  # noqa: E402

READERS = """
import asyncio, collections, json, sys, time
import httpx
url, readers, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
codes = collections.Counter()
async def loop(client, until):
    while time.monotonic() < until:
        try:
            codes[(await client.get(url)).status_code] += 1
        except httpx.HTTPError:
            codes["error"] += 1
async def main():
    limits = httpx.Limits(max_connections=readers, max_keepalive_connections=readers)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        until = time.monotonic() + seconds
        await asyncio.gather(*(loop(client, until) for _ in range(readers)))
asyncio.run(main())
print(json.dumps({str(k): v for k, v in codes.items()}))
"""

BOUND_OFF = {"IOTGW_API_MAX_CONCURRENT": "1000", "IOTGW_API_MAX_CONCURRENT_PER_KEY": "1000"}


def one_run(args: argparse.Namespace, label: str, readers: int, env: dict[str, str]) -> dict[str, Any]:
    with base.workspace(f"api-{label}") as (work, broker):
        db, log, http_port = work / "api.db", work / "gateway.log", free_port()
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            gw = base._gateway(broker.gateway_port, db, http_port, log, consumers="")  # noqa: SLF001
        finally:
            os.environ.clear()
            os.environ.update(saved)
        try:
            base._wait_ready(http_port, gw)  # noqa: SLF001
            per_device = args.fill // args.devices
            fill = base._write_streams(work, "fill-", args.devices, per_device, base.SITE)  # noqa: SLF001
            base._blast(broker.gateway_port, fill)  # noqa: SLF001
            while base._stored_span(db, "fill-")[0] < per_device * args.devices:  # noqa: SLF001
                time.sleep(0.1)
            load = None
            if readers:
                url = f"http://127.0.0.1:{http_port}/api/events?limit=1000"
                seconds = str(args.read_s)
                load = subprocess.Popen(
                    [sys.executable, "-c", READERS, url, str(readers), seconds], stdout=subprocess.PIPE
                )
                time.sleep(2)  # the readers are at it
            per_device = args.messages // args.devices
            total = per_device * args.devices
            streams = base._write_streams(work, "run-", args.devices, per_device, base.SITE)  # noqa: SLF001
            started = base._blast(broker.gateway_port, streams)  # noqa: SLF001
            deadline = time.time() + 600
            while (span := base._stored_span(db, "run-"))[0] < total and time.time() < deadline:  # noqa: SLF001
                time.sleep(0.1)
            rate = span[0] / (span[1] - started) if span[1] > started else 0.0
            codes: dict[str, int] = {}
            if load is not None:
                out, _ = load.communicate(timeout=args.read_s + 120)
                codes = json.loads(out)
        finally:
            gw.terminate()
            gw.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print(f"  {label}: {rate:,.0f} msg/s stored; readers' answers {codes}", file=sys.stderr, flush=True)
    return {"stored_rate": rate, "reader_status": codes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--fill", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--read-s", type=float, default=30.0, help="how long the readers keep at it")
    args = parser.parse_args()
    results: dict[str, Any] = {"messages": args.messages, "readers": args.readers}
    results["alone"] = one_run(args, "alone", 0, {})
    results["bound_on"] = one_run(args, "readers, bound on", args.readers, {})
    results["bound_off"] = one_run(args, "readers, bound off", args.readers, BOUND_OFF)
    alone = results["alone"]["stored_rate"]
    for key in ("bound_on", "bound_off"):
        results[key]["ratio_to_alone"] = results[key]["stored_rate"] / alone if alone else None
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "api_load.json").write_text(json.dumps(results, indent=2))
    print(f"ingest alone {alone:,.0f} msg/s")
    for key, label in (("bound_on", "bound on "), ("bound_off", "bound off")):
        r = results[key]
        print(f"with {args.readers} readers, {label}: {r['stored_rate']:,.0f} msg/s ({r['ratio_to_alone']:.2f}x)")


if __name__ == "__main__":
    main()
