"""`BatchHistogram.observe_all` counts exactly what `observe` would, value by value."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.metrics import BatchHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 30.0)
EDGES = [0.0, 0.001, 0.0010001, 0.01, 0.1, 1.0, 29.999, 30.0, 30.0001, 1e9]


def _samples(values: list[float], *, batched: bool) -> dict[str, float]:
    registry = CollectorRegistry()
    h = BatchHistogram("latency_seconds", "a test histogram", buckets=BUCKETS, registry=registry)
    if batched:
        h.observe_all(values[: len(values) // 2])
        h.observe_all(iter(values[len(values) // 2 :]))  # any iterable, in several batches
    else:
        for v in values:
            h.observe(v)
    return {
        f"{s.name}{s.labels.get('le', '')}": s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def _agree(values: list[float]) -> dict[str, float]:
    batched, single = _samples(values, batched=True), _samples(values, batched=False)
    assert batched.pop("latency_seconds_sum") == pytest.approx(single.pop("latency_seconds_sum"))
    assert batched == single
    return batched


def test_bucket_edges_land_where_observe_puts_them() -> None:
    counts = _agree(EDGES)
    assert counts["latency_seconds_bucket0.001"] == 2  # 0 and 0.001 itself
    assert counts["latency_seconds_bucket30.0"] == 8
    assert counts["latency_seconds_bucket+Inf"] == counts["latency_seconds_count"] == 10


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=50))
def test_any_batch_counts_as_its_values_one_by_one(values: list[float]) -> None:
    assert _agree(values)["latency_seconds_count"] == len(values)
