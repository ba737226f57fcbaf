"""An alert's lifecycle, for the engine and the API alike: firing, flapping, acknowledged, resolved;
every change recorded as a transition, appended to the log as `alert.<status>` and notified."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select, update

from alerts.tables import OPEN, AlertReplayIdRow, AlertRow, AlertStatus, AlertTransitionRow, NotificationRow
from gateway.core.clock import iso_z
from gateway.errors import GatewayError
from gateway.log import (
    append_event,
    replaying,
)

log = logging.getLogger("alerts.engine")


ALERT_SOURCE = "iotgw/alerts"


RECONCILING = "iotgw_alerts_reconciling"  # Session.info: the first tick after a replay (AlertEngine.tick)


def is_rebuilding(tx: Session) -> bool:
    return replaying(tx) or bool(tx.info.get(RECONCILING))


def before_replay(tx: Session, rule: str, device_id: str, at: datetime) -> tuple[int | None, datetime]:
    """While a replay rebuilds alerts: the id and firing time this alert had before (None, `at`: new).

    An alert fired by an event fires at that event's time again; one fired by the timer fires
    when the replay's clock (the log's receive times) passes its due time, which may be earlier
    or later than the first time (the engine was paused, say): it is the alert of the rule and
    device, not rebuilt yet, that fired closest to then. After the replay, only an alert still
    open before it can be the one firing again."""
    if not is_rebuilding(tx):
        return None, at
    where = [
        col(AlertReplayIdRow.rule) == rule,
        col(AlertReplayIdRow.device_id) == device_id,
        col(AlertReplayIdRow.taken).is_(False),
    ]
    if not replaying(tx):
        where.append(col(AlertReplayIdRow.status) != AlertStatus.RESOLVED.value)
    candidates = tx.exec(select(AlertReplayIdRow).where(*where)).all()
    kept = min(candidates, key=lambda k: abs(k.fired_at - at), default=None)
    if kept is None:
        return None, at
    kept.taken = True
    tx.add(kept)
    return kept.id, kept.fired_at


def _happened_before(tx: Session, alert: AlertRow, new: AlertStatus) -> bool:
    """On the first tick after a replay: whether this transition of a rebuilt alert happened
    before the replay (then it is not told again)."""
    if not tx.info.get(RECONCILING):
        return False
    kept = tx.get(AlertReplayIdRow, alert.id)
    return kept is not None and kept.taken and (new is AlertStatus.FIRING or kept.status == new.value)


def record(  # noqa: PLR0913, PLR0917
    tx: Session,
    alert: AlertRow,
    old: str | None,
    new: AlertStatus,
    at: datetime,
    by: str,
    note: str | None = None,
    *,
    context: Mapping[str, Any] | None = None,
) -> None:
    """Write one transition of `alert`, its notification to the outbox and its event to the log.

    All in `tx`: the event (`alert.firing`, `alert.acknowledged`, ...) is how other consumers
    (dispatch) learn of alerts, through the log like everything else.
    """
    assert alert.id is not None  # noqa: S101 - flushed before
    transition = AlertTransitionRow(alert_id=alert.id, at=at, from_status=old, to_status=new.value, by=by, note=note)
    tx.add(transition)
    if replaying(tx) or _happened_before(tx, alert, new):
        return  # rebuilt after a replay: its notification and its event went out the first time
    tx.flush()
    assert transition.id is not None  # noqa: S101 - flushed
    key = f"iotgw-alert-{alert.id}-{transition.id}"
    notification = NotificationRow(
        key=key, alert_id=alert.id, transition_id=transition.id, status=new.value, created_at=at
    )
    data = {
        "alert_id": alert.id, "rule": alert.rule, "severity": alert.severity, "status": new.value,
        "from_status": old, "summary": alert.summary, "device_id": alert.device_id, "site": alert.site,
        "fired_at": iso_z(alert.fired_at), "by": by, "note": note, **(context or {}),
    }  # fmt: skip
    # The notification is this event: receivers of CloudEvents get it as the log holds it.
    notification.event_position = append_event(
        tx, ce_id=key, source=ALERT_SOURCE, type=f"alert.{new.value}", subject=alert.device_id, time=at,
        site=alert.site, data=data,
    )  # fmt: skip
    tx.add(notification)


def change_status(  # noqa: PLR0913, PLR0917
    tx: Session, alert: AlertRow, new: AlertStatus, at: datetime, by: str, note: str | None = None
) -> None:
    """Move an alert to `new` (with who, when and why) and record the transition."""
    old = alert.status
    alert.status, alert.updated_at = new.value, at
    if new is AlertStatus.ACKNOWLEDGED:
        alert.acked_at, alert.acked_by = at, by
    elif new is AlertStatus.RESOLVED:
        alert.resolved_at, alert.resolved_by = at, by
    else:  # firing again, or flapping: open once more
        alert.resolved_at, alert.resolved_by = None, None
    if note and new is not AlertStatus.FLAPPING:
        alert.note = note
    tx.add(alert)
    record(tx, alert, old, new, at, by, note)


def resolve(tx: Session, alert: AlertRow, at: datetime, by: str, note: str | None = None) -> None:
    """Resolve an open alert."""
    change_status(tx, alert, AlertStatus.RESOLVED, at, by, note)


def acknowledge(tx: Session, alert: AlertRow, at: datetime, by: str, note: str | None = None) -> None:
    """Acknowledge a firing alert."""
    change_status(tx, alert, AlertStatus.ACKNOWLEDGED, at, by, note)


class AlertActionError(GatewayError):
    """A person's action on an alert that cannot be done; `kind`: `unknown`, `state` or `note`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def act_by_hand(  # noqa: PLR0913 - who acts, on what, how, why and when
    tx: Session, alert_id: int, to: AlertStatus, *, by: str, note: str | None, at: datetime
) -> None:
    """A person acknowledges a firing (or flapping) alert, or resolves an open one, saying why
    (`note` is required to resolve). Raises `AlertActionError` when that cannot be done.
    The alert's row is locked before its status is read: of two people acting at once (a
    double click), the second sees what the first did."""
    tx.exec(update(AlertRow).where(col(AlertRow.id) == alert_id).values(status=AlertRow.status))
    row = tx.get(AlertRow, alert_id, populate_existing=True)
    if row is None:
        raise AlertActionError("unknown", f"no alert {alert_id}")
    if to is AlertStatus.ACKNOWLEDGED:
        if row.status not in (AlertStatus.FIRING.value, AlertStatus.FLAPPING.value):
            raise AlertActionError("state", f"alert {alert_id} is {row.status}, not firing")
        acknowledge(tx, row, at, by, note)
        return
    if row.status not in OPEN:
        raise AlertActionError("state", f"alert {alert_id} is already {row.status}")
    if not note:
        raise AlertActionError("note", "note: say why it is resolved")
    resolve(tx, row, at, by, note)
