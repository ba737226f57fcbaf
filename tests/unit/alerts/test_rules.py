"""Alert rules: loading with line numbers, and pure evaluation (time is an input)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alerts.evaluation import KeyState, Observation, Signal, step
from alerts.loading import RulesError, load_rules, load_rules_file
from alerts.notify.receivers import parse_duration
from alerts.rules import DeviceInfo, Rule
from tests.support.gateway import ROOT

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def rule(**kw: Any) -> Rule:
    return Rule.model_validate({"name": "r", "severity": "major", "summary": "s", **kw})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def obs(seconds: float, etype: str = "x", state: dict[str, Any] | None = None, **data: Any) -> Observation:
    return Observation(at(seconds), etype, data, state or {})


def run(r: Rule, inputs: list[tuple[float, Observation | None]]) -> list[tuple[float, Signal]]:
    ks, out = KeyState(), []
    for t, o in inputs:
        ks, sig = step(r, ks, o, at(t))
        if sig:
            out.append((t, sig))
    return out


def test_shipped_rules_are_valid() -> None:
    ruleset = load_rules_file(ROOT / "alerts" / "rules.yaml")
    assert {r.kind for r in ruleset.rules} == {"event", "state", "threshold", "absence", "rate"}


def test_errors_name_the_line_and_field() -> None:
    text = (
        "rules:\n  - name: ok\n    severity: info\n    summary: s\n    absence: {heartbeat: 1m}\n"
        "  - name: bad\n    severity: fatal\n    summary: s\n    state: {field: door, op: '~', value: 1}\n"
    )
    with pytest.raises(RulesError) as info:
        load_rules(text, "r.yaml")
    message = str(info.value)
    assert "r.yaml:7: rules.1.severity" in message
    assert "r.yaml:9: rules.1.state.op" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("rules: [", "not valid YAML"),
        ("- 1\n", "mapping with a `rules:` list"),
        ("rules:\n  - {name: a, severity: info, summary: s}\n", "exactly one condition"),
        ("rules:\n  - {name: a, severity: info, summary: s, event: {type: elevator.stuck}}\n", "needs `clear`"),
        ("rules:\n  - {name: a, severity: info, summary: s, absence: {heartbeat: 1m}, rate: {}}\n", "rules.0.rate"),
        (
            "rules:\n  - {name: a, severity: info, summary: s, absence: {heartbeat: 1m}}\n"
            "  - {name: a, severity: info, summary: s, absence: {heartbeat: 1m}}\n",
            "used twice",
        ),
    ],
)
def test_bad_rules_files_get_clear_errors(text: str, fragment: str) -> None:
    with pytest.raises(RulesError, match=fragment):
        load_rules(text)


def test_durations() -> None:
    assert [parse_duration(v) for v in (90, "90s", "5m", "1.5h", "2d", "250ms")] == [90, 90, 300, 5400, 172800, 0.25]
    for bad in ("soon", "-5s", True):
        with pytest.raises((ValueError, TypeError)):
            parse_duration(bad)


def test_repeated_and_redelivered_fault_event_fires_once_and_clears_on_its_clear_event() -> None:
    r = rule(event={"type": "elevator.fault.raised", "data": {"code": "DOOR_JAM"}, "clear": {
        "type": "elevator.fault.cleared", "data": {"code": "DOOR_JAM"}}})  # fmt: skip
    jam = {"code": "DOOR_JAM"}
    signals = run(
        r,
        [
            (1, obs(1, "elevator.fault.raised", **jam)),
            (2, obs(2, "elevator.fault.raised", **jam)),  # repeated
            (2, obs(2, "elevator.fault.raised", **jam)),  # redelivered
            (3, obs(3, "elevator.fault.cleared", code="POWER")),  # another fault's clear: no effect
            (9, obs(9, "elevator.fault.cleared", **jam)),
        ],
    )
    assert signals == [(1, Signal.FIRE), (9, Signal.CLEAR)]


def test_event_rule_can_resolve_after_a_quiet_period() -> None:
    r = rule(event={"type": "elevator.stuck", "clear_after": "60s"})
    assert run(r, [(0, obs(0, "elevator.stuck")), (30, None), (61, None)]) == [(0, Signal.FIRE), (61, Signal.CLEAR)]


def test_state_rule_with_for_fires_by_the_passing_of_time() -> None:
    r = rule(state={"field": "door", "value": "open"}, **{"for": "90s"})
    open_ = {"door": "open"}
    signals = run(
        r, [(0, obs(0, state=open_)), (60, None), (89, None), (91, None), (100, obs(100, state={"door": "closed"}))]
    )
    assert signals == [(91, Signal.FIRE), (100, Signal.CLEAR)]
    # Closing before 90 s: nothing.
    assert run(r, [(0, obs(0, state=open_)), (80, obs(80, state={"door": "closed"})), (200, None)]) == []


def test_threshold_hysteresis_inside_the_band_neither_fires_nor_clears() -> None:
    r = rule(threshold={"above": 30, "clear_below": 28})
    values = [29, 29.9, 28.5, 30, 29]  # never above 30: no alert
    assert run(r, [(i, obs(i, value=v)) for i, v in enumerate(values)]) == []
    values = [31, 29, 29.5, 28.1, 27.9]  # fires at 31, stays through the band, clears at 27.9
    assert run(r, [(i, obs(i, value=v)) for i, v in enumerate(values)]) == [(0, Signal.FIRE), (4, Signal.CLEAR)]


@given(st.lists(st.floats(min_value=28.01, max_value=30.0), max_size=50))
def test_values_inside_the_hysteresis_band_never_fire(values: list[float]) -> None:
    r = rule(threshold={"above": 30, "clear_below": 28})
    assert run(r, [(i, obs(i, value=v)) for i, v in enumerate(values)]) == []


def test_consecutive_breaches_are_needed_to_fire_and_clear_for_delays_the_clear() -> None:
    r = rule(threshold={"above": 10, "clear_below": 7}, consecutive=3, clear_for="30s")
    seq = [11, 12, 6, 11, 11, 11, 5, 5]
    times = [0, 1, 2, 3, 4, 5, 6, 40]
    assert run(r, [(t, obs(t, value=v)) for t, v in zip(times, seq, strict=True)]) == [
        (5, Signal.FIRE),
        (40, Signal.CLEAR),
    ]


def test_absence_fires_after_the_heartbeat_and_clears_on_the_next_message() -> None:
    r = rule(absence={"heartbeat": "2m"})
    signals = run(r, [(0, obs(0)), (60, None), (119, None), (121, None), (130, None), (200, obs(200))])
    assert signals == [(121, Signal.FIRE), (200, Signal.CLEAR)]


def test_rate_over_a_sliding_window() -> None:
    r = rule(rate={"event": {"type": "elevator.door.opened"}, "window": "1h", "above": 3})
    inputs: list[tuple[float, Observation | None]] = [(t, obs(t, "elevator.door.opened")) for t in (0, 10, 20, 30)]
    inputs += [(40, obs(40, "elevator.trip.completed")), (3605, None), (3700, None)]
    assert run(r, inputs) == [(30, Signal.FIRE), (3605, Signal.CLEAR)]


def test_summary_template_fills_device_and_fields() -> None:
    r = rule(summary="{device} at {site}: door {door} on floor {floor} ({load_kg})", absence={"heartbeat": 1})
    text = r.render(DeviceInfo("el-1", "elevator", "hq"), {"door": "open", "floor": 3})
    assert text == "el-1 at hq: door open on floor 3 ({load_kg})", "a field without a value stays as written"


def test_selector() -> None:
    r = rule(select={"type": ["elevator"], "ids": ["el-*"], "labels": {"zone": "a"}}, absence={"heartbeat": 1})
    assert r.select.matches(DeviceInfo("el-1", "elevator", "hq", {"zone": "a"}))
    assert not r.select.matches(DeviceInfo("el-1", "elevator", "hq", {"zone": "b"}))
    assert not r.select.matches(DeviceInfo("t-1", "elevator", "hq", {"zone": "a"}))
    assert not r.select.matches(DeviceInfo("el-1", "temperature", "hq", {"zone": "a"}))


OPENED, CLOSED = "elevator.door.opened", "elevator.door.closed"
TYPES = [OPENED, CLOSED, "elevator.trip.started"]
RULES = [
    rule(threshold={"above": 5, "clear_below": 3}, consecutive=2, clear_for=3),
    rule(state={"field": "door", "value": "open"}, **{"for": 5}),
    rule(event={"type": OPENED, "clear": {"type": CLOSED}}),
    rule(event={"type": OPENED, "clear_after": 4}),
    rule(absence={"heartbeat": 5}),
    rule(rate={"event": {"type": OPENED}, "window": 10, "above": 2}),
]


@given(
    st.sampled_from(RULES),
    st.lists(
        st.tuples(
            st.integers(0, 5),
            st.one_of(
                st.none(),
                st.tuples(st.sampled_from(TYPES), st.integers(0, 8), st.booleans()),
            ),
        ),
        max_size=60,
    ),
)
def test_fire_and_clear_always_alternate_starting_with_fire(r: Rule, script: list[tuple[int, Any]]) -> None:
    t, inputs = 0.0, []
    for gap, o in script:
        t += gap
        inputs.append(
            (t, None if o is None else obs(t, o[0], state={"door": "open" if o[2] else "closed"}, value=o[1]))
        )
    signals = [s for _, s in run(r, inputs)]
    assert signals == [Signal.FIRE, Signal.CLEAR] * (len(signals) // 2) + [Signal.FIRE] * (len(signals) % 2)


def test_a_rule_is_checked_against_what_the_gateway_knows_with_a_guess() -> None:
    text = """rules:
  - name: a
    severity: major
    summary: "{flor}"
    select: {type: [elevatr]}
    event:
      type: elevator.fault.rasied
      data: {code: DOOR_JAMM}
      clear: {type: elevator.fault.cleared}
  - name: b
    severity: minor
    summary: "x"
    state: {field: dor, value: open}
  - name: c
    severity: minor
    summary: "x"
    state: {field: mode, op: "==", value: out_of_servce}
"""
    with pytest.raises(RulesError) as caught:
        load_rules(text, "r.yaml")
    said = str(caught.value)
    for line, what in (
        (4, "summary field '{flor}' is not one the gateway knows; did you mean '{floor}'?"),
        (5, "device type 'elevatr' is not one the gateway knows; did you mean 'elevator'?"),
        (7, "event type 'elevator.fault.rasied' is not one the gateway knows; did you mean 'elevator.fault.raised'?"),
        (8, "fault code 'DOOR_JAMM' is not one the gateway knows; did you mean 'DOOR_JAM'?"),
        (13, "state field 'dor' is not one the gateway knows; did you mean 'door'?"),
        (17, "mode value 'out_of_servce' is not one the gateway knows; did you mean 'out_of_service'?"),
    ):
        assert f"r.yaml:{line}: " in said, line
        assert what in said, what
