"""Ingest benchmark: the broker's ceiling vs the gateway's stored rate, latency and memory.

Run by `make bench` (not part of the tests' pass/fail). One run, on a private Mosquitto started
with the project's mosquitto.conf:

1. ceiling: N QoS 1 messages (one `mosquitto_pub -l` C client per device, flat out) received by
   `mosquitto_sub`, Mosquitto's own C client;
2. gateway: an identical stream stored by `iotgw run` (acknowledged after each commit), ingest
   only, with every consumer as it runs by default (in a process of its own, IOTGW_CONSUMER_PROCESS;
   also how long after the last stored event they are caught up), and with every consumer in the
   gateway's process (IOTGW_CONSUMER_PROCESS=false); the ratio of the rates is the headline figure;
3. backlog: the gateway is stopped, the same volume queues up in its persistent session, and the
   restarted gateway's catch-up rate is measured (start-up included);
4. latency: paced streams (aiomqtt devices, `ts` set at publish) at fixed offered loads (1k and
   5k msg/s), device -> stored p50/p99/max from the stored rows; during the first, 50 elevators
   raise a door jam each: device publish -> `alert.firing` in the log; and the gateway's peak RSS.

Rates are counted from the moment the publishers start to the last message received/stored.
The three gateway runs of step 2 alternate --repeat times (default 3) and their medians are
reported: on a 2-core machine the noise between runs is larger than the effect measured.
Results are printed as a table and written to bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devices.connect import mqtt_client  # noqa: E402
from devices.load import publish_numbered, telemetry_payload  # noqa: E402
from gateway.cli.broker import Mosquitto, free_port  # noqa: E402

GW_ID = "bench-gateway"
SITE = "campus-north/building-07/floor-12/plant-room-b"
PREFIX = "bench-temperature-sensor-"
FAULT_PREFIX = "bench-elevator-"


# The broker runs the project's config and ACL (authentication on): the gateway logs in as
# `iotgw`; the benchmark's publishers and its ceiling subscriber as `bench`, allowed everywhere.
USERS = {"iotgw": secrets.token_urlsafe(16), "bench": secrets.token_urlsafe(16)}
BENCH_ACL = "user bench\ntopic readwrite devices/#\n"


def login(user: str = "bench") -> list[str]:
    """`-u USER -P PASSWORD` for Mosquitto's C clients."""
    return ["-u", user, "-P", USERS[user]]


@contextlib.contextmanager
def workspace(name: str) -> Iterator[tuple[Path, Mosquitto]]:
    """A scratch directory and a private Mosquitto running the project's config; both gone after."""
    work = Path(tempfile.mkdtemp(prefix=f"iotgw-{name}-"))
    broker = Mosquitto(
        Path(tempfile.mkdtemp(prefix=f"iotgw-{name}-mqtt-")), free_port(), users=USERS, extra_acl=BENCH_ACL
    )
    broker.start()
    try:
        yield work, broker
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(broker.data_dir, ignore_errors=True)


def numbers(text: str) -> list[float]:
    """A comma-separated list of numbers (a command-line value)."""
    return [float(x) for x in text.split(",")]


def save(out: Path, results: dict[str, Any]) -> None:
    """Write the results as JSON and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {out}")


def _of(runs: list[int]) -> str:
    """How a figure was taken: ` (median of 1,200, 1,300, 1,250)`, or nothing for a single run."""
    return f" (median of {', '.join(f'{x:,}' for x in runs)})" if len(runs) > 1 else ""


def _gateway(
    port: int, db: Path, http_port: int, log: Path, *, consumers: str = "*", client_id: str = GW_ID, apart: bool = True
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "gateway", "run",
        "--mqtt-url", f"mqtt://127.0.0.1:{port}",
        "--database-url", f"sqlite:///{db}",
        "--http-port", str(http_port),
        "--client-id", client_id,
        "--log-level", "WARNING",
        "--consumers", consumers,
    ]  # fmt: skip
    env = {**os.environ, "IOTGW_MQTT_PASSWORD": USERS["iotgw"], "IOTGW_API_AUTH": "false"}
    env["IOTGW_CONSUMER_PROCESS"] = "true" if apart else "false"
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def _caught_up_after(http_port: int, last_stored: float, timeout: float) -> float:
    """Seconds from the last stored event until every consumer (of the gateway on `http_port`) has no lag."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            states = httpx.get(f"http://127.0.0.1:{http_port}/api/consumers").json()["items"]
        except httpx.TransportError:
            states = [{"lag_events": None}]  # its API is not up yet (a backlog drains meanwhile)
        if all(c["lag_events"] == 0 for c in states):
            return max(time.time() - last_stored, 0.0)
        time.sleep(0.05)
    raise SystemExit("the consumers never caught up")


