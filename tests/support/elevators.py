"""Elevator state messages for alert tests, and reading the alerts they raise."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from gateway.service import Gateway
from tests.support.gateway import wait_for

IDLE = {"floor": 2, "direction": "idle", "door": "closed", "mode": "normal", "load_kg": 0, "fault": None}


DOOR_JAM_RULE = """
rules:
  - name: door-jam
    severity: major
    summary: "Door jammed on {device}"
    event: {type: elevator.fault.raised, data: {code: DOOR_JAM}, clear: {type: elevator.fault.cleared}}
"""


def door_jam_rules(tmp: Path, receivers: str) -> Path:
    """A rules file of one rule (a door jam on an elevator) and `receivers` (YAML list items)."""
    path = tmp / "rules.yaml"
    path.write_text(f"{DOOR_JAM_RULE}receivers:\n{receivers.lstrip(chr(10))}")
    return path


def state(seq: int, **data: Any) -> bytes:
    return json.dumps({"type": "elevator", "seq": seq, "ts": 1764324000000 + seq * 1000, "site": "hq",
                       "data": {**IDLE, **data}}).encode()  # fmt: skip


async def alerts_of(gw: Gateway, **params: Any) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url="http://gw") as c:
        r = await c.get("/api/alerts", params=params)
        assert r.status_code == 200, r.text
        return list(r.json()["items"])


async def caught_up(gw: Gateway, device: str, seq: int) -> None:
    """Wait until `device`'s message `seq` is stored and every consumer has handled the log."""

    async def check() -> bool:
        shadow = (await asyncio.to_thread(gw.store.load_shadows)).get(device)
        if shadow is None or shadow.last_seq != seq:
            return False
        status = await asyncio.to_thread(gw.router.status)
        return all(s.lag_events == 0 for s in status)

    await wait_for(check, what="the alert engine to catch up")
