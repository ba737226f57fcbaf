"""Bad input that must not reach too far: a far-future device clock, messages at the limits of the
protocol, internal errors, a retained invalid message, topics outside a device's channels, a
huge seq, NUL characters, a message the database refuses. Real Mosquitto with the project's
config, a real database, the gateway's own API."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import select

from devices.connect import mqtt_client
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.errors import StoreError
from gateway.log import EventRow, Store
from tests.support.gateway import running_gateway, settled, wait_for
from tests.support.probing import (
    api,
    dead_letters,
    iso,
    publish,
    reading,
    sample,
    state,
    truth,
)

pytestmark = pytest.mark.anyio


async def test_one_device_clock_in_2100_neither_dates_its_events_there_nor_skews_the_fleet(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(broker, consumers="analytics", max_clock_skew_s=86400)
    async with running_gateway(settings) as gw:
        now = datetime.now(UTC)
        await publish(broker, "el-good", state(1, iso(now - timedelta(seconds=30))), state(2, iso(now)))
        # Far ahead: beyond the bound; 12 h ahead: within it, but never past the gateway's own time.
        await publish(broker, "el-2100", state(1, "2100-01-01T00:00:00Z"), state(2, "2100-01-01T00:00:05Z"))
        await publish(broker, "el-ahead", state(1, iso(now + timedelta(hours=12))))
        await settled(gw)
        with gw.store.session() as tx:
            times = {e.subject: e.time for e in tx.exec(select(EventRow))}
        assert times["el-2100"] < now + timedelta(minutes=5), "the receive time, not 2100"
        assert sample(gw, "iotgw_device_clock_skew_total") == 2
        assert dead_letters(gw) == [], "nothing lost: the events are kept, with the gateway's time"
        async with api(gw) as client:

            async def analysed() -> bool:
                fleet = (await client.get("/api/analytics/fleet")).json()
                return fleet["devices_by_type"].get("elevator") == 3

            await wait_for(analysed, what="analytics of the three elevators")
            fleet = (await client.get("/api/analytics/fleet")).json()["total"]
            good = (await client.get("/api/analytics/devices/el-good")).json()["figures"]
        assert fleet["availability"] == 1.0
        assert set(fleet["mode_seconds"]) == {"normal"}
        observed = sum(good["mode_seconds"].values())
        assert observed < 3600, f"el-good's time is its own, not stretched by el-ahead's clock: {observed}"


@pytest.mark.parametrize(
    "payload",
    [
        state(1, "9999-12-31T23:59:59-01:00"),
        state(1, "0001-01-01T00:00:00+01:00"),
        b'{"type": "elevator", "seq": ' + b"7" * 5000 + b', "ts": 1764324000000, "data": {}}',
    ],
    ids=["year-10000-in-utc", "year-0-in-utc", "5000-digit-seq"],
)
async def test_messages_at_the_limits_are_schema_dead_letters_and_the_gateway_goes_on(
    broker: Mosquitto, settings_for: Callable[..., Settings], payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        await publish(broker, "el-1", *[payload] * 200)
        await publish(broker, "el-1", state(1, 1764324000000))
        await settled(gw)
        reasons = [d.reason for d in dead_letters(gw)]
        assert reasons == ["schema"] * 200
        with gw.store.session() as tx:
            assert len(tx.exec(select(EventRow)).all()) == 1, "the next valid message is stored"
    assert "internal error" not in caplog.text
    assert "Traceback" not in caplog.text
    assert len(caplog.text) < 5000, "rejections are logged, not 200 times"


async def test_internal_errors_are_dead_lettered_with_one_traceback_not_one_each(
    broker: Mosquitto,
    settings_for: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gateway.ingest.pipeline  # noqa: PLC0415

    def broken(*_args: object, **_kwargs: object) -> None:
        msg = "a bug"
        raise RuntimeError(msg)

    monkeypatch.setattr(gateway.ingest.pipeline, "normalize", broken)
    caplog.set_level(logging.WARNING)
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        await publish(broker, "el-1", *[state(seq, 1764324000000) for seq in range(1, 501)])
        await settled(gw)
        assert [d.reason for d in dead_letters(gw)] == ["internal_error"] * 500
    assert caplog.text.count("Traceback") == 1
    assert caplog.text.count("internal error on devices/el-1/state") == 1


async def test_a_retained_invalid_message_is_dead_lettered_once_across_restarts_and_reconnects(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(broker, consumers="")
    async with mqtt_client(broker.url_as("tester"), "temp-9") as c:
        await c.publish("devices/temp-9/status", b"{not json", qos=1, retain=True)
    async with running_gateway(settings) as gw:
        await wait_for(lambda: truth(len(dead_letters(gw)) == 1), what="the retained message's dead letter")
    for _ in range(2):
        async with running_gateway(settings) as gw:
            await settled(gw)
    async with running_gateway(settings) as gw:
        broker.stop()  # a reconnect on a session that survived the broker's restart
        broker.start()
        await wait_for(lambda: truth(gw.ingest.connected), what="the gateway to reconnect")
        async with mqtt_client(broker.url_as("tester"), "temp-8") as c:  # a marker behind it
            await c.publish("devices/temp-8/status", b'{"online": true}', qos=1)
        await wait_for(lambda: truth(sample(gw, "iotgw_events_total", {"type": "device.online"}) == 1), what="marker")
        assert [(d.topic, d.reason) for d in dead_letters(gw)] == [("devices/temp-9/status", "bad_json")]


def test_a_device_may_publish_only_to_its_three_channels(broker: Mosquitto) -> None:
    broker.add_devices({"temp-acl": "acl-pw"})
    outcomes = {}
    for topic in ("devices/temp-acl/telemetry", "devices/temp-acl/state/extra", "devices/temp-acl/other"):
        cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5", "-q", "1", "-d",
               "-u", "temp-acl", "-P", "acl-pw", "-t", topic, "-m", "{}"]  # fmt: skip
        outcomes[topic] = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout
    accepted = outcomes["devices/temp-acl/telemetry"]
    assert "received PUBACK (Mid: 1, RC:" in accepted, accepted
    assert "RC:135" not in accepted  # 0 or 16 (no subscriber yet): accepted
    for topic in ("devices/temp-acl/state/extra", "devices/temp-acl/other"):
        assert "RC:135" in outcomes[topic], f"{topic}: refused at the broker (not authorized), not silently dropped"


async def test_one_huge_seq_does_not_mute_a_device_and_a_restarted_counter_is_taken_on(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker, consumers="alerts")) as gw:
        ts = 1764324000000
        await publish(broker, "el-7", state(1, ts), state(2, ts + 1000), state(2**62, ts + 2000))
        # After the bad seq the device goes on with its own numbering: a door jam, then stuck.
        await publish(broker, "el-7", state(3, ts + 3000, mode="fault", fault="DOOR_JAM"))
        await publish(broker, "el-7", state(4, ts + 4000, mode="fault", fault="STUCK", direction="up", load_kg=80))
        # A sensor counts to 1,500, restarts and counts from 1 again.
        await publish(broker, "t-7", *[reading(seq) for seq in range(1, 1501)], channel="telemetry")
        await publish(broker, "t-7", *[reading(seq) for seq in range(1, 11)], channel="telemetry")
        # A sensor restarts, and its new count's first two messages arrive swapped.
        await publish(broker, "t-8", reading(1100), reading(50), reading(49), channel="telemetry")
        await settled(gw)
        with gw.store.session() as tx:
            el = [(e.type, e.sequence) for e in tx.exec(select(EventRow).where(EventRow.subject == "el-7"))]
            readings = tx.exec(
                select(EventRow).where(EventRow.subject == "t-7", EventRow.type == "sensor.reading")
            ).all()
            resets = tx.exec(select(EventRow).where(EventRow.type == "device.seq.reset")).all()
            swapped = tx.exec(
                select(EventRow).where(EventRow.subject == "t-8", EventRow.type == "sensor.reading")
            ).all()
        # The log's sequence goes on a reset window (1,000) above the last one.
        assert ("elevator.fault.raised", 2**62 + 1001) in el, f"the door jam after the huge seq is an event: {el}"
        assert "elevator.stuck" in {t for t, _ in el}
        assert len(readings) == 1510, "the restarted counter's readings are new, not duplicates"
        assert sorted(r.sequence for r in readings)[-10:] == list(range(2501, 2511)), "the log's sequence goes on"
        assert {(r.subject, r.data["last_seq"], r.data["seq"]) for r in resets} == {
            ("el-7", 2**62, 3),
            ("t-7", 1500, 1),
            ("t-8", 1100, 50),
        }
        assert sample(gw, "iotgw_seq_anomalies_total", {"kind": "reset"}) == 3
        # The late one of the new count is a reading of its own, not taken for seq 1100 again.
        assert sorted(r.sequence for r in swapped) == [1100, 2100, 2101]
        assert dead_letters(gw) == []
        async with api(gw) as client:

            async def jammed() -> bool:
                alerts = (await client.get("/api/alerts", params={"rule": "door-jam"})).json()["items"]
                return [a["device_id"] for a in alerts] == ["el-7"]

            await wait_for(jammed, what="the door jam's alert")
        # A redelivered message after the reset is still stored once.
        await publish(broker, "t-7", reading(10), channel="telemetry")
        await settled(gw)
        with gw.store.session() as tx:
            # The device's own events (the alert engine may have said something of t-7 too).
            rows = tx.exec(select(EventRow).where(EventRow.source == "devices/t-7")).all()
            assert len(rows) == 1511  # + the reset


NUL_SITE = b'{"type":"temperature","seq":1,"ts":1764324000000,"site":"a\\u0000b","data":{"value":1.0,"unit":"C"}}'
NUL_KEY = b'{"type":"temperature","seq":2,"ts":1764324000000,"x\\u0000":1,"data":{"value":1.0,"unit":"C"}}'


async def test_nul_characters_are_schema_dead_letters_and_the_fleet_goes_on(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        await publish(broker, "t-nul", NUL_SITE, NUL_KEY, channel="telemetry")
        await publish(broker, "t-ok", *[reading(seq) for seq in range(1, 4)], channel="telemetry")
        await settled(gw)
        assert [(d.reason, "NUL" in d.detail) for d in dead_letters(gw)] == [("schema", True)] * 2
        with gw.store.session() as tx:
            assert len(tx.exec(select(EventRow).where(EventRow.subject == "t-ok")).all()) == 3
        assert sample(gw, "iotgw_database_writable") == 1


@pytest.mark.parametrize(
    ("refusal", "words"),
    [
        (
            StoreError("batch commit failed: (DataError) a value the database cannot store", transient=False),
            "cannot store",
        ),
        # Not a StoreError: what a driver raises for a value nothing checked before it (an encoding, an adapter).
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), "surrogates not allowed"),
    ],
    ids=["database", "driver"],
)
async def test_a_message_the_database_or_its_driver_refuses_is_a_dead_letter_and_the_others_are_stored(
    broker: Mosquitto,
    settings_for: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    refusal: Exception,
    words: str,
) -> None:
    # Whatever the protocol lets through that the database then refuses (a value it cannot
    # store): the real commit path, with the refusal made to order for one device. The writer
    # goes on, message by message.
    real = Store.append_batch

    def refusing(self: Store, events: Any, *args: Any, **kwargs: Any) -> Any:
        if any(e.subject == "t-poison" for e in events):
            raise refusal
        return real(self, events, *args, **kwargs)

    monkeypatch.setattr(Store, "append_batch", refusing)
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        await publish(broker, "t-poison", reading(1), channel="telemetry")
        await publish(broker, "t-ok", *[reading(seq) for seq in range(1, 51)], channel="telemetry")
        await settled(gw)
        (dead,) = dead_letters(gw)
        assert (dead.topic, dead.reason) == ("devices/t-poison/telemetry", "internal_error")
        assert words in dead.detail
        with gw.store.session() as tx:
            assert len(tx.exec(select(EventRow).where(EventRow.subject == "t-ok")).all()) == 50
        assert sample(gw, "iotgw_database_writable") == 1
        async with api(gw) as c:
            assert (await c.get("/ready")).status_code == 200


SURROGATES = {
    "site": b'{"type":"temperature","seq":1,"ts":1764324000000,"site":"\\ud800","data":{"value":1.0,"unit":"C"}}',
    "data.unit": b'{"type":"temperature","seq":2,"ts":1764324000000,"data":{"value":1.0,"unit":"\\udc00"}}',
    "data": b'{"type":"temperature","seq":3,"ts":1764324000000,"data":{"value":1.0,"unit":"C","\\uDBFF":1}}',
}


async def test_lone_surrogate_escapes_are_schema_dead_letters_and_the_fleet_goes_on(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    # json reads "\ud800" as a string no database can store as text: it must not reach the commit.
    async with running_gateway(settings_for(broker, consumers="")) as gw:
        await publish(broker, "t-sur", *SURROGATES.values(), channel="telemetry")
        await publish(broker, "t-sur", b'{"online": true, "site": "a\\ud800b"}', channel="status")
        await publish(broker, "t-ok", *[reading(seq) for seq in range(1, 4)], channel="telemetry")
        await publish(broker, "t-ok", b'{"online": true, "site": "\\ud83d\\ude00"}', channel="status")  # a pair
        await settled(gw)
        assert [(d.reason, d.detail.split(":")[0], "surrogate" in d.detail) for d in dead_letters(gw)] == [
            ("schema", field, True) for field in (*SURROGATES, "site")
        ]
        with gw.store.session() as tx:
            assert len(tx.exec(select(EventRow).where(EventRow.subject == "t-ok")).all()) == 3
        async with api(gw) as c:
            assert (await c.get("/api/devices/t-ok")).json()["site"] == "\N{GRINNING FACE}"


async def test_a_batch_writer_that_ended_makes_the_gateway_not_ready(
    broker: Mosquitto, settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        msg = "the acknowledgement path broke"
        raise RuntimeError(msg)

    monkeypatch.setattr("gateway.ingest.client.Ingest._acknowledge", broken)
    async with running_gateway(settings_for(broker, consumers="")) as gw, api(gw) as c:
        sender = asyncio.create_task(publish(broker, "t-1", reading(1), channel="telemetry"))  # never acknowledged

        async def not_ready() -> bool:
            r = await c.get("/ready")
            return r.status_code == 503 and "ingest" in r.json()["checks"]

        await wait_for(not_ready, what="/ready to say the writer stopped")
        assert "the acknowledgement path broke" in (await c.get("/ready")).json()["checks"]["ingest"]
        sender.cancel()
