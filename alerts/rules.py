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
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import httpx
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import GatewayError
from gateway.events import EVENT_TYPES
from gateway.protocol import FAULT_CODES, DeviceType, ElevatorData, SensorData

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object) -> float:
    """Seconds from `90`, `90s`, `5m`, `1.5h`, `2d` or `250ms`."""
    if isinstance(value, bool):
        msg = "a duration is a number of seconds or a string like 90s, 5m, 1h"
        raise TypeError(msg)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        msg = f"{value!r} is not a duration (use seconds or 90s, 5m, 1h, 2d)"
        raise ValueError(msg)
    if seconds < 0:
        msg = "a duration cannot be negative"
        raise ValueError(msg)
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class Severity(StrEnum):
    """How bad it is, most severe first."""

    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"
    INFO = "info"


# What the gateway knows, for rules to be checked against (a typo would never match anything).
DEVICE_TYPES = tuple(t.value for t in DeviceType)
# Device events, and those the gateway derives (a rule may watch them too).
KNOWN_EVENT_TYPES = (*EVENT_TYPES, "alert.firing", "alert.acknowledged", "alert.flapping", "alert.resolved")
STATE_FIELDS = (*ElevatorData.model_fields, *SensorData.model_fields, "online")
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
    name: values
    for model in (ElevatorData, SensorData)
    for name, info in model.model_fields.items()
    if (values := _literal_values(info.annotation))
}


def _unknown(what: str, value: str, known: tuple[str, ...]) -> ValueError:
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(set(known)))})"
    return ValueError(f"{what} {value!r} is not one the gateway knows{hint}")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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