def _consumers_up(http_port: int, timeout: float) -> None:
    """Wait until the consumers' own process has said it is ready (`iotgw_consumer_process_up 1`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if "\niotgw_consumer_process_up 1.0" in httpx.get(f"http://127.0.0.1:{http_port}/metrics").text:
                return
        time.sleep(0.05)
    raise SystemExit("the consumers' process never said it was ready")


def gateway_rss(proc: psutil.Process) -> int:
    """Resident memory of the gateway and its consumers' process together."""
    total = proc.memory_info().rss
    for child in proc.children():
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total


def gateway_cpu_s(proc: psutil.Process) -> float:
    """CPU seconds (user + system) of the gateway and its consumers' process together."""
    total = 0.0
    for p in (proc, *proc.children()):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def _forget_session(port: int, client_id: str) -> None:
    cmd = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-i", client_id, *login("iotgw"), "-t", "bench/none"]
    cmd += ["-W", "1"]
    subprocess.run(cmd, check=False, capture_output=True)


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


def _fault_to_alert(db: Path) -> list[float]:
    """ms from each bench elevator's door-jam publish (its ts) to its alert.firing in the log."""
    with sqlite3.connect(db, timeout=30) as conn:
        rows = conn.execute(
            "select f.time, a.received_at from events a join events f on f.subject = a.subject "
            "where a.type = 'alert.firing' and f.type = 'elevator.fault.raised' and a.subject like ?",
            (FAULT_PREFIX + "%",),
        ).fetchall()
    return [
        (datetime.fromisoformat(alerted) - datetime.fromisoformat(raised)).total_seconds() * 1000
        for raised, alerted in rows
    ]


def _summary(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"p50": round(statistics.median(ms), 1), "p99": round(_pct(ms, 0.99), 1), "max": round(max(ms), 1)}


async def _paced_phase(  # noqa: PLR0917 - one phase's parameters
    url: str, devices: int, per_device: int, prefix: str, site: str, rate: float, *, faults: int, seconds: float
) -> None:
    jobs = [publish_numbered(url, devices, per_device, prefix=prefix, site=site, rate=rate)]
    jobs += [_door_jam(url, f"{FAULT_PREFIX}{i:03d}", site, delay=seconds * i / max(faults, 1)) for i in range(faults)]
    await asyncio.gather(*jobs)


async def _door_jam(url: str, device_id: str, site: str, *, delay: float) -> None:
    """One elevator: at rest, then (after `delay`) a door jam, each stamped with its publish time."""
    idle = {"floor": 1, "direction": "idle", "door": "closed", "mode": "normal", "load_kg": 0, "fault": None}
    jam = {**idle, "door": "opening", "mode": "fault", "fault": "DOOR_JAM"}
    async with mqtt_client(url, device_id) as c:
        for seq, data in ((1, idle), (2, jam)):
            if seq == 2:
                await asyncio.sleep(delay)
            body = {"type": "elevator", "seq": seq, "ts": int(time.time() * 1000), "site": site, "data": data}
            await c.publish(f"devices/{device_id}/state", json.dumps(body).encode(), qos=1)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_split(gateway: psutil.Process, broker: psutil.Process) -> dict[str, float]:
    """CPU seconds (user + system, from /proc) so far of the gateway's process, its consumers'
    process (when they run apart) and the broker."""

    def used(p: psutil.Process) -> float:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            return times.user + times.system
        return 0.0

    return {"gateway": used(gateway), "consumers": sum(used(c) for c in gateway.children()), "broker": used(broker)}


