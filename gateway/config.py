"""Settings: the one place that reads the environment (prefix IOTGW_); CLI flags map onto the same fields."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The broker refuses anything above its own limit (mosquitto.conf: message_size_limit 262144),
# so a gateway limit above that could never be reached.
BROKER_MESSAGE_LIMIT = 256 * 1024

Port = Annotated[int, Field(ge=1, le=65535)]


class Settings(BaseSettings):
    """Gateway configuration; every field is also `IOTGW_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="IOTGW_", extra="forbid", frozen=True)

    mqtt_url: str = "mqtt://localhost:1883"
    mqtt_client_id: str = Field(default="iotgw", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # In-flight window: with ack-after-commit the broker sends at most this many unacknowledged
    # messages, so it bounds both the batch size and the throughput (see README, design notes).
    mqtt_receive_maximum: int = Field(default=2000, ge=10, le=65535)
    mqtt_session_expiry_s: int = Field(default=7 * 24 * 3600, ge=60)
    mqtt_reconnect_max_s: float = Field(default=30.0, gt=0)
    database_url: str = "sqlite:///iotgw.db"
    http_host: str = "127.0.0.1"
    http_port: Port = 8000
    max_message_bytes: int = Field(default=16 * 1024, ge=256, le=BROKER_MESSAGE_LIMIT)
    batch_max: int = Field(default=1000, ge=1, le=10000)
    stuck_after_s: float = Field(default=60.0, gt=0)
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    # Consumers to run, by entry point name, comma-separated; "*" runs every registered one.
    consumers: str = Field(default="*", pattern=r"^\s*(\*|[A-Za-z0-9_.-]+(\s*,\s*[A-Za-z0-9_.-]+)*)?\s*$")
    consumer_poll_s: float = Field(default=1.0, gt=0, le=60)
    # Alert rules; empty: the rules shipped in alerts/rules.yaml.
    rules_file: str = ""
    # The maintenance roster for dispatch (empty: the shipped alerts/roster.yaml).
    roster_file: str = ""
    # Whether a device in maintenance mode raises alerts (by default it does not).
    alerts_in_maintenance: bool = False
    # Per-elevator analytics series exist only while the fleet has at most this many elevators.
    analytics_device_series_max: int = Field(default=100, ge=0)

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            msg = f"mqtt_url must look like mqtt://host:port, got {value!r}"
            raise ValueError(msg)
        try:
            port = parts.port
        except ValueError as exc:
            msg = f"mqtt_url has an invalid port: {value!r}"
            raise ValueError(msg) from exc
        if port is not None and not 1 <= port <= 65535:  # pragma: no cover - urlsplit rejects these
            msg = f"mqtt_url port out of range: {value!r}"
            raise ValueError(msg)
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if "://" not in value:
            msg = f"database_url must be an SQLAlchemy URL such as sqlite:///iotgw.db, got {value!r}"
            raise ValueError(msg)
        return value

    @property
    def consumer_names(self) -> list[str]:
        """`consumers` as a list of names."""
        return [n.strip() for n in self.consumers.split(",") if n.strip()]

    @property
    def mqtt_host(self) -> str:
        """Host part of `mqtt_url`."""
        return urlsplit(self.mqtt_url).hostname or "localhost"

    @property
    def mqtt_port(self) -> int:
        """Port part of `mqtt_url` (1883 when absent)."""
        return urlsplit(self.mqtt_url).port or 1883
