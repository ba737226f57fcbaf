"""No device can take the gateway's broker session or account (issue: hardening, items 1 and 2).

Real Mosquitto with the project's config, real database, devices as real `mosquitto_pub`
processes with provisioned credentials: a device that connects with the gateway's client id
gets its own id instead (the devices' listener ties client ids to user names), so the
gateway's persistent session keeps everything published while the gateway was away; a
session that is really gone (its own account connecting clean) is said loudly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest
from sqlmodel import select

from gateway.cli.broker import Mosquitto, free_port
from gateway.config import Settings
from gateway.log import EventRow
from gateway.security import PasswordFile, provision
from gateway.service import Gateway
from tests.support.gateway import ROOT, running_gateway, settled, wait_for

pytestmark = pytest.mark.anyio


def reading(seq: int) -> str:
    return json.dumps(
        {"type": "temperature", "seq": seq, "ts": "2026-12-01T10:00:00Z", "data": {"value": 20.0, "unit": "C"}}
    )


def readings_stored(gw: Gateway, device: str) -> int:
    with gw.store.session() as tx:
        return len(tx.exec(select(EventRow.id).where(EventRow.subject == device)).all())


def publish_as_client_id(broker: Mosquitto, device: str, password: str, client_id: str, count: int) -> None:
    """`count` readings from `device`, connecting with `client_id` and a clean session (mosquitto_pub's default)."""
    lines = "".join(reading(seq) + "\n" for seq in range(1, count + 1))
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-i", client_id,
           "-u", device, "-P", password, "-t", f"devices/{device}/telemetry", "-l"]  # fmt: skip
    done = subprocess.run(cmd, input=lines, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def session_lost(gw: Gateway) -> float:
    return gw.metrics.registry.get_sample_value("iotgw_broker_session_lost_total") or 0.0


async def test_a_device_connecting_with_the_gateways_client_id_neither_erases_its_session_nor_knocks_it_off(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(broker, consumers="")
    client_id = settings.client_id
    async with running_gateway(settings) as gw:
        creds = await asyncio.to_thread(provision, gw.store, broker.passwords, {"temp-evil": "temperature"})
        await asyncio.to_thread(broker.reload)
        # While the gateway runs: the device's connection as the gateway's id leaves it connected.
        await asyncio.to_thread(publish_as_client_id, broker, "temp-evil", creds["temp-evil"], client_id, 10)
        await wait_for(lambda: _true(readings_stored(gw, "temp-evil") == 10), what="the 10 readings")
        assert gw.ingest.connected
        assert gw.metrics.registry.get_sample_value("iotgw_broker_disconnects_total") == 0
    # The gateway is down for a restart: a device connects as the gateway with a clean session
    # (which would discard the gateway's session and everything queued in it), then publishes.
    await asyncio.to_thread(publish_as_client_id, broker, "temp-evil", creds["temp-evil"], client_id, 510)
    connections = [
        line for line in (broker.data_dir / "mosquitto.log").read_text().splitlines() if "u'temp-evil'" in line
    ]
    assert connections, "the device's connections are in the broker's log"
    assert all(" as temp-evil (" in line for line in connections), "the broker gave the device its own id"
    async with running_gateway(settings) as gw:
        await wait_for(lambda: _true(readings_stored(gw, "temp-evil") == 510), what="all 510 readings (seq 11-510 new)")
        await settled(gw)
        assert session_lost(gw) == 0


async def _true(value: bool) -> bool:
    return value


async def test_a_lost_session_is_said_loudly_on_reconnect_and_after_a_restart(
    broker: Mosquitto, settings_for: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(broker, consumers="")
    caplog.set_level(logging.INFO)
    async with running_gateway(settings) as gw:
        assert session_lost(gw) == 0, "a first connection finds no session, and expects none"
        # The broker restarts without its persistence file: the session is gone.
        broker.stop()
        (broker.data_dir / "mosquitto.db").unlink(missing_ok=True)
        broker.start()
        await wait_for(lambda: _true(session_lost(gw) == 1), what="the lost session to be counted")
        assert "had no session for client id" in caplog.text
    # Down for a restart, and someone with the gateway's own account connects clean as its id.
    cmd = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.gateway_port), "-i", settings.client_id,
           "-u", "iotgw", "-P", broker.users["iotgw"], "-t", "nothing", "-W", "1"]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=10, check=False)
    caplog.clear()
    async with running_gateway(settings) as gw:
        await wait_for(lambda: _true(session_lost(gw) == 1), what="the session the database remembers to be missed")
        assert "had no session for client id" in caplog.text
    # And a clean restart with the session kept says nothing.
    caplog.clear()
    async with running_gateway(settings) as gw:
        assert session_lost(gw) == 0
    assert "had no session" not in caplog.text


