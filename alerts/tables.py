"""The alerts plugin's tables: alerts and their transitions, the rules' state per device and key,
silences, and the notification outbox (notifications and their deliveries per receiver)."""

from __future__ import annotations

import fnmatch
import logging
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Integer
from sqlmodel import Field, SQLModel

from alerts.windows import in_window
from gateway.log import (
    datetime_field,
)

log = logging.getLogger("alerts.engine")


class AlertStatus(StrEnum):
    """The lifecycle: firing -> acknowledged -> resolved; flapping when it keeps toggling."""

    FIRING = "firing"
    ACKNOWLEDGED = "acknowledged"
    FLAPPING = "flapping"
    RESOLVED = "resolved"


OPEN = (AlertStatus.FIRING.value, AlertStatus.ACKNOWLEDGED.value, AlertStatus.FLAPPING.value)


class AlertRow(SQLModel, table=True):
    """An alert: one episode of a rule's condition on one device."""

    __tablename__ = "alerts"
    # Ids are never reused (not even after a replay empties the table): other consumers (dispatch)
    # remember alerts by id.
    __table_args__ = (
        Index("ix_alerts_rule_device_status", "rule", "device_id", "status"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    rule: str
    device_id: str = Field(index=True)
    site: str | None = Field(default=None, index=True)
    severity: str = Field(index=True)
    status: str = Field(index=True)
    summary: str
    fired_at: datetime = datetime_field(nullable=False)
    updated_at: datetime = datetime_field(nullable=False)
    acked_at: datetime | None = datetime_field()
    acked_by: str | None = None
    resolved_at: datetime | None = datetime_field()
    resolved_by: str | None = None
    note: str | None = None


class AlertReplayIdRow(SQLModel, table=True):
    """An alert's id kept across a replay: the rebuilt alert of the same rule, device and firing
    time takes it again, so that what others hold of it (dispatch's orders, pages) stays true."""

    __tablename__ = "alert_replay_ids"
    __table_args__ = (Index("ix_alert_replay_ids_key", "rule", "device_id"),)

    id: int = Field(primary_key=True)
    rule: str
    device_id: str
    fired_at: datetime = datetime_field(nullable=False)
    status: str | None = None  # as it was when the replay was asked for
    resolved_at: datetime | None = datetime_field()
    taken: bool = False  # a rebuilt alert has this id again


class AlertTransitionRow(SQLModel, table=True):
    """One change of an alert's status, with who and why."""

    __tablename__ = "alert_transitions"
    __table_args__ = ({"sqlite_autoincrement": True},)  # notification keys name transitions: never reused

    id: int | None = Field(default=None, primary_key=True)
    alert_id: int = Field(index=True)
    at: datetime = datetime_field(nullable=False)
    from_status: str | None = None
    to_status: str
    by: str  # "engine" or the person
    note: str | None = None


class NotificationRow(SQLModel, table=True):
    """The outbox: one row per alert transition, written in the transition's transaction.

    The sender (alerts/notify/notifier.py) fans it out to the receivers and delivers with retries; the
    key is the idempotency key receivers see, the same on every retry.
    """

    __tablename__ = "notifications"

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True)
    alert_id: int = Field(index=True)
    transition_id: int
    status: str  # the alert status this notification announces (or the work order's step)
    created_at: datetime = datetime_field(nullable=False)
    fanned_out: bool = Field(default=False, index=True)
    # Work-order notifications (alerts/dispatch/consumer.py) page one person: their contact receiver.
    # alert_id is then the alert that opened the order, transition_id 0.
    work_order_id: int | None = Field(default=None, index=True)
    entry_id: int | None = None
    receiver: str | None = None
    person: str | None = None  # a page: the technician it is for (PagerDuty: one incident per order and person)
    # The event of the log this notification announces: what CloudEvents receivers get.
    event_position: int | None = Field(default=None, sa_column=Column(BigInteger().with_variant(Integer(), "sqlite")))


class DeliveryRow(SQLModel, table=True):
    """One notification to one receiver."""

    __tablename__ = "notification_deliveries"
    __table_args__ = (Index("ix_notification_deliveries_lane", "status", "receiver", "id"),)  # a receiver's lane

    id: int | None = Field(default=None, primary_key=True)
    notification_id: int = Field(index=True)
    alert_id: int = Field(index=True)
    receiver: str
    status: str = Field(default="pending", index=True)  # pending | delivered | failed | skipped | silenced
    attempts: int = 0
    next_at: datetime = datetime_field(nullable=False, index=True)
    last_error: str | None = None
    delivered_at: datetime | None = datetime_field()
    created_at: datetime | None = datetime_field()  # when it was fanned out: retries end at the maximum age
    sent_as: str | None = None  # the key its last try went under (its own, or its group message's)


class NotificationGroupRow(SQLModel, table=True):
    """A receiver's group of alerts (its `group_by` labels' values): what its last message listed
    as open, when it was sent, and the retry of the next one (alerts/notify/groups.py)."""

    __tablename__ = "notification_groups"
    # One row a receiver and key while the group has open alerts; ids never reused (acknowledge
    # links and e-mail threads name a group by id).
    __table_args__ = (
        Index("ix_notification_groups_key", "receiver", "key", unique=True),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    receiver: str
    key: str  # the group_by labels' values, as JSON
    open: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # alert ids
    sent_at: datetime | None = datetime_field()
    messages: int = 0  # sent so far (the e-mails' Message-IDs count them)
    attempts: int = 0  # failed tries of the next message in a row
    next_at: datetime | None = datetime_field()  # not tried again before (a backoff)
    last_error: str | None = None


class SilenceRow(SQLModel, table=True):
    """A silence: notifications of matching alerts are not sent while it lasts (alerts still fire)."""

    __tablename__ = "silences"

    id: int | None = Field(default=None, primary_key=True)
    matchers: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_by: str
    comment: str
    starts_at: datetime = datetime_field(nullable=False)
    ends_at: datetime = datetime_field(nullable=False, index=True)
    # A recurring maintenance window (alerts/windows.py): in force only in its windows, from
    # starts_at until ends_at; None: all the time in between.
    schedule: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))

    def in_force(self, at: datetime) -> bool:
        """Whether the silence holds notifications back at `at` (whatever they match)."""
        return self.starts_at <= at < self.ends_at and (self.schedule is None or in_window(self.schedule, at))

    def matches(self, alert: AlertRow, at: datetime) -> bool:
        """True when `alert` falls under this silence at `at` (matchers are fnmatch patterns)."""
        if not self.in_force(at):
            return False
        fields = {
            "rule": alert.rule,
            "device_id": alert.device_id,
            "site": alert.site or "",
            "severity": alert.severity,
        }
        return all(fnmatch.fnmatchcase(fields.get(k, ""), v) for k, v in self.matchers.items())


class AlertKeyRow(SQLModel, table=True):
    """Evaluation state of one (rule, device) key."""

    __tablename__ = "alert_keys"

    rule: str = Field(primary_key=True)
    device_id: str = Field(primary_key=True)
    state: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class AlertDeviceRow(SQLModel, table=True):
    """The engine's own view of a device, built from the log (replays give the same view)."""

    __tablename__ = "alert_devices"

    device_id: str = Field(primary_key=True)
    type: str | None = None
    site: str | None = None
    state: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
