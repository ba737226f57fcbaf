"""The consumer runtime: every consumer reads the durable log from its own cursor.

One asyncio task and one worker thread per consumer. A consumer gets batches of the events it
asked for plus the database session its cursor is committed in, so its own writes and its
cursor commit together (at-least-once delivery, exactly-once effects). A consumer that raises
is retried with backoff, event by event, and an event that keeps failing is parked in
`consumer_dead_letters` so the consumer can move on. Nothing here can slow ingestion: the
router only reads the log, and each consumer waits in its own thread.

The one import path of the runtime (`from gateway.runtime import BaseConsumer`); its parts live
in `gateway/runtime/`: `contract` (what a consumer is, how they are found), `runner` (one
consumer's loop, batches, cursor and lease), `failures`, `operations` and `status` (the
runner's other parts), `router` (the runners together).
"""

from __future__ import annotations

from gateway.runtime.contract import (
    ENTRY_POINT_GROUP,
    BaseConsumer,
    Consumer,
    ConsumerError,
    UnknownConsumerError,
    available_consumers,
    load_consumers,
    matches,
)
from gateway.runtime.router import Changes, Router
from gateway.runtime.runner import ConsumerRunner
from gateway.runtime.state import Elsewhere
from gateway.runtime.status import ConsumerStatus

__all__ = [
    "ENTRY_POINT_GROUP",
    "BaseConsumer",
    "Changes",
    "Consumer",
    "ConsumerError",
    "ConsumerRunner",
    "ConsumerStatus",
    "Elsewhere",
    "Router",
    "UnknownConsumerError",
    "available_consumers",
    "load_consumers",
    "matches",
]
