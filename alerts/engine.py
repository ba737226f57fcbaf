"""The alert engine consumer: evaluates the rules over the log, with timers for absence and flapping.

One class of some 400 lines on purpose: the three ways the log reaches it (batches of events,
spans of sensor readings, ticks of the clock) share its batch state and its one transition
path. What can stand alone already does: the rules and their pure evaluation (`rules`,
`evaluation`), the stored state (`state`) and the alert lifecycle (`lifecycle`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from msgspec.structs import replace
from sqlalchemy import delete, event
from sqlmodel import Session, col, select

from alerts.evaluation import KeyState, Observation, Signal, step
from alerts.lifecycle import RECONCILING, before_replay, change_status, is_rebuilding, record, resolve
from alerts.loading import load_rules_file
from alerts.notify.receivers import Receiver
from alerts.rules import DeviceInfo, Rule, RuleSet
from alerts.state import (
    VOLATILE,
    Batch,
    DeviceView,
    absence_only_moved,
    clears_later,
    decode,
    encode,
    lasting,
    may_change,
    project,
    reading_limits,
)
from alerts.tables import OPEN, AlertDeviceRow, AlertKeyRow, AlertReplayIdRow, AlertRow, AlertStatus, AlertTransitionRow
from gateway.core import events as ev
from gateway.core.events import Event
from gateway.core.protocol import sensor_type_of
from gateway.log import read_events, replaying, spans, upsert
from gateway.runtime import BaseConsumer

log = logging.getLogger(__name__)


SHIPPED_RULES = Path(__file__).resolve().parent / "rules.yaml"


class AlertEngine(BaseConsumer):
    """Runs the alert rules over the log and keeps alerts (consumer `alerts`).

    Device views and key states live in memory (loaded once, all of them, so that silent
    devices tick too); a batch works on copies, writes only what changed, and the copies become
    the new memory after the commit: a rolled-back batch leaves memory as the database has it.
    """

    name = "alerts"
    # Sensor readings (most of the log) come through handle_span; everything else one by one.
    types = ("device.*", "elevator.*")
    replay_resets_state = True
    linger_s = 0.05  # alerts are real-time: wait only briefly for more events
    batch_size = 2000  # a span of readings costs little more than one of 500, a round much
    tick_s = 1.0

    def __init__(self, rules: RuleSet | None = None, *, alerts_in_maintenance: bool = False) -> None:
        ruleset = rules or load_rules_file(SHIPPED_RULES)
        self.rules: list[Rule] = list(ruleset.rules)
        self.receivers: list[Receiver] = list(ruleset.receivers)
        self.alerts_in_maintenance = alerts_in_maintenance
        # Set by the gateway: whether it holds its broker session (inhibits absence alerts).
        self._absence_quiet_until: datetime | None = None
        self.forget()

    def configure(self, settings: Any) -> None:  # noqa: ANN401 - gateway.config.Settings
        """Load the configured rules file (or the shipped one)."""
        path = Path(settings.rules_file) if settings.rules_file else SHIPPED_RULES
        ruleset = load_rules_file(path)
        self.rules = list(ruleset.rules)
        self.receivers = list(ruleset.receivers)
        self.alerts_in_maintenance = bool(settings.alerts_in_maintenance)
        self.forget()
        log.info("alert engine: %d rules from %s", len(self.rules), path)

    def forget(self) -> None:
        """Drop what is held in memory; it is loaded again from the database when next needed."""
        self._loaded = False
        self._kept_pending = False  # alerts kept by a replay wait for the first tick after it (tick)
        self._flapping: dict[tuple[str, str], datetime] = {}  # key -> last toggle of its flapping alert
        self._current: Batch | None = None
        self._devices: dict[str, DeviceView] = {}
        self._keys: dict[tuple[str, str], KeyState] = {}  # as stored (or as good: see absence_only_moved)
        self._by_type: dict[tuple[str, str, str | None, str | None], list[Rule]] = {}
        self._by_name = {r.name: r for r in self.rules}

    def reset(self, tx: Session) -> None:
        """Forget everything derived (alerts included) before a replay from the start.

        The replay rebuilds it silently (`replaying`: no events, no notifications: they were sent
        already, and stay in the outbox), and each rebuilt alert takes the id it had."""
        # Asked for during another replay: what was kept at the first is what happened.
        waiting = {k.id: k for k in tx.exec(select(AlertReplayIdRow))}
        for k in waiting.values():
            k.taken = False
            tx.add(k)
        kept = [
            {"id": a.id, "rule": a.rule, "device_id": a.device_id, "fired_at": a.fired_at, "status": a.status,
             "resolved_at": a.resolved_at, "taken": False}
            for a in tx.exec(select(AlertRow))
            if a.id not in waiting
        ]  # fmt: skip
        if kept:
            tx.execute(AlertReplayIdRow.__table__.insert(), kept)  # type: ignore[attr-defined]
        for table in (AlertTransitionRow, AlertRow, AlertKeyRow, AlertDeviceRow):
            tx.exec(delete(table))
        self.forget()
        self._loaded = True  # the tables are empty now
        self._kept_pending = bool(kept or waiting)

    def _load(self, tx: Session) -> None:
        if self._loaded:
            return
        for d in tx.exec(select(AlertDeviceRow)):
            self._devices[d.device_id] = DeviceView(d.type, d.site, dict(d.state))
        for k in tx.exec(select(AlertKeyRow)):
            if k.rule in self._by_name:
                self._keys[(k.rule, k.device_id)] = decode(dict(k.state))
        for a in tx.exec(select(AlertRow).where(col(AlertRow.status) == AlertStatus.FLAPPING.value)):
            self._flapping[(a.rule, a.device_id)] = a.updated_at
        self._kept_pending = tx.exec(select(AlertReplayIdRow.id).limit(1)).first() is not None
        self._loaded = True

    def _rules_for(self, event_type: str, device_id: str, dev: DeviceView) -> list[Rule]:
        """The rules that select this device and that an event of this type can affect (cached)."""
        cache_key = (event_type, device_id, dev.type, dev.site)
        rules = self._by_type.get(cache_key)
        if rules is None:
            info = DeviceInfo(device_id, dev.type, dev.site)
            rules = [r for r in self.rules if may_change(r, event_type) and r.select.matches(info)]
            self._by_type[cache_key] = rules
        return rules

    def _batch(self, tx: Session) -> Batch:
        b = self._current
        if b is None or b.tx is not tx:
            b = self._current = Batch(tx)
            # Memory follows the database: only what commits is remembered.
            event.listen(tx, "after_commit", lambda _s: self._remember(b), once=True)
            event.listen(tx, "after_rollback", lambda _s: self._discard(b), once=True)
        return b

    def _remember(self, b: Batch) -> None:
        self._devices.update(b.devices)
        self._keys.update(b.written)
        for key, since in b.flaps.items():
            if since is None:
                self._flapping.pop(key, None)
            else:
                self._flapping[key] = since
        self._discard(b)

    def _discard(self, b: Batch) -> None:
        if self._current is b:
            self._current = None

    def _device(self, b: Batch, device_id: str) -> DeviceView:
        dev = b.devices.get(device_id)
        if dev is None:
            known = self._devices.get(device_id)
            dev = b.devices[device_id] = (
                DeviceView(known.type, known.site, dict(known.state)) if known else DeviceView()
            )
        return dev

    def handle(self, events: Sequence[Event], tx: Session) -> None:
        """Update each device's view, then step the rules an event can affect."""
        self._load(tx)
        b = self._batch(tx)
        for e in events:
            dev = self._device(b, e.subject)
            project(dev, e)
            self._observe(tx, b, e, dev)
        self._write(tx, b)

    def _observe(self, tx: Session, b: Batch, e: Event, dev: DeviceView) -> None:
        rebuilding = replaying(tx)
        device_id = e.subject
        obs = Observation(e.time, e.type, e.data, dev.state)
        # Silence is measured on the gateway's clock, as the timer measures it: a device whose
        # clock runs behind must not look silent (its events keep their own time otherwise).
        heard = replace(obs, time=e.received_at) if e.received_at is not None else obs
        for rule in self._rules_for(obs.event_type, device_id, dev):
            seen = heard if rule.absence is not None else obs
            k = (rule.name, device_id)
            before = b.keys.get(k) or self._keys.get(k) or KeyState()
            if rebuilding:
                before = self._catch_up(tx, rule, device_id, dev, before, seen.time)
            new, signal = step(rule, before, seen, seen.time)
            b.keys[k] = new
            if signal is not None and not self._transition(
                tx, rule, device_id, dev, signal, seen.time, {**dev.state, **e.data}
            ):
                b.keys[k] = before  # held back for now: the key fires again when it may
            elif signal is None:
                self._settle_flapping(tx, k, new, seen.time)

    def _catch_up(  # noqa: PLR0913, PLR0917
        self, tx: Session, rule: Rule, device_id: str, dev: DeviceView, ks: KeyState, at: datetime
    ) -> KeyState:
        """During a replay, events come faster than time passed: before an event, what the timer
        did to its key up to then (a device silent beyond its heartbeat fired before it spoke again)."""
        new, signal = step(rule, ks, None, at)
        if signal is None:
            return new
        return new if self._transition(tx, rule, device_id, dev, signal, at, dict(dev.state)) else ks

    def handle_span(self, tx: Session, after: int, upto: int) -> None:
        """Sensor readings of the span, without reading most of them into Python.

        Every reading says its device is alive (one aggregate row per device is enough for that),
        but only readings that can move a threshold key matter one by one: values beyond the
        rules' limits, and all readings of devices whose keys are breaching or firing.
        """
        self._load(tx)
        b = self._batch(tx)
        limits = reading_limits(self.rules)
        # A replay reads every reading: the gaps between a device's readings are what its
        # absence rules fired on the first time.
        if not spans.in_sql(tx) or limits is None or replaying(tx):
            readings = read_events(tx, after, upto, (ev.SENSOR_READING,))
        else:
            beyond: set[str] = set()
            for sp in spans.speakers(tx, after, upto, limits):
                if sp.beyond:
                    beyond.add(sp.device_id)
                dev = self._device(b, sp.device_id)
                dev.site = sp.site or dev.site
                dev.type = dev.type or sensor_type_of(sp.unit)
                at = sp.last_received
                for rule in self._rules_for(ev.SENSOR_READING, sp.device_id, dev):
                    if rule.absence is None:
                        continue
                    k = (rule.name, sp.device_id)
                    before = b.keys.get(k) or self._keys.get(k) or KeyState()
                    new, signal = step(rule, before, Observation(at, ev.SENSOR_READING, {}, dev.state), at)
                    b.keys[k] = new
                    if signal is not None and not self._transition(tx, rule, sp.device_id, dev, signal, at, dev.state):
                        b.keys[k] = before
            value_rules = {r.name for r in self.rules if r.threshold is not None}
            merged = {**self._keys, **b.keys}
            hot = {d for (r, d), ks in merged.items() if r in value_rules and (ks.breaching or ks.firing)}
            # Devices with a reading beyond a limit, or already breaching: all their readings, in order.
            readings = spans.readings_of(tx, after, upto, sorted(beyond | hot))
        for e in readings:
            dev = self._device(b, e.subject)
            project(dev, e)
            self._observe(tx, b, e, dev)
        self._write(tx, b)

    def tick(self, tx: Session, now: datetime) -> None:
        """Step time-driven keys (for, clear_for, clear_after, absence, rate windows) to `now`.

        The first tick after a replay settles it (`RECONCILING`): what the timer finds due now
        and what was kept from before the replay tell what happened already (an alert open then
        fires again silently, under its id; one resolved then resolves silently, at its time)
        from what is new (told as ever); then nothing is kept any more."""
        self._load(tx)
        b = self._batch(tx)
        if self._kept_pending and not replaying(tx):
            tx.info[RECONCILING] = True
            event.listen(tx, "after_commit", lambda _s: setattr(self, "_kept_pending", False), once=True)
        timed = {r.name for r in self.rules if r.absence or r.rate or r.for_ or r.clear_for or clears_later(r)}
        # (Keys of this batch too: a replay ticks in the batch that rebuilt them.)
        for (rule_name, device_id), stored in list({**self._keys, **b.keys}.items()):
            if rule_name not in timed:
                continue
            rule = self._by_name[rule_name]
            old = b.keys.get((rule_name, device_id), stored)
            new, signal = step(rule, old, None, now)
            if new != old:
                b.keys[(rule_name, device_id)] = new
            if signal is not None:
                dev = self._devices.get(device_id) or DeviceView()
                if not self._transition(tx, rule, device_id, dev, signal, now, dict(dev.state)):
                    b.keys[(rule_name, device_id)] = old  # held back: the next tick tries again
        self._write(tx, b)
        if tx.info.get(RECONCILING):
            tx.exec(delete(AlertReplayIdRow))

    def _inhibited(self, tx: Session, rule: Rule, dev: DeviceView, at: datetime) -> str | None:
        """Why this rule may not fire now: "broker" (lost; absence rules), "site" (an inhibiting alert)."""
        if rule.absence is not None and self.broker_connected is not None:
            if not self.broker_connected():
                self._absence_quiet_until = at + timedelta(seconds=rule.absence.heartbeat)
                return "broker"  # the gateway hears nothing: silence says nothing about the devices
            if self._absence_quiet_until is not None and at < self._absence_quiet_until:
                return "broker"  # after the broker came back, give every device one heartbeat
        inhibitors = [r.name for r in self.rules if rule.name in r.inhibits]
        if not inhibitors or dev.site is None:
            return None
        blocking = tx.exec(
            select(AlertRow.id).where(
                col(AlertRow.rule).in_(inhibitors), col(AlertRow.site) == dev.site, col(AlertRow.status).in_(OPEN)
            )
        ).first()
        return "site" if blocking is not None else None

    def _settle_flapping(self, tx: Session, key: tuple[str, str], ks: KeyState, at: datetime) -> None:
        """Resolve a flapping alert once an event shows its condition clear for a whole flap window.

        Decided on event times only, so a replay or a restart decides it the same way.
        """
        flaps = self._batch(tx).flaps
        since = flaps.get(key, self._flapping.get(key))
        rule = self._by_name.get(key[0])
        if since is None or rule is None or ks.firing or at - since < timedelta(seconds=rule.flap_window):
            return
        alert = tx.exec(
            select(AlertRow).where(
                col(AlertRow.rule) == key[0],
                col(AlertRow.device_id) == key[1],
                col(AlertRow.status) == AlertStatus.FLAPPING.value,
            )
        ).first()
        if alert is not None:
            resolve(tx, alert, at, "engine", "stopped flapping")
        flaps[key] = None

    def _write(self, tx: Session, b: Batch) -> None:
        """Upsert what changed (compared with memory); may run several times in one transaction."""
        devices = [
            {"device_id": device_id, "type": dev.type, "site": dev.site, "state": dev.state}
            for device_id, dev in b.devices.items()
            if lasting(self._devices.get(device_id)) != lasting(dev)
        ]
        keys = []
        for k, v in b.keys.items():
            old = self._keys.get(k)
            if v != old and not absence_only_moved(self._by_name[k[0]], old, v) and b.written.get(k) != v:
                keys.append({"rule": k[0], "device_id": k[1], "state": encode(v)})
                b.written[k] = v
        upsert(tx, AlertDeviceRow, devices, ["device_id"])
        upsert(tx, AlertKeyRow, keys, ["rule", "device_id"])

    def _transition(  # noqa: PLR0913, PLR0917
        self,
        tx: Session,
        rule: Rule,
        device_id: str,
        dev: DeviceView,
        signal: Signal,
        at: datetime,
        values: dict[str, Any],
    ) -> bool:
        """Apply a signal to the alert of (rule, device); False when a FIRE must wait (broker lost)."""
        open_alert = tx.exec(
            select(AlertRow).where(
                col(AlertRow.rule) == rule.name,
                col(AlertRow.device_id) == device_id,
                col(AlertRow.status).in_(OPEN),
            )
        ).first()
        if open_alert is not None and open_alert.status == AlertStatus.FLAPPING.value:
            # While flapping, toggles only move the quiet-period clock (see tick); no notifications.
            open_alert.updated_at = at
            tx.add(open_alert)
            self._batch(tx).flaps[(rule.name, device_id)] = at
            return True
        if signal is Signal.FIRE:
            if open_alert is not None:
                return True  # exactly one open alert per (rule, device)
            if dev.state.get("mode") == "maintenance" and not self.alerts_in_maintenance:
                return True  # planned work: no alerts
            inhibited = self._inhibited(tx, rule, dev, at)
            if inhibited:
                return inhibited != "broker"
            recent = tx.exec(
                select(AlertRow)
                .where(
                    col(AlertRow.rule) == rule.name,
                    col(AlertRow.device_id) == device_id,
                    col(AlertRow.fired_at) >= at - timedelta(seconds=rule.flap_window),
                )
                .order_by(col(AlertRow.id))
            ).all()
            if recent and len(recent) + 1 >= rule.flap_count:
                # Firing again and again within the window: reopen the first one, as flapping.
                alert = recent[0]
                self._batch(tx).flaps[(rule.name, device_id)] = at
                change_status(tx, alert, AlertStatus.FLAPPING, at, "engine", f"fired {len(recent) + 1} times")
                return True
            info = DeviceInfo(device_id, dev.type, dev.site)
            # Rebuilt by a replay: the alert it was, under its id and from when it fired then.
            alert_id, fired_at = before_replay(tx, rule.name, device_id, at)
            alert = AlertRow(
                id=alert_id,
                rule=rule.name, device_id=device_id, site=dev.site, severity=rule.severity.value,
                status=AlertStatus.FIRING.value, summary=rule.render(info, values)[:500], fired_at=fired_at,
                updated_at=fired_at,
            )  # fmt: skip
            tx.add(alert)
            tx.flush()
            # What dispatch needs to decide (an entrapment is a stuck car with load inside).
            context = {"device_type": dev.type, "state": {k: v for k, v in values.items() if k not in VOLATILE}}
            record(tx, alert, None, AlertStatus.FIRING, fired_at, "engine", context=context)
        elif open_alert is not None:
            kept = tx.get(AlertReplayIdRow, open_alert.id) if is_rebuilding(tx) else None
            if kept is not None and kept.resolved_at is not None and kept.status == AlertStatus.RESOLVED.value:
                at = max(kept.resolved_at, open_alert.fired_at)  # rebuilt: it resolved then
            resolve(tx, open_alert, at, "engine", "condition cleared")
        return True
