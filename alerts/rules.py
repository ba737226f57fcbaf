"""Alert rules: the models, loading from YAML with line numbers, and pure evaluation.

A rule watches one device at a time (the key is rule + device). `step()` is a pure function of
the rule, the key's state, one observation (an event with the device's current state) or none
(a timer tick), and `now`; it returns the new state and a signal: FIRE, CLEAR or nothing. The
alert engine owns the lifecycle (acknowledge, flapping, silences) and the clock.
"""

from __future__ import annotations

import difflib
import fnmatch
import operator
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from pydantic import Field, field_validator, model_validator

from alerts.notify.receivers import (
    Duration,
    Receiver,
    Severity,
    StrictModel,
)
from gateway.core.events import EVENT_TYPES
from gateway.core.protocol import FAULT_CODES, DeviceType, ElevatorData, SensorData

# What the gateway knows, for rules to be checked against (a typo would never match anything).
DEVICE_TYPES = tuple(t.value for t in DeviceType)


# Device events, and those the gateway derives (a rule may watch them too).
KNOWN_EVENT_TYPES = (*EVENT_TYPES, "alert.firing", "alert.acknowledged", "alert.flapping", "alert.resolved")


STATE_FIELDS = (*ElevatorData.__struct_fields__, *SensorData.__struct_fields__, "online")


EVENT_FIELDS = ("code", "floor", "load_kg", "duration_s", "from_floor", "to_floor", "floors", "direction",
                "reason", "from", "to", "value", "unit", "last_seq", "seq", "state")  # fmt: skip


SUMMARY_FIELDS = ("device", "site", "type", *STATE_FIELDS, *EVENT_FIELDS)


