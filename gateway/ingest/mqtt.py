"""The gateway's MQTT client: gmqtt, with acknowledgements sent by us, after the commit, in bulk.

gmqtt with `optimistic_acknowledgement=False` already withholds a PUBACK until an async
`on_message` returns, but it pays for that with one asyncio task per message and one socket
write per PUBACK. Profiling a 30,000-message drain showed those two costs at about half of the
event loop's time. So QoS 1 publishes are handed to a plain callback with their packet id, and
`ack()` sends the PUBACKs of a committed batch in one write. A QoS 1 PUBLISH without MQTT 5
properties (what devices send) is decoded here in a few slices, where gmqtt's handler builds
three struct formats and a property dict per packet (a third of the event loop's time); any
other PUBLISH goes through gmqtt's. The packets of a socket read are framed here too
(`_read_packets`, in place of gmqtt's `MQTTProtocol._read_packet`), and those the lean decoder
takes go straight to `sink`; every other packet goes to gmqtt's connection as before. gmqtt is
pinned (pyproject.toml): this leans on its `_read_packet`, `_handle_publish_packet` and
`_handle_qos_1_publish_packet` hooks and its packet builder.
"""

from __future__ import annotations

import functools
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTCommands, MQTTv50
from gmqtt.mqtt.package import CommandWithMidPacket, Package

from gateway.config import Settings
from gateway.errors import ConfigError

log = logging.getLogger(__name__)

_PUBLISH = int(MQTTCommands.PUBLISH)  # (an int: comparing with the IntEnum costs more)

# topic, payload, packet id (None for QoS 0), the connection it arrived on
Sink = Callable[[str, bytes, int | None, object], None]


