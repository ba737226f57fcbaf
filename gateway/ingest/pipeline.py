"""The ingest pipeline's steps between receiving and committing: what was received, parsed and
derived (events, shadows, dead letters), and the counts a committed batch adds to the metrics."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec

from gateway.config import Settings
from gateway.core.events import Event
from gateway.core.normalize import Shadow, normalize
from gateway.core.protocol import CHANNELS, DeviceMessage, Reason
from gateway.errors import PayloadError
from gateway.log import DeadLetter
from gateway.logs import QuietLog
from gateway.metrics import Metrics

log = logging.getLogger("gateway.ingest")


Clock = Callable[[], datetime]


class Pending(msgspec.Struct, gc=False):
    topic: str
    payload: bytes
    received_at: datetime
    mid: int | None  # MQTT packet id, None for QoS 0
    connection: object  # the connection it arrived on: only that one may acknowledge it


class Parsed(msgspec.Struct, frozen=True, gc=False):
    """A message that passed admission and parsing."""

    topic: str
    payload: bytes
    received_at: datetime
    msg: DeviceMessage


@dataclass(slots=True, frozen=True)
class Derived:
    """What a run of parsed messages produced: events, the devices' new shadows, dead letters, seq anomalies."""

    events: list[Event]
    shadows: dict[str, Shadow]
    dead: list[DeadLetter]
    anomalies: Counter[str]


# A bug hit by every message of a flood must not write a traceback per message: one per kind of
# error every 10 s, with the count of those held back.
_INTERNAL_ERRORS = QuietLog(log, every_s=10.0)


def internal_error(topic: str, payload: bytes, received_at: datetime, exc: Exception) -> DeadLetter:
    # A bug must not stop ingestion or lose the message: keep it, with the error.
    _INTERNAL_ERRORS.log(
        logging.ERROR,
        f"internal_error {type(exc).__name__}",
        "internal error on %s; message kept as a dead letter",
        topic[:200],
        exc_info=exc,
    )
    return DeadLetter(topic, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", payload, received_at)


CLOCK_SKEW = "clock_skew"  # in Derived.anomalies beside the seq anomalies; its own metric


def derive(
    parsed: Sequence[Parsed], shadows: Mapping[str, Shadow], settings: Settings, *, rejections: QuietLog
) -> Derived:
    """Normalise `parsed` in order against the devices' `shadows` (not changed: the new shadows
    are returned, to be taken on after the commit)."""
    overlay: dict[str, Shadow] = {}
    events: list[Event] = []
    dead: list[DeadLetter] = []
    anomalies: Counter[str] = Counter()
    for p in parsed:
        msg = p.msg
        try:
            shadow = overlay.get(msg.device_id) or shadows.get(msg.device_id)
            if msg.type is not None and shadow is not None and shadow.type not in (None, msg.type.value):
                raise PayloadError(  # noqa: TRY301 - handled with the other payload errors below
                    Reason.TYPE_MISMATCH,
                    f"device {msg.device_id} is a {shadow.type}, message says {msg.type.value}",
                    p.topic,
                )
            out = normalize(
                msg,
                shadow,
                received_at=p.received_at,
                stuck_after_s=settings.stuck_after_s,
                max_skew_s=settings.max_clock_skew_s,
                reset_below=settings.seq_reset_below,
            )
        except PayloadError as exc:
            rejections.warn(exc.reason, "rejected %s: %s", p.topic[:200], exc)
            dead.append(DeadLetter(p.topic, exc.reason, exc.detail, p.payload, p.received_at))
            continue
        except Exception as exc:
            dead.append(internal_error(p.topic, p.payload, p.received_at, exc))
            continue
        events.extend(out.events)
        overlay[msg.device_id] = out.shadow
        if out.anomaly is not None:
            anomalies[out.anomaly.value] += 1
        if out.clock_skewed:
            anomalies[CLOCK_SKEW] += 1
            rejections.warn(
                CLOCK_SKEW,
                "device %s sent ts %s, more than %gs from the gateway's clock (%s): its events carry the receive time",
                msg.device_id,
                msg.ts.isoformat() if msg.ts else None,
                settings.max_clock_skew_s,
                p.received_at.isoformat(),
            )
    return Derived(events, overlay, dead, anomalies)


def count_outcome(  # noqa: PLR0913
    m: Metrics,
    events: Sequence[Event],
    dead: Sequence[DeadLetter],
    anomalies: Counter[str],
    *,
    skipped: int,
    now: datetime,
) -> None:
    """Count a commit's events, dead letters, seq anomalies and duplicates, and the events' latency."""
    for d in dead:
        m.messages_rejected.labels(d.reason).inc()
    for kind, n in anomalies.items():
        if kind == CLOCK_SKEW:
            m.clock_skew.inc(n)
        else:
            m.seq_anomalies.labels(kind).inc(n)
    if skipped:
        m.events_duplicate.inc(skipped)
    for etype, n in Counter(e.type for e in events).items():
        m.events.labels(etype).inc(n)
    m.device_latency.observe_all(max((now - e.time).total_seconds(), 0.0) for e in events)


@dataclass(slots=True, frozen=True)
class Prepared:
    events: list[Event]
    shadows: dict[str, Shadow]
    dead: list[DeadLetter]
    anomalies: Counter[str]
    received: Counter[str]


def channel_of(topic: str) -> str:
    """The channel label of a topic (bounded: anything unknown is `other`)."""
    channel = topic.rsplit("/", 1)[-1]
    return channel if channel in CHANNELS else "other"


def topic_device(topic: str) -> str | None:
    parts = topic.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "devices" and parts[1] else None
