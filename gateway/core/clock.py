"""The wall clock, in UTC: one place to read it (tests and consumers with a clock of their own
pass theirs instead)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utcnow() -> datetime:
    """Now, timezone-aware, in UTC."""
    return datetime.now(UTC)


@overload
def iso_z(t: datetime) -> str: ...
@overload
def iso_z(t: None) -> None: ...
def iso_z(t: datetime | None) -> str | None:
    """RFC 3339 in UTC with a `Z` (as CloudEvents and Alertmanager write times); None stays None."""
    return None if t is None else t.astimezone(UTC).isoformat().replace("+00:00", "Z")