class AckAfterCommitClient(gmqtt.Client):  # type: ignore[misc]
    """A gmqtt client that passes every message to `sink` and acknowledges only on `ack()`."""

    def __init__(self, client_id: str, sink: Sink, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(client_id, optimistic_acknowledgement=False, **kwargs)
        self._sink = sink
        # QoS 1: the handler gives us the packet id; we never let gmqtt acknowledge.
        handler = self._package_handler
        handler._handle_qos_1_publish_packet = self._on_qos1  # noqa: SLF001
        self._gmqtt_publish = handler._handle_publish_packet  # noqa: SLF001
        handler._handle_publish_packet = self._on_publish  # noqa: SLF001
        # QoS 0 (and anything else gmqtt routes through on_message): nothing to acknowledge.
        self.on_message = self._on_qos0

    @property
    def refused_for_good(self) -> bool:
        """Whether gmqtt stopped reconnecting after a refused CONNACK it deems permanent."""
        return bool(self._package_handler._permanent_failure)  # noqa: SLF001

    @property
    def refusal(self) -> str:
        """The last refusal, as gmqtt words it (e.g. "code 135 (Not authorized)"), or ""."""
        return str(self._package_handler._error or "")  # noqa: SLF001

    @property
    def connection(self) -> object:
        """The current connection; messages remember theirs, and only the live one is acked."""
        return self._connection

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - gmqtt's signature
        connection = await super()._create_connection(*args, **kwargs)
        # Before the CONNECT goes out, so every packet of this connection is framed here.
        connection._protocol._read_packet = functools.partial(self._read_packets, connection)  # noqa: SLF001
        return connection

    def _read_packets(self, connection: Any, data: bytes) -> int:  # noqa: ANN401 - gmqtt's connection
        """The whole packets at the start of `data` (what one socket read left): QoS 1 PUBLISHes
        the lean decoder takes to `sink`, every other packet to gmqtt's connection (it handles it,
        or drops it if the connection was superseded). Returns the bytes used, or -1 for a length
        over MQTT's four bytes (gmqtt then drops the connection). Packet by packet what gmqtt's
        `MQTTProtocol._read_packet` does, without its per-packet Package, clock reads and debug call."""
        size, at = len(data), 0
        live = self._package_handler.current_connection is connection
        lean, sink = self._lean_qos1, self._sink
        while size - at >= 2:  # a fixed header is 2 bytes at least
            length, mult, i = 0, 1, at + 1
            while i < size:
                byte = data[i]
                length += (byte & 0x7F) * mult
                i += 1
                if not byte & 0x80:
                    break
                mult *= 128
                if mult > 2097152:  # 128**3: a fifth length byte is malformed
                    return -1
            else:
                break  # the rest of the fixed header is in the next read
            end = i + length
            if end > size:
                break
            cmd, body = data[at], data[i:end]
            at = end
            if live and cmd & 0xF0 == _PUBLISH:
                fields = lean(cmd, body)
                if fields is not None:
                    try:
                        sink(*fields, connection)
                    except Exception:  # as gmqtt's handler does: the read loop must go on
                        log.exception("handing over a message of %s failed", fields[0][:200])
                    continue
            connection.put_package(Package(cmd, body))
        if at and live:
            connection._last_data_in = time.monotonic()  # noqa: SLF001 - gmqtt's keepalive reads it
        return at

    def _on_publish(self, cmd: int, raw: bytes) -> None:
        """A PUBLISH packet's variable header and payload: topic length and topic, packet id
        (QoS 1 and 2), properties (MQTT 5: their length, then them), the payload."""
        fields = self._lean_qos1(cmd, raw)
        if fields is None:
            self._gmqtt_publish(cmd, raw)  # QoS 0 or 2, properties, a topic alias, a bad topic: gmqtt's
        else:
            self._sink(*fields, self._connection)

    def _lean_qos1(self, cmd: int, raw: bytes) -> tuple[str, bytes, int] | None:
        """Topic, payload and packet id of a QoS 1 PUBLISH without properties; None for any other."""
        if (cmd >> 1) & 3 != 1 or len(raw) < 2:
            return None
        at = 2 + (raw[0] << 8 | raw[1])
        body = at + 2 + (self._connection_state.protocol_version >= MQTTv50)
        if at == 2 or len(raw) < body or (body > at + 2 and raw[at + 2] != 0):
            return None
        try:
            topic = raw[2:at].decode("utf-8")
        except UnicodeDecodeError:
            return None  # gmqtt logs it and hands the topic over as bytes
        return topic, raw[body:], raw[at] << 8 | raw[at + 1]

    def _on_qos1(self, mid: int, payload: bytes, topic: str, properties: Any) -> None:  # noqa: ANN401, ARG002
        self._sink(topic, payload, mid, self._connection)

    def _on_qos0(self, client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> None:  # noqa: ANN401, ARG002
        self._sink(topic, payload, None, self._connection)

    def ack(self, connection: object, mids: Iterable[int]) -> int:
        """Send PUBACKs for `mids` received on `connection`, in one write; returns how many.

        Messages from an earlier connection are not acknowledged here: the broker redelivers
        them on the new one (persistent session), and the store keeps them once.
        """
        conn: Any = self._connection
        if conn is None or id(conn) != id(connection) or conn.is_closing():
            return 0
        proto = self._connection_state.protocol_version
        data = b"".join(
            CommandWithMidPacket.build_package(MQTTCommands.PUBACK, mid, dup=False, proto_ver=proto) for mid in mids
        )
        if data:
            conn.send_package(data)
        return len(data)


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The client TLS context `settings` describe (CA file, optional client certificate)."""
    try:
        ctx = ssl.create_default_context(cafile=settings.mqtt_ca_file or None)
        if settings.mqtt_cert_file:
            ctx.load_cert_chain(settings.mqtt_cert_file, settings.mqtt_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        msg = f"cannot set up TLS for {settings.mqtt_url_safe}: {exc}"
        raise ConfigError(msg) from exc
    return ctx


class _GmqttGivesUp(logging.Filter):
    """gmqtt logs that it gives up on a "permanent" CONNACK refusal; the gateway does not give up
    (`Ingest._on_disconnect` connects again and says so), so that line would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not reconnecting" not in record.getMessage()


MQTT_LOG = logging.getLogger("iotgw.mqtt")


MQTT_LOG.addFilter(_GmqttGivesUp())
