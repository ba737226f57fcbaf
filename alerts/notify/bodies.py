"""What a notification says, per receiver kind: Alertmanager alerts, PagerDuty events (alerts and
pages), CloudEvents for webhooks, with links to the staff page."""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from alerts.dispatch.orders import HANDED_OVER, WorkOrderEntryRow, WorkOrderRow
from alerts.notify.acklinks import Grant, token
from alerts.notify.http import Request
from alerts.notify.receivers import Receiver
from alerts.rules import Rule
from alerts.tables import AlertRow, AlertTransitionRow, NotificationRow
from gateway.core.clock import iso_z

log = logging.getLogger("alerts.notify.notifier")


PD_SEVERITY = {"critical": "critical", "major": "error", "minor": "warning", "warning": "warning", "info": "info"}


PD_ACTION = {"firing": "trigger", "flapping": "trigger", "acknowledged": "acknowledge", "resolved": "resolve"}


PD_PRIORITY = {"P1": "critical", "P2": "error", "P3": "warning"}


@dataclass(frozen=True, slots=True)
class Links:
    """What bodies say beyond the alert itself: where the staff page is, the rules' extras."""

    public_url: str = "http://127.0.0.1:8000"
    rules: Mapping[str, Rule] = field(default_factory=dict)
    time_zone: str = "UTC"  # the gateway's (IOTGW_TIME_ZONE): times people read are in it
    ack_key: str = ""  # IOTGW_ACK_LINK_KEY: signs acknowledge links (empty: none)
    ack_valid_s: float = 86400.0

    def ack(self, kind: str, ident: int | None, person: str | None, at: datetime) -> str | None:
        """A signed link that acknowledges the alert (`kind` alert) or work order (order) as
        `person`, valid for `ack_valid_s` from `at`; None without a key (or a person)."""
        if not self.ack_key or ident is None or not person:
            return None
        grant = Grant(kind, ident, person, at + timedelta(seconds=self.ack_valid_s))
        return f"{self.public_url}/ack/{token(self.ack_key, grant)}"

    def alert(self, alert_id: int | None) -> str:
        return f"{self.public_url}/ui/?alert={alert_id}"

    def order(self, order_id: int | None) -> str:
        return f"{self.public_url}/ui/?work_order={order_id}"


def am_alert(alert: AlertRow, device_type: str | None, links: Links, ends_at: datetime) -> dict[str, Any]:
    """One alert as Alertmanager's API takes it (`POST /api/v2/alerts`, a list of these)."""
    rule = links.rules.get(alert.rule)
    labels = {
        **(rule.labels if rule is not None else {}),
        "alertname": alert.rule, "device": alert.device_id, "severity": alert.severity, "source": "iotgw",
    }  # fmt: skip
    if alert.site:
        labels["site"] = alert.site  # (an empty label is no label to Alertmanager)
    if device_type:
        labels["device_type"] = device_type
    annotations = {"summary": alert.summary}
    if rule is not None and rule.description:
        annotations["description"] = rule.description
    if rule is not None and rule.runbook_url:
        annotations["runbook_url"] = rule.runbook_url
    return {
        "labels": labels, "annotations": annotations, "startsAt": iso_z(alert.fired_at), "endsAt": iso_z(ends_at),
        "generatorURL": links.alert(alert.id),
    }  # fmt: skip


def am_ends_at(receiver: Receiver, alert: AlertRow, now: datetime) -> datetime:
    """As Prometheus does: an open alert ends 4 resend intervals ahead unless sent again; a
    resolved one ended when it resolved."""
    if alert.status == "resolved" and alert.resolved_at is not None:
        return alert.resolved_at
    return now + timedelta(seconds=4 * receiver.resend_interval)


def build(  # noqa: PLR0913, PLR0917
    receiver: Receiver,
    n: NotificationRow,
    alert: AlertRow,
    tr: AlertTransitionRow,
    links: Links,
    device_type: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any] | list[dict[str, Any]] | None:
    """The request body for an Alertmanager or PagerDuty receiver, or None when the receiver has
    no such transition (CloudEvents receivers get the log's event: `cloudevent_request`)."""
    facts = {
        "alert_id": alert.id, "rule": alert.rule, "device_id": alert.device_id, "site": alert.site,
        "severity": alert.severity, "status": n.status, "summary": alert.summary, "fired_at": iso_z(alert.fired_at),
        "by": tr.by, "note": tr.note, "from_status": tr.from_status,
    }  # fmt: skip
    if receiver.kind == "alertmanager":
        # Its current state: a late retry never sends Alertmanager back to an older one.
        return [am_alert(alert, device_type, links, am_ends_at(receiver, alert, now or datetime.now(UTC)))]
    if receiver.kind == "alertmanager-webhook":
        if n.status == "acknowledged":
            return None  # Alertmanager's webhook format knows only firing and resolved
        item = am_webhook_alert(alert, links, status="resolved" if n.status == "resolved" else "firing")
        return {
            "version": "4", "groupKey": f"{alert.rule}:{alert.device_id}", "truncatedAlerts": 0,
            "status": item["status"], "receiver": receiver.name, "groupLabels": {"alertname": alert.rule},
            "commonLabels": item["labels"], "commonAnnotations": {"summary": alert.summary},
            "externalURL": links.public_url, "alerts": [item],
        }  # fmt: skip
    body: dict[str, Any] = {
        "routing_key": receiver.routing_key,
        "event_action": PD_ACTION[n.status],
        "dedup_key": f"iotgw-{alert.rule}-{alert.device_id}-{alert.id}",
    }
    if n.status in ("firing", "flapping"):
        body["payload"] = {
            "summary": alert.summary[:1024], "source": alert.device_id, "severity": PD_SEVERITY[alert.severity],
            "timestamp": iso_z(alert.fired_at), "component": alert.rule, "group": alert.site or NO_SITE,
            "class": alert.rule, "custom_details": facts,
        }  # fmt: skip
        body |= _pd_links(links, links.alert(alert.id), "The alert on the staff page")
    return body


