"""The alerts plugin's metric families: alerts, notifications and work orders."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlmodel import Session, col, select

from alerts.dispatch.orders import OPEN_ORDER, WorkOrderEntryRow, WorkOrderRow
from alerts.tables import OPEN, AlertRow, AlertStatus, AlertTransitionRow

HUMAN_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)


class AlertFamilies:
    """Defined on the gateway's registry by the alerts plugin; set by its publishers and the notifier."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        # Notifications (one series per configured receiver).
        self.notifications_sent = Counter(
            "iotgw_notifications_sent_total", "Notifications delivered, by receiver.", ["receiver"], registry=r
        )
        self.notification_retries = Counter(
            "iotgw_notification_retries_total",
            "Delivery attempts that failed for now (5xx, 408, 425, 429, timeout, connection): retried.",
            ["receiver"],
            registry=r,
        )
        self.notifications_failed = Counter(
            "iotgw_notifications_failed_total",
            "Deliveries given up: rejected (a 4xx), unreachable (a URL that cannot be requested), "
            "expired (retried for the maximum age).",
            ["receiver", "reason"],
            registry=r,
        )
        self.notification_receiver_failing = Gauge(
            "iotgw_notification_receiver_failing",
            "1 while the receiver's last delivery attempt failed.",
            ["receiver"],
            registry=r,
        )
        self.notifications_pending = Gauge(
            "iotgw_notifications_pending", "Deliveries not yet acknowledged by their receiver.", registry=r
        )
        # Alerts (label values bounded by the rules file and the five severities).
        self.alerts_open = Gauge(
            "iotgw_alerts_open", "Open alerts (firing or acknowledged).", ["severity", "rule", "status"], registry=r
        )
        self.alert_transitions = Counter(
            "iotgw_alert_transitions_total", "Alert status changes, by new status.", ["status"], registry=r
        )
        self.alert_time_to_ack = Histogram(
            "iotgw_alert_time_to_acknowledge_seconds", "Fired to acknowledged.", buckets=HUMAN_BUCKETS, registry=r
        )
        self.alert_time_to_resolve = Histogram(
            "iotgw_alert_time_to_resolve_seconds", "Fired to resolved.", buckets=HUMAN_BUCKETS, registry=r
        )
        self.work_orders_open = Gauge(
            "iotgw_work_orders_open", "Open work orders, by priority and status.", ["priority", "status"], registry=r
        )
        self.work_order_time_to_assign = Histogram(
            "iotgw_work_order_time_to_assign_seconds",
            "Work order created to first assigned.",
            buckets=(0.1, 0.5, 1, *HUMAN_BUCKETS),
            registry=r,
        )
        self.work_order_time_to_ack = Histogram(
            "iotgw_work_order_time_to_acknowledge_seconds",
            "Work order created to acknowledged by a technician.",
            buckets=HUMAN_BUCKETS,
            registry=r,
        )
        self.work_order_time_to_resolve = Histogram(
            "iotgw_work_order_time_to_resolve_seconds",
            "Work order created to resolved.",
            buckets=HUMAN_BUCKETS,
            registry=r,
        )
        self.work_order_escalations = Counter(
            "iotgw_work_order_escalations_total",
            "Work orders escalated to a further level (or re-notified at the last), by the level reached.",
            ["level"],
            registry=r,
        )


class AlertMetrics:
    """Alert gauges and histograms, read from the alerts tables (the engine stays metric-free)."""

    def __init__(self) -> None:
        self.last_transition = 0
        self.seen_open: set[tuple[str, str, str]] = set()
        self._started = False

    def publish(self, tx: Session, metrics: Any) -> None:  # noqa: ANN401 - alerts.metrics.AlertFamilies
        """Observe the transitions written since the last call, and set the open-alert gauges."""
        if not self._started:
            for status in AlertStatus:
                metrics.alert_transitions.labels(status.value)  # 0 from the start, not absent
            self._started = True
        rows = tx.exec(
            select(AlertTransitionRow, AlertRow)
            .join(AlertRow, col(AlertRow.id) == col(AlertTransitionRow.alert_id))
            .where(col(AlertTransitionRow.id) > self.last_transition)
            .order_by(col(AlertTransitionRow.id))
        ).all()
        for tr, alert in rows:
            metrics.alert_transitions.labels(tr.to_status).inc()
            spent = (tr.at - alert.fired_at).total_seconds()
            if tr.to_status == AlertStatus.ACKNOWLEDGED.value:
                metrics.alert_time_to_ack.observe(max(spent, 0.0))
            elif tr.to_status == AlertStatus.RESOLVED.value:
                metrics.alert_time_to_resolve.observe(max(spent, 0.0))
            self.last_transition = tr.id or self.last_transition
        counts: dict[tuple[str, str, str], int] = {}
        for a in tx.exec(select(AlertRow).where(col(AlertRow.status).in_(OPEN))):
            k = (a.severity, a.rule, a.status)
            counts[k] = counts.get(k, 0) + 1
        for k in self.seen_open | set(counts):
            metrics.alerts_open.labels(*k).set(counts.get(k, 0))
        self.seen_open |= set(counts)


class WorkOrderMetrics:
    """Work-order gauges and histograms, read from the timeline (the consumer stays metric-free)."""

    def __init__(self, levels: int = 0) -> None:
        self.last_entry = 0
        self.seen_open: set[tuple[str, str]] = set()
        self.levels = levels  # escalation levels of the longest policy: their series exist from the start

    def publish(self, tx: Session, metrics: Any) -> None:  # noqa: ANN401 - alerts.metrics.AlertFamilies
        """Observe the steps written since the last call, and set the open-order gauges."""
        for level in range(1, self.levels + 1):
            metrics.work_order_escalations.labels(str(level))
        rows = tx.exec(
            select(WorkOrderEntryRow, WorkOrderRow)
            .join(WorkOrderRow, col(WorkOrderRow.id) == col(WorkOrderEntryRow.work_order_id))
            .where(col(WorkOrderEntryRow.id) > self.last_entry)
            .order_by(col(WorkOrderEntryRow.id))
        ).all()
        for entry, order in rows:
            spent = max((entry.at - order.created_at).total_seconds(), 0.0)
            if entry.kind == "assigned" and order.assigned_at == entry.at:
                metrics.work_order_time_to_assign.observe(spent)
            elif entry.kind in ("escalated", "renotified"):
                metrics.work_order_escalations.labels(str((entry.level or 0) + 1)).inc()
            if entry.kind in ("acknowledged", "en_route", "on_site", "resolved") and order.acked_at == entry.at:
                metrics.work_order_time_to_ack.observe(spent)
            if entry.kind == "resolved":
                metrics.work_order_time_to_resolve.observe(spent)
            self.last_entry = entry.id or self.last_entry
        counts: dict[tuple[str, str], int] = {}
        for o in tx.exec(select(WorkOrderRow).where(col(WorkOrderRow.status).in_(OPEN_ORDER))):
            k = (o.priority, o.status)
            counts[k] = counts.get(k, 0) + 1
        for k in self.seen_open | set(counts):
            metrics.work_orders_open.labels(*k).set(counts.get(k, 0))
        self.seen_open |= set(counts)
