"""The gateway's exceptions: one root, subclasses carrying their context as attributes."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A setting or command-line value is unusable."""


class ReservedNameError(ConfigError):
    """A device id that is one of the gateway's own broker names (its account or client ids)."""


class PayloadError(GatewayError):
    """A device message was rejected; `reason` is the dead-letter reason code."""

    def __init__(self, reason: str, detail: str, topic: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.topic = topic


class StoreError(GatewayError):
    """The database could not be read or written. `transient`: the database's state (down, locked,
    full) is to blame and a retry may succeed; else the data written was refused."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class BrokerError(GatewayError):
    """The MQTT broker could not be started or reached."""


class ReplayRangeError(GatewayError):
    """A replay asked for a position beyond the log's head (`head` is the last event's position)."""

    def __init__(self, position: int, head: int) -> None:
        super().__init__(
            f"from_position {position} is beyond the log: its last event is at {head}; replay from at most {head + 1}"
        )
        self.position = position
        self.head = head
