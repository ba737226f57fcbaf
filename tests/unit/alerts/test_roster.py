"""The roster: shifts in local time, validation with line numbers, and the pure assignment plan."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from alerts.dispatch.roster import (
    SHIPPED_ROSTER,
    DispatchRules,
    Priority,
    RosterError,
    Shift,
    load_roster,
    load_roster_file,
    plan,
    priority_of,
    qualifies,
)

ROSTER = """
timezone: Europe/Berlin
receivers:
  - {name: pager, kind: log}
technicians:
  - {id: abe, name: Abe, contact: pager, sites: [hq], skills: [elevator],
     shifts: [{days: [mon, tue, wed, thu, fri], start: "22:00", end: "06:00"}]}
  - {id: tina, name: Tina, contact: pager, sites: [hq], skills: [elevator],
     shifts: [{start: "08:00", end: "16:00"}]}
  - {id: hvac, name: Hank, contact: pager, sites: ["*"], skills: [hvac], shifts: [{start: "00:00", end: "24:00"}]}
  - {id: sue, name: Sue, role: supervisor, contact: pager, shifts: [{start: "00:00", end: "24:00"}]}
policies:
  - name: default
    levels:
      - {role: technician, ack_timeout: 5m}
      - {role: supervisor, ack_timeout: 10m}
"""

# Wednesday 2026-11-25; Berlin is UTC+1 in November.
WED_10_BERLIN = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def test_shipped_roster_is_valid() -> None:
    roster = load_roster_file(SHIPPED_ROSTER)
    assert {t.role for t in roster.technicians} == {"technician", "supervisor", "manager"}


@pytest.mark.parametrize(
    ("utc", "covered"),
    [
        (datetime(2026, 11, 25, 21, 0, tzinfo=UTC), True),  # Wed 22:00 Berlin: starts
        (datetime(2026, 11, 25, 20, 59, tzinfo=UTC), False),  # Wed 21:59
        (datetime(2026, 11, 26, 4, 59, tzinfo=UTC), True),  # Thu 05:59: Wednesday's night shift
        (datetime(2026, 11, 26, 5, 0, tzinfo=UTC), False),  # Thu 06:00: over
        (datetime(2026, 11, 28, 22, 0, tzinfo=UTC), False),  # Sat 23:00: no Saturday shift
        (datetime(2026, 11, 29, 0, 0, tzinfo=UTC), False),  # Sun 01:00: Saturday had none to run over
        (datetime(2026, 11, 28, 1, 0, tzinfo=UTC), True),  # Sat 02:00: Friday's night shift runs over
    ],
)
def test_overnight_shift_belongs_to_the_day_it_starts(utc: datetime, *, covered: bool) -> None:
    shift = Shift(days=["mon", "tue", "wed", "thu", "fri"], start="22:00", end="06:00")
    assert shift.covers(utc, "Europe/Berlin") is covered


def test_shift_uses_its_own_time_zone() -> None:
    shift = Shift(start="09:00", end="17:00", tz="America/New_York")
    assert not shift.covers(WED_10_BERLIN, "Europe/Berlin")  # 04:00 in New York
    assert shift.covers(WED_10_BERLIN + timedelta(hours=6), "Europe/Berlin")  # 10:00 in New York


def test_on_shift_technician_with_the_skill_and_fewest_orders_is_chosen() -> None:
    roster = load_roster(ROSTER)
    policy = roster.policies[0]
    got = plan(roster, policy, 0, site="hq", skill="elevator", at=WED_10_BERLIN, open_orders={"tina": 3})
    # abe sorts first and has no orders, but is off shift at 10:00; hvac lacks the skill.
    assert got is not None
    assert (got.level, got.technician.id, got.skipped) == (0, "tina", ())
    assert got.deadline == WED_10_BERLIN + timedelta(minutes=5)
    at_night = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)
    got = plan(roster, policy, 0, site="hq", skill="elevator", at=at_night, open_orders={"abe": 9})
    assert got is not None
    assert got.technician.id == "abe"


def test_nobody_on_shift_goes_straight_to_the_next_level() -> None:
    roster = load_roster(ROSTER)
    evening = datetime(2026, 11, 25, 19, 0, tzinfo=UTC)  # 20:00 Berlin: tina gone, abe not yet there
    got = plan(roster, roster.policies[0], 0, site="hq", skill="elevator", at=evening, open_orders={})
    assert got is not None
    assert (got.level, got.technician.id, got.skipped) == (1, "sue", (0,))
    assert got.deadline == evening + timedelta(minutes=10)
    # At 10:00 tina is on shift at hq, but nobody with the skill serves another site.
    got = plan(roster, roster.policies[0], 0, site="depot", skill="elevator", at=WED_10_BERLIN, open_orders={})
    assert got is not None
    assert (got.level, got.technician.id, got.skipped) == (1, "sue", (0,))
    nobody = roster.model_copy(update={"technicians": roster.technicians[:1]})  # abe only: off shift
    assert plan(nobody, roster.policies[0], 0, site="hq", skill="elevator", at=evening, open_orders={}) is None


def test_priority_and_which_alerts_make_orders() -> None:
    rules = DispatchRules()
    assert priority_of(rules, "stuck", {"load_kg": 80}) is Priority.P1
    assert priority_of(rules, "stuck", {"load_kg": 0}) is Priority.P3  # nobody inside
    assert priority_of(rules, "out-of-service", {}) is Priority.P2
    assert priority_of(rules, "door-jam", {"mode": "out_of_service"}) is Priority.P2
    assert priority_of(rules, "door-jam", {"load_kg": 80}) is Priority.P3
    assert qualifies(rules, severity="critical", device_type="elevator", rule="stuck")
    assert not qualifies(rules, severity="warning", device_type="elevator", rule="door-open-too-long")
    assert not qualifies(rules, severity="critical", device_type="power", rule="site-power-lost")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ROSTER.replace('start: "08:00"', 'start: "8am"'), "roster.yaml:9: technicians.1.shifts.0.start"),
        (ROSTER.replace("Europe/Berlin", "Mars/Olympus"), "unknown time zone 'Mars/Olympus'"),
        (
            ROSTER.replace(
                "contact: pager, sites: [hq], skills: [elevator],\n     shifts: [{start",
                "contact: sms, sites: [hq], skills: [elevator],\n     shifts: [{start",
            ),
            "contact 'sms' is not one of the receivers",
        ),
        (ROSTER.replace("id: tina", "id: abe"), "technician id 'abe' is used twice"),
        (ROSTER.replace("- name: default", "- name: default\n    sites: [hq]"), "the last resort is missing"),
        ("technicians: [", "not valid YAML"),
        (ROSTER.replace("skills: [elevator]", "skills: [elevatr]", 1), "skill 'elevatr': did you mean elevator?"),
        (ROSTER + "dispatch: {device_types: [elevatr]}\n", "no device is of type 'elevatr': did you mean elevator?"),
    ],
)
def test_invalid_roster_says_what_and_where(text: str, expected: str) -> None:
    with pytest.raises(RosterError) as info:
        load_roster(text, "roster.yaml")
    assert expected in str(info.value)


PREFERENCES = """
timezone: Europe/Berlin
receivers:
  - {name: phone, kind: log}
  - {name: desk, kind: log}
  - {name: mail, kind: log}
