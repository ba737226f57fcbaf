"""Consumers for tests: one that fails on demand."""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlmodel import Session

from gateway.core.events import Event
from gateway.runtime import BaseConsumer


class Failing(BaseConsumer):
    """Raises on every event while `broken`."""

    name = "failing"
    types = ("sensor.reading",)
    max_attempts = 3
    retry_base_s = 0.001

    def __init__(self, delay_s: float = 0.0) -> None:
        self.broken = True
        self.calls = 0
        self.positions: list[int] = []
        self.delay_s = delay_s  # each try takes this long (a downstream system timing out, say)

    def handle(self, events: Sequence[Event], tx: Session) -> None:  # noqa: ARG002
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.broken:
            raise RuntimeError("boom: the downstream system is down")
        self.positions.extend(e.position for e in events)