def am_webhook_alert(
    alert: AlertRow, links: Links, device_type: str | None = None, *, status: str | None = None
) -> dict[str, Any]:
    """One alert as Alertmanager's webhook lists it: firing (acknowledged too) or resolved."""
    labels = {"alertname": alert.rule, "device": alert.device_id, "site": alert.site or "", "severity": alert.severity}
    if device_type:
        labels["device_type"] = device_type
    return {
        "status": status or ("resolved" if alert.status == "resolved" else "firing"), "labels": labels,
        "annotations": {"summary": alert.summary}, "startsAt": iso_z(alert.fired_at),
        "endsAt": iso_z(alert.resolved_at) or "0001-01-01T00:00:00Z", "generatorURL": links.alert(alert.id),
        "fingerprint": f"iotgw-{alert.id}",
    }  # fmt: skip


NO_SITE = "no site"  # PagerDuty's payload.group is a string


def _pd_links(links: Links, href: str, text: str) -> dict[str, Any]:
    return {"links": [{"href": href, "text": text}], "client": "iotgw", "client_url": f"{links.public_url}/ui/"}


PD_PAGE_ACTION = {"acknowledged": "acknowledge", "en_route": "acknowledge", "on_site": "acknowledge",
                  "resolved": "resolve", HANDED_OVER: "resolve"}  # fmt: skip


def build_page(
    receiver: Receiver, n: NotificationRow, order: WorkOrderRow, entry: WorkOrderEntryRow, links: Links
) -> dict[str, Any]:
    """The PagerDuty event for a page: one incident per order and person, triggered when the
    person is paged, acknowledged when the order is acknowledged, en route or on site, resolved
    when it is resolved or passes to someone else."""
    if receiver.kind != "pagerduty":
        msg = f"no page body for a {receiver.kind} receiver"  # webhooks: cloudevent_request
        raise ValueError(msg)
    person = n.person or entry.assignee
    action = PD_PAGE_ACTION.get(n.status, "trigger")
    dedup_key = f"iotgw-workorder-{order.id}-{person}"
    body: dict[str, Any] = {"routing_key": receiver.routing_key, "event_action": action, "dedup_key": dedup_key}
    if action == "trigger":
        facts = {
            "work_order_id": order.id, "step": entry.kind, "priority": order.priority, "status": order.status,
            "device_id": order.device_id, "site": order.site, "summary": order.summary, "assignee": order.assignee,
            "level": entry.level, "ack_deadline": iso_z(order.ack_deadline), "note": entry.note,
        }  # fmt: skip
        body["payload"] = {
            "summary": f"[{order.priority}] {order.summary}"[:1024], "source": order.device_id,
            "severity": PD_PRIORITY.get(order.priority, "warning"), "timestamp": iso_z(entry.at),
            "component": order.device_type or "device", "group": order.site or NO_SITE,
            "class": f"work-order {order.priority}", "custom_details": facts,
        }  # fmt: skip
        body |= _pd_links(links, links.order(order.id), "The work order on the staff page")
    return body


STRUCTURED = "application/cloudevents+json; charset=utf-8"


# Header values of the HTTP binding: printable ASCII but for space, '"' and '%' as they are.
_HEADER_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "%"}


def _header_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return "".join(c if c in _HEADER_SAFE else urllib.parse.quote(c, safe="") for c in text)


def cloudevent_request(receiver: Receiver, event: dict[str, Any]) -> Request:
    """The HTTP request (body, headers) carrying `event` by the CloudEvents HTTP binding:
    structured mode (the whole event as JSON) or, with `mode: binary`, its attributes as
    `ce-*` headers and its data as the body."""
    if receiver.mode == "structured":
        return json.dumps(event, separators=(",", ":")).encode(), {"Content-Type": STRUCTURED}
    headers = {f"ce-{k}": _header_value(v) for k, v in event.items() if k not in ("data", "datacontenttype")}
    headers["Content-Type"] = str(event.get("datacontenttype", "application/json"))
    return json.dumps(event.get("data"), separators=(",", ":")).encode(), headers
