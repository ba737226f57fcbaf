"""The ingest writer without a broker: batches in, rows and metrics out."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

import gateway.ingest.pipeline
from gateway.config import Settings
from gateway.core.clock import utcnow
from gateway.ingest.client import Ingest
from gateway.ingest.pipeline import Pending
from gateway.log import Store, list_dead_letters
from gateway.logs import QuietLog
from gateway.metrics import Metrics


@pytest.fixture
def ingest(make_store: Callable[[], Store]) -> Ingest:
    store = make_store()
    return Ingest(Settings(database_url=store.url), store, Metrics(CollectorRegistry()))


def pending(topic: str, body: dict[str, object]) -> Pending:
    return Pending(topic, json.dumps(body).encode(), utcnow(), 1, None)


def reading(device: str, seq: int) -> Pending:
    body = {"type": "power", "seq": seq, "ts": 1764324000000, "data": {"value": 900, "unit": "W"}}
    return pending(f"devices/{device}/telemetry", body)


def test_a_bug_in_normalisation_keeps_the_message_and_the_rest_of_the_batch(
    ingest: Ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gateway.ingest.pipeline.normalize

    def flaky(msg, shadow, **kw):  # type: ignore[no-untyped-def]
        if msg.device_id == "broken":
            raise ZeroDivisionError("oops")
        return real(msg, shadow, **kw)

    monkeypatch.setattr(gateway.ingest.pipeline, "normalize", flaky)
    ingest.writer._process([reading("ok-1", 1), reading("broken", 1), reading("ok-1", 2)])
    assert ingest.store.count_events() == 2
    (dead,) = list_dead_letters(ingest.store)
    assert (dead.reason, dead.topic) == ("internal_error", "devices/broken/telemetry")
    assert "ZeroDivisionError" in dead.detail


def test_devices_online_gauge_follows_status_without_full_scans(ingest: Ingest) -> None:
    reg = ingest.metrics.registry
    ingest.writer._process([reading("p1", 1), reading("p2", 1)])
    assert reg.get_sample_value("iotgw_devices_online", {"type": "power", "site": ""}) == 2
    ingest.writer._process([pending("devices/p1/status", {"online": False})])
    assert reg.get_sample_value("iotgw_devices_online", {"type": "power", "site": ""}) == 1
    assert reg.get_sample_value("iotgw_devices_known", {"type": "power", "site": ""}) == 2


def test_odd_channel_names_do_not_become_metric_labels(ingest: Ingest) -> None:
    ingest.writer._process([pending("devices/p1/whatever-an-attacker-likes", {"online": True})])
    reg = ingest.metrics.registry
    assert reg.get_sample_value("iotgw_messages_received_total", {"channel": "other"}) == 1
    assert reg.get_sample_value("iotgw_messages_rejected_total", {"reason": "bad_topic"}) == 1


def test_repeated_rejections_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    quiet = QuietLog(logging.getLogger("test.quiet"), every_s=3600)
    with caplog.at_level(logging.WARNING, logger="test.quiet"):
        for i in range(100):
            quiet.warn("bad_json", "rejected %s", i)
        quiet.warn("schema", "rejected %s", "x")
    assert [r.getMessage() for r in caplog.records] == ["rejected 0", "rejected x"]
