"""The alerts plugin: the alert engine and dispatch consumers, and everything beside them in the
gateway's process: their routes, metrics, the notifier, their part of the live stream, and the
`iotgw rules` and `iotgw roster` commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from prometheus_client import CollectorRegistry
from sqlmodel import Session, col, select

from alerts.dispatch import routes as work_orders
from alerts.dispatch.orders import OPEN_ORDER, WorkOrderAlertRow, WorkOrderRow
from alerts.dispatch.roster import load_roster_file
from alerts.loading import FileProblemsError, load_rules_file
from alerts.metrics import AlertFamilies, AlertMetrics, WorkOrderMetrics
from alerts.notify.bodies import Links
from alerts.notify.notifier import Notifier
from alerts.notify.receivers import Receiver
from alerts.routes import ack, alerts, silences
from alerts.tables import OPEN, AlertRow
from gateway.log import DeviceRow
from gateway.plugins import Plugin
from gateway.runtime.leases import Lease
from gateway.tasks import stop_task
from gateway.text import plural

log = logging.getLogger(__name__)
LIVE_MAX = 200  # most alerts and work orders in one snapshot of the live stream
PUBLISH_EVERY_S = 2.0


class AlertsPlugin(Plugin):
    """Active with the alert engine or dispatch (or both)."""

    name = "alerts"
    consumers = ("alerts", "dispatch")
    event_types = ("alert.firing", "alert.acknowledged", "alert.flapping", "alert.resolved", "workorder.*")
    migrations = "alerts.migrations"

    def __init__(self, host: Any) -> None:  # noqa: ANN401 - gateway.plugins.Host
        super().__init__(host)
        self.notifier: Notifier | None = None
        self._notifier_task: asyncio.Task[None] | None = None

    @classmethod
    def define_metrics(cls, registry: CollectorRegistry) -> AlertFamilies:
        return AlertFamilies(registry)

    @classmethod
    def add_commands(cls, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        for kind, about in (("rules", "alert rules"), ("roster", "the maintenance roster")):
            group = commands.add_parser(kind, help=about)
            sub = group.add_subparsers(dest=f"{kind}_command", required=True)
            check = sub.add_parser("check", help=f"validate a {kind} file; errors name their line")
            check.add_argument("file", type=Path, help=f"the {kind} file (YAML)")
            check.set_defaults(func=lambda args, kind=kind: check_file(kind, args.file))

    def ui(self) -> dict[str, Path]:
        """The staff page at /ui/."""
        return {"/ui": Path(__file__).resolve().parent / "ui"}

    def api(self) -> APIRouter:
        router = APIRouter()
        for module in (alerts, silences, work_orders):
            router.include_router(module.router)
        return router

    def pages(self) -> APIRouter:
        """The pages acknowledge links open (/ack/...): the signed link is their credential."""
        return ack.router

    def live(self, tx: Session) -> dict[str, Any]:
        """The open alerts (newest first) and open work orders (most urgent first)."""
        open_alerts = tx.exec(
            select(AlertRow).where(col(AlertRow.status).in_(OPEN)).order_by(col(AlertRow.id).desc()).limit(LIVE_MAX)
        ).all()
        orders = tx.exec(
            select(WorkOrderRow)
            .where(col(WorkOrderRow.status).in_(OPEN_ORDER))
            .order_by(col(WorkOrderRow.priority), col(WorkOrderRow.id).desc())
            .limit(LIVE_MAX)
        ).all()
        attached: dict[int, list[int]] = {}
        for link in tx.exec(
            select(WorkOrderAlertRow).where(col(WorkOrderAlertRow.work_order_id).in_([o.id for o in orders]))
        ):
            attached.setdefault(link.work_order_id, []).append(link.alert_id)
        # Only a trapped passenger's elevator: every other device's readings would change the
        # snapshot, and push it again, at each message.
        trapped = {o.device_id for o in orders if o.priority == "P1"}
        devices = {d.device_id: d for d in tx.exec(
            select(DeviceRow).where(col(DeviceRow.device_id).in_(trapped)))} if trapped else {}  # fmt: skip
        return {
            "alerts": [alerts.AlertPublic.model_validate(a, from_attributes=True).model_dump(mode="json")
                       for a in open_alerts],
            # Each order with the ids of its alerts (the staff page shows them inside it); a P1
            # order with its device's state now (the card says the load, the floor, since when).
            "work_orders": [{**work_orders.public(o).model_dump(mode="json"),
                             "alert_ids": sorted(attached.get(o.id or 0, [])),
                             "device": device_now(devices.get(o.device_id)) if o.priority == "P1" else None}
                            for o in orders],
        }  # fmt: skip

    # --- what the consumers were configured with ---

    def receivers(self) -> list[Receiver]:
        """Where every alert notification goes: the rules file's receivers."""
        engine = self.host.consumers.get("alerts")
        return list(getattr(engine, "receivers", None) or [])

    def pagers(self) -> list[Receiver]:
        """People's contacts for work-order pages: the roster's receivers (read afresh: the API may edit it)."""
        roster = getattr(self.host.consumers.get("dispatch"), "roster", None)
        return list(getattr(roster, "receivers", None) or [])

    def links(self) -> Links:
        """The staff page's address and the alert rules, for what notifications link and label."""
        rules = getattr(self.host.consumers.get("alerts"), "rules", None)
        settings = self.host.settings
        zone = str(getattr(settings, "time_zone", "UTC") or "UTC")
        key, valid = (
            str(getattr(settings, "ack_link_key", "") or ""),
            float(getattr(settings, "ack_link_valid_s", 86400)),
        )
        return Links(self.host.public_url, {r.name: r for r in rules or ()}, zone, key, valid)

    # --- in the gateway's process ---

    async def run(self) -> None:
        """Deliver notifications (under the notifier's lease) and keep the gauges current."""
        names = [r.name for r in self.receivers()] + [r.name for r in self.pagers()]
        if names:
            settings = self.host.settings
            self.notifier = Notifier(
                self.host.store, self.receivers, self.metrics, pagers=self.pagers,
                lease=Lease("notifier", settings.instance_name, settings.lease_s),
                max_age_s=settings.notify_max_age_s, links=self.links,
            )  # fmt: skip
            self._notifier_task = asyncio.create_task(self.notifier.run(), name="iotgw-notifier")
            log.info("notifications to %s", ", ".join(names))
            both = sorted({r.name for r in self.receivers()} & {r.name for r in self.pagers()})
            if both:  # each delivers its own, but they share their metrics' labels and log lines
                log.warning("receiver name(s) %s in both the rules file and the roster: rename one to tell them apart",
                            ", ".join(both))  # fmt: skip
        await self._publish()

    async def stop(self) -> None:
        if self.notifier is not None and self._notifier_task is not None:
            # Let it finish the round in hand: its thread must not hold a connection past close().
            self.notifier.stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._notifier_task), 15)
        await stop_task(self._notifier_task)

    async def _publish(self) -> None:
        publishers: list[Any] = []
        if "alerts" in self.host.consumers:
            publishers.append(AlertMetrics())
        dispatch = self.host.consumers.get("dispatch")
        if dispatch is not None:
            levels = max((len(p.levels) for p in getattr(dispatch.roster, "policies", [])), default=0)
            publishers.append(WorkOrderMetrics(levels))

        def once() -> None:
            with self.host.store.session() as tx:
                for publisher in publishers:
                    publisher.publish(tx, self.metrics)

        await self.host.every(PUBLISH_EVERY_S, once, "alert metrics")


