"""Small helpers for what the gateway's commands say to people."""

from __future__ import annotations


def plural(n: int, one: str, many: str | None = None) -> str:
    """`1 device`, `3 devices`; `many` for an irregular plural (`2 escalation policies`)."""
    return f"{n} {one if n == 1 else many or one + 's'}"
