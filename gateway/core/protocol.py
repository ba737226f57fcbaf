"""The device wire protocol: topic + payload bytes in, a validated `DeviceMessage` out.

Pure functions, no I/O. Every rejection is a `PayloadError` whose `reason` becomes the
dead-letter reason and the `iotgw_messages_rejected_total{reason}` label.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import PayloadError

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CHANNELS = ("state", "telemetry", "status")
SUBSCRIPTION = "devices/+/+"


class Reason(StrEnum):
    """Why a message was rejected (dead-letter reason codes; a closed set for metric labels)."""

    TOO_LARGE = "too_large"
    BAD_TOPIC = "bad_topic"
    NOT_UTF8 = "not_utf8"
    BAD_JSON = "bad_json"
    SCHEMA = "schema"
    UNKNOWN_TYPE = "unknown_type"
    DEVICE_MISMATCH = "device_mismatch"
    CHANNEL_MISMATCH = "channel_mismatch"
    TYPE_MISMATCH = "type_mismatch"
    UNKNOWN_DEVICE = "unknown_device"  # not provisioned (IOTGW_REQUIRE_REGISTERED_DEVICES)
    RATE_LIMITED = "rate_limited"  # above the device's rate (IOTGW_DEVICE_RATE)
    INTERNAL_ERROR = "internal_error"  # the gateway failed on this message; kept for a replay


class DeviceType(StrEnum):
    """Device classes the gateway understands."""

    ELEVATOR = "elevator"
    TEMPERATURE = "temperature"
    VIBRATION = "vibration"
    HUMIDITY = "humidity"
    POWER = "power"


SENSOR_UNITS: dict[DeviceType, str] = {
    DeviceType.TEMPERATURE: "C",
    DeviceType.VIBRATION: "mm/s",
    DeviceType.HUMIDITY: "%RH",
    DeviceType.POWER: "W",
}
# The other way round: a reading's unit says what kind of sensor sent it ("sensor" when unknown).
UNIT_TYPES: dict[str, str] = {unit: dtype.value for dtype, unit in SENSOR_UNITS.items()}


def sensor_type_of(unit: object) -> str:
    """The sensor type a reading's unit stands for; `sensor` for a unit no type has."""
    return UNIT_TYPES.get(str(unit), "sensor")


FAULT_CODES = ("DOOR_JAM", "STUCK", "OVERSPEED", "LEVELLING", "POWER")

_Strict = ConfigDict(extra="forbid", frozen=True, strict=True)


class ElevatorData(BaseModel):
    """The full state of an elevator car."""

    model_config = _Strict

    floor: int = Field(ge=-10, le=300)
    direction: Literal["up", "down", "idle"]
    door: Literal["open", "closed", "opening", "closing"]
    mode: Literal["normal", "maintenance", "fault", "out_of_service"]
    load_kg: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False, strict=False)]
    fault: Literal["DOOR_JAM", "STUCK", "OVERSPEED", "LEVELLING", "POWER"] | None = None


class SensorData(BaseModel):
    """One sensor reading."""

    model_config = _Strict

    value: Annotated[float, Field(allow_inf_nan=False, strict=False)]
    unit: Literal["C", "mm/s", "%RH", "W"]


class StatusData(BaseModel):
    """A connection status message (retained on connect, Last Will on loss)."""

    model_config = _Strict

    online: bool


@dataclass(slots=True, frozen=True)
class DeviceMessage:
    """A validated device message. `seq`, `ts` and `type` are None only on status messages."""

    device_id: str
    channel: Literal["state", "telemetry", "status"]
    type: DeviceType | None
    seq: int | None
    ts: datetime | None
    site: str | None
    data: ElevatorData | SensorData | StatusData


