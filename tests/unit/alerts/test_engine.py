"""The alert engine on its own, in-process: inhibition, the broker's absence, and which readings a span reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlmodel import select

from alerts.tables import AlertRow

INHIBIT_RULES = """
rules:
  - name: device-offline
    severity: warning
    summary: "{device} offline"
    event: {type: device.offline, clear: {type: device.online}}
  - name: site-power-lost
    severity: critical
    summary: "power lost at {site}"
    select: {type: [power]}
    threshold: {below: 50, clear_above: 500}
    inhibits: [device-offline]
  - name: silent
    severity: warning
    summary: "{device} silent"
    absence: {heartbeat: 60s}
"""


def _engine_store(make_store: Callable[[], Any]) -> tuple[Any, Any]:
    from alerts.engine import AlertEngine  # noqa: PLC0415
    from alerts.loading import load_rules  # noqa: PLC0415

    store = make_store()
    return AlertEngine(load_rules(INHIBIT_RULES)), store


def _event(etype: str, subject: str, site: str, t: Any, **data: Any) -> Any:
    from gateway.core.events import Event  # noqa: PLC0415

    return Event(id=f"{subject}-{etype}-{t}", source=f"devices/{subject}", type=etype, time=t, subject=subject,
                 data=data, site=site)  # fmt: skip


def test_a_site_power_failure_inhibits_offline_alerts_at_that_site_only(make_store: Callable[[], Any]) -> None:
    from datetime import UTC, datetime  # noqa: PLC0415

    engine, store = _engine_store(make_store)
    t = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    with store.session() as tx:
        engine.handle([_event("sensor.reading", "pwr-1", "hq", t, value=3.0, unit="W")], tx)
        engine.handle([_event("device.offline", "el-1", "hq", t), _event("device.offline", "el-2", "north", t)], tx)
        tx.commit()
    with store.session() as tx:
        fired = sorted((a.rule, a.device_id) for a in tx.exec(select_alerts(AlertRow)))
    assert fired == [("device-offline", "el-2"), ("site-power-lost", "pwr-1")]


def test_no_absence_alerts_while_the_broker_is_lost_and_one_heartbeat_after(make_store: Callable[[], Any]) -> None:
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415

    engine, store = _engine_store(make_store)
    connected = {"up": True}
    engine.broker_connected = lambda: connected["up"]
    t = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    with store.session() as tx:
        engine.handle([_event("sensor.reading", "hum-1", "hq", t, value=40.0, unit="%RH")], tx)
        tx.commit()

    def tick(at: datetime) -> list[str]:
        with store.session() as tx:
            engine.tick(tx, at)
            tx.commit()
            return [a.rule for a in tx.exec(select_alerts(AlertRow))]

    connected["up"] = False
    assert tick(t + timedelta(seconds=300)) == []  # silent, but the gateway hears nothing at all
    connected["up"] = True
    assert tick(t + timedelta(seconds=330)) == []  # back: every device gets one heartbeat
    assert tick(t + timedelta(seconds=400)) == ["silent"]


def select_alerts(row: Any) -> Any:

    return select(row)


def test_only_readings_beyond_their_own_rules_limits_are_read_one_by_one(tmp_path: Path) -> None:
    # The SQLite fast path (the log's speakers, with their beyond flag) itself; other databases
    # take the readings one by one.
    from datetime import UTC, datetime  # noqa: PLC0415

    from alerts.engine import AlertEngine  # noqa: PLC0415
    from alerts.loading import load_rules  # noqa: PLC0415
    from alerts.state import reading_limits  # noqa: PLC0415
    from gateway.core.events import Event  # noqa: PLC0415
    from gateway.log import Store, spans  # noqa: PLC0415

    engine = AlertEngine(load_rules(RULES_WITH_TWO_LIMITS))
    store = Store(f"sqlite:///{tmp_path / 'limits.db'}")
    store.create_schema()
    t = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    readings = [("t-cool", 21.0, "C"), ("t-hot", 35.0, "C"), ("p-ok", 1500.0, "W"), ("p-dead", 3.0, "W")]
    store.append_batch(
        [Event(f"{d}-1-0", f"devices/{d}", "sensor.reading", t, d, {"value": v, "unit": u}, 1, 0, "hq")
         for d, v, u in readings],
        [], [], now=t,
    )  # fmt: skip
    limits = reading_limits(engine.rules)
    assert limits is not None
    with store.session() as tx:
        assert spans.in_sql(tx)
        found = spans.speakers(tx, 0, 10, limits)
        hot = spans.readings_of(tx, 0, 10, ["t-hot", "p-dead"])
    # A thermometer at 21 C is not "below 50" just because the power rule says so.
    assert sorted(s.device_id for s in found if s.beyond) == ["p-dead", "t-hot"]
    assert sorted(s.device_id for s in found) == sorted(d for d, _v, _u in readings)  # every reader, beyond or not
    assert {s.device_id: s.unit for s in found} == {d: u for d, _v, u in readings}
    assert all(s.last_received == t for s in found)
    assert [e.subject for e in hot] == ["t-hot", "p-dead"]  # in log order, whatever order asked in


RULES_WITH_TWO_LIMITS = """
rules:
  - name: hot
    severity: minor
    summary: hot
    select: {type: [temperature]}
    threshold: {above: 30, clear_below: 28}
  - name: power-lost
    severity: critical
    summary: dead
    select: {type: [power]}
    threshold: {below: 50, clear_above: 500}
"""
