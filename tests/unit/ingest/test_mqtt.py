"""The gateway's own decoding of a PUBLISH hands over what gmqtt's handler does, for every packet
(with and without MQTT 5 properties, QoS 0 and 1, MQTT 3.1.1 and 5, odd topics)."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.ingest.mqtt import AckAfterCommitClient

PROPERTIES = [
    b"",
    b"\x02" + struct.pack("!I", 60),  # message expiry interval
    b"\x26" + struct.pack("!H", 1) + b"k" + struct.pack("!H", 1) + b"v",  # a user property
    b"\x01\x01",  # payload format indicator: UTF-8
]


def _packet(topic: bytes, payload: bytes, mid: int, qos: int, props: bytes | None) -> tuple[int, bytes]:
    raw = struct.pack("!H", len(topic)) + topic
    if qos:
        raw += struct.pack("!H", mid)
    if props is not None:
        raw += bytes([len(props)]) + props
    return 0x30 | qos << 1, raw + payload


def _handed_over(cmd: int, raw: bytes, version: int, *, lean: bool) -> list[tuple[Any, ...]]:
    got: list[tuple[Any, ...]] = []
    client = AckAfterCommitClient("probe", lambda *fields: got.append(fields[:3]))
    client._connection_state.protocol_version = version
    handle = client._package_handler._handle_publish_packet if lean else client._gmqtt_publish
    handle(cmd, raw)
    return got


_PUBLISH = st.tuples(
    st.one_of(st.binary(max_size=80), st.text(max_size=40).map(str.encode)),  # topic
    st.binary(max_size=200),  # payload
    st.integers(1, 65535),  # packet id
    st.sampled_from([0, 1]),  # QoS
    st.sampled_from(PROPERTIES),
)


@given(_PUBLISH, st.sampled_from([4, 5]))
def test_the_lean_decoder_hands_over_what_gmqtt_does(
    publish: tuple[bytes, bytes, int, int, bytes], version: int
) -> None:
    topic, payload, mid, qos, props = publish
    cmd, raw = _packet(topic, payload, mid, qos, props if version == 5 else None)
    lean = _handed_over(cmd, raw, version, lean=True)
    assert lean == _handed_over(cmd, raw, version, lean=False)


def test_a_device_reading_is_decoded_by_the_lean_path() -> None:
    got: list[tuple[Any, ...]] = []
    client = AckAfterCommitClient("probe", lambda *fields: got.append(fields[:3]))
    client._gmqtt_publish = lambda *_: got.append(("gmqtt",))
    client._package_handler._handle_publish_packet(*_packet(b"devices/t-1/telemetry", b"{}", 7, 1, b""))
    assert got == [("devices/t-1/telemetry", b"{}", 7)]
