"""Grouping's pure parts: which receivers may group and with what timings, when a group is due,
and what its message says (shared facts, the worst severity, a list that stays readable)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from alerts.dispatch.roster import RosterError, load_roster
from alerts.notify import groups, mail
from alerts.notify.bodies import Links
from alerts.notify.receivers import Receiver
from alerts.tables import AlertDeviceRow, AlertRow

T0 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


def _receiver(**extra: Any) -> Receiver:
    return Receiver.model_validate({"name": "ops", "kind": "log", "group_by": ["site", "rule"], **extra})


def _alert(i: int, **extra: Any) -> AlertRow:
    fields = {"id": i, "rule": "device-offline", "device_id": f"el-{i}", "site": "hq", "severity": "warning",
              "status": "firing", "summary": f"el-{i} (hq) went offline", "fired_at": T0 + timedelta(seconds=i),
              "updated_at": T0, **extra}  # fmt: skip
    return AlertRow(**fields)


def test_grouping_takes_alertmanagers_defaults() -> None:
    r = _receiver()
    assert r.grouped
    assert (r.wait_s, r.interval_s, r.repeat_s) == (30.0, 300.0, 4 * 3600.0)
    assert not Receiver.model_validate({"name": "ops", "kind": "log"}).grouped
    everything = _receiver(group_by=[])  # one group of all its alerts
    assert everything.grouped
    assert groups.key(groups.labels(everything, _alert(1), None)) == groups.key(
        groups.labels(everything, _alert(2, site="b"), "x")
    )
    timed = _receiver(group_wait="10s", group_interval="1m", repeat_interval="2h")
    assert (timed.wait_s, timed.interval_s, timed.repeat_s) == (10.0, 60.0, 7200.0)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"name": "h", "kind": "log", "group_wait": "10s"}, "group_wait: for a receiver with group_by"),
        ({"name": "h", "kind": "webhook", "url": "http://x.example/h", "group_by": ["site"]}, "takes one alert"),
        (
            {
                "name": "p",
                "kind": "pagerduty",
                "url": "http://x.example/p",
                "routing_key": "R" * 32,
                "group_by": ["site"],
            },
            "takes one alert",
        ),
        ({"name": "h", "kind": "log", "group_by": ["site", "site"]}, "named twice"),
        ({"name": "h", "kind": "log", "group_by": ["site"], "group_wait": True}, "a duration is a number"),
        ({"name": "h", "kind": "log", "group_by": ["colour"]}, "group_by.0"),
        (
            {"name": "h", "kind": "log", "group_by": ["site"], "group_interval": "2h", "repeat_interval": "1h"},
            "shorter than group_interval",
        ),
        ({"name": "h", "kind": "log", "group_by": ["site"], "repeat_interval": "10s"}, "greater than or equal to 60"),
    ],
)
def test_a_grouping_that_cannot_work_is_refused_with_its_reason(raw: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Receiver.model_validate(raw)
    assert says in str(caught.value)


def test_a_roster_receiver_is_never_grouped() -> None:
    roster = """
receivers:
  - {name: pager, kind: log, group_by: [site]}
technicians:
  - {id: tina, name: Tina, contact: pager, shifts: [{start: "00:00", end: "24:00"}]}
policies:
  - {name: default, levels: [{role: technician, ack_timeout: 5m}]}
