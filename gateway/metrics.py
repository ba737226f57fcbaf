"""Every Prometheus metric of the gateway, defined once, against an injectable registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Metrics:
    """The gateway's metrics. Tests build one on a fresh `CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
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
        self.batch_size = Histogram(
            "iotgw_batch_size_messages", "Messages per committed batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.commit_duration = Histogram(
            "iotgw_commit_duration_seconds", "Time to commit one batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.commit_failures = Counter(
            "iotgw_commit_failures_total", "Batch commits that failed and were retried.", registry=r
        )
        self.device_latency = Histogram(
            "iotgw_ingest_device_latency_seconds",
            "Device timestamp to event stored (includes device clock skew).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.receive_latency = Histogram(
            "iotgw_ingest_receive_latency_seconds",
            "Gateway receive to event stored and acknowledged.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pending = Gauge("iotgw_ingest_pending_messages", "Messages received, not yet committed.", registry=r)
        self.devices_online = Gauge("iotgw_devices_online", "Devices online, by type.", ["type"], registry=r)
        self.devices_known = Gauge(
            "iotgw_devices_known", "Devices known to the gateway, by type.", ["type"], registry=r
        )
        self.broker_connected = Gauge(
            "iotgw_broker_connected", "1 while the gateway holds a session with the broker.", registry=r
        )
        self.broker_reconnects = Counter(
            "iotgw_broker_disconnects_total", "Times the broker connection was lost.", registry=r
        )
        self.database_writable = Gauge(
            "iotgw_database_writable", "1 while the last batch commit succeeded.", registry=r
        )
