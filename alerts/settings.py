"""The alerts plugin's settings: they join the gateway's (`IOTGW_<FIELD>`), registered under the
entry point group `iotgw.settings`. Nothing of the gateway is imported here: the settings load first."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator


class AlertsSettings(BaseModel):
    """Alert rules, notifications and the maintenance roster."""

    rules_file: str = Field(default="", description="the alert rules (empty: the shipped alerts/rules.yaml)")
    roster_file: str = Field(
        default="",
        description="technicians, shifts and escalation policies for dispatch (empty: the shipped roster)",
    )
    alerts_in_maintenance: bool = Field(default=False, description="whether a device in maintenance mode raises alerts")
    notify_max_age_s: float = Field(
        default=86400.0,
        gt=0,
        description=(
            "a notification failing for now (5xx, timeouts, no connection) is retried this long, then "
            "given up as expired"
        ),
    )
    ack_link_key: str = Field(
        default="",
        description=(
            "the secret that signs the acknowledge links in notifications (empty: no links); at least "
            "32 characters, e.g. from `openssl rand -hex 32`"
        ),
    )
    ack_link_valid_s: float = Field(
        default=86400.0, gt=0, description="how long an acknowledge link in a notification can be used"
    )

    @field_validator("ack_link_key")
    @classmethod
    def _long_enough(cls, value: str) -> str:
        if value and len(value) < 32:
            msg = "ack_link_key: at least 32 characters (e.g. openssl rand -hex 32)"
            raise ValueError(msg)
        return value
