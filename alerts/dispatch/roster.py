"""The maintenance roster: technicians, their shifts, escalation policies; and pure assignment.

Everything here is a function of the roster, the facts and `at` (no clock reads, no I/O but
the file loader), so shifts and escalation plans are tested without a database or a broker.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from alerts.loading import FileProblemsError, load_checked, read_config_file
from alerts.notify.receivers import Duration, Place, Problems, Receiver, Severity, StrictModel
from gateway.core.protocol import DeviceType

DEVICE_TYPES = [t.value for t in DeviceType]

SHIPPED_ROSTER = Path(__file__).resolve().parent / "roster.yaml"

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Role = Literal["technician", "supervisor", "manager"]
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


class Priority(StrEnum):
    """Work order priority; P1 is the most urgent (a passenger trapped)."""

    P1 = "P1"
    P2 = "P2"
    P3 = "P3"


class RosterError(FileProblemsError):
    """A roster is invalid."""


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        msg = f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin or UTC)"
        raise ValueError(msg) from None


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def _every_day() -> list[Day]:
    return ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class Shift(StrictModel):
    """A weekly window: on `days`, from `start` to `end` (local time; an end before the start runs
    past midnight into the next day; `00:00`-`24:00` is the whole day)."""

    days: list[Day] = Field(default_factory=_every_day, min_length=1)
    start: str
    end: str
    tz: str | None = None  # default: the roster's time zone

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        if not _CLOCK.match(value):
            msg = f"{value!r} is not a time of day (HH:MM, 00:00 to 24:00)"
            raise ValueError(msg)
        return value

    @field_validator("tz")
    @classmethod
    def _tz(cls, value: str | None) -> str | None:
        if value is not None:
            _zone(value)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Shift:
        if self.start == self.end:
            msg = "a shift's start and end are the same time: it would never (or always) cover; use 00:00-24:00"
            raise ValueError(msg)
        return self

    def covers(self, at: datetime, default_tz: str) -> bool:
        """True when `at` (aware) falls in this weekly window."""
        local = at.astimezone(_zone(self.tz or default_tz))
        now = local.hour * 60 + local.minute + local.second / 60
        today = DAYS[local.weekday()]
        yesterday = DAYS[(local.weekday() - 1) % 7]
        start, end = _minutes(self.start), _minutes(self.end)
        if start < end:
            return today in self.days and start <= now < end
        # Overnight: the evening part belongs to today's shift, the small hours to yesterday's.
        return (today in self.days and now >= start) or (yesterday in self.days and now < end)


class Contact(StrictModel):
    """One way to reach a person: a receiver of the roster, for some priorities (default: all),
    quiet in some hours (weekly windows, as shifts are; a P1 page goes through them)."""

    receiver: str
    priorities: list[Priority] | None = None
    quiet: list[Shift] = Field(default_factory=list)

    def takes(self, priority: str, at: datetime, default_tz: str) -> bool:
        """Whether a page of this priority goes here now."""
        if self.priorities is not None and priority not in self.priorities:
            return False
        return priority == Priority.P1 or not any(q.covers(at, default_tz) for q in self.quiet)


class Technician(StrictModel):
    """A person who can be dispatched: role, contact receiver (or several, with the priorities
    each takes and quiet hours), the sites and skills they cover, shifts."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    name: str = Field(min_length=1, max_length=200)
    role: Role = "technician"
    contact: str  # the name of a receiver in the roster (with `contacts`: the first one's)
    contacts: list[Contact] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _one_way_or_several(cls, data: Any) -> Any:  # noqa: ANN401 - pydantic's raw input
        if isinstance(data, dict) and data.get("contacts"):
            first = data["contacts"][0]
            receiver = first.get("receiver") if isinstance(first, dict) else getattr(first, "receiver", None)
            if data.get("contact") not in (None, receiver):
                msg = "contact or contacts, not both (contact is then the first of contacts)"
                raise ValueError(msg)
            return {**data, "contact": receiver}
        return data

    def reach(self, priority: str, at: datetime, default_tz: str) -> list[str]:
        """The receivers a page of this priority goes to now: the contacts that take it; a P1 page
        reaches every contact when none of them lists P1."""
        if not self.contacts:
            return [self.contact]
        chosen = [c.receiver for c in self.contacts if c.takes(priority, at, default_tz)]
        if not chosen and priority == Priority.P1:
            chosen = [c.receiver for c in self.contacts]
        return chosen

    sites: list[str] = Field(default_factory=lambda: ["*"], min_length=1)  # fnmatch patterns
    skills: list[str] = Field(default_factory=list)

    @field_validator("skills")
    @classmethod
    def _no_misspelt_type(cls, value: list[str]) -> list[str]:
        """A skill may be anything a team names; one a letter or two away from a device type is a typo
        that would keep the person from ever being dispatched to that type."""
        for skill in value:
            close = difflib.get_close_matches(skill, DEVICE_TYPES, n=1, cutoff=0.88)
            if close and skill not in DEVICE_TYPES:
                msg = f"skill {skill!r}: did you mean {close[0]}? (the device type a technician must have as a skill)"
                raise ValueError(msg)
        return value

    shifts: list[Shift] = Field(min_length=1)

    def on_shift(self, at: datetime, default_tz: str) -> bool:
        """True when one of the shifts covers `at`."""
        return any(s.covers(at, default_tz) for s in self.shifts)

    def serves(self, site: str | None) -> bool:
        """True when the technician covers this site."""
        return any(fnmatch.fnmatchcase(site or "", p) for p in self.sites)


