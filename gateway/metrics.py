"""The platform's Prometheus metrics, defined once, against an injectable registry (plugins define
theirs on the same registry: gateway/plugins.py)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class BatchHistogram(Histogram):
    """A Histogram that also takes a batch's observations at once (`observe_all`): one increment per
    bucket hit and one of the sum, where `observe` takes two locked increments per value. It uses
    prometheus_client's bucket storage (`_upper_bounds`, `_buckets`, `_sum`; the version is pinned),
    and tests/unit/test_metrics.py checks it against `observe`."""

    def observe_all(self, amounts: Iterable[float]) -> None:
        """`observe` each of `amounts` (finite values)."""
        self._raise_if_not_observable()  # type: ignore[no-untyped-call]
        bounds = self._upper_bounds
        hits = [0] * len(bounds)
        total = 0.0
        for amount in amounts:
            hits[bisect_left(bounds, amount)] += 1  # the first bound >= amount, as observe() finds it
            total += amount
        self._sum.inc(total)
        for bucket, n in zip(self._buckets, hits, strict=True):
            if n:
                bucket.inc(n)


class Metrics:
    """The gateway's metrics. Tests build one on a fresh `CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None, *, handled_elsewhere: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # What the process running the consumers counts (events, failures, retries, parked, handler
        # time) goes in `handled_here`. With `handled_elsewhere` the consumers run in a child
        # process (gateway/runtime/apart.py): here these stay at 0 and /metrics shows the child's instead.
        self.handled_here = CollectorRegistry() if handled_elsewhere else r
        h = self.handled_here
        self.messages_received = Counter(
            "iotgw_messages_received_total", "MQTT messages received, by channel.", ["channel"], registry=r
        )
        self.messages_rejected = Counter(
            "iotgw_messages_rejected_total",
            "Messages sent to the dead-letter store, by reason.",
            ["reason"],
            registry=r,
        )
        self.events = Counter("iotgw_events_total", "Events appended to the log, by type.", ["type"], registry=r)
        self.events_duplicate = Counter(
            "iotgw_events_duplicate_total",
            "Events not stored because their (device, seq) was stored already.",
            registry=r,
        )
        self.seq_anomalies = Counter(
            "iotgw_seq_anomalies_total", "Device seq gaps, duplicates and out-of-order arrivals.", ["kind"], registry=r
        )
        self.clock_skew = Counter(
            "iotgw_device_clock_skew_total",
            "Messages whose device time was further from the gateway's clock than IOTGW_MAX_CLOCK_SKEW_S "
            "(their events carry the receive time).",
            registry=r,
        )
        self.batch_size = Histogram(
            "iotgw_batch_size_messages", "Messages per committed batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.commit_duration = Histogram(
            "iotgw_commit_duration_seconds", "Time to commit one batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.sequencer_waiting = Gauge(
            "iotgw_sequencer_waiting_messages",
            "Cluster: messages the sequencer holds back until their predecessor (seq - 1) arrives.",
            registry=r,
        )
        self.commit_failures = Counter(
            "iotgw_commit_failures_total", "Batch commits that failed and were retried.", registry=r
        )
        self.device_latency = BatchHistogram(
            "iotgw_ingest_device_latency_seconds",
            "Device timestamp to event stored (includes device clock skew).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.receive_latency = BatchHistogram(
            "iotgw_ingest_receive_latency_seconds",
            "Gateway receive to event stored and acknowledged.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pending = Gauge("iotgw_ingest_pending_messages", "Messages received, not yet committed.", registry=r)
        # By site too: the number of sites is bounded by the deployment, not by the fleet's size.
        self.devices_online = Gauge(
            "iotgw_devices_online", "Devices online, by type and site.", ["type", "site"], registry=r
        )
        self.devices_known = Gauge(
            "iotgw_devices_known", "Devices known to the gateway, by type and site.", ["type", "site"], registry=r
        )
        self.broker_connected = Gauge(
            "iotgw_broker_connected", "1 while the gateway holds a session with the broker.", registry=r
        )
        self.broker_reconnects = Counter(
            "iotgw_broker_disconnects_total", "Times the broker connection was lost.", registry=r
        )
        self.broker_session_lost = Counter(
            "iotgw_broker_session_lost_total",
            "Connections on which the broker had no session for the gateway although it held one "
            "(messages published meanwhile may be lost).",
            registry=r,
        )
        self.database_writable = Gauge(
            "iotgw_database_writable", "0 while batch commits fail (1 from start-up until one does).", registry=r
        )
        # Consumers (one series per consumer: their number is fixed by configuration).
        self.consumer_events = Counter(
            "iotgw_consumer_events_total", "Events handled by a consumer.", ["consumer"], registry=h
        )
        self.consumer_failures = Counter(
            "iotgw_consumer_failures_total", "Consumer handler failures.", ["consumer"], registry=h
        )
        self.consumer_retries = Counter(
            "iotgw_consumer_retries_total", "Retries after a consumer failure.", ["consumer"], registry=h
        )
        self.consumer_parked = Counter(
            "iotgw_consumer_parked_total", "Events parked after too many failed attempts.", ["consumer"], registry=h
        )
        self.consumer_stalled = Gauge(
            "iotgw_consumer_stalled",
            "1 while events wait for a consumer whose cursor has not moved for IOTGW_CONSUMER_STALL_S "
            "(or whose process does not answer); /api/consumers says why.",
            ["consumer"],
            registry=r,
        )
        self.consumer_lag_events = Gauge(
            "iotgw_consumer_lag_events", "Events in the log a consumer has not handled yet.", ["consumer"], registry=r
        )
        self.consumer_lag_seconds = Gauge(
            "iotgw_consumer_lag_seconds",
            "Age of the oldest event a consumer has not handled.",
            ["consumer"],
            registry=r,
        )
        self.consumer_handler_seconds = Histogram(
            "iotgw_consumer_handler_seconds", "Time a consumer takes for one batch.", ["consumer"],
            buckets=_LATENCY_BUCKETS, registry=h,
        )  # fmt: skip
        self.consumer_process_up = Gauge(
            "iotgw_consumer_process_up", "1 while the consumers' own process runs (when they have one).", registry=r
        )
        self.consumer_process_restarts = Counter(
            "iotgw_consumer_process_restarts_total", "Times the consumers' process ended and was started again.",
            registry=r,
        )  # fmt: skip