def per_message_us(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {k: round((after[k] - before[k]) * 1e6 / n, 1) for k in before}


def _write_streams(work: Path, prefix: str, devices: int, per_device: int, site: str) -> list[tuple[str, Path]]:
    """One file of JSON lines per device, for `mosquitto_pub -l` (seq 1..per_device)."""
    out = []
    for d in range(devices):
        device_id = f"{prefix}{d:05d}"
        path = work / f"{device_id}.jsonl"
        with path.open("wb") as f:
            for seq in range(1, per_device + 1):
                f.write(telemetry_payload(seq, 20 + seq % 10, site=site) + b"\n")
        out.append((device_id, path))
    return out


def _blast(port: int, streams: list[tuple[str, Path]]) -> float:
    """Publish every stream flat out, one `mosquitto_pub -l` (C client, QoS 1) per device."""
    started = time.time()
    procs = []
    for device_id, path in streams:
        with path.open("rb") as stdin:
            cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-i", device_id, *login()]
            procs.append(subprocess.Popen([*cmd, "-t", f"devices/{device_id}/telemetry", "-l"], stdin=stdin))
    for proc in procs:
        proc.wait(600)
    return started


def _stored_span(db: Path, prefix: str) -> tuple[int, float]:
    with sqlite3.connect(db, timeout=30) as conn:
        n, last = conn.execute(
            "select count(*), max(received_at) from events where type='sensor.reading' and subject like ?",
            (prefix + "%",),
        ).fetchone()
    return int(n), datetime.fromisoformat(last).replace(tzinfo=UTC).timestamp() if last else 0.0


def broker_ceiling(  # noqa: PLR0917
    work: Path, broker: Mosquitto, devices: int, per_device: int, site: str, timeout: float
) -> float:
    """The rate at which Mosquitto's own C subscriber receives a flat-out stream from C publishers."""
    total = devices * per_device
    sub_streams = _write_streams(work, PREFIX + "sub-", devices, per_device, site)
    # A retained probe, delivered right after the subscription is acknowledged: its line says the
    # subscriber is listening (no guessed pause). Cleared at once, so no later subscriber gets it.
    probe = f"devices/{PREFIX}probe/telemetry"
    pub = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.gateway_port), *login(), "-q", "1", "-r", "-t", probe]
    subprocess.run([*pub, "-m", "probe"], check=True)
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.gateway_port), *login(), "-q", "1", "-t", "devices/+/+",
         "-C", str(total + 2), "-F", "%t %U"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert sub.stdout is not None
    sub.stdout.readline()  # the probe
    subprocess.run([*pub, "-n"], check=True)  # clearing it reaches the subscriber too: total + 2
    started = _blast(broker.gateway_port, sub_streams)
    out, _ = sub.communicate(timeout=timeout)
    stamps = [line.split()[1] for line in out.splitlines() if not line.startswith(probe.encode())]
    ceiling = len(stamps) / (float(stamps[-1]) - started)
    print(f"  live: mosquitto_sub received {len(stamps):,} at {ceiling:,.0f} msg/s", file=sys.stderr, flush=True)
    return ceiling


def run(args: argparse.Namespace) -> dict[str, Any]:
    with workspace("bench") as (work, broker):
        return _run(args, work, broker)


