"""The gateway's exceptions: one root, subclasses carrying their context as attributes."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A setting or command-line value is unusable."""


class PayloadError(GatewayError):
    """A device message was rejected; `reason` is the dead-letter reason code."""

    def __init__(self, reason: str, detail: str, topic: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.topic = topic


class StoreError(GatewayError):
    """The database could not be read or written."""


class BrokerError(GatewayError):
    """The MQTT broker could not be started or reached."""
