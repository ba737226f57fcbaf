"""The analytics plugin: its consumer's figures served under /api/analytics and as gauges."""

from __future__ import annotations

import functools
import logging

from fastapi import APIRouter
from prometheus_client import CollectorRegistry, Gauge

from analytics.consumer import publish_metrics
from analytics.routes import router
from gateway.plugins import Plugin

log = logging.getLogger(__name__)
PUBLISH_EVERY_S = 10.0


class AnalyticsFamilies:
    """The analytics gauges (a replay rebuilds the figures, so they may go down)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        figures = {
            "trips": "Trips completed.",
            "door_cycles": "Door openings.",
            "faults": "Faults raised.",
            "entrapments": "Stuck with load inside.",
            "availability_ratio": "Share of observed time in normal service.",
            "mtbf_seconds": "Time in service per fault.",
            "mttr_seconds": "Mean time from fault raised to cleared.",
        }
        self.site_figures = {
            k: Gauge(f"iotgw_site_elevator_{k}", doc + " Per site.", ["site"], registry=r) for k, doc in figures.items()
        }
        # Per elevator only while the fleet is within IOTGW_ANALYTICS_DEVICE_SERIES_MAX.
        self.elevator_figures = {
            k: Gauge(f"iotgw_elevator_{k}", doc + " Per elevator.", ["device", "site"], registry=r)
            for k, doc in figures.items()
        }


class AnalyticsPlugin(Plugin):
    """Active with the analytics consumer."""

    name = "analytics"
    consumers = ("analytics",)
    migrations = "analytics.migrations"

    @classmethod
    def define_metrics(cls, registry: CollectorRegistry) -> AnalyticsFamilies:
        return AnalyticsFamilies(registry)

    def api(self) -> APIRouter:
        return router

    async def run(self) -> None:
        """Refresh the gauges from the consumer's tables every 10 s."""
        publish = functools.partial(
            publish_metrics,
            self.host.store,
            self.metrics,
            max_device_series=self.host.settings.analytics_device_series_max,
        )
        await self.host.every(PUBLISH_EVERY_S, publish, "analytics metrics")
