"""Cost growth: does ingest or the API slow down as the event log grows?

Run by `make bench` after bench/ingest.py (not part of the tests' pass/fail). For each log size
(default 250k, 500k and 1M stored events: 1x, 2x, 4x), on a database filled directly with
realistic readings and the consumers' cursors at its head:

1. ingest: the gateway (all consumers on) stores a flat-out stream of 20,000 QoS 1 messages from
   100 `mosquitto_pub` connections; msg/s from the first publish to the last stored row;
2. API: 300 sequential `GET /api/events` pages (by device, by type prefix, by time window, from a
   random cursor; 100 per page), p50/p99/max in ms.

Printed as a table and written to bench/results/growth.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ingest as base  # noqa: E402

from gateway.cli.broker import Mosquitto, free_port  # noqa: E402
from gateway.log import Store  # noqa: E402

FILL_DEVICES = 2_000
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _fill(db: Path, upto: int) -> None:
    """Add stored readings until the log holds `upto` events (SQLAlchemy's SQLite text datetimes)."""
    with sqlite3.connect(db) as conn:
        have = int(conn.execute("select count(*) from events").fetchone()[0])
        rows = []
        for i in range(have, upto):
            device = f"fill-{i % FILL_DEVICES:05d}"
            seq = i // FILL_DEVICES + 1
            at = (T0 + timedelta(seconds=i // 50)).strftime("%Y-%m-%d %H:%M:%S.%f")
            data = json.dumps({"value": 20 + (i % 97) / 10, "unit": "C"})
            rows.append(
                (f"{device}-{seq}-0", f"devices/{device}", "sensor.reading", device, at, at, seq, 0, "hq", data)
            )
            if len(rows) == 50_000:
                conn.executemany(_INSERT, rows)
                rows.clear()
        conn.executemany(_INSERT, rows)
        head = int(conn.execute("select max(id) from events").fetchone()[0])
        # The consumers start at the head: this measures a big log, not a replay of it.
        for name in ("alerts", "analytics", "dispatch"):
            conn.execute(
                "insert into consumer_cursors (name, position, paused, updated_at) values (?, ?, 0, ?) "
                "on conflict (name) do update set position = excluded.position",
                (name, head, T0.strftime("%Y-%m-%d %H:%M:%S.%f")),
            )


_INSERT = (
    "insert into events (ce_id, source, type, subject, time, received_at, sequence, part, site, data) "
    "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _stored_after(db: Path, after_id: int) -> tuple[int, float]:
    with sqlite3.connect(db, timeout=30) as conn:
        n, last = conn.execute(
            "select count(*), max(received_at) from events where id > ? and type = 'sensor.reading'", (after_id,)
        ).fetchone()
    return int(n), datetime.fromisoformat(last).replace(tzinfo=UTC).timestamp() if last else 0.0


def _api_pages(http_port: int, head: int, pages: int, rng: random.Random) -> list[float]:
    kinds = [
        lambda: {"device_id": f"fill-{rng.randrange(FILL_DEVICES):05d}"},
        lambda: {"type": "sensor.*"},
        lambda: {"since": (T0 + timedelta(seconds=rng.randrange(head // 50))).isoformat()},
        lambda: {"cursor": str(rng.randrange(head))},
    ]
    took = []
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        for i in range(pages):
            params = {**kinds[i % len(kinds)](), "limit": 100}
            t = time.perf_counter()
            r = client.get("/api/events", params=params)
            took.append((time.perf_counter() - t) * 1000)
            if r.status_code != 200:
                raise SystemExit(f"/api/events {params}: {r.status_code} {r.text[:200]}")
    return took


def run(args: argparse.Namespace) -> dict[str, Any]:
    with base.workspace("growth") as (work, broker):
        return _run(args, work, broker)


def _run(args: argparse.Namespace, work: Path, broker: Mosquitto) -> dict[str, Any]:
    db, log, http_port = work / "growth.db", work / "gateway.log", free_port()
    Store(f"sqlite:///{db}").create_schema()
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rng = random.Random(5)  # noqa: S311 - repeatable choices, not secrets
    results: dict[str, Any] = {"sizes": []}
    per_device = args.messages // args.devices
    for size in args.sizes:
        t = time.monotonic()
        _fill(db, size)
        say(f"  log filled to {size:,} events in {time.monotonic() - t:.0f} s")
        with sqlite3.connect(db) as conn:
            head = int(conn.execute("select max(id) from events").fetchone()[0])
        gw = base._gateway(broker.gateway_port, db, http_port, log, client_id=f"growth-{size}")  # noqa: SLF001
        try:
            base._wait_ready(http_port, gw, timeout=120)  # noqa: SLF001
            prefix = f"growth{size}-"
            streams = base._write_streams(work, prefix, args.devices, per_device, base.SITE)  # noqa: SLF001
            started = base._blast(broker.gateway_port, streams)  # noqa: SLF001
            total = per_device * args.devices
            while (done := _stored_after(db, head))[0] < total:
                if gw.poll() is not None or time.time() - started > args.timeout:
                    raise SystemExit(f"stored only {done[0]:,} of {total:,}; see {log}")
                time.sleep(0.2)
            rate = total / (done[1] - started)
            pages = _api_pages(http_port, head, args.pages, rng)
        finally:
            base._stop(gw)  # noqa: SLF001
            base._forget_session(broker.gateway_port, f"growth-{size}")  # noqa: SLF001
        row = {
            "events": size,
            "ingest_msg_s": round(rate),
            "api_ms": {
                "p50": round(statistics.median(pages), 1),
                "p99": round(sorted(pages)[int(0.99 * len(pages))], 1),
                "max": round(max(pages), 1),
            },
            "db_mb": round(db.stat().st_size / 2**20),
        }
        results["sizes"].append(row)
        say(f"  {size:,} events: ingest {rate:,.0f} msg/s, /api/events p99 {row['api_ms']['p99']} ms")
    return results


def main() -> None:
    """Parse flags, run, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", type=lambda s: [int(x) for x in base.numbers(s)], default=[250_000, 500_000, 1_000_000],
        help="log sizes to measure at, comma-separated (default 250000,500000,1000000)",
    )  # fmt: skip
    p.add_argument("--messages", type=int, default=20_000, help="messages ingested at each size")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--pages", type=int, default=300, help="/api/events pages requested at each size")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "growth.json")
    args = p.parse_args()
    print(f"iotgw cost growth: {args.messages:,} messages and {args.pages} API pages at each log size", file=sys.stderr)
    r = run(args)
    print()
    print("| events in the log | database | ingest, all consumers | `/api/events` page p50 / p99 / max |")
    print("|---|---|---|---|")
    for row in r["sizes"]:
        api = row["api_ms"]
        print(
            f"| {row['events']:,} | {row['db_mb']} MB | {row['ingest_msg_s']:,} msg/s "
            f"| {api['p50']} / {api['p99']} / {api['max']} ms |"
        )
    base.save(args.out, r)


if __name__ == "__main__":
    main()
