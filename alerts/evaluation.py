"""Rule evaluation, a pure function: a rule, a key's state, one observation (or a timer tick) and
`now` in; the new state and whether to fire or clear out."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import msgspec
from msgspec.structs import replace

from alerts.rules import OPS, AbsenceCondition, RateCondition, Rule


class Observation(msgspec.Struct, frozen=True, gc=False):
    """One event of a device, with the device's state after it."""

    time: datetime
    event_type: str
    data: Mapping[str, Any]
    state: Mapping[str, Any]


class Signal(StrEnum):
    """What a step asks of the alert lifecycle."""

    FIRE = "fire"
    CLEAR = "clear"


class KeyState(msgspec.Struct, frozen=True, gc=False):
    """Evaluation state of one (rule, device) key (a Struct: `replace` of a frozen dataclass cost
    8 µs, a tenth of the alert engine's time over a stream of readings)."""

    breaching: bool = False
    since: datetime | None = None  # when the condition last became true
    clear_since: datetime | None = None  # when it last became false while firing
    breaches: int = 0  # consecutive breaching observations
    firing: bool = False
    last_seen: datetime | None = None
    fired_at: datetime | None = None
    hits: tuple[datetime, ...] = ()


def _breach(rule: Rule, ks: KeyState, obs: Observation) -> bool | None:  # noqa: PLR0911 - one exit per case
    """Whether this observation breaches (True), clears (False) or says nothing (None)."""
    if rule.state is not None:
        c = rule.state
        if c.field not in obs.state:
            return None
        try:
            return bool(OPS[c.op](obs.state[c.field], c.value))
        except TypeError:
            return False
    if rule.threshold is not None:
        t = rule.threshold
        raw = obs.data.get(t.field, obs.state.get(t.field))
        if not isinstance(raw, int | float) or isinstance(raw, bool):
            return None
        v = float(raw)
        if t.above is not None:
            clear_at = t.clear_below if t.clear_below is not None else t.above
            return True if v > t.above else (False if v <= clear_at else ks.breaching)
        assert t.below is not None  # noqa: S101 - validated
        clear_at = t.clear_above if t.clear_above is not None else t.below
        return True if v < t.below else (False if v >= clear_at else ks.breaching)
    if rule.event is not None:
        if rule.event.matches(obs.event_type, obs.data):
            return True
        if rule.event.clear is not None and rule.event.clear.matches(obs.event_type, obs.data):
            return False
        return None
    return None


def step(rule: Rule, ks: KeyState, obs: Observation | None, now: datetime) -> tuple[KeyState, Signal | None]:
    """Advance one key by an observation (or by time alone when `obs` is None)."""
    if rule.absence is not None:
        if obs is not None:
            ks = replace(ks, last_seen=obs.time if ks.last_seen is None else max(ks.last_seen, obs.time))
        return _absence(rule.absence, ks, now)
    if rule.rate is not None:
        return _rate(rule, rule.rate, ks, obs, now)
    if obs is not None:
        verdict = _breach(rule, ks, obs)
        if verdict is True:
            ks = replace(
                ks, breaching=True, since=ks.since if ks.breaching else obs.time, clear_since=None,
                breaches=ks.breaches + 1,
            )  # fmt: skip
            if rule.event is not None and ks.firing:
                ks = replace(ks, fired_at=obs.time)  # a repeat of the event extends clear_after
        elif verdict is False and (ks.breaching or ks.since is not None or ks.breaches or ks.clear_since is None):
            # (A clear observation on a key that is already clear changes nothing: no new object.)
            ks = replace(
                ks, breaching=False, since=None, breaches=0,
                clear_since=ks.clear_since if (ks.clear_since and not ks.breaching) else obs.time,
            )  # fmt: skip
    return _decide(rule, ks, now)


def _decide(rule: Rule, ks: KeyState, now: datetime) -> tuple[KeyState, Signal | None]:
    if not ks.firing:
        held = ks.since is not None and (now - ks.since) >= timedelta(seconds=rule.for_)
        if ks.breaching and ks.breaches >= rule.consecutive and held:
            return replace(ks, firing=True, fired_at=now, clear_since=None), Signal.FIRE
        return ks, None
    ev = rule.event
    expired = (
        ev is not None
        and ev.clear_after is not None
        and ks.fired_at is not None
        and (now - ks.fired_at >= timedelta(seconds=ev.clear_after))
    )
    settled = (
        not ks.breaching and ks.clear_since is not None and (now - ks.clear_since >= timedelta(seconds=rule.clear_for))
    )
    return (_cleared(ks), Signal.CLEAR) if expired or settled else (ks, None)


def _cleared(ks: KeyState) -> KeyState:
    return replace(ks, firing=False, breaching=False, since=None, clear_since=None, breaches=0, fired_at=None)


def _absence(c: AbsenceCondition, ks: KeyState, now: datetime) -> tuple[KeyState, Signal | None]:
    if ks.last_seen is None:
        return ks, None
    silent = now - ks.last_seen > timedelta(seconds=c.heartbeat)
    if silent and not ks.firing:
        return replace(ks, firing=True, fired_at=now), Signal.FIRE
    if not silent and ks.firing:
        return _cleared(ks), Signal.CLEAR
    return ks, None


def _rate(
    rule: Rule, c: RateCondition, ks: KeyState, obs: Observation | None, now: datetime
) -> tuple[KeyState, Signal | None]:
    horizon = now - timedelta(seconds=c.window)
    hits = tuple(t for t in ks.hits if t > horizon)
    if obs is not None and c.event.matches(obs.event_type, obs.data) and obs.time > horizon:
        hits = (*hits, obs.time)
    over = len(hits) > c.above
    ks = replace(ks, hits=hits)
    if over and not ks.firing:
        return replace(ks, firing=True, fired_at=now), Signal.FIRE
    if not over and ks.firing:
        clear_since = ks.clear_since or now
        if now - clear_since >= timedelta(seconds=rule.clear_for):
            return _cleared(replace(ks, hits=hits)), Signal.CLEAR
        return replace(ks, clear_since=clear_since), None
    return replace(ks, clear_since=None) if over else ks, None
