"""The consumer contract: what a consumer is (`Consumer`, `BaseConsumer`), how the installed ones
are found (`iotgw.consumers` entry points) and loaded, and which event types they read."""

from __future__ import annotations

import abc
import fnmatch
import logging
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from sqlmodel import Session

from gateway.core.events import Event
from gateway.errors import ConfigError, GatewayError

log = logging.getLogger("gateway.runtime")  # one logger name for the runtime, as operators know it


ENTRY_POINT_GROUP = "iotgw.consumers"


@runtime_checkable
class Consumer(Protocol):
    """A reader of the event log.

    `types` are patterns (`elevator.*`, `sensor.reading`, `*`). `handle` gets the matching events
    of one batch, in log order, and `tx`: write with it and the writes commit together with the
    cursor. Optional attributes (see `BaseConsumer`): `max_attempts`, `batch_size`,
    `replay_resets_state` and `reset(tx)`, `linger_s`, `retry_base_s`, and
    `handle_span(tx, after, upto)`, called for every batch with the range of positions it
    covers (after < position <= upto), for consumers that aggregate in SQL; `prepare(tx)`,
    called in the consumer's thread whenever this instance takes the consumer on (at start, or
    from another instance of a cluster), after `forget()`, which must drop whatever the consumer
    keeps in memory (the database is the truth); `tick(tx, now)` every `tick_s` once caught up,
    with `now` from the consumer's own `clock()` if it has one.
    """

    name: str
    types: tuple[str, ...]

    def handle(self, events: Sequence[Event], tx: Session) -> None:
        """Handle one batch; raise to have it retried."""


class BaseConsumer(abc.ABC):
    """Defaults for a consumer; subclass and set `name`, `types` and `handle`."""

    name = ""
    types: tuple[str, ...] = ("*",)
    max_attempts = 5  # attempts per event before it is parked
    retry_base_s = 0.05  # first retry waits up to this, doubling each attempt (full jitter, 30 s cap)
    linger_s = 0.05  # after a wake-up, wait this long for more events (larger batches, less contention)
    handler_timeout_s = 30.0  # a batch (or tick) not done by then counts as failed; its thread is abandoned
    batch_size = 500
    replay_resets_state = False  # True: a replay starts from scratch, after reset(tx)
    # Whether the gateway holds its broker session now, set by the runtime where that is known
    # (None: unknown). A consumer that judges devices by their silence asks it first.
    broker_connected: Callable[[], bool] | None = None

    def reset(self, tx: Session) -> None:  # noqa: B027 - an optional hook; most consumers keep no state
        """Forget all derived state (called before a full replay when replay_resets_state)."""

    def configure(self, settings: Any) -> None:  # noqa: ANN401, B027 - an optional hook
        """Take what the consumer needs from the gateway's settings (called once, after __init__)."""

    @abc.abstractmethod
    def handle(self, events: Sequence[Event], tx: Session) -> None:
        """Handle one batch of matching events (every consumer must say what it does)."""


class ConsumerError(GatewayError):
    """An operation on a consumer could not be done (unknown name, bad replay point...)."""


class UnknownConsumerError(ConsumerError):
    """No consumer of that name is running."""


def available_consumers() -> dict[str, Callable[[], Any]]:
    """Loaders of the consumer classes registered under the `iotgw.consumers` entry point group."""
    found: dict[str, Callable[[], Any]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.load
    return found


def load_consumers(names: Sequence[str], settings: Any = None) -> list[Consumer]:  # noqa: ANN401 - Settings
    """Instantiate the named consumers (`*` = every registered one); `configure(settings)` if they have it."""
    registry = available_consumers()
    wanted = sorted(registry) if "*" in names else list(dict.fromkeys(names))
    missing = [n for n in wanted if n not in registry]
    if missing:
        msg = f"unknown consumer(s) {', '.join(missing)}; registered: {', '.join(sorted(registry)) or 'none'}"
        raise ConfigError(msg)
    consumers = []
    for name in wanted:
        try:
            consumer_class = registry[name]()
            consumer = consumer_class()
            if settings is not None and hasattr(consumer, "configure"):
                consumer.configure(settings)
        except Exception as exc:
            msg = f"consumer {name!r} could not be loaded: {exc}"
            raise ConfigError(msg) from exc
        if not isinstance(consumer, Consumer):
            msg = f"consumer {name!r} does not have name, types and handle(events, tx)"
            raise ConfigError(msg)
        if consumer.name != name:  # selected, run, reported and operated by one name
            msg = f"consumer entry point {name!r} names a consumer called {consumer.name!r}: make them the same"
            raise ConfigError(msg)
        consumers.append(consumer)
    return consumers


def matches(patterns: Sequence[str], event_type: str) -> bool:
    """True when `event_type` matches one of the fnmatch-style patterns."""
    return any(p == "*" or fnmatch.fnmatchcase(event_type, p) for p in patterns)
