"""The device wire protocol: topic + payload bytes in, a validated `DeviceMessage` out.

Pure functions, no I/O. Every rejection is a `PayloadError` whose `reason` becomes the
dead-letter reason and the `iotgw_messages_rejected_total{reason}` label.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

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


class _Data(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """A device's data: strict types (no "3" for 3, no true for 1), unknown fields refused."""

    def model_dump(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return msgspec.structs.asdict(self)


class ElevatorData(_Data, frozen=True):
    """The full state of an elevator car."""

    floor: Annotated[int, msgspec.Meta(ge=-10, le=300)]
    direction: Literal["up", "down", "idle"]
    door: Literal["open", "closed", "opening", "closing"]
    mode: Literal["normal", "maintenance", "fault", "out_of_service"]
    load_kg: Annotated[float, msgspec.Meta(ge=0, le=100_000)]  # an integer is taken too; NaN fails the bounds
    fault: Literal["DOOR_JAM", "STUCK", "OVERSPEED", "LEVELLING", "POWER"] | None = None


class SensorData(_Data, frozen=True):
    """One sensor reading."""

    value: float  # finite: checked after decoding (a float with no bounds takes NaN)
    unit: Literal["C", "mm/s", "%RH", "W"]


class StatusData(_Data, frozen=True):
    """A connection status message (retained on connect, Last Will on loss)."""

    online: bool


class DeviceMessage(msgspec.Struct, frozen=True, gc=False):
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
    """Device time: RFC 3339 with a zone, or epoch milliseconds. Returns an aware UTC datetime;
    anything else is a ValueError saying what `ts` must be."""
    if isinstance(value, bool):
        msg = "ts must be an RFC 3339 string or epoch milliseconds"
        raise ValueError(msg)  # noqa: TRY004 - the caller reports a ValueError as a schema error
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


_Site = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class _EnvelopeFields(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False, kw_only=True):
    """A state or telemetry message's fields but its data."""

    type: str
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    ts: str | int | float
    site: _Site | None = None
    device_id: str | None = None


class _Envelope(_EnvelopeFields, frozen=True, kw_only=True):
    """The message as it comes off the wire; `data` is decoded by its type."""

    data: msgspec.Raw


class _LooseEnvelope(_EnvelopeFields, frozen=True, kw_only=True):
    """The same message from a parsed JSON object, for the rare one the fast path refused."""

    data: dict[str, Any]


class _StatusEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    online: bool
    ts: str | int | float | None = None
    type: str | None = None
    site: _Site | None = None
    device_id: str | None = None


# The values each of the data's fixed-choice fields takes, by the name a `detail` gives it.
_CHOICES = {
    f"data.{info.name}": [
        v for arg in (info.type, *get_args(info.type)) if get_origin(arg) is Literal for v in get_args(arg)
    ]
    for model in (ElevatorData, SensorData)
    for info in msgspec.structs.fields(model)
}
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_NAMED = re.compile(r"^Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]*)`$")


def _schema_error(exc: msgspec.ValidationError | RecursionError, topic: str, within: str = "") -> PayloadError:
    """`where: what`, e.g. `data.floor: Expected `int` >= -10` or `seq: field required`."""
    found = _AT.match(str(exc))
    assert found is not None  # noqa: S101 - the pattern matches any text
    msg, where = found["msg"], [within, *re.split(r"[.\[\]]+", found["path"] or "")]
    if named := _NAMED.match(msg):
        where.append(named["name"][:64])
        msg = "field required" if named["what"] == "missing required" else "unknown field (not in the protocol)"
    field = ".".join(w for w in where if w) or "message"
    if msg.startswith("Invalid enum value") and _CHOICES.get(field):
        msg += f" (one of {', '.join(_CHOICES[field])})"
    return PayloadError(Reason.SCHEMA, f"{field}: {msg[:200]}", topic)


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


def _device_time(value: str | float | None, topic: str) -> datetime | None:
    try:
        return None if value is None else parse_ts(value)
    except ValueError as exc:
        raise PayloadError(Reason.SCHEMA, f"ts: {exc}", topic) from None


def _lone_surrogate(value: object, where: str = "") -> str | None:
    """Where a string (or a key) holds a lone UTF-16 surrogate, e.g. `site` or `data.door`; None if nowhere."""
    if isinstance(value, str):
        return None if value.isascii() or not any("\ud800" <= c <= "\udfff" for c in value) else where or "message"
    if isinstance(value, dict):
        for k, v in value.items():
            name = f"{where}.{k}" if where else str(k)
            if (found := _lone_surrogate(k, where or "message") or _lone_surrogate(v, name)) is not None:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            if (found := _lone_surrogate(v, f"{where}.{i}" if where else str(i))) is not None:
                return found
    return None


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


_Channel = Literal["state", "telemetry", "status"]
_STATUS = msgspec.json.Decoder(_StatusEnvelope)
_ENVELOPE = msgspec.json.Decoder(_Envelope)
_ELEVATOR = msgspec.json.Decoder(ElevatorData)
_SENSOR = msgspec.json.Decoder(SensorData)


def parse(topic: str, payload: bytes, *, max_bytes: int = 16 * 1024) -> DeviceMessage:
    """Validate one MQTT message against the device contract (docs/protocol.md).

    A valid message is decoded and validated straight from its bytes. One the decoder refuses
    (or one with an escaped NUL) takes the careful path, which finds the first thing wrong in the
    order the reasons are documented: UTF-8, JSON, the envelope, the device, the data."""
    if len(payload) > max_bytes:
        raise PayloadError(Reason.TOO_LARGE, f"{len(payload)} bytes exceeds the limit of {max_bytes}", topic)
    device_id, channel = parse_topic(topic)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(Reason.NOT_UTF8, f"payload is not UTF-8 (byte {exc.start})", topic) from None
    if "\\u0000" not in text:
        # A decoded envelope is a whole, valid JSON object: the checks after it are the careful path's.
        try:
            if channel == "status":
                return _status(_STATUS.decode(text), device_id, topic)
            env = _ENVELOPE.decode(text)
        except (msgspec.MsgspecError, RecursionError):
            return _parse_carefully(text, device_id, channel, topic)
        if memoryview(env.data)[0] != ord("{"):  # the envelope's data must be an object before anything else
            return _parse_carefully(text, device_id, channel, topic)
        ts, dtype = _checked(env, device_id, channel, topic)
        try:
            data: ElevatorData | SensorData = (_ELEVATOR if dtype is DeviceType.ELEVATOR else _SENSOR).decode(env.data)
        except (msgspec.MsgspecError, RecursionError):
            return _parse_carefully(text, device_id, channel, topic)
        data = _checked_data(data, dtype, topic)
        return DeviceMessage(device_id, channel, dtype, env.seq, ts, env.site, data)
    return _parse_carefully(text, device_id, channel, topic)


def _parse_carefully(text: str, device_id: str, channel: _Channel, topic: str) -> DeviceMessage:
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
    # An unpaired \ud800-\udfff escape is no character: no database stores it as text (json reads it).
    if ("\\ud" in text or "\\uD" in text) and (where := _lone_surrogate(raw)) is not None:
        raise PayloadError(
            Reason.SCHEMA, f"{where[:100]}: a lone UTF-16 surrogate (\\ud800-\\udfff) is no character", topic
        )
    try:
        if channel == "status":
            return _status(msgspec.convert(raw, _StatusEnvelope), device_id, topic)
        env = msgspec.convert(raw, _LooseEnvelope)
    except (msgspec.ValidationError, RecursionError) as exc:
        raise _schema_error(exc, topic) from None
    ts, dtype = _checked(env, device_id, channel, topic)
    try:
        model: type[ElevatorData | SensorData] = ElevatorData if dtype is DeviceType.ELEVATOR else SensorData
        data = msgspec.convert(env.data, model)
    except (msgspec.ValidationError, RecursionError) as exc:
        raise _schema_error(exc, topic, "data") from None
    data = _checked_data(data, dtype, topic)
    return DeviceMessage(device_id, channel, dtype, env.seq, ts, env.site, data)


def _status(env: _StatusEnvelope, device_id: str, topic: str) -> DeviceMessage:
    ts = _device_time(env.ts, topic)
    _check_identity(env.device_id, device_id, topic)
    dtype = _device_type(env.type, topic)
    return DeviceMessage(device_id, "status", dtype, None, ts, env.site, StatusData(online=env.online))


def _checked(env: _EnvelopeFields, device_id: str, channel: _Channel, topic: str) -> tuple[datetime, DeviceType]:
    """The envelope's time, the device's identity, its type and channel, in that order."""
    ts = _device_time(env.ts, topic)
    assert ts is not None  # noqa: S101 - a data message's ts is required
    _check_identity(env.device_id, device_id, topic)
    dtype = _device_type(env.type, topic)
    assert dtype is not None  # noqa: S101 - env.type is required, so _device_type returned a type
    expected = "state" if dtype is DeviceType.ELEVATOR else "telemetry"
    if channel != expected:
        raise PayloadError(Reason.CHANNEL_MISMATCH, f"{dtype.value} devices publish on /{expected}", topic)
    return ts, dtype


def _checked_data(data: ElevatorData | SensorData, dtype: DeviceType, topic: str) -> ElevatorData | SensorData:
    if isinstance(data, SensorData):
        if not math.isfinite(data.value):
            raise PayloadError(Reason.SCHEMA, "data.value: must be a finite number", topic)
        if data.unit != SENSOR_UNITS[dtype]:
            raise PayloadError(Reason.SCHEMA, f"data.unit: {dtype.value} readings are in {SENSOR_UNITS[dtype]}", topic)
    return data
