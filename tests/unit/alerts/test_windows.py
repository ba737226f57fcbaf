"""Recurring maintenance windows: which instants a schedule covers (days, overnight windows, a
whole day, daylight saving time), and what a bad schedule is told."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from alerts.windows import check, in_window

BERLIN = ZoneInfo("Europe/Berlin")
TUESDAYS = {"days": ["tue"], "start": "02:00", "end": "04:00", "time_zone": "Europe/Berlin"}


def at(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=BERLIN)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (at(2026, 12, 1, 1, 59), False),  # a Tuesday, before
        (at(2026, 12, 1, 2, 0), True),
        (at(2026, 12, 1, 3, 59, 59), True),
        (at(2026, 12, 1, 4, 0), False),  # the end is not in it
        (at(2026, 12, 8, 2, 30), True),  # the next Tuesday
        (at(2026, 12, 2, 2, 30), False),  # a Wednesday
        (datetime(2026, 12, 1, 1, 30, tzinfo=UTC), True),  # 02:30 in Berlin
    ],
)
def test_a_weekly_window(when: datetime, inside: bool) -> None:
    assert in_window(TUESDAYS, when) is inside


def test_an_overnight_window_runs_into_the_next_day() -> None:
    nights = {"days": ["fri"], "start": "22:00", "end": "06:00", "time_zone": "Europe/Berlin"}
    assert in_window(nights, at(2026, 12, 4, 23, 0))  # Friday night
    assert in_window(nights, at(2026, 12, 5, 5, 59))  # Saturday morning: Friday's window
    assert not in_window(nights, at(2026, 12, 5, 22, 30))  # Saturday night: no window starts then
    assert not in_window(nights, at(2026, 12, 4, 21, 59))


def test_a_whole_day_and_daylight_saving_time() -> None:
    sundays = {"days": ["sun"], "start": "00:00", "end": "24:00", "time_zone": "Europe/Berlin"}
    assert in_window(sundays, at(2026, 3, 29, 0, 0))
    assert in_window(sundays, at(2026, 3, 29, 23, 59))  # the day clocks went forward: 23 hours long
    assert not in_window(sundays, at(2026, 3, 30, 0, 0))
    # 02:00-04:00 on that day is 01:00-02:00 UTC: one hour of window
    early = {**TUESDAYS, "days": ["sun"]}
    assert in_window(early, datetime(2026, 3, 29, 1, 0, tzinfo=UTC))
    assert not in_window(early, datetime(2026, 3, 29, 2, 0, tzinfo=UTC))


@pytest.mark.parametrize(
    ("schedule", "says"),
    [
        ({**TUESDAYS, "days": []}, "days: a list of mon"),
        ({**TUESDAYS, "days": ["tuesday"]}, "days: a list of mon"),
        ({**TUESDAYS, "start": "2:00"}, "not a time of day"),
        ({**TUESDAYS, "end": "25:00"}, "not a time of day"),
        ({**TUESDAYS, "start": "24:00"}, "starts before 24:00"),
        ({**TUESDAYS, "end": "02:00"}, "the same as start"),
        ({**TUESDAYS, "time_zone": "Mars/Olympus"}, "not an IANA time zone"),
        ({**TUESDAYS, "time_zone": "Europe"}, "not an IANA time zone"),
        ({**TUESDAYS, "time_zone": "x" * 300}, "not an IANA time zone"),
    ],
)
def test_a_bad_schedule_is_told_why(schedule: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        check(schedule)