def parse_topic(topic: str) -> tuple[str, Literal["state", "telemetry", "status"]]:
    """Split `devices/{id}/{channel}` into (device_id, channel)."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "devices":
        raise PayloadError(Reason.BAD_TOPIC, f"expected devices/<id>/<channel>, got {topic[:200]!r}", topic)
    device_id, channel = parts[1], parts[2]
    if not DEVICE_ID_RE.match(device_id):
        raise PayloadError(Reason.BAD_TOPIC, "device id must match [A-Za-z0-9_-]{1,64}", topic)
    if channel == "state":
        return device_id, "state"
    if channel == "telemetry":
        return device_id, "telemetry"
    if channel == "status":
        return device_id, "status"
    raise PayloadError(Reason.BAD_TOPIC, f"unknown channel {channel[:40]!r} (state, telemetry, status)", topic)


def parse_ts(value: object) -> datetime:
    """Device time: RFC 3339 with a zone, or epoch milliseconds. Returns an aware UTC datetime.
    (Raises ValueError for anything else: pydantic turns that, not TypeError, into a field error.)"""
    if isinstance(value, bool):
        msg = "ts must be an RFC 3339 string or epoch milliseconds"
        raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError as a field error
    if isinstance(value, int | float):
        # A plain comparison: NaN and infinities fail it, and huge ints never reach float() (OverflowError).
        if not 0 <= value < 32_503_680_000_000:  # before year 3000
            msg = "ts epoch milliseconds out of range"
            raise ValueError(msg)
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            msg = "ts needs a time zone (e.g. a trailing Z)"
            raise ValueError(msg)
        try:
            return parsed.astimezone(UTC)
        except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00 is in the year 10000 in UTC
            msg = "ts is out of range (years 1-9999 in UTC)"
            raise ValueError(msg) from None
    msg = "ts must be an RFC 3339 string or epoch milliseconds"
    raise ValueError(msg)


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    seq: Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)]
    ts: datetime
    site: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    data: dict[str, Any]
    device_id: str | None = None

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value: object) -> datetime:
        return parse_ts(value)


class _StatusEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    online: Annotated[bool, Field(strict=True)]
    ts: datetime | None = None
    type: str | None = None
    site: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    device_id: str | None = None

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value: object) -> datetime | None:
        return None if value is None else parse_ts(value)


def _schema_error(exc: ValidationError, topic: str) -> PayloadError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "message"
    return PayloadError(Reason.SCHEMA, f"{where}: {first['msg']}", topic)


def _device_type(name: str | None, topic: str) -> DeviceType | None:
    if name is None:
        return None
    try:
        return DeviceType(name)
    except ValueError:
        allowed = ", ".join(t.value for t in DeviceType)
        raise PayloadError(Reason.UNKNOWN_TYPE, f"type {name[:40]!r} is not one of {allowed}", topic) from None


def _check_identity(claimed: str | None, device_id: str, topic: str) -> None:
    # Identity comes from the topic (tied to the authenticated client by the broker ACL).
    if claimed is not None and claimed != device_id:
        raise PayloadError(
            Reason.DEVICE_MISMATCH, f"payload claims device {claimed[:64]!r} on the topic of {device_id!r}", topic
        )


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def parse(topic: str, payload: bytes, *, max_bytes: int = 16 * 1024) -> DeviceMessage:
    """Validate one MQTT message against the device contract (docs/protocol.md)."""
    if len(payload) > max_bytes:
        raise PayloadError(Reason.TOO_LARGE, f"{len(payload)} bytes exceeds the limit of {max_bytes}", topic)
    device_id, channel = parse_topic(topic)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(Reason.NOT_UTF8, f"payload is not UTF-8 (byte {exc.start})", topic) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PayloadError(Reason.BAD_JSON, f"{exc.msg} at line {exc.lineno} column {exc.colno}", topic) from None
    except RecursionError:
        raise PayloadError(Reason.BAD_JSON, "JSON nested too deeply", topic) from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.int_info)
        raise PayloadError(Reason.SCHEMA, f"a number is too long: {str(exc)[:80]}", topic) from None
    if not isinstance(raw, dict):
        raise PayloadError(Reason.SCHEMA, f"message must be a JSON object, got {type(raw).__name__}", topic)
    # NUL can only come as the escape \u0000 (JSON refuses the raw byte in strings). No database
    # text column takes it (PostgreSQL refuses the whole commit), and no device needs it.
    if "\\u0000" in text and _has_nul(raw):
        raise PayloadError(Reason.SCHEMA, "NUL characters (\\u0000) are not accepted in device messages", topic)
    if channel == "status":
        return _parse_status(raw, device_id, topic)
    return _parse_data(raw, device_id, channel, topic)


def _parse_status(raw: dict[str, Any], device_id: str, topic: str) -> DeviceMessage:
    try:
        env = _StatusEnvelope.model_validate(raw)
    except ValidationError as exc:
        raise _schema_error(exc, topic) from None
    _check_identity(env.device_id, device_id, topic)
    return DeviceMessage(
        device_id=device_id,
        channel="status",
        type=_device_type(env.type, topic),
        seq=None,
        ts=env.ts,
        site=env.site,
        data=StatusData(online=env.online),
    )


def _parse_data(
    raw: dict[str, Any], device_id: str, channel: Literal["state", "telemetry"], topic: str
) -> DeviceMessage:
    try:
        env = _Envelope.model_validate(raw)
    except ValidationError as exc:
        raise _schema_error(exc, topic) from None
    _check_identity(env.device_id, device_id, topic)
    dtype = _device_type(env.type, topic)
    assert dtype is not None  # noqa: S101 - env.type is required, so _device_type returned a type
    expected = "state" if dtype is DeviceType.ELEVATOR else "telemetry"
    if channel != expected:
        raise PayloadError(Reason.CHANNEL_MISMATCH, f"{dtype.value} devices publish on /{expected}", topic)
    data: ElevatorData | SensorData
    try:
        data = (
            ElevatorData.model_validate(env.data)
            if dtype is DeviceType.ELEVATOR
            else SensorData.model_validate(env.data)
        )
    except ValidationError as exc:
        raise _schema_error(exc, topic) from None
    if isinstance(data, SensorData) and data.unit != SENSOR_UNITS[dtype]:
        raise PayloadError(Reason.SCHEMA, f"data.unit: {dtype.value} readings are in {SENSOR_UNITS[dtype]}", topic)
    return DeviceMessage(
        device_id=device_id, channel=channel, type=dtype, seq=env.seq, ts=env.ts, site=env.site, data=data
    )