_OPS: dict[str, Callable[[Any, Any], bool]] = {
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


class Receiver(StrictModel):
    """Where notifications go: a generic webhook (CloudEvents), Alertmanager (its API, kept in
    sync), a consumer of Alertmanager's webhook format, PagerDuty Events v2, or `log` (the
    gateway's own log, for trying things out: no URL)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["webhook", "alertmanager", "alertmanager-webhook", "pagerduty", "log"] = "webhook"
    # alertmanager: the base URL of Alertmanager, or a list of them (an HA pair: each is sent to)
    url: str | list[str] | None = None
    severities: list[Severity] | None = None  # only these (default: all)
    routing_key: str | None = None  # PagerDuty integration key
    timeout_s: Duration = 5.0
    # webhook: the CloudEvents HTTP binding's mode (structured: the event as JSON; binary: ce-* headers)
    mode: Literal["structured", "binary"] = "structured"
    # alertmanager: every open alert is sent again this often (and endsAt is 4 times this ahead)
    resend_interval: Duration = Field(default=60.0, ge=1, le=3600)

    @model_validator(mode="after")
    def _consistent(self) -> Receiver:
        if self.kind == "pagerduty" and not PD_ROUTING_KEY.fullmatch(self.routing_key or ""):
            msg = "a pagerduty receiver needs routing_key, its integration key of 32 characters"
            raise ValueError(msg)
        if self.mode == "binary" and self.kind != "webhook":
            msg = "mode: binary is for webhook receivers (CloudEvents' binary content mode)"
            raise ValueError(msg)
        if (self.kind == "log") != (self.url is None):
            msg = "a log receiver has no url; every other kind needs one (http:// or https://)"
            raise ValueError(msg)
        if isinstance(self.url, list) and (self.kind != "alertmanager" or not self.url):
            msg = "a list of urls is for an alertmanager receiver (an HA pair); other kinds have one url"
            raise ValueError(msg)
        for url in self.urls:
            _check_url(url)
        return self

    @property
    def urls(self) -> list[str]:
        """The URLs as given (none for `log`)."""
        return [] if self.url is None else [self.url] if isinstance(self.url, str) else list(self.url)

    @property
    def targets(self) -> list[str]:
        """Where a request goes: Alertmanager's alerts API under each base URL; else the URL."""
        if self.kind == "alertmanager":
            return [u.rstrip("/") + "/api/v2/alerts" for u in self.urls]
        return self.urls


PD_ROUTING_KEY = re.compile(r"[A-Za-z0-9]{32}")  # (fullmatch: no newline after it either)


def _check_url(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        msg = f"url {url!r}: http:// or https:// only"
        raise ValueError(msg)
    try:
        parsed = httpx.URL(url)
        host, port = parsed.host, parsed.port
        host.encode("idna")  # an empty or too long label: no name a resolver would take
    except (httpx.InvalidURL, UnicodeError) as exc:
        msg = f"url {url!r} is not a URL: {exc}"
        raise ValueError(msg) from exc
    if not host or any(c.isspace() for c in url):
        msg = f"url {url!r} names no host one could reach"
        raise ValueError(msg)
    if port is not None and not 0 < port < 65536:
        msg = f"url {url!r}: port {port} is not a TCP port"
        raise ValueError(msg)


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
        for r in self.rules:
            unknown = [n for n in r.inhibits if n not in seen]
            if unknown:
                msg = f"rule {r.name!r} inhibits unknown rule(s) {unknown}"
                raise ValueError(msg)
        return self


# -- loading ---------------------------------------------------------------------------------


class FileProblemsError(GatewayError):
    """A YAML configuration file is invalid; `problems` are (line, message) pairs."""

    def __init__(self, path: str, problems: list[tuple[int | None, str]]) -> None:
        lines = [f"{path}:{line}: {msg}" if line else f"{path}: {msg}" for line, msg in problems]
        super().__init__("\n".join(lines))
        self.problems = problems


class RulesError(FileProblemsError):
    """A rules file is invalid."""


M = TypeVar("M", bound=BaseModel)


def load_yaml_model(text: str, path: str, model: type[M], required: str, error: type[FileProblemsError]) -> M:
    """Parse YAML and validate it as `model`; every problem is reported with its line number."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise error(path, [(mark.line + 1 if mark else None, f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict) or required not in data:
        raise error(path, [(1, f"the file must be a mapping with a `{required}:` list")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [(_line_of(node, err["loc"]), _where(err["loc"]) + _said(err["msg"])) for err in exc.errors()]
        raise error(path, problems) from None


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) + ": " if loc else ""  # a whole-file problem has no path


def _said(msg: str) -> str:
    return msg.removeprefix("Value error, ")  # pydantic's prefix to our own words


def read_config_file(path: Path, error: type[FileProblemsError]) -> str:
    """The text of a configuration file, or `error` saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(str(path), [(None, f"cannot read: {exc.strerror}")]) from None


def load_rules(text: str, path: str = "<rules>") -> RuleSet:
    """Parse and validate a rules file; every problem is reported with its line number."""
    twice = _duplicate_names(text)
    try:
        ruleset = load_yaml_model(text, path, RuleSet, "rules", RulesError)
    except RulesError as exc:  # every problem at once, the duplicates with the rest, by line
        raise RulesError(path, sorted([*twice, *exc.problems], key=lambda p: p[0] or 0)) from None
    if twice:
        raise RulesError(path, twice)
    return ruleset


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)


def _duplicate_names(text: str) -> list[tuple[int | None, str]]:
    """Each rule name used twice, at the line of its second use."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []  # said by load_yaml_model
    rules = _child(node, "rules")
    seen: dict[str, int] = {}
    problems: list[tuple[int | None, str]] = []
    for i, item in enumerate(rules.value if isinstance(rules, yaml.SequenceNode) else []):
        name = _child(item, "name")
        if not isinstance(name, yaml.ScalarNode):
            continue
        line = name.start_mark.line + 1
        if name.value in seen:
            problems.append(
                (line, f"rules.{i}.name: rule name {name.value!r} is used twice (first at line {seen[name.value]})")
            )
        else:
            seen[name.value] = line
    return problems


def load_rules_file(path: Path) -> RuleSet:
    """`load_rules` on a file."""
    return load_rules(read_config_file(path, RulesError), str(path))


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The line of the deepest YAML node on the error's path."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            key = "for" if part == "for_" else part
            child = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        else:
            child = None
        if child is None:
            break
        node = child
        line = node.start_mark.line + 1
    return line


# -- evaluation ------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class DeviceInfo:
    """What a selector and a summary need to know of a device."""

    device_id: str
    type: str | None = None
    site: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Observation:
    """One event of a device, with the device's state after it."""

    time: datetime
    event_type: str
    data: Mapping[str, Any]
    state: Mapping[str, Any]


class Signal(StrEnum):
    """What a step asks of the alert lifecycle."""

    FIRE = "fire"
    CLEAR = "clear"


@dataclass(slots=True, frozen=True)
class KeyState:
    """Evaluation state of one (rule, device) key."""

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
            return bool(_OPS[c.op](obs.state[c.field], c.value))
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