class Level(StrictModel):
    """One escalation level: who (a role) and how long they have to acknowledge."""

    role: Role
    ack_timeout: Duration = Field(gt=0)


class Policy(StrictModel):
    """Escalation levels for the sites (and priorities) it matches; the first matching policy applies."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sites: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    priorities: list[Priority] | None = None  # default: all
    levels: list[Level] = Field(min_length=1)

    def applies(self, site: str | None, priority: Priority) -> bool:
        """True when this policy covers the site and priority."""
        in_site = any(fnmatch.fnmatchcase(site or "", p) for p in self.sites)
        return in_site and (self.priorities is None or priority in self.priorities)


class DispatchRules(StrictModel):
    """Which alerts make work orders, and how urgent they are."""

    severities: list[Severity] = Field(default_factory=lambda: [Severity.CRITICAL, Severity.MAJOR])
    device_types: list[str] = Field(default_factory=lambda: ["elevator"])
    rules: list[str] | None = None  # default: every rule
    entrapment_rules: list[str] = Field(default_factory=lambda: ["stuck"])  # P1 when load_kg > 0
    out_of_service_rules: list[str] = Field(default_factory=lambda: ["out-of-service"])  # P2

    @field_validator("device_types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in DEVICE_TYPES:
                close = difflib.get_close_matches(name, DEVICE_TYPES, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}? " if close else ""
                msg = f"no device is of type {name!r}: {hint}known: {', '.join(DEVICE_TYPES)}"
                raise ValueError(msg)
        return value


class Roster(StrictModel):
    """A roster file: receivers, technicians, escalation policies and dispatch rules."""

    timezone: str = "UTC"
    receivers: list[Receiver] = Field(default_factory=list)
    technicians: list[Technician] = Field(min_length=1)  # nobody to dispatch: not a roster
    policies: list[Policy] = Field(min_length=1)
    dispatch: DispatchRules = Field(default_factory=DispatchRules)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        _zone(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Roster:
        problems = [
            *_unique("technician id", "technicians", "id", [t.id for t in self.technicians]),
            *_unique("receiver name", "receivers", "name", [r.name for r in self.receivers]),
            *_unique("policy name", "policies", "name", [p.name for p in self.policies]),
        ]
        receivers = {r.name: r for r in self.receivers}
        for i, r in enumerate(self.receivers):
            if r.grouped:
                msg = f"receiver {r.name}: a page is never grouped or delayed (group_by is for the rules' receivers)"
                problems.append((("receivers", i, "group_by"), msg))
            if r.severities is not None:
                msg = f"receiver {r.name}: severities are for the rules' receivers (a technician's contacts say theirs)"
                problems.append((("receivers", i, "severities"), msg))
        for i, t in enumerate(self.technicians):
            named: list[tuple[Place, str]] = [
                (("technicians", i, "contacts", j, "receiver"), c.receiver) for j, c in enumerate(t.contacts)
            ]
            named = named or [(("technicians", i, "contact"), t.contact)]  # (contact is then the first of them)
            for place, name in named:
                receiver = receivers.get(name)
                if receiver is None:
                    msg = f"technician {t.id}: contact {name!r} is not one of the receivers ({', '.join(receivers)})"
                    problems.append((place, msg))
                elif receiver.kind in ("alertmanager", "alertmanager-webhook"):
                    msg = (
                        f"technician {t.id}: an alertmanager receiver pages nobody (webhook, pagerduty, email, apprise)"
                    )
                    problems.append((place, msg))
        roles = {t.role for t in self.technicians}
        for i, p in enumerate(self.policies):  # (a level nobody holds is passed over; a policy with none pages nobody)
            if not any(level.role in roles for level in p.levels):
                wanted = ", ".join(sorted({level.role for level in p.levels}))
                problems.append(
                    (("policies", i), f"policy {p.name}: nobody in the roster is a {wanted}: it could page nobody")
                )
        if not any(p.sites == ["*"] and p.priorities is None for p in self.policies):
            msg = 'the last resort is missing: add a policy with sites ["*"] and no priorities'
            problems.append((("policies",), msg))
        if problems:
            raise Problems(problems)
        return self

    def technician(self, tech_id: str) -> Technician | None:
        """The technician with this id."""
        return next((t for t in self.technicians if t.id == tech_id), None)

    def policy_for(self, site: str | None, priority: Priority) -> Policy:
        """The first policy that applies (there is always one: the catch-all)."""
        return next(p for p in self.policies if p.applies(site, priority))


def _unique(what: str, key: str, field: str, values: list[str]) -> list[tuple[Place, str]]:
    """Each value used twice, at its second use (`key`.i.`field`)."""
    first: dict[str, int] = {}
    problems: list[tuple[Place, str]] = []
    for i, v in enumerate(values):
        if v in first:
            problems.append(((key, i, field), f"{what} {v!r} is used twice (first as {key}.{first[v]})"))
        else:
            first[v] = i
    return problems


def load_roster(text: str, path: str = "<roster>") -> Roster:
    """Parse and validate a roster; every problem is reported with its line number."""
    names = [("technicians", "technician id", "id"), ("receivers", "receiver name", "name"),
             ("policies", "policy name", "name")]  # fmt: skip
    return load_checked(text, path, Roster, "technicians", RosterError, names)


def load_roster_file(path: Path) -> Roster:
    """`load_roster` on a file."""
    return load_roster(read_config_file(path, RosterError), str(path))


# -- pure decisions ------------------------------------------------------------------------------

_PRIORITY_ORDER = {Priority.P1: 0, Priority.P2: 1, Priority.P3: 2}


def more_urgent(a: Priority, b: Priority) -> bool:
    """True when `a` is more urgent than `b`."""
    return _PRIORITY_ORDER[a] < _PRIORITY_ORDER[b]


def qualifies(rules: DispatchRules, *, severity: str, device_type: str | None, rule: str) -> bool:
    """Whether an alert of this severity, device type and rule makes a work order."""
    return (
        severity in rules.severities
        and device_type in rules.device_types
        and (rules.rules is None or rule in rules.rules)
    )


def priority_of(rules: DispatchRules, rule: str, state: Mapping[str, Any]) -> Priority:
    """P1 for an entrapment (stuck with load inside), P2 for out of service, P3 otherwise."""
    load = state.get("load_kg")
    if rule in rules.entrapment_rules and isinstance(load, int | float) and load > 0:
        return Priority.P1
    if rule in rules.out_of_service_rules or state.get("mode") == "out_of_service":
        return Priority.P2
    return Priority.P3


@dataclass(slots=True, frozen=True)
class Assignment:
    """Who gets the order, at which level, and until when they have to acknowledge."""

    level: int
    technician: Technician
    deadline: datetime
    skipped: tuple[int, ...]  # levels passed over because nobody there was on shift


def plan(  # noqa: PLR0913 - the facts an assignment depends on
    roster: Roster,
    policy: Policy,
    from_level: int,
    *,
    site: str | None,
    skill: str | None,
    at: datetime,
    open_orders: Mapping[str, int],
) -> Assignment | None:
    """The first level from `from_level` with somebody on shift; None when nobody is.

    At a level, the candidates are the people of its role on shift at `at` who serve the site
    (technicians also need the skill); the one with the fewest open orders gets it (ties: by id).
    """
    skipped: list[int] = []
    for index in range(from_level, len(policy.levels)):
        level = policy.levels[index]
        candidates = [
            t
            for t in roster.technicians
            if t.role == level.role
            and t.serves(site)
            and (level.role != "technician" or skill is None or skill in t.skills)
            and t.on_shift(at, roster.timezone)
        ]
        if candidates:
            chosen = min(candidates, key=lambda t: (open_orders.get(t.id, 0), t.id))
            return Assignment(index, chosen, at + timedelta(seconds=level.ack_timeout), tuple(skipped))
        skipped.append(index)
    return None