technicians:
  - id: tina
    name: Tina
    shifts: [{start: "00:00", end: "24:00"}]
    contacts:
      - {receiver: phone, priorities: [P1, P2], quiet: [{start: "22:00", end: "07:00"}]}
      - {receiver: desk, priorities: [P2, P3], quiet: [{start: "18:00", end: "08:00"}]}
      - {receiver: mail, priorities: [P3]}
policies:
  - {name: default, levels: [{role: technician, ack_timeout: 5m}]}
"""


@pytest.mark.parametrize(
    ("priority", "berlin_hour", "reached"),
    [
        ("P1", 10, ["phone"]),
        ("P2", 10, ["phone", "desk"]),
        ("P3", 10, ["desk", "mail"]),
        ("P2", 23, []),  # both of its contacts are quiet: the escalation goes on without a page
        ("P3", 23, ["mail"]),
        ("P1", 23, ["phone"]),  # a P1 page goes through quiet hours
    ],
)
def test_a_page_reaches_the_contacts_that_take_its_priority_now(
    priority: str, berlin_hour: int, reached: list[str]
) -> None:
    (tina,) = load_roster(PREFERENCES).technicians
    at = datetime(2026, 11, 25, berlin_hour - 1, 30, tzinfo=UTC)  # UTC+1 in November
    assert tina.reach(priority, at, "Europe/Berlin") == reached
    assert tina.contact == "phone"  # the first contact: what single-contact readers see


def test_a_p1_page_reaches_every_contact_when_none_lists_p1() -> None:
    roster = load_roster(PREFERENCES.replace("priorities: [P1, P2]", "priorities: [P2]"))
    (tina,) = roster.technicians
    assert tina.reach("P1", datetime(2026, 11, 25, 9, tzinfo=UTC), "Europe/Berlin") == ["phone", "desk", "mail"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (("receiver: mail", "receiver: fax"), "contact 'fax' is not one of the receivers"),
        (("    contacts:\n", "    contact: desk\n    contacts:\n"), "contact or contacts, not both"),
        (
            ("priorities: [P3]}", "priorities: [P4]}"),
            "<roster>:14: technicians.0.contacts.2.priorities.0: 'P4': Input should be",
        ),
        (('quiet: [{start: "22:00", end: "07:00"}]', 'quiet: [{start: "22:00", end: "22:00"}]'), "the same time"),
    ],
)
def test_bad_contacts_are_refused_with_their_line(change: tuple[str, str], says: str) -> None:
    with pytest.raises(RosterError, match=re.escape(says)):
        load_roster(PREFERENCES.replace(*change))


def test_a_name_used_twice_is_said_with_the_other_problems_at_its_line() -> None:
    text = ROSTER.replace("id: tina", "id: abe").replace("Europe/Berlin", "Mars/Olympus")
    with pytest.raises(RosterError) as info:
        load_roster(text, "roster.yaml")
    said = str(info.value)
    assert "unknown time zone 'Mars/Olympus'" in said  # a field's problem, and in the same run:
    first, second = [i for i, row in enumerate(text.splitlines(), 1) if "id: abe" in row]
    assert f"roster.yaml:{second}: technicians.1.id: technician id 'abe' is used twice (first at line {first})" in said
    assert said.count("is used twice") == 1, said
