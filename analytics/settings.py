"""The analytics plugin's settings: they join the gateway's (`IOTGW_<FIELD>`), registered under the
entry point group `iotgw.settings`. Nothing of the gateway is imported here: the settings load first."""

from __future__ import annotations

from pydantic import BaseModel, Field


class AnalyticsSettings(BaseModel):
    """How much the analytics consumer publishes."""

    analytics_device_series_max: int = Field(
        default=100,
        ge=0,
        description="per-elevator analytics series exist only while the fleet has at most this many elevators",
    )
