"""The wall clock, in UTC: one place to read it (tests and consumers with a clock of their own
pass theirs instead)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now, timezone-aware, in UTC."""
    return datetime.now(UTC)