def _run(args: argparse.Namespace, work: Path, broker: Mosquitto) -> dict[str, Any]:  # noqa: PLR0912 - one phase after another
    db, log, http_port = work / "bench.db", work / "gateway.log", free_port()
    per_device = args.messages // args.devices
    total = per_device * args.devices
    sample = telemetry_payload(123456, 21.5, site=args.site)
    results: dict[str, Any] = {
        "messages": total,
        "devices": args.devices,
        "message_bytes": len(sample) + len(f"devices/{PREFIX}00000/telemetry"),
    }
    say = functools.partial(print, file=sys.stderr, flush=True)
    gw: subprocess.Popen[bytes] | None = None
    try:
        say(f"iotgw ingest benchmark: {total:,} QoS 1 messages from {args.devices} device connections")
        # 1. Live ceiling: Mosquitto's own C subscriber receives a flat-out stream from C publishers.
        ceiling = broker_ceiling(work, broker, args.devices, per_device, args.site, args.timeout)
        results["ceiling_msg_s"] = round(ceiling)
        # 2. The gateway on identical streams, alternately ingest only (no consumers, a database
        #    of its own), with every consumer as by default (in their own process), and with
        #    every consumer in the gateway's process; medians of --repeat runs each, because
        #    run-to-run noise on a 2-core machine is larger than the difference we look for.
        solo_db, inproc_db = work / "ingest-only.db", work / "in-process.db"
        solo_rates: list[float] = []
        all_rates: list[float] = []
        inproc_rates: list[float] = []
        behind: list[float] = []
        cpu: dict[str, list[dict[str, float]]] = {"solo": [], "all": [], "inproc": []}
        mosquitto = psutil.Process(broker.proc.pid) if broker.proc is not None else psutil.Process()
        peak_rss = 0
        for run_no in range(args.repeat):
            for mode in ("solo", "all", "inproc"):
                target_db = {"solo": solo_db, "all": db, "inproc": inproc_db}[mode]
                gw = _gateway(
                    broker.gateway_port, target_db, http_port, log,
                    consumers="" if mode == "solo" else args.consumers,
                    client_id=f"{GW_ID}-{mode}",
                    apart=mode == "all",
                )  # fmt: skip
                _wait_ready(http_port, gw)
                proc = psutil.Process(gw.pid)
                prefix = f"{PREFIX}{mode}{run_no}-"
                streams = _write_streams(work, prefix, args.devices, per_device, args.site)
                if mode == "all":  # its consumers' process has started: its start is not counted
                    _consumers_up(http_port, args.timeout)
                before = cpu_split(proc, mosquitto)
                started = _blast(broker.gateway_port, streams)
                while (done := _stored_span(target_db, prefix))[0] < total:
                    peak_rss = max(peak_rss, gateway_rss(proc))
                    if gw.poll() is not None or time.time() - started > args.timeout:
                        raise SystemExit(f"gateway stored only {done[0]:,} of {total:,}; see {log}")
                    time.sleep(0.2)
                stored = cpu_split(proc, mosquitto)  # the gateway's share ends here (below, the bench polls its API)
                rate = total / (done[1] - started)
                {"solo": solo_rates, "all": all_rates, "inproc": inproc_rates}[mode].append(rate)
                label = {"solo": "ingest only", "all": "all consumers", "inproc": "all consumers in one process"}[mode]
                say(f"  live #{run_no + 1}: gateway, {label}: {rate:,.0f} msg/s ({rate / ceiling:.0%} of the ceiling)")
                if mode == "all":
                    behind.append(_caught_up_after(http_port, done[1], args.timeout))
                    say(f"    its consumers caught up {behind[-1]:.1f} s after the last event was stored")
                # CPU per stored message, until stored (and the consumers', until they caught up).
                stored["consumers"] = cpu_split(proc, mosquitto)["consumers"]
                cpu[mode].append(per_message_us(before, stored, total))
                say("    CPU per message: " + ", ".join(f"{k} {v} µs" for k, v in cpu[mode][-1].items()))
                _stop(gw)
                # Its persistent session would queue every later stream: burden the broker and
                # skew the next runs. A clean-session connect with the same id discards it.
                _forget_session(broker.gateway_port, f"{GW_ID}-{mode}")
        solo, stored = statistics.median(solo_rates), statistics.median(all_rates)
        results["ingest_only_msg_s"] = round(solo)
        results["gateway_msg_s"] = round(stored)
        results["ingest_only_runs"] = [round(r) for r in solo_rates]
        results["all_consumers_runs"] = [round(r) for r in all_rates]
        results["ratio"] = round(stored / ceiling, 3)
        results["consumers_vs_ingest_only"] = round(stored / solo, 3)
        # Each run against the ingest-only run just before it (the machine's state drifts over
        # minutes): the median of these pairs, and their spread, say more than one ratio of medians.
        paired = sorted(a / s for a, s in zip(all_rates, solo_rates, strict=True))
        results["paired_ratios"] = [round(r, 3) for r in paired]
        results["caught_up_s"] = round(max(behind), 1)
        results["cpu_us_per_msg"] = {
            mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for mode, runs in cpu.items()
        }
        inproc = statistics.median(inproc_rates)
        results["in_process_msg_s"] = round(inproc)
        results["in_process_runs"] = [round(r) for r in inproc_rates]
        results["in_process_vs_ingest_only"] = round(inproc / solo, 3)
        results["in_process_paired_ratios"] = sorted(
            round(a / s, 3) for a, s in zip(inproc_rates, solo_rates, strict=True)
        )
        if args.quick:
            return results
        # 3. Backlog: the gateway (with all consumers) was away while the same volume queued up.
        gw = _gateway(broker.gateway_port, db, http_port, log)  # creates its persistent session
        _wait_ready(http_port, gw)
        _stop(gw)
        drain_prefix = PREFIX + "drain-"
        _blast(broker.gateway_port, _write_streams(work, drain_prefix, args.devices, per_device, args.site))
        t0 = time.time()
        gw = _gateway(broker.gateway_port, db, http_port, log)
        proc = psutil.Process(gw.pid)
        while (done := _stored_span(db, drain_prefix))[0] < total:
            peak_rss = max(peak_rss, gateway_rss(proc))
            if time.time() - t0 > args.timeout:
                raise SystemExit(f"gateway caught up only {done[0]:,} of {total:,}; see {log}")
            time.sleep(0.2)
        results["backlog_msg_s"] = round(total / (done[1] - t0))
        say(f"  backlog: caught up {total:,} queued messages at {results['backlog_msg_s']:,} msg/s")
        # The latency phases measure a steady state: they start once the consumers have caught up
        # with the backlog too (on a saturated machine they yield the CPU to ingestion, see docs/decisions.md).
        results["backlog_consumers_caught_up_s"] = round(_caught_up_after(http_port, done[1], args.timeout), 1)
        say(f"    the consumers caught up {results['backlog_consumers_caught_up_s']} s after its last event was stored")
        # 4. Latency at fixed offered loads (paced aiomqtt devices, ts set at publish); during the
        #    first, elevators also raise door jams: device publish -> alert.firing in the log.
        results["latency"] = []
        for i, rate in enumerate(args.live_rates):
            with sqlite3.connect(db) as conn:
                last_id = int(conn.execute("select max(id) from events").fetchone()[0])
            live_per_device = max(1, int(rate * args.live_seconds) // args.devices)
            prefix = f"{PREFIX}paced{rate:.0f}-"
            say(f"  latency: {rate:,.0f} msg/s for {args.live_seconds:.0f}s" + (", with door jams" if i == 0 else ""))
            t0 = time.monotonic()
            asyncio.run(
                _paced_phase(
                    broker.url_as("bench"), args.devices, live_per_device, prefix, args.site, rate,
                    faults=args.fault_elevators if i == 0 else 0, seconds=args.live_seconds,
                )
            )  # fmt: skip
            achieved = live_per_device * args.devices / (time.monotonic() - t0)
            deadline = time.monotonic() + 60
            while _stored_span(db, prefix)[0] < live_per_device * args.devices and time.monotonic() < deadline:
                time.sleep(0.1)
            lat = _latencies(db, last_id)
            peak_rss = max(peak_rss, gateway_rss(proc))
            results["latency"].append({"rate": rate, "achieved": round(achieved), **_summary(lat)})
            if i == 0 and args.fault_elevators:
                deadline = time.monotonic() + 30
                while len(alerted := _fault_to_alert(db)) < args.fault_elevators and time.monotonic() < deadline:
                    time.sleep(0.1)
                results["fault_to_alert_ms"] = {"alerts": len(alerted), **_summary(alerted)}
        results["gateway_rss_mb"] = round(peak_rss / 2**20, 1)
    finally:
        if gw is not None:
            _stop(gw)
    return results


def main() -> None:
    """Parse flags, run, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--site", default=SITE, help="site name in every message (sets the message size)")
    p.add_argument(
        "--live-rates",
        type=numbers,
        default=[1000.0, 5000.0],
        help="offered loads of the latency phases, msg/s, comma-separated (default 1000,5000)",
    )
    p.add_argument("--fault-elevators", type=int, default=50, help="door jams raised during the first latency phase")
    p.add_argument("--live-seconds", type=float, default=10.0)
    p.add_argument("--consumers", default="*", help="consumers of the 'all consumers' runs (default: every one)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each live gateway phase (medians reported)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up on a phase after this many seconds")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the live runs alone, once each: 40,000 messages from 20 devices (unless given); no backlog or latency",
    )
    args = p.parse_args()
    if args.quick:
        given = set(sys.argv)
        args.messages = args.messages if "--messages" in given else 40_000
        args.devices = args.devices if "--devices" in given else 20
        args.repeat = args.repeat if "--repeat" in given else 1
    r = run(args)
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| messages (QoS 1, {r['message_bytes']} B with topic) | {r['messages']:,} from {r['devices']} devices |")
    print(f"| ceiling: mosquitto_sub, live stream | {r['ceiling_msg_s']:,} msg/s |")
    print(f"| gateway, ingest only, same stream{_of(r['ingest_only_runs'])} | {r['ingest_only_msg_s']:,} msg/s |")
    print(f"| gateway with all consumers, same stream{_of(r['all_consumers_runs'])} | {r['gateway_msg_s']:,} msg/s |")
    print(f"| ratio to the ceiling (all consumers) | {r['ratio']:.0%} |")
    print(f"| all consumers vs ingest only | {r['consumers_vs_ingest_only']:.0%} |")
    pairs = ", ".join(f"{x:.0%}" for x in r["paired_ratios"])
    print(f"| the same, run by run against the ingest-only run before it | {pairs} |")
    print(f"| the consumers caught up after the last event stored (worst run) | {r['caught_up_s']} s |")
    inproc = f"{r['in_process_msg_s']:,} msg/s"
    print(f"| gateway, all consumers in the gateway's process{_of(r['in_process_runs'])} | {inproc} |")
    print(f"| consumers in the gateway's process vs ingest only | {r['in_process_vs_ingest_only']:.0%} |")
    pairs = ", ".join(f"{x:.0%}" for x in r["in_process_paired_ratios"])
    print(f"| the same, run by run | {pairs} |")
    labels = {"solo": "ingest only", "all": "all consumers in their own process", "inproc": "all in one process"}
    for mode, us in r["cpu_us_per_msg"].items():
        split = ", ".join(f"{k} {v} µs" for k, v in us.items())
        both = us["gateway"] + us["consumers"]
        print(f"| CPU per stored message, {labels[mode]} | {split}; gateway + consumers {both:.1f} µs |")
    if args.quick:
        given_out = any(a.startswith("--out") for a in sys.argv)
        save(args.out if given_out else args.out.with_name("ingest-quick.json"), r)
        return
    print(f"| gateway catching up a backlog after a restart | {r['backlog_msg_s']:,} msg/s |")
    print(f"| its consumers caught up after the backlog's last event stored | {r['backlog_consumers_caught_up_s']} s |")
    for lat in r["latency"]:
        live = f"{lat['rate']:,.0f} msg/s offered ({lat['achieved']:,} achieved)"
        print(f"| device -> stored latency at {live} | p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms |")
    if "fault_to_alert_ms" in r:
        fa = r["fault_to_alert_ms"]
        print(
            f"| door jam published -> alert in the log ({fa['alerts']} elevators, during the first phase) "
            f"| p50 {fa['p50']} ms, p99 {fa['p99']} ms, max {fa['max']} ms |"
        )
    print(f"| gateway peak RSS (with its consumers' process) | {r['gateway_rss_mb']} MB |")
    save(args.out, r)


if __name__ == "__main__":
    main()
