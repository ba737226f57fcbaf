"""MQTT ingest: receive, validate, normalise, commit a batch, THEN acknowledge.

Messages arrive through `AckAfterCommitClient` (gateway/ingest/mqtt.py) with their packet ids;
the writer (gateway/ingest/writer.py) commits a batch and only then has the client send the
batch's PUBACKs. A crash before the commit leaves the messages unacknowledged, and the broker
redelivers them to the persistent session (fixed client id, clean start off) after the restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import datetime
from typing import Any

import gmqtt

from gateway.config import Settings
from gateway.core.clock import utcnow
from gateway.core.protocol import CHANNELS, Reason
from gateway.ingest.mqtt import MQTT_LOG, AckAfterCommitClient, tls_context
from gateway.ingest.pipeline import (
    Clock,
    Pending,
)
from gateway.ingest.writer import Writer
from gateway.log import Store
from gateway.metrics import Metrics
from gateway.tasks import stop_task

log = logging.getLogger("gateway.ingest")


class Ingest:
    """The MQTT subscriber and batch writer. One instance per gateway process."""

    def __init__(  # noqa: PLR0913
        self,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        *,
        clock: Clock = utcnow,
        on_commit: Callable[[set[str]], None] | None = None,
        on_inbox: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_commit = on_commit
        self.on_inbox = on_inbox  # cluster: a batch went into the inbox (the sequencer's input)
        self.store = store
        self.metrics = metrics
        # Every reason and channel from the start: a dashboard's rate() sees 0, not "no data".
        for reason in Reason:
            metrics.messages_rejected.labels(reason.value)
        for channel in CHANNELS:
            metrics.messages_received.labels(channel)
        self.clock = clock
        self.connected = False
        self.subscribed = asyncio.Event()
        self.writer = Writer(
            settings, store, metrics, clock=clock, ack=self._acknowledge, on_commit=on_commit, on_inbox=on_inbox
        )
        self._client: Any = None
        self._tls = tls_context(settings) if settings.mqtt_tls else False
        self._connector: asyncio.Task[None] | None = None
        self._delay = 0.5
        self._stopping = False
        self._session_held = False  # whether the broker should have a session for us (see _on_connect)
        self._read_at: datetime | None = None  # the receive time of the messages of one socket read

    @property
    def database_ok(self) -> bool:
        """Whether the last commit (or probe) succeeded."""
        return self.writer.database_ok

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batch writer and connect (retrying in the background)."""
        # Read and (create_schema, before this) written: writable until a commit says otherwise, as
        # /ready says; 0 from here until the first commit would fire IotgwDatabaseNotWritable on a
        # quiet gateway.
        self.metrics.database_writable.set(1)
        self._session_held = await self.writer.call(
            self.store.had_broker_session, self.settings.client_id, self.settings.mqtt_url_safe
        )
        await self.writer.start()
        self._client = self._make_client()
        self._connector = asyncio.create_task(self._connect_loop(), name="iotgw-ingest-connect")

    async def stop(self) -> None:
        """Commit and acknowledge what was received, then leave the broker (the session persists)."""
        self._stopping = True
        await stop_task(self._connector)
        await self.writer.drain(10)
        if self._client is not None and self.connected:
            try:
                await asyncio.wait_for(self._client.disconnect(), timeout=5)
            except (TimeoutError, OSError) as exc:
                log.warning("broker disconnect failed: %s", exc)
        self.connected = False
        self.metrics.broker_connected.set(0)
        await self.writer.stop()

    def _make_client(self) -> Any:  # noqa: ANN401 - gmqtt is untyped
        s = self.settings
        client = AckAfterCommitClient(
            s.client_id,
            self._receive,
            clean_session=False,
            session_expiry_interval=s.mqtt_session_expiry_s,
            receive_maximum=s.mqtt_receive_maximum,
            logger=MQTT_LOG,
        )
        if s.mqtt_login is not None:
            client.set_auth_credentials(*s.mqtt_login)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay = self._delay
        return client

    async def _connect_loop(self) -> None:
        s = self.settings
        while True:
            try:
                await self._client.connect(s.mqtt_host, s.mqtt_port, keepalive=30, ssl=self._tls)
            except gmqtt.mqtt.handler.MQTTConnectError as exc:
                log.warning(
                    "broker %s refused the gateway's login (%s); retrying in %.1fs", s.mqtt_url_safe, exc, self._delay
                )
                await asyncio.sleep(self._delay)
                self._backoff()
                continue
            except OSError as exc:
                log.warning("broker %s unreachable (%s); retrying in %.1fs", s.mqtt_url_safe, exc, self._delay)
                await asyncio.sleep(self._delay)
                self._backoff()
                continue
            return

    def _backoff(self) -> None:
        # Exponential with jitter, capped; gmqtt's own reconnect uses the delay we set here.
        self._delay = min(self._delay * 2, self.settings.mqtt_reconnect_max_s) * random.uniform(0.8, 1.0)  # noqa: S311
        if self._client is not None:
            self._client.reconnect_delay = self._delay

    # -- gmqtt callbacks -----------------------------------------------------------------------

    def _on_connect(self, client: Any, flags: int, rc: int, properties: Any) -> None:  # noqa: ANN401, ARG002
        s = self.settings
        present = bool(flags)
        log.info("connected to %s as %s (session present: %s)", s.mqtt_url_safe, s.client_id, present)
        if self._session_held and not present:
            # Ours before (this process connected, or the database says a run before it did): the
            # broker dropped it, and with it whatever it queued for us while we were away.
            log.error(
                "the broker %s had no session for client id %s although the gateway held one: messages "
                "published while the gateway was disconnected may be lost (another client connected with "
                "this id and a clean session, the broker lost its persistence, or the session expired)",
                s.mqtt_url_safe,
                s.client_id,
            )
            self.metrics.broker_session_lost.inc()
        if not self._session_held:
            self._session_held = True
            noted = self.writer.call(self.store.note_broker_session, s.client_id, s.mqtt_url_safe, self.clock())
            noted.add_done_callback(self._session_noted)
        self.connected = True
        self.metrics.broker_connected.set(1)
        self._delay = 0.5
        client.reconnect_delay = self._delay
        # Retained messages only for a subscription the session did not have yet: a session that
        # survived (a restart, a reconnect) has seen them, and an invalid one would be
        # dead-lettered again on every reconnect.
        client.subscribe(self.settings.subscription, qos=1, retain_handling_options=1)

    def _session_noted(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            self._session_held = False  # noted again on the next connect
            log.warning("cannot note the broker session in the database: %s", done.exception())

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:  # noqa: ANN401, ARG002
        if self.connected and not self._stopping:
            log.warning("lost the broker %s; reconnecting with backoff", self.settings.mqtt_url_safe)
            self.metrics.broker_reconnects.inc()
        self.connected = False
        self.metrics.broker_connected.set(0)
        self._backoff()
        if (
            self._stopping
            or not client.refused_for_good
            or (self._connector is not None and not self._connector.done())
        ):
            return
        # gmqtt gives up on a refusal it deems permanent (a bad password, say: CONNACK 0x86/0x87).
        # The gateway never does: the password may be fixed or the broker's files reloaded at any
        # time, and it must come back by itself. So it connects again itself, with backoff.
        log.error(
            "broker %s refused the gateway's login (%s); retrying in %.1fs (check IOTGW_MQTT_USERNAME/"
            "IOTGW_MQTT_PASSWORD against the broker's password file for the gateway's listener)",
            self.settings.mqtt_url_safe,
            client.refusal,
            self._delay,
        )
        self._connector = asyncio.get_running_loop().create_task(self._connect_later(), name="iotgw-ingest-connect")

    async def _connect_later(self) -> None:
        await asyncio.sleep(self._delay)
        self._backoff()
        await self._connect_loop()

    def _on_subscribe(self, client: Any, mid: int, qos: Any, properties: Any) -> None:  # noqa: ANN401, ARG002
        self.subscribed.set()

    def _receive(self, topic: str, payload: bytes, mid: int | None, connection: object) -> None:
        # gmqtt hands over every message of one socket read in one go: they share one clock
        # reading, forgotten once the event loop moves on.
        at = self._read_at
        if at is None:
            at = self._read_at = self.clock()
            asyncio.get_running_loop().call_soon(self._read_done)
        self.writer.put(Pending(topic, bytes(payload), at, mid, connection))

    def _read_done(self) -> None:
        self._read_at = None

    def _acknowledge(self, batch: list[Pending]) -> None:
        # Usually one connection per batch; group in case the broker reconnected mid-batch.
        by_connection: dict[int, tuple[object, list[int]]] = {}
        for p in batch:
            if p.mid is not None:
                by_connection.setdefault(id(p.connection), (p.connection, []))[1].append(p.mid)
        for connection, mids in by_connection.values():
            self._client.ack(connection, mids)
