"""Logging helpers: failures are logged with context, never as a storm."""

from __future__ import annotations

import logging
import time
from collections import Counter


class QuietLog:
    """At most one warning per key every `every_s` seconds, saying how many were held back."""

    def __init__(self, logger: logging.Logger, every_s: float) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def warn(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        """Log at `level` unless `key` was logged less than `every_s` ago (then count it)."""
        now = time.monotonic()
        if now - self._last.get(key, -self.every_s) < self.every_s:
            self._held[key] += 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        suffix = f" (and {held} more {key} since the last report)" if held else ""
        self.logger.log(level, msg + "%s", *args, suffix, exc_info=exc_info)
