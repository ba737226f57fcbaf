"""Who gets in, before a message is parsed: each device's token bucket (`IOTGW_DEVICE_RATE`), the
registry of provisioned devices (`IOTGW_REQUIRE_REGISTERED_DEVICES`), and the census of devices
online and known."""

from __future__ import annotations

import logging
import time
from collections import Counter

from gateway.core.normalize import Shadow
from gateway.log import Store
from gateway.metrics import Metrics
from gateway.security import registered

log = logging.getLogger("gateway.ingest")


class Census:
    """Devices known and online by type and site, kept up to date shadow by shadow (no full scans)."""

    def __init__(self) -> None:
        self.known: Counter[tuple[str, str]] = Counter()
        self.online: Counter[tuple[str, str]] = Counter()
        self._dirty: set[tuple[str, str]] = set()

    def move(self, old: Shadow | None, new: Shadow) -> None:
        for sh, sign in ((old, -1), (new, 1)):
            if sh is None:
                continue
            t = (sh.type or "unknown", sh.site or "")
            self.known[t] += sign
            self.online[t] += sign if sh.online else 0
            self._dirty.add(t)

    def publish(self, metrics: Metrics) -> None:
        for t in self._dirty:
            metrics.devices_known.labels(*t).set(self.known[t])
            metrics.devices_online.labels(*t).set(self.online[t])
        self._dirty.clear()


class Buckets:
    """A token bucket per device: `rate` messages per second on average, bursts up to `burst`."""

    PRUNE_AT = 100_000

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._state: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)

    def allow(self, device_id: str, now: float) -> bool:
        tokens, at = self._state.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + max(now - at, 0.0) * self.rate)
        allowed = tokens >= 1.0
        self._state[device_id] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._state) > self.PRUNE_AT:
            self._prune(now)
        return allowed

    def _prune(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket.
        self._state = {d: (t, a) for d, (t, a) in self._state.items() if t + (now - a) * self.rate < self.burst}


class Registry:
    """The registered devices, for IOTGW_REQUIRE_REGISTERED_DEVICES: reloaded every few seconds
    (so a revocation takes effect), and asked about a device it does not know (so a device
    provisioned a moment ago is accepted at once)."""

    RELOAD_S = 5.0

    def __init__(self, store: Store) -> None:
        self.store = store
        self._ids: set[str] = set()
        self._loaded = -1e9

    def known(self, device_ids: set[str]) -> set[str]:
        """Which of `device_ids` are registered (runs in the writer thread; may query the store)."""
        now = time.monotonic()
        if now - self._loaded > self.RELOAD_S:
            self._ids = registered(self.store)
            self._loaded = now
        missing = device_ids - self._ids
        if missing:
            self._ids |= registered(self.store, among=missing)
        return device_ids & self._ids
