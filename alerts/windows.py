"""Recurring maintenance windows: a silence in force only on some days of the week, between two
times of day, in a time zone ("every Tuesday 02:00-04:00 Europe/Berlin")."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def clock(value: str) -> time | None:
    """A time of day from "HH:MM" ("24:00": the end of the day, as None)."""
    if value == "24:00":
        return None
    hours, _, minutes = value.partition(":")
    if not (len(hours) == len(minutes) == 2 and hours.isdigit() and minutes.isdigit()):
        msg = f"{value!r} is not a time of day (HH:MM, 00:00 to 24:00)"
        raise ValueError(msg)
    try:
        return time(int(hours), int(minutes))
    except ValueError as exc:
        msg = f"{value!r} is not a time of day (HH:MM, 00:00 to 24:00)"
        raise ValueError(msg) from exc


def in_window(schedule: dict[str, Any], at: datetime) -> bool:
    """Whether `at` falls in one of the schedule's windows. A window starts on each of its `days`
    at `start` (local time) and ends at `end`: the same day, or the next one when `end` is not
    after `start` (22:00-06:00 runs overnight)."""
    zone = ZoneInfo(schedule["time_zone"])
    local = at.astimezone(zone)
    start, end = clock(schedule["start"]), clock(schedule["end"])
    assert start is not None  # noqa: S101 - validated: a window starts before 24:00
    for back in (0, 1):  # a window that began yesterday may run into today
        day = (local - timedelta(days=back)).date()
        if DAYS[day.weekday()] not in schedule["days"]:
            continue
        opens = datetime.combine(day, start, zone)
        ends_on = day + timedelta(days=1) if end is None or end <= start else day
        closes = datetime.combine(ends_on, end or time(0), zone)
        if opens <= local < closes:
            return True
    return False


def check(schedule: dict[str, Any]) -> dict[str, Any]:
    """`schedule` if it is one (days, start, end, time_zone); else a ValueError saying what is wrong."""
    days = schedule.get("days")
    if not isinstance(days, list) or not days or any(d not in DAYS for d in days):
        msg = f"days: a list of {', '.join(DAYS)} (at least one)"
        raise ValueError(msg)
    start = clock(str(schedule.get("start", "")))
    if start is None:
        msg = "start: a window starts before 24:00"
        raise ValueError(msg)
    end = clock(str(schedule.get("end", "")))
    if end == start:
        msg = "end: the same as start (a whole day is 00:00-24:00)"
        raise ValueError(msg)
    try:
        ZoneInfo(str(schedule.get("time_zone", "")))
    except (ValueError, KeyError, OSError) as exc:  # (OSError: a folder such as "Europe", a long name)
        msg = f"time_zone {schedule.get('time_zone')!r} is not an IANA time zone (e.g. Europe/Berlin)"
        raise ValueError(msg) from exc
    return schedule