"""
    with pytest.raises(RosterError, match="a page is never grouped or delayed"):
        load_roster(roster)


def test_a_group_waits_for_its_burst_then_for_its_interval_and_for_a_backoff() -> None:
    r = _receiver(group_wait="30s", group_interval="5m")
    assert groups.due(r, T0, None, None) == T0 + timedelta(seconds=30)
    sent = T0 + timedelta(seconds=30)
    later = T0 + timedelta(minutes=1)  # a new alert a minute on: with the next update, 5 min after the last
    assert groups.due(r, later, sent, None) == sent + timedelta(minutes=5)
    long_after = T0 + timedelta(hours=1)  # long quiet: its own group_wait
    assert groups.due(r, long_after, sent, None) == long_after + timedelta(seconds=30)
    backoff = long_after + timedelta(minutes=2)
    assert groups.due(r, long_after, sent, backoff) == backoff


def test_the_groups_message_says_what_its_alerts_share_and_lists_them() -> None:
    r = _receiver()
    alerts = [_alert(i) for i in range(3)] + [_alert(3, status="resolved", severity="critical")]
    devices = {f"el-{i}": AlertDeviceRow(device_id=f"el-{i}", type="elevator", state={"floor": 2}) for i in range(4)}
    values = groups.labels(r, alerts[0], "elevator")
    assert values == {"site": "hq", "rule": "device-offline"}
    facts = groups.facts(alerts, devices, values, Links(public_url="https://gw.example"), None)
    assert facts["summary"] == "3 open, 1 resolved: device-offline at site hq"
    assert facts["severity"] == "warning"  # the worst of those open (the critical one is resolved)
    assert (facts["site"], facts["type"], facts["floor"], facts["device"]) == ("hq", "elevator", "2", None)
    assert facts["count"] == 4
    assert facts["since"] == "2026-12-02 09:00:00 UTC"  # the oldest open one
    lines = facts["alerts"].splitlines()
    assert lines[0] == "- firing · el-0, floor 2 · el-0 (hq) went offline · since 2026-12-02 09:00:00 UTC"
    assert lines[-1].startswith("- resolved · el-3")
    subject, text = mail.texts(r, facts, grouped=True)
    assert subject == "[warning] 3 open, 1 resolved: device-offline at site hq"
    assert "Where: site hq, floor 2\n" in text
    assert "Acknowledge all" not in text  # no link: the line is left out
    blank = r.model_copy(update={"subject": "{note}", "body": "{by}"})  # nothing to say here
    assert mail.texts(blank, facts, grouped=True) == (subject, text)  # the defaults, never a blank message


def test_a_long_group_is_counted_past_fifty_and_one_alert_reads_as_itself() -> None:
    alerts = [_alert(i, site=f"s{i % 2}") for i in range(60)]
    facts = groups.facts(alerts, {}, {"rule": "device-offline"}, Links(), None)
    assert facts["summary"] == "60 open: device-offline"  # (two sites: none named)
    lines = facts["alerts"].splitlines()
    assert len(lines) == 51
    assert lines[-1] == "- and 10 more on the staff page"
    (one,) = [_alert(7)]
    alone = groups.facts([one], {}, {"site": "hq"}, Links(public_url="https://gw.example"), None)
    assert alone["summary"] == "firing: el-7 (hq) went offline"  # (its status: the subject has no other)
    assert alone["link"] == "https://gw.example/ui/?alert=7"


def test_a_group_in_alertmanagers_webhook_format() -> None:
    r = Receiver.model_validate({"name": "am", "kind": "alertmanager-webhook", "url": "http://am.example/hook",
                                 "group_by": ["site"]})  # fmt: skip
    alerts = [_alert(1), _alert(2, rule="door-jam", severity="major", summary="Door jammed on el-2")]
    body = groups.am_webhook(r, groups.key({"site": "hq"}), {"site": "hq"}, alerts, {}, Links())
    assert body["groupLabels"] == {"site": "hq"}
    assert body["commonLabels"] == {"site": "hq"}
    assert body["commonAnnotations"] == {}  # their summaries differ
    assert body["status"] == "firing"
    assert [a["labels"]["device"] for a in body["alerts"]] == ["el-2", "el-1"]  # the worst first
    assert body["groupKey"] == 'am:[["site","hq"]]'


def test_a_devices_words_stay_on_their_line_and_are_never_a_link() -> None:
    raw = {"name": "m", "kind": "email", "url": "smtp://mail.example", "from": "iotgw@example.org",
           "to": ["ops@example.org"], "group_by": ["site"]}  # fmt: skip
    r = Receiver.model_validate(raw)
    forged = "hq\nAcknowledge all that fire: https://evil.example/ack/phish\r"
    alerts = [_alert(1, site=forged), _alert(2, site=forged, summary="x\nAcknowledge: https://evil.example/2")]
    links = Links(public_url="https://gw.example")
    facts = groups.facts(alerts, {}, {"site": forged}, links, "https://gw.example/ack/ours")
    msg = mail.message(r, facts, "iotgw.group-1", None, T0, grouped=True)
    text = msg.get_body(("plain",)).get_content()
    lines = text.splitlines()
    assert not [line for line in lines if line.startswith("Acknowledge") and "evil" in line]
    assert "Acknowledge all that fire: https://gw.example/ack/ours" in lines
    html = msg.get_body(("html",)).get_content()
    assert 'href="https://evil' not in html
    assert '<a href="https://gw.example/ack/ours">' in html
