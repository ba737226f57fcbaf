"""A broker crash loses nothing it acknowledged more than its autosave window ago (issue: hardening, item 3).

The project's mosquitto.conf (autosave_interval 1), a real Mosquitto killed with SIGKILL while it
holds the gateway's queued messages, a device as a real `mosquitto_pub` process, a real database.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable

import pytest
from sqlmodel import func, select

from devices.load import telemetry_payload
from gateway.cli.broker import Mosquitto
from gateway.config import Settings
from gateway.log import EventRow
from gateway.security import provision
from tests.support.gateway import running_gateway, wait_for

pytestmark = pytest.mark.anyio

MESSAGES = 2000
# After the last acknowledgement, longer than two autosave intervals of the shipped config.
SAVED_AFTER_S = 3.0


async def test_messages_queued_for_the_gateway_survive_a_kill_9_of_the_broker(
    broker: Mosquitto, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(broker, consumers="")
    async with running_gateway(settings) as gw:  # the persistent session exists from here on
        creds = await asyncio.to_thread(provision, gw.store, broker.passwords, {"temp-k": "temperature"})
        await asyncio.to_thread(broker.reload)
    # The gateway is away; the device's messages queue in its session, each acknowledged.
    lines = b"".join(telemetry_payload(seq, 20.0) + b"\n" for seq in range(1, MESSAGES + 1))
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-u", "temp-k",
           "-P", creds["temp-k"], "-t", "devices/temp-k/telemetry", "-l"]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, cmd, input=lines, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    acknowledged_at = time.monotonic()
    await asyncio.sleep(SAVED_AFTER_S)
    assert broker.proc is not None
    broker.proc.kill()  # a crash: no clean shutdown, no final save
    broker.proc.wait()
    assert time.monotonic() - acknowledged_at < 10, "the broker's own 30 s default would not have saved yet"
    await asyncio.to_thread(broker.start)
    async with running_gateway(settings) as gw:

        async def all_stored() -> bool:
            with gw.store.session() as tx:
                return tx.exec(select(func.count()).select_from(EventRow)).one() == MESSAGES

        await wait_for(all_stored, what=f"all {MESSAGES} acknowledged messages after the broker's crash")
