"""Response models: what the API promises, independent of the table layout."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel


class DevicePublic(BaseModel):
    """A device and its last known state."""

    device_id: str
    type: str | None
    site: str | None
    online: bool
    first_seen: datetime | None
    last_seen: datetime | None
    last_seq: int | None
    state: dict[str, Any]


class EventPublic(BaseModel):
    """An event of the log, as a CloudEvent 1.0 (JSON format), with the extensions `position`
    (its place in the log), `receivedat`, `seq` (the device's message counter) and `site`;
    an extension without a value is left out."""

    specversion: Literal["1.0"]
    id: str
    source: str
    type: str
    time: datetime
    subject: str
    datacontenttype: Literal["application/json"]
    data: dict[str, Any]
    position: int
    receivedat: datetime
    seq: int | None = None
    site: str | None = None


class EventPage(BaseModel):
    """One page of events; pass `next_cursor` as `cursor` for the next page (null at the end)."""

    items: list[EventPublic]
    next_cursor: str | None


class DeadLetterPublic(BaseModel):
    """A rejected message with its reason; `payload_b64` is the exact bytes received."""

    id: int
    received_at: datetime
    topic: str
    reason: str
    detail: str
    size: int
    payload_b64: str
    payload_preview: str


class DeadLetterPage(BaseModel):
    """One page of dead letters."""

    items: list[DeadLetterPublic]
    next_cursor: str | None
