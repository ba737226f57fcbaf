"""CloudEvents-shaped events, the unit of the durable log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from gateway.core.clock import iso_z

# Event types (the `type` attribute). Consumers match on these strings.
DOOR_OPENED = "elevator.door.opened"
DOOR_CLOSED = "elevator.door.closed"
TRIP_STARTED = "elevator.trip.started"
TRIP_COMPLETED = "elevator.trip.completed"
FAULT_RAISED = "elevator.fault.raised"
FAULT_CLEARED = "elevator.fault.cleared"
MODE_CHANGED = "elevator.mode.changed"
STUCK = "elevator.stuck"
SENSOR_READING = "sensor.reading"
DEVICE_ONLINE = "device.online"
DEVICE_OFFLINE = "device.offline"
DEVICE_DISCOVERED = "device.discovered"
SEQ_RESET = "device.seq.reset"  # the device's seq went far back: a restarted counter, taken on

EVENT_TYPES = (
    DOOR_OPENED,
    DOOR_CLOSED,
    TRIP_STARTED,
    TRIP_COMPLETED,
    FAULT_RAISED,
    FAULT_CLEARED,
    MODE_CHANGED,
    STUCK,
    SENSOR_READING,
    DEVICE_ONLINE,
    DEVICE_OFFLINE,
    DEVICE_DISCOVERED,
    SEQ_RESET,
)


class Event(msgspec.Struct, frozen=True, gc=False):
    """One event (CloudEvents 1.0 attribute names, plus `sequence` and `site` extensions).

    `id` is deterministic (`{device}-{seq}-{part}`), so a redelivered message yields the same ids.
    """

    id: str
    source: str
    type: str
    time: datetime
    subject: str
    data: dict[str, Any] = {}
    sequence: int | None = None
    part: int = 0
    site: str | None = None
    position: int = 0  # place in the log once stored (0 before)
    received_at: datetime | None = None  # when the gateway received it (read from the log; None before)

    def to_cloudevent(self) -> dict[str, Any]:
        """A stored event as a CloudEvent 1.0 in the JSON format (structured mode), the one form the
        API serves and webhooks send. Extensions (names of lowercase letters and digits, as the spec
        wants): `position` (its place in the log), `receivedat` (when the gateway received it),
        `seq` (the device's message counter; not the spec's string-valued `sequence`) and `site`,
        each left out when it has no value."""
        ce: dict[str, Any] = {
            "specversion": "1.0", "id": self.id, "source": self.source, "type": self.type,
            "time": cloudevent_time(self.time), "subject": self.subject, "datacontenttype": "application/json",
            "data": self.data, "position": self.position,
        }  # fmt: skip
        if self.received_at is not None:
            ce["receivedat"] = cloudevent_time(self.received_at)
        if self.sequence is not None:
            ce["seq"] = self.sequence
        if self.site is not None:
            ce["site"] = self.site
        return ce


def cloudevent_time(t: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, as CloudEvents' `time` is written."""
    return iso_z(t)
