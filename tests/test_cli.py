"""The command line: clear errors for bad settings, and the commands users are told about."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.broker import render_config
from gateway.cli import main
from gateway.config import Settings
from gateway.errors import BrokerError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--mqtt-url", "http://x"], "--mqtt-url"),
        (["run", "--http-port", "70000"], "--http-port"),
        (["run", "--database-url", "iotgw.db"], "--database-url"),
        (["simulate", "--rate", "0"], "--rate"),
        (["simulate", "--fault-rate", "2"], "--fault-rate"),
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
