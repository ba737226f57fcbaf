"""Shared fixtures: a real Mosquitto per test (the project's mosquitto.conf on a free port)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.broker import Mosquitto, free_port
from gateway.config import Settings
from gateway.log import Store
from tests.support.gateway import (
    GATEWAY_PASSWORD,
    TEST_CLOCK_SKEW_S,
    fresh_database,
    new_broker,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    """A fresh Mosquitto running the project's config (its own port and persistence dir)."""
    mq = new_broker()
    mq.start()
    yield mq
    mq.stop()
    shutil.rmtree(mq.data_dir, ignore_errors=True)


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for one test."""
    with fresh_database(tmp_path) as url:
        yield url


@pytest.fixture
def make_store(database_url: str) -> Iterator[Callable[[], Store]]:
    """Stores on the test's database, schema created; closed after the test."""
    stores: list[Store] = []

    def make() -> Store:
        store = Store(database_url)
        store.create_schema()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def settings_for(database_url: str) -> Callable[..., Settings]:
    """Settings for a gateway on `broker`, with its own database and client id."""

    def make(broker: Mosquitto, **overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "mqtt_url": broker.url,
            "mqtt_password": GATEWAY_PASSWORD,
            # API keys have their own tests (test_security.py, test_ui.py, test_demo.py).
            "api_auth": False,
            "database_url": database_url,
            "mqtt_client_id": f"iotgw-test-{broker.port}",
            "http_port": free_port(),
            # The consumers in the test's process (tests/integration/test_apart.py runs them in their own).
            "consumer_process": False,
            # Tests replay devices at fixed, past times; the skew bound has its own tests.
            "max_clock_skew_s": TEST_CLOCK_SKEW_S,
        }
        return Settings(**{**base, **overrides})

    return make
