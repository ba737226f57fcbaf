"""Alertmanager receivers are kept in step with the open alerts, as Prometheus does: every open
alert is sent again each `resend_interval`, with an `endsAt` ahead, so a lost request or either
side restarting with no memory is made good within one interval. (Beside this, each transition
goes through the receiver's delivery lane like any other notification.)"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from sqlmodel import col, select

from alerts.metrics import AlertFamilies
from alerts.notify.bodies import Links, am_alert, am_ends_at
from alerts.notify.http import post
from alerts.notify.receivers import Receiver
from alerts.tables import OPEN, AlertDeviceRow, AlertRow, SilenceRow
from gateway.errors import StoreError
from gateway.log import Store
from gateway.logs import QuietLog

log = logging.getLogger("alerts.notify.notifier")

SYNC_BATCH = 500  # alerts per request to Alertmanager
SYNC_RETRY_S = 5.0  # an Alertmanager that did not take the state is tried again this soon


class AlertmanagerSync:
    """Sends the open alerts to each Alertmanager receiver when due (from the notifier's rounds)."""

    def __init__(self, store: Store, metrics: AlertFamilies, links: Callable[[], Links]) -> None:
        self.store = store
        self.metrics = metrics
        self.links = links
        self._synced: dict[str, float] = {}  # receiver -> when all its open alerts are due again (monotonic)
        self._quiet = QuietLog(log, every_s=30.0)

    def due(self, receivers: Iterable[Receiver]) -> list[Receiver]:
        """The Alertmanager receivers whose open alerts are due to be sent again."""
        now = time.monotonic()
        return [r for r in receivers if r.kind == "alertmanager" and self._synced.get(r.name, 0) <= now]

    def round(self, receiver: Receiver) -> bool:
        """Send the state now (in a thread of its own); whether every URL took it."""
        name = receiver.name
        try:
            ok = self.sync(receiver)
        except StoreError as exc:
            self._quiet.warn("store", "alertmanager %s: database error: %s", name, exc)
            ok = False
        except Exception:  # a bug must not end the sender: said, and tried again
            log.exception("alertmanager %s: unexpected error", name)
            ok = False
        # Sent: again after the resend interval; not: soon (Alertmanager restarting, say).
        wait = receiver.resend_interval if ok else min(receiver.resend_interval, SYNC_RETRY_S)
        self._synced[name] = time.monotonic() + wait
        return ok

    def sync(self, receiver: Receiver, now: datetime | None = None) -> bool:
        """Send every open alert to Alertmanager (each of its URLs), as Prometheus does: state, not
        one message per change. A lost request, or either side restarting with no memory, is made
        good within one resend interval. Alerts under a silence of the gateway's are not sent (they
        end in Alertmanager with their endsAt); when the silence ends they are sent again."""
        now = now or datetime.now(UTC)
        links = self.links()
        with self.store.session() as tx:
            alerts = list(tx.exec(select(AlertRow).where(col(AlertRow.status).in_(OPEN)).order_by(col(AlertRow.id))))
            silences = list(tx.exec(select(SilenceRow).where(col(SilenceRow.ends_at) > now)))
            devices = {a.device_id for a in alerts}
            seen = tx.exec(select(AlertDeviceRow).where(col(AlertDeviceRow.device_id).in_(devices))).all()
            types = {d.device_id: d.type for d in seen}
        wanted = [
            a for a in alerts
            if (receiver.severities is None or a.severity in receiver.severities)
            and not any(s.matches(a, now) for s in silences)
        ]  # fmt: skip
        bodies = [am_alert(a, types.get(a.device_id), links, am_ends_at(receiver, a, now)) for a in wanted]
        ok = True
        for i in range(0, len(bodies), SYNC_BATCH):
            content = json.dumps(bodies[i : i + SYNC_BATCH], separators=(",", ":")).encode()
            for url in receiver.targets:
                outcome, error, _ = post(url, content, {"Content-Type": "application/json"}, receiver.timeout_s)
                if outcome != "delivered":
                    ok = False
                    self._quiet.warn(f"sync:{receiver.name}", "alertmanager %s at %s: %s", receiver.name, url, error)
        self.metrics.notification_receiver_failing.labels(receiver.name).set(0 if ok else 1)
        return ok