def check_file(kind: str, path: Path) -> int:
    """`iotgw rules check` / `iotgw roster check`: 0 and a summary, or 1 and every problem with its line."""
    try:
        if kind == "rules":
            ruleset = load_rules_file(path)
            kinds = ", ".join(sorted({r.kind for r in ruleset.rules}))
            summary = (
                f"{plural(len(ruleset.rules), 'rule')} OK ({kinds})"
                if ruleset.rules
                else ("no rules: valid, but the alert engine would raise no alert")
            )
        else:
            roster = load_roster_file(path)
            counts = [
                (sum(t.role == r for t in roster.technicians), r) for r in ("technician", "supervisor", "manager")
            ]
            roles = ", ".join(plural(n, r) for n, r in counts)
            summary = f"OK ({roles}; {plural(len(roster.policies), 'escalation policy', 'escalation policies')})"
            if counts[0][0] == 0:
                summary += "; no technician: every order goes past that level to the next at once"
    except FileProblemsError as exc:
        print(exc, file=sys.stderr)  # noqa: T201
        return 1
    print(f"{path}: {summary}")  # noqa: T201
    receivers = ruleset.receivers if kind == "rules" else roster.receivers
    for r in receivers:  # (read at each try: it may be there only where the gateway runs)
        if r.urls_file and not os.access(r.urls_file, os.R_OK):
            print(f"{path}: note: receiver {r.name}: urls_file {r.urls_file} cannot be read here;"  # noqa: T201
                  " its messages wait (retried) until it can", file=sys.stderr)  # fmt: skip
    return 0


def device_now(row: DeviceRow | None) -> dict[str, Any] | None:
    """A device's shadow as the live view shows it: online, its state, since when at this floor or in fault."""
    if row is None:
        return None
    at = {
        k: v.isoformat() if v else None
        for k, v in (("last_seen", row.last_seen), ("floor_since", row.floor_since), ("fault_since", row.fault_since))
    }
    return {"online": row.online, "state": row.state, **at}
