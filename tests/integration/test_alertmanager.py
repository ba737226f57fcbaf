"""The alertmanager receiver against a real Alertmanager (Debian's prometheus-alertmanager):
the gateway keeps Alertmanager's alerts in step with its own, as Prometheus does."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli.broker import Mosquitto, free_port
from gateway.config import Settings
from tests.support.dispatching import WED_10_BERLIN, Clock, message, publish
from tests.support.gateway import running_gateway, wait_for
from tests.support.peers import Hooks, serving

pytestmark = pytest.mark.anyio

RULES = """
rules:
  - name: door-jam
    severity: major
    summary: "Door jammed on {{device}}"
    description: "The car door does not close; passengers may be unable to leave."
    runbook_url: "https://wiki.example/runbooks/door-jam"
    labels: {{team: lifts}}
    select: {{type: [elevator]}}
    event:
      type: elevator.fault.raised
      data: {{code: DOOR_JAM}}
      clear: {{type: elevator.fault.cleared, data: {{code: DOOR_JAM}}}}
receivers:
  - {{name: am, kind: alertmanager, url: "{url}", resend_interval: 2s}}
"""

AM_CONFIG = """
route:
  receiver: hook
  group_by: [alertname, device]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: "{hook}"
        send_resolved: true
"""


class Alertmanager:
    """A real Alertmanager on a free port, clustering off, its storage in `data`."""

    def __init__(self, root: Path, hook: str) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "am.yml").write_text(AM_CONFIG.format(hook=hook))
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        binary = shutil.which("prometheus-alertmanager")
        assert binary, "prometheus-alertmanager missing: `make test` installs Debian's package"
        self.runs += 1
        data = self.root / f"data-{self.runs}"  # every start: no memory of the last
        data.mkdir()
        with (self.root / f"am-{self.runs}.log").open("wb") as errors:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={self.root / 'am.yml'}", f"--storage.path={data}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"],
                stdout=subprocess.DEVNULL, stderr=errors,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"Alertmanager did not start: {(self.root / f'am-{self.runs}.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def alerts(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v2/alerts", timeout=5)
        r.raise_for_status()
        return list(r.json())

    def of(self, device: str) -> dict[str, Any] | None:
        return next((a for a in self.alerts() if a["labels"].get("device") == device), None)


@contextmanager
def alertmanager(root: Path, hook: Hooks) -> Iterator[Alertmanager]:
    am = Alertmanager(root, f"http://127.0.0.1:{hook.server_address[1]}/am")
    am.start()
    try:
        yield am
    finally:
        am.stop()


def notified(hook: Hooks, device: str, status: str) -> bool:
    """Whether Alertmanager's own webhook told its receiver that `device`'s alert is `status`."""
    return any(
        a["labels"].get("device") == device and a["status"] == status
        for r in hook.ok()
        for a in r["body"].get("alerts", [])
    )


async def test_alerts_reach_a_real_alertmanager_stay_in_step_and_come_back_after_it_forgets(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    clock = Clock(WED_10_BERLIN)
    with serving() as hook, alertmanager(tmp_path, hook) as am:
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES.format(url=am.url))
        settings = settings_for(
            broker, consumers="alerts", rules_file=str(rules), public_url="https://gw.example/iotgw"
        )
        async with running_gateway(settings):
            jam = {"mode": "fault", "fault": "DOOR_JAM", "door": "opening"}
            await publish(broker, "el-1", message(1, clock.now), message(2, clock.now, **jam))
            await wait_for(
                lambda: asyncio.to_thread(lambda: am.of("el-1") is not None), what="the alert in Alertmanager"
            )
            shown = await asyncio.to_thread(am.of, "el-1")
            assert shown is not None
            assert shown["labels"] == {
                "alertname": "door-jam", "device": "el-1", "site": "hq", "severity": "major",
                "device_type": "elevator", "source": "iotgw", "team": "lifts",
            }  # fmt: skip
            assert shown["annotations"] == {
                "summary": "Door jammed on el-1",
                "description": "The car door does not close; passengers may be unable to leave.",
                "runbook_url": "https://wiki.example/runbooks/door-jam",
            }
            assert shown["generatorURL"].startswith("https://gw.example/iotgw/ui/?alert=")
            assert shown["status"]["state"] == "active"
            await wait_for(lambda: asyncio.sleep(0, notified(hook, "el-1", "firing")), what="Alertmanager's page")

            # Silenced in Alertmanager (its API): the alert shows as suppressed there.
            now = datetime.now(UTC)
            silence = {
                "matchers": [{"name": "device", "value": "el-2", "isRegex": False, "isEqual": True}],
                "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat(),
                "createdBy": "ana", "comment": "lift under repair",
            }  # fmt: skip
            r = await asyncio.to_thread(httpx.post, f"{am.url}/api/v2/silences", json=silence, timeout=5)
            assert r.status_code == 200, r.text
            await publish(broker, "el-2", message(1, clock.now), message(2, clock.now, **jam))

            def suppressed() -> bool:
                a = am.of("el-2")
                return a is not None and a["status"]["state"] == "suppressed"

            await wait_for(lambda: asyncio.to_thread(suppressed), what="the silenced alert as suppressed")

            # Cleared at the device: resolved in Alertmanager, which says so to its receiver.
            await publish(broker, "el-1", message(3, clock.now))
            await wait_for(lambda: asyncio.sleep(0, notified(hook, "el-1", "resolved")), what="Alertmanager's resolve")

            # Alertmanager restarted with nothing stored: the open alert is back within a resend interval.
            await asyncio.to_thread(am.stop)
            await asyncio.to_thread(am.start)
            started = time.monotonic()
            await wait_for(lambda: asyncio.to_thread(lambda: am.of("el-2") is not None), timeout=10,
                           what="the open alert sent again")  # fmt: skip
            assert time.monotonic() - started <= 2.0 + 1.5, "within one resend interval (2 s), and a little"
            assert await asyncio.to_thread(am.of, "el-1") is None, "a resolved alert is not sent again"


async def test_an_ha_pair_gets_every_alert_each_and_one_down_delays_nothing_for_the_other(
    broker: Mosquitto, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    clock = Clock(WED_10_BERLIN)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serving() as hook, alertmanager(tmp_path / "a", hook) as one, alertmanager(tmp_path / "b", hook) as two:
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES.format(url=one.url).replace(f'url: "{one.url}"', f'url: ["{one.url}", "{two.url}"]'))
        async with running_gateway(settings_for(broker, consumers="alerts", rules_file=str(rules))):
            await asyncio.to_thread(two.stop)  # one of the pair is away
            jam = {"mode": "fault", "fault": "DOOR_JAM", "door": "opening"}
            await publish(broker, "el-1", message(1, clock.now), message(2, clock.now, **jam))
            await wait_for(lambda: asyncio.to_thread(lambda: one.of("el-1") is not None), what="the alert in one")
            await asyncio.to_thread(two.start)  # back, with nothing stored
            await wait_for(lambda: asyncio.to_thread(lambda: two.of("el-1") is not None), timeout=10,
                           what="the alert in the other, once it is back")  # fmt: skip
