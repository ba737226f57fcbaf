"""Grouped notifications, as Alertmanager groups them: a receiver with `group_by` gets one message
for the alerts that share those labels' values (a site's power loss that takes 40 devices
offline: one message listing them, not 40).

A group's first message goes `group_wait` after its first alert's notification, so that the
others of the same burst join it; later changes (new alerts, resolved ones) go as one update at
most every `group_interval`; while any of its alerts is open, the group is sent again every
`repeat_interval`. Each message lists the group's alerts as they are when it is sent: those whose
notifications it carries, and those still open from its earlier messages. A group ends with the
message that leaves none of its alerts open.

Pages about work orders are never grouped or delayed: they go one by one, at once."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from alerts.notify.bodies import Links, am_webhook_alert
from alerts.notify.mail import flat, local_time
from alerts.notify.receivers import Receiver, Severity
from alerts.tables import OPEN, AlertDeviceRow, AlertRow

GROUP_BATCH = 5000  # pending deliveries a grouped lane reads per round at most

LISTED = 50  # alerts a message lists one by one; the rest are counted (the staff page has them all)

FIRING = ("firing", "flapping")

_RANK = {s.value: i for i, s in enumerate(Severity)}  # most severe first

_ORDER = {"firing": 0, "flapping": 0, "acknowledged": 1, "resolved": 2}


def labels(receiver: Receiver, alert: AlertRow, device_type: str | None) -> dict[str, str]:
    """The group labels' values of `alert` for `receiver` (its `group_by`, in its order)."""
    values = {
        "site": alert.site or "", "rule": alert.rule, "severity": alert.severity, "device": alert.device_id,
        "type": device_type or "",
    }  # fmt: skip
    return {label: values[label] for label in receiver.group_by or ()}


def key(values: Mapping[str, str]) -> str:
    """The group's key: its labels' values, as stored."""
    return json.dumps(list(values.items()), separators=(",", ":"))


def unkey(text: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in json.loads(text)}


def ordered(alerts: Iterable[AlertRow]) -> list[AlertRow]:
    """Open first (firing before acknowledged), most severe first, oldest first."""
    return sorted(alerts, key=lambda a: (_ORDER.get(a.status, 3), _RANK.get(a.severity, 9), a.fired_at, a.id or 0))


def summary(alerts: Sequence[AlertRow], values: Mapping[str, str]) -> str:
    """One line for the group: how many are open and resolved, of what, where."""
    if len(alerts) == 1:
        return f"{alerts[0].status}: {alerts[0].summary}"
    open_ = sum(a.status in OPEN for a in alerts)
    counts = [f"{n} {word}" for n, word in ((open_, "open"), (len(alerts) - open_, "resolved")) if n]
    rules = {a.rule for a in alerts}
    sites = {a.site or "" for a in alerts}
    what = next(iter(rules)) if len(rules) == 1 else "alerts"
    where = f" at site {next(iter(sites))}" if len(sites) == 1 and next(iter(sites)) else ""
    rest = ", ".join(f"{k} {v}" for k, v in values.items() if k not in ("rule", "site") and v)
    return f"{', '.join(counts)}: {what}{where}" + (f" ({rest})" if rest else "")


def facts(
    alerts: Sequence[AlertRow],
    devices: Mapping[str, AlertDeviceRow],
    values: Mapping[str, str],
    links: Links,
    ack_link: str | None,
) -> dict[str, Any]:
    """What a group's message can say (TEMPLATE_FIELDS): a field its alerts share has their value,
    one they differ in is empty; `severity` is the worst open one's, `since` the oldest open one's
    firing, `count` how many are listed and `alerts` the list, a line each."""
    alerts = ordered(alerts)
    open_ = [a for a in alerts if a.status in OPEN] or alerts
    floors = {_floor(devices.get(a.device_id)) for a in alerts}

    def common(values_: Iterable[str | None]) -> str | None:
        seen = set(values_)
        return next(iter(seen)) if len(seen) == 1 else None

    status = next((s for s in ("firing", "flapping", "acknowledged") if any(a.status == s for a in alerts)), "resolved")
    return {
        "summary": summary(alerts, values), "status": status, "severity": open_[0].severity,
        "rule": common(a.rule for a in alerts), "device": common(a.device_id for a in alerts),
        "type": common(_type(devices.get(a.device_id)) for a in alerts), "site": common(a.site for a in alerts),
        "floor": next(iter(floors)) if len(floors) == 1 else None,
        "since": local_time(min(a.fired_at for a in open_), links), "count": len(alerts),
        "alerts": _lines(alerts, devices, links), "link": links.alert(alerts[0].id) if len(alerts) == 1 else
        f"{links.public_url}/ui/", "ack_link": ack_link,
    }  # fmt: skip


def _type(device: AlertDeviceRow | None) -> str | None:
    return device.type if device is not None else None


def _floor(device: AlertDeviceRow | None) -> str | None:
    floor = device.state.get("floor") if device is not None else None
    return None if floor is None else str(floor)


def _lines(alerts: Sequence[AlertRow], devices: Mapping[str, AlertDeviceRow], links: Links) -> str:
    lines = []
    for a in alerts[:LISTED]:
        floor = _floor(devices.get(a.device_id))
        where = f"{a.device_id}" + (f", floor {floor}" if floor is not None else "")
        line = f"- {a.status} · {where} · {a.summary} · since {local_time(a.fired_at, links)}"
        lines.append(flat(line))
    if len(alerts) > LISTED:
        lines.append(f"- and {len(alerts) - LISTED} more on the staff page")
    return "\n".join(lines)


def am_webhook(  # noqa: PLR0913, PLR0917
    receiver: Receiver,
    group_key: str,
    values: Mapping[str, str],
    alerts: Sequence[AlertRow],
    devices: Mapping[str, AlertDeviceRow],
    links: Links,
) -> dict[str, Any]:
    """The group in Alertmanager's webhook format (version 4): firing while any alert is open."""
    items = [am_webhook_alert(a, links, _type(devices.get(a.device_id))) for a in ordered(alerts)]
    common = dict(items[0]["labels"]) if items else {}
    for item in items[1:]:
        common = {k: v for k, v in common.items() if item["labels"].get(k) == v}
    names = {"rule": "alertname", "type": "device_type"}
    summaries = {a.summary for a in alerts}
    return {
        "version": "4", "groupKey": f"{receiver.name}:{group_key}", "truncatedAlerts": 0,
        "status": "firing" if any(a.status in OPEN for a in alerts) else "resolved", "receiver": receiver.name,
        "groupLabels": {names.get(k, k): v for k, v in values.items()}, "commonLabels": common,
        "commonAnnotations": {"summary": next(iter(summaries))} if len(summaries) == 1 else {},
        "externalURL": links.public_url, "alerts": items,
    }  # fmt: skip


def due(receiver: Receiver, first: datetime, sent_at: datetime | None, retry_at: datetime | None) -> datetime:
    """When a group's next message is due: `group_wait` after the first notification waiting
    (`first`), not sooner than `group_interval` after the last message (`sent_at`), nor before a
    retry's backoff is over (`retry_at`)."""
    at = first + timedelta(seconds=receiver.wait_s)
    if sent_at is not None:
        at = max(at, sent_at + timedelta(seconds=receiver.interval_s))
    return max(at, retry_at) if retry_at is not None else at