def _literal_values(annotation: Any) -> tuple[Any, ...]:  # noqa: ANN401 - a type annotation
    """The values a `Literal[...]` (or `Literal[...] | None`) annotation allows; () for any other."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(v for arg in get_args(annotation) for v in _literal_values(arg))


# The fields of the device state with a fixed set of values, and those values.
STATE_CHOICES = {
    info.name: values
    for model in (ElevatorData, SensorData)
    for info in msgspec.structs.fields(model)
    if (values := _literal_values(info.type))
}


def _unknown(what: str, value: str, known: tuple[str, ...]) -> ValueError:
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(set(known)))})"
    return ValueError(f"{what} {value!r} is not one the gateway knows{hint}")


class Selector(StrictModel):
    """Which devices a rule applies to; every given field must match."""

    type: list[str] | None = None
    site: list[str] | None = None
    ids: list[str] | None = None  # fnmatch patterns, e.g. "elev-*"
    labels: dict[str, str] | None = None

    @field_validator("type")
    @classmethod
    def _known_types(cls, types: list[str] | None) -> list[str] | None:
        for t in types or ():
            if t not in DEVICE_TYPES:
                raise _unknown("device type", t, DEVICE_TYPES)
        return types

    def matches(self, device: DeviceInfo) -> bool:
        """True when `device` is selected."""
        if self.type is not None and device.type not in self.type:
            return False
        if self.site is not None and device.site not in self.site:
            return False
        if self.ids is not None and not any(fnmatch.fnmatchcase(device.device_id, p) for p in self.ids):
            return False
        return self.labels is None or all(device.labels.get(k) == v for k, v in self.labels.items())


class EventMatch(StrictModel):
    """An event type (fnmatch pattern) and data fields that must be equal."""

    type: str
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _known_event(cls, pattern: str) -> str:
        if not any(fnmatch.fnmatchcase(t, pattern) for t in KNOWN_EVENT_TYPES):
            raise _unknown("event type", pattern, KNOWN_EVENT_TYPES)
        return pattern

    @field_validator("data")
    @classmethod
    def _known_data(cls, data: dict[str, Any]) -> dict[str, Any]:
        for key, value in data.items():
            if key not in EVENT_FIELDS:
                raise _unknown("event data field", key, EVENT_FIELDS)
            if key == "code" and value not in FAULT_CODES:
                raise _unknown("fault code", str(value), FAULT_CODES)
        return data

    def matches(self, event_type: str, data: Mapping[str, Any]) -> bool:
        """True when the event is of that type and carries those data values."""
        return fnmatch.fnmatchcase(event_type, self.type) and all(data.get(k) == v for k, v in self.data.items())


class EventCondition(EventMatch):
    """Fires on a matching event; clears on `clear` (an event) or after `clear_after`."""

    clear: EventMatch | None = None
    clear_after: Duration | None = None

    @model_validator(mode="after")
    def _needs_an_end(self) -> EventCondition:
        if self.clear is None and self.clear_after is None:
            msg = "an event condition needs `clear` (an event) or `clear_after` (a duration) to resolve"
            raise ValueError(msg)
        return self


OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}  # fmt: skip


class StateCondition(StrictModel):
    """A field of the device state compared with a value (`door == open`)."""

    field: str
    op: Literal["==", "!=", ">", ">=", "<", "<="] = "=="
    value: Any

    @field_validator("field")
    @classmethod
    def _known_field(cls, name: str) -> str:
        if name not in STATE_FIELDS:
            raise _unknown("state field", name, STATE_FIELDS)
        return name

    @model_validator(mode="after")
    def _known_value(self) -> StateCondition:
        """A field with a fixed set of values (`mode`, `door`...) compared with one it never has."""
        choices = STATE_CHOICES.get(self.field)
        if choices and self.op in ("==", "!=") and self.value is not None and self.value not in choices:
            raise _unknown(f"{self.field} value", str(self.value), tuple(str(c) for c in choices))
        return self


class ThresholdCondition(StrictModel):
    """A reading above/below a limit, with a separate clear limit (hysteresis)."""

    field: str = "value"
    above: float | None = None
    below: float | None = None
    clear_below: float | None = None  # for `above`; defaults to `above`
    clear_above: float | None = None  # for `below`; defaults to `below`

    @model_validator(mode="after")
    def _one_direction(self) -> ThresholdCondition:
        if (self.above is None) == (self.below is None):
            msg = "a threshold has exactly one of `above` and `below`"
            raise ValueError(msg)
        if self.above is not None and self.clear_below is not None and self.clear_below > self.above:
            msg = "clear_below must not be above `above` (it is the hysteresis band's lower edge)"
            raise ValueError(msg)
        if self.below is not None and self.clear_above is not None and self.clear_above < self.below:
            msg = "clear_above must not be below `below` (it is the hysteresis band's upper edge)"
            raise ValueError(msg)
        return self


class AbsenceCondition(StrictModel):
    """No message from the device for longer than its heartbeat."""

    heartbeat: Duration = Field(gt=0)


class RateCondition(StrictModel):
    """More than `above` matching events within a sliding `window`."""

    event: EventMatch
    window: Duration = Field(gt=0)
    above: int = Field(ge=0)


class Rule(StrictModel):
    """One alert rule: which devices, how severe, what to say, and exactly one condition."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    severity: Severity
    summary: str = Field(min_length=1, max_length=500)
    select: Selector = Field(default_factory=Selector)
    event: EventCondition | None = None
    state: StateCondition | None = None
    threshold: ThresholdCondition | None = None
    absence: AbsenceCondition | None = None
    rate: RateCondition | None = None
    # Anti-flap: N consecutive breaching observations and/or `for` seconds to fire,
    # `clear_for` seconds of the condition being false to clear.
    consecutive: int = Field(default=1, ge=1, le=1000)
    for_: Duration = Field(default=0.0, alias="for")
    clear_for: Duration = 0.0
    # Firing this many times within flap_window makes the alert `flapping`: one notification,
    # then quiet until the condition has stayed clear for flap_window.
    flap_count: int = Field(default=3, ge=2, le=1000)
    flap_window: Duration = 900.0
    # While an alert of this rule is open at a site, these rules raise no alerts at that site
    # (e.g. a mains failure inhibits the offline alerts it causes).
    inhibits: list[str] = Field(default_factory=list)
    # For Alertmanager (and anyone reading the alert): extra labels, a longer text, a runbook.
    labels: dict[
        Annotated[str, Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")], Annotated[str, Field(max_length=200)]
    ] = Field(default_factory=dict)
    description: str | None = Field(default=None, max_length=2000)
    runbook_url: str | None = Field(default=None, pattern=r"^https?://", max_length=500)

    @field_validator("summary")
    @classmethod
    def _known_placeholders(cls, summary: str) -> str:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(summary) if name]
        except ValueError as exc:
            msg = f"summary {summary!r}: {exc} (a literal brace is written {{{{ or }}}})"
            raise ValueError(msg) from exc
        for name in names:
            if name not in SUMMARY_FIELDS:
                raise _unknown("summary field", "{" + name + "}", tuple("{" + f + "}" for f in SUMMARY_FIELDS))
        return summary

    @model_validator(mode="after")
    def _exactly_one_condition(self) -> Rule:
        given = [k for k in ("event", "state", "threshold", "absence", "rate") if getattr(self, k) is not None]
        if len(given) != 1:
            msg = f"a rule has exactly one condition (event, state, threshold, absence or rate); got {given or 'none'}"
            raise ValueError(msg)
        return self

    @property
    def kind(self) -> str:
        """Which condition the rule has."""
        for k in ("event", "state", "threshold", "absence", "rate"):
            if getattr(self, k) is not None:
                return k
        raise AssertionError  # pragma: no cover - validated at construction

    def render(self, device: DeviceInfo, values: Mapping[str, Any]) -> str:
        """The summary with {device}, {site}, {type} and state/event fields filled in."""
        tidy = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in values.items()}  # 80, not 80.0
        fields = {**tidy, "device": device.device_id, "site": device.site or "", "type": device.type or ""}
        try:
            return self.summary.format_map(_Missing(fields))
        except (ValueError, IndexError):
            return self.summary


class _Missing(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


class RuleSet(StrictModel):
    """A rules file: `rules: [...]` with unique names, and optional `receivers: [...]`."""

    rules: list[Rule]
    receivers: list[Receiver] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> RuleSet:
        seen: set[str] = set()
        for r in self.rules:
            if r.name in seen:
                msg = f"rule name {r.name!r} is used twice"
                raise ValueError(msg)
            seen.add(r.name)
        names = [r.name for r in self.receivers]
        if len(set(names)) != len(names):
            again = next(n for i, n in enumerate(names) if n in names[:i])
            msg = f"receiver name {again!r} is used twice"
            raise ValueError(msg)
        for r in self.rules:
            unknown = [n for n in r.inhibits if n not in seen]
            if unknown:
                msg = f"rule {r.name!r} inhibits unknown rule(s) {unknown}"
                raise ValueError(msg)
        return self


@dataclass(slots=True, frozen=True)
class DeviceInfo:
    """What a selector and a summary need to know of a device."""

    device_id: str
    type: str | None = None
    site: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
