"""Requests generated from the OpenAPI schema (schemathesis) against a running gateway with every
consumer, over real HTTP with an admin key: no route answers with a 5xx, whatever it is sent."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry
from schemathesis.checks import not_a_server_error

from gateway.cli.broker import Mosquitto, free_port
from gateway.config import Settings
from gateway.security import create_api_key
from gateway.service import Gateway
from tests.support.gateway import GATEWAY_PASSWORD, fresh_database, new_broker

EXAMPLES = 25  # per operation: bounded, so `make test` stays quick


@pytest.fixture(scope="module")
def live_gateway() -> Iterator[tuple[str, str]]:
    """A gateway on its own event loop thread: (base URL, admin key)."""
    broker = new_broker()
    broker.start()
    work = Path(tempfile.mkdtemp(prefix="iotgw-schemathesis-"))
    with fresh_database(work) as database_url:
        yield from _serve(broker, work, database_url)


def _serve(broker: Mosquitto, work: Path, database_url: str) -> Iterator[tuple[str, str]]:
    settings = Settings(
        mqtt_url=broker.url,
        mqtt_password=GATEWAY_PASSWORD,
        mqtt_client_id=f"iotgw-schemathesis-{broker.port}",
        database_url=database_url,
        http_port=free_port(),
        broker_password_file=str(broker.passwords.path),
        broker_pid_file=str(broker.data_dir / "mosquitto.pid"),
    )
    gw = Gateway(settings, registry=CollectorRegistry())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway-loop", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(gw.start(), loop).result(30)
    key = create_api_key(gw.store, "schemathesis", "admin")[1]
    try:
        yield f"http://127.0.0.1:{settings.http_port}", key
    finally:
        asyncio.run_coroutine_threadsafe(gw.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        broker.stop()
        shutil.rmtree(broker.data_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def test_no_route_answers_with_a_server_error(live_gateway: tuple[str, str]) -> None:
    base, key = live_gateway
    # The event stream never ends by design; its auth is covered in test_api_auth.py.
    api = schemathesis.openapi.from_url(f"{base}/openapi.json").exclude(path="/api/stream")
    headers = {"Authorization": f"Bearer {key}"}
    failures: dict[str, str] = {}
    tried = 0
    for result in api.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_5xx(case: schemathesis.Case) -> None:
            response = case.call(base_url=base, headers=headers, timeout=30)
            case.validate_response(response, checks=[not_a_server_error])

        tried += 1
        try:
            no_5xx()
        except Exception as exc:
            failures[operation.label] = str(exc)[:2000]
    assert tried >= 30, f"only {tried} operations in the schema"
    assert not failures, "\n\n".join(f"{label}:\n{error}" for label, error in failures.items())