def iotgw(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, **env}, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["iotgw", "iotgw-gw-2", "gw-user", "my-gateway", "my-gateway-b"])
async def test_the_gateways_names_cannot_be_provisioned_by_the_cli(
    broker: Mosquitto, database_url: str, name: str
) -> None:
    env = {
        "IOTGW_DATABASE_URL": database_url,
        "IOTGW_BROKER_PASSWORD_FILE": str(broker.passwords.path),
        "IOTGW_MQTT_USERNAME": "gw-user",
        "IOTGW_MQTT_CLIENT_ID": "my-gateway",
    }
    before = broker.passwords.path.read_text()
    done = iotgw("devices", "provision", "--create-database", "--id", name, env=env)
    assert done.returncode == 1
    assert "reserved for the gateway" in done.stderr
    assert "password" not in done.stdout
    assert broker.passwords.path.read_text() == before, "nothing written"
    assert iotgw("devices", "list", env=env).stdout == ""


async def test_the_gateways_names_cannot_be_provisioned_through_the_api(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(
        broker,
        consumers="",
        broker_password_file=str(broker.passwords.path),
        broker_pid_file=str(broker.data_dir / "mosquitto.pid"),
    )
    async with running_gateway(settings) as gw:
        transport = httpx.ASGITransport(app=gw.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            for name in ("iotgw", "iotgw-b", settings.client_id, f"{settings.client_id}-b"):
                r = await client.post("/api/devices", json={"id": name})
                assert r.status_code == 409, (name, r.text)
                assert "reserved for the gateway" in r.json()["detail"]
            assert PasswordFile(broker.passwords.path).users() == []
            r = await client.post("/api/devices", json={"id": "temp-ok"})
            assert r.status_code == 201
        assert PasswordFile(broker.passwords.path).users() == ["temp-ok"]


async def test_a_refused_login_is_retried_until_the_broker_takes_it_again(
    broker: Mosquitto, settings_for: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(broker, consumers="", mqtt_reconnect_max_s=1.0)
    async with running_gateway(settings) as gw:
        creds = await asyncio.to_thread(provision, gw.store, broker.passwords, {"temp-r": "temperature"})
        # The gateway's password changes at the broker, and the broker restarts: CONNACK 0x87.
        password = broker.users["iotgw"]
        broker.users["iotgw"] = "changed-elsewhere"  # what the restarted broker's file holds
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)

        async def refused() -> bool:
            return "refused the gateway's login" in caplog.text

        await wait_for(refused, what="the refusal to be logged")

        async def refused_again() -> bool:  # gmqtt alone stops at the first refusal
            return caplog.text.count("refused the gateway's login") >= 3

        await wait_for(refused_again, what="the gateway to keep trying")
        assert not gw.ingest.connected
        # The password is put back: the gateway comes back by itself and stores new readings.
        broker.users["iotgw"] = password
        await asyncio.to_thread(broker.services.set, {"iotgw": password})
        await asyncio.to_thread(broker.reload)
        await wait_for(lambda: _true(gw.ingest.connected), what="the gateway to log in again")
        await asyncio.to_thread(publish_as_client_id, broker, "temp-r", creds["temp-r"], "temp-r", 100)
        await wait_for(lambda: _true(readings_stored(gw, "temp-r") == 100), what="100 new readings")


async def test_the_gateway_will_not_start_under_a_name_a_device_was_provisioned_with(
    broker: Mosquitto, database_url: str
) -> None:
    env = {"IOTGW_DATABASE_URL": database_url, "IOTGW_BROKER_PASSWORD_FILE": str(broker.passwords.path)}
    done = iotgw(
        "devices", "provision", "--create-database", "--id", "gwclient", env=env
    )  # no client id of that name yet
    assert done.returncode == 0, done.stderr
    run = {**env, "IOTGW_MQTT_URL": broker.url, "IOTGW_MQTT_CLIENT_ID": "gwclient", "IOTGW_API_AUTH": "false",
           "IOTGW_HTTP_PORT": str(free_port())}  # fmt: skip
    started = iotgw("run", env=run)
    assert started.returncode == 1
    assert "reserved for the gateway" in started.stderr
    assert "gwclient" in started.stderr
    assert "iotgw devices revoke" in started.stderr
