"""The gateway's own decoding of a PUBLISH hands over what gmqtt's handler does, for every packet
(with and without MQTT 5 properties, QoS 0 and 1, MQTT 3.1.1 and 5, odd topics), and its framing
of a socket's bytes into packets what gmqtt's does (however the reads cut the stream)."""

from __future__ import annotations

import logging
import struct
from types import MethodType, SimpleNamespace
from typing import Any

import pytest
from gmqtt.mqtt.connection import MQTTConnection
from gmqtt.mqtt.protocol import MQTTProtocol
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


def _fixed_header(cmd: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:
        n, byte = n >> 7, n & 0x7F
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            return bytes([cmd]) + length + body


_OTHER = st.sampled_from([(0x40, b"\x00\x07"), (0xD0, b""), (0x90, b"\x00\x02\x01")])  # PUBACK, PINGRESP, SUBACK


def _read(stream: bytes, cuts: list[int], *, ours: bool) -> list[tuple[Any, ...]]:
    """What a client hands over (messages, and the other packets its handler got) for `stream`,
    read in the pieces `cuts` makes, by the gateway's framing or by gmqtt's."""
    got: list[tuple[Any, ...]] = []
    client = AckAfterCommitClient("probe", lambda *fields: got.append(fields[:3]))
    client._connection_state.protocol_version = 5
    handler = client._package_handler
    for name in ("_handle_puback_packet", "_handle_pingresp_packet", "_handle_suback_packet"):
        setattr(handler, name, lambda cmd, raw: got.append((cmd, raw)))
    connection = SimpleNamespace(_handler=handler, _logger=logging.getLogger("probe"), _last_data_in=0.0)
    connection.put_package = MethodType(MQTTConnection.put_package, connection)
    handler._connection = client._connection = connection
    protocol = SimpleNamespace(_connection=connection)

    def read(data: bytes) -> int:
        return client._read_packets(connection, data) if ours else MQTTProtocol._read_packet(protocol, data)

    buf, start = b"", 0
    for cut in [*sorted(cuts), len(stream)]:
        buf += stream[start:cut]
        start = max(start, cut)
        used = read(buf)
        assert used >= 0
        buf = buf[used:]
    assert buf == b""
    return got


@given(
    st.lists(st.one_of(_PUBLISH.map(lambda p: _packet(*p[:4], p[4])), _OTHER), max_size=12),
    st.lists(st.integers(0, 3000), max_size=8),
)
def test_the_gateways_framing_hands_over_what_gmqtts_does(packets: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(_fixed_header(cmd, body) for cmd, body in packets)
    cuts = [c % (len(stream) + 1) for c in cuts]
    assert _read(stream, cuts, ours=True) == _read(stream, cuts, ours=False)


def test_readings_and_other_packets_are_handed_over_in_order() -> None:
    # Lengths of one, two and three bytes, and reads cut inside headers and bodies.
    readings = [_packet(b"devices/t-1/telemetry", b"x" * n, mid, 1, b"") for mid, n in ((7, 2), (8, 300), (9, 20000))]
    stream = b"".join(_fixed_header(*p) for p in (readings[0], (0x40, b"\x00\x07"), *readings[1:]))
    expected = [("devices/t-1/telemetry", b"x" * n, mid) for mid, n in ((7, 2), (8, 300), (9, 20000))]
    expected.insert(1, (0x40, b"\x00\x07"))
    for cuts in ([], [1, 30, 31, 33, 200], [len(stream) - 1]):
        assert _read(stream, cuts, ours=True) == expected


def test_a_length_of_five_bytes_is_malformed() -> None:
    # (gmqtt says so only once the 256 MB the first four promise have arrived.)
    client = AckAfterCommitClient("probe", lambda *_: None)
    connection = SimpleNamespace(put_package=lambda _pkg: None, _last_data_in=0.0)
    assert client._read_packets(connection, b"\x32\xff\xff\xff\xff\x01" + b"x" * 16) == -1
    assert client._read_packets(connection, b"\x32\xff\xff\xff\x7f") == 0  # the longest length: wait for it


def test_a_superseded_connection_hands_nothing_over() -> None:
    got: list[Any] = []
    client = AckAfterCommitClient("probe", lambda *fields: got.append(fields))
    old = SimpleNamespace(put_package=lambda pkg: got.append(("gmqtt", pkg.cmd, pkg.data)), _last_data_in=0.0)
    client._package_handler._connection = SimpleNamespace()  # the live one is another
    stream = _fixed_header(*_packet(b"devices/t-1/telemetry", b"{}", 7, 1, b""))
    assert client._read_packets(old, stream) == len(stream)
    assert got == [("gmqtt", 0x32, stream[2:])]  # to gmqtt's connection, which drops it


def test_a_read_that_ends_inside_a_header_still_counts_as_data_in() -> None:
    # gmqtt's keepalive closes a connection it has heard nothing from: whole packets are something.
    client = AckAfterCommitClient("probe", lambda *_: None)
    connection = SimpleNamespace(put_package=lambda _pkg: None, _last_data_in=0.0)
    client._package_handler._connection = connection
    reading = _fixed_header(*_packet(b"devices/t-1/telemetry", b"{}", 7, 1, b""))
    big = _fixed_header(*_packet(b"devices/t-1/telemetry", b"x" * 300, 8, 1, b""))
    assert client._read_packets(connection, reading + big[:2]) == len(reading)
    assert connection._last_data_in > 0


def test_a_sink_that_fails_loses_the_read_loop_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    got: list[int] = []

    def sink(_topic: str, _payload: bytes, mid: int, _connection: object) -> None:
        if mid == 8:
            raise RuntimeError("a bug downstream")
        got.append(mid)

    client = AckAfterCommitClient("probe", sink)
    connection = SimpleNamespace(put_package=lambda _pkg: None, _last_data_in=0.0)
    client._package_handler._connection = connection
    stream = b"".join(_fixed_header(*_packet(b"devices/t-1/telemetry", b"{}", mid, 1, b"")) for mid in (7, 8, 9))
    assert client._read_packets(connection, stream) == len(stream)
    assert got == [7, 9]
    assert "handing over a message of devices/t-1/telemetry failed" in caplog.text
