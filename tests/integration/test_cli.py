"""The command line: clear errors for bad settings, and the commands users are told about."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.cli.broker import Mosquitto, render_config
from gateway.config import Settings
from gateway.errors import BrokerError
from tests.support.gateway import ROOT


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--mqtt-url", "http://x"], "--mqtt-url"),
        (["run", "--http-port", "70000"], "--http-port"),
        (["run", "--database-url", "iotgw.db"], "--database-url"),
        (["run", "--time-zone", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
        (["simulate", "--rate", "0"], "--rate"),
        (["simulate", "--fault-rate", "2"], "--fault-rate"),
        (["demo", "--duration", "-5"], "--duration must be > 0"),
        (["demo", "--mqtt-url", "mqtts://user:secret@example.com:18203"], "only sets the port"),
    ],
)
def test_bad_settings_exit_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) in (1, 2)
    assert message in capsys.readouterr().err


def test_environment_variables_configure_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTGW_MQTT_URL", "mqtt://broker.example:1884")
    monkeypatch.setenv("IOTGW_HTTP_PORT", "9000")
    s = Settings()
    assert (s.mqtt_host, s.mqtt_port, s.http_port) == ("broker.example", 1884, 9000)
    assert Settings(http_port=9100).http_port == 9100  # flags win over the environment


def test_module_and_help_run() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for command in ("run", "simulate", "demo"):
        assert command in out


def test_broker_config_rendering_keeps_the_project_settings() -> None:
    source = (ROOT / "mosquitto.conf").read_text()
    out = render_config(source, port=12345, gateway_port=12346, data_dir=Path("/tmp/x"))
    assert "listener 12345 127.0.0.1\nuse_username_as_clientid true\n" in out, "devices: client id = user name"
    assert "listener 12346 127.0.0.1\nallow_anonymous false\npassword_file /tmp/x/services.passwd\n" in out
    assert "password_file /tmp/x/passwd\n" in out, "the devices' accounts, where provisioning writes"
    assert "persistence_location /tmp/x/" in out
    assert "max_queued_messages 1000000" in out
    with pytest.raises(BrokerError):
        render_config("persistence true\n", port=1, gateway_port=2, data_dir=Path("/tmp"))


def test_rules_check_reports_ok_and_errors_with_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", str(ROOT / "alerts" / "rules.yaml")]) == 0
    assert "rules OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: a\n    severity: loud\n    summary: s\n    absence: {heartbeat: 1m}\n")
    assert main(["rules", "check", str(bad)]) == 1
    assert f"{bad}:3: rules.0.severity" in capsys.readouterr().err
    twice = tmp_path / "twice.yaml"
    rule = "  - name: a\n    severity: info\n    summary: s\n    absence: {heartbeat: 1m}\n"
    twice.write_text("rules:\n" + rule + rule)
    assert main(["rules", "check", str(twice)]) == 1
    assert f"{twice}:6: rules.1.name: rule name 'a' is used twice (first at line 2)" in capsys.readouterr().err


def test_roster_check_refuses_a_roster_without_people_and_counts_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["roster", "check", str(ROOT / "alerts" / "dispatch" / "roster.yaml")]) == 0
    said = capsys.readouterr().out
    assert "3 technicians, 1 supervisor, 1 manager; 2 escalation policies" in said, said
    empty = tmp_path / "empty.yaml"
    empty.write_text("technicians: []\npolicies:\n  - {name: d, levels: [{role: technician, ack_timeout: 5m}]}\n")
    assert main(["roster", "check", str(empty)]) == 1
    assert f"{empty}:1: technicians:" in capsys.readouterr().err
    bosses = tmp_path / "bosses.yaml"
    bosses.write_text(
        "timezone: UTC\nreceivers:\n  - {name: pager, kind: log}\ntechnicians:\n"
        "  - {id: sue, name: Sue, role: supervisor, contact: pager, shifts: [{start: '00:00', end: '24:00'}]}\n"
        "policies:\n  - {name: default, levels: [{role: technician, ack_timeout: 5m}]}\n"
    )
    assert main(["roster", "check", str(bosses)]) == 1
    assert "policy default: nobody in the roster is a technician: it could page nobody" in capsys.readouterr().err


def test_checks_say_every_problem_of_receivers_at_its_own_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: a\n    severity: info\n    summary: s\n    absence: {heartbeat: 1m}\n"
        "receivers:\n  - &mail {name: ops, kind: log}\n  - {name: ops, kind: log}\n  - *mail\n"
        "  - {<<: *mail, severities: [critical]}\n  - {name: x, kind: lgo}\n"
    )
    assert main(["rules", "check", str(rules)]) == 1  # one of them would get nothing
    said = capsys.readouterr().err
    assert said.splitlines()[:3] == [
        f"{rules}:{line}: receivers.{i}.name: receiver name 'ops' is used twice (first at line 7)"
        for i, line in ((1, 8), (2, 9), (3, 10))  # as written, through an alias, through a merge
    ], said
    assert f"{rules}:11: receivers.4.kind: 'lgo': Input should be" in said  # with the rest
    roster = tmp_path / "roster.yaml"
    roster.write_text(
        "timezone: UTC\nreceivers:\n"
        "  - {name: pager, kind: log, group_by: [site]}\n"  # 3
        "  - {name: desk, kind: log, severities: [critical]}\n"  # 4
        "  - {name: desk, kind: log}\n"  # 5
        "technicians:\n"
        "  - {id: sue, name: Sue, role: technician, contact: nobody, shifts: [{start: '00:00', end: '24:00'}]}\n"  # 7
        "  - {id: abe, name: Abe, role: technician, shifts: [{start: '00:00', end: '24:00'}],\n"
        "     contacts: [{receiver: pager}, {receiver: sms}]}\n"  # 9
        "policies:\n  - {name: default, levels: [{role: technician, ack_timeout: 5m}]}\n"
    )
    assert main(["roster", "check", str(roster)]) == 1
    said = capsys.readouterr().err
    assert [line.split(": ", 2)[:2] for line in said.splitlines()] == [
        [f"{roster}:3", "receivers.0.group_by"],
        [f"{roster}:4", "receivers.1.severities"],
        [f"{roster}:5", "receivers.2.name"],
        [f"{roster}:7", "technicians.0.contact"],
        [f"{roster}:9", "technicians.1.contacts.1.receiver"],
    ], said
    secret = tmp_path / "rules-secret.yaml"
    secret.write_text(
        "rules:\n  - name: a\n    severity: info\n    summary: s\n    absence: {heartbeat: 1m}\n"
        f"receivers:\n  - {{name: teams, kind: apprise, urls_file: {tmp_path / 'teams-url'}}}\n"
    )
    assert main(["rules", "check", str(secret)]) == 0  # valid: the file may be there only where it runs
    assert f"note: receiver teams: urls_file {tmp_path / 'teams-url'} cannot be read here" in capsys.readouterr().err
    keys = tmp_path / "keys.yaml"  # YAML keeps the last of a key written twice: the first is said
    keys.write_text(
        "rules:\n  - name: a\n    severity: info\n    severity: major\n    summary: s\n"
        "    absence: {heartbeat: 1m}\nreceivers:\n  - {name: b, kind: log}\n"
        "receivers:\n  - {name: c, kind: log}\n  - {name: c, kind: log}\n"
    )
    assert main(["rules", "check", str(keys)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{keys}:4: key 'severity' is written twice (first at line 3): the first would be ignored",
        f"{keys}:9: key 'receivers' is written twice (first at line 7): the first would be ignored",
        f"{keys}:11: receivers.1.name: receiver name 'c' is used twice (first at line 10)",
    ]
    deep = tmp_path / "deep.yaml"
    deep.write_text("rules: " + "[" * 5000 + "]" * 5000 + "\n")
    for kind in ("rules", "roster"):
        assert main([kind, "check", str(deep)]) == 1
        assert "nested too deeply (more than 50 levels)" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"rules:\n  - name: caf\xe9\n")
    for kind in ("rules", "roster"):
        assert main([kind, "check", str(latin1)]) == 1
        assert capsys.readouterr().err.strip() == f"{latin1}:2: not UTF-8: byte 0xe9 (save the file as UTF-8)"


def test_simulate_says_where_it_publishes_and_exits_1_with_the_broker_s_refusal(broker: Mosquitto) -> None:
    url = broker.device_url  # the project's broker: a device without provisioned credentials is refused
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "simulate", "--mqtt-url", url, "--elevators", "1", "--sensors", "0",
         "--connect-timeout", "3", "--duration", "30"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    first = done.stderr.splitlines()[0]
    assert first == f"simulate: 1 device publishing to {url}"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"iotgw: no device could connect to {url} within 3 s: ")
    assert "authori" in last.lower(), last  # the broker's CONNACK: not authorised (no credentials given)


def test_a_command_that_adds_to_a_database_makes_none_by_mistake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "iotgw.db"
    url = f"sqlite:///{missing}"
    for argv in (["apikeys", "create", "--role", "admin", "--name", "ana"], ["apikeys", "list"], ["devices", "list"]):
        assert main([*argv, "--database-url", url]) == 1, argv
        said = capsys.readouterr().err
        assert f"no database at {missing}" in said
        assert "--database-url sqlite:///.iotgw-demo/iotgw.db" in said, "where the demo's is"
        assert not missing.exists()
    assert (
        main(["apikeys", "create", "--role", "admin", "--name", "ana", "--database-url", url, "--create-database"]) == 0
    )
    assert missing.exists()
    assert main(["apikeys", "list", "--database-url", url]) == 0


def test_logs_and_hints_never_show_the_database_password() -> None:
    s = Settings(database_url="postgresql+psycopg://iotgw:s3cret@db.example:5432/iotgw")
    assert s.database_url_safe == "postgresql+psycopg://iotgw:***@db.example:5432/iotgw"
    assert Settings(database_url="sqlite:////var/lib/iotgw/iotgw.db").database_url_safe.endswith("/iotgw.db")
