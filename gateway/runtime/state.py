"""The state the parts of a consumer runner share (runner, failures, operations, status)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from sqlmodel import Session

from gateway.log import (
    Store,
)
from gateway.logs import QuietLog
from gateway.metrics import Metrics
from gateway.runtime.contract import Consumer
from gateway.runtime.leases import Lease
from gateway.runtime.loop import WakeLoop

log = logging.getLogger("gateway.runtime")  # one logger name for the runtime, as operators know it


class Elsewhere(Protocol):
    """The other process of this gateway that runs its consumers (gateway.runtime.apart)."""

    def notify(self, types: Collection[str] | None) -> None:
        """New events of `types` (None: unknown) are in the log."""

    def reload(self, name: str) -> Awaitable[None]:
        """An operation changed consumer `name`'s cursor or state in the database."""

    def retry(self, name: str, dead_letter_id: int) -> Awaitable[None]:
        """Retry a parked event there; raises `ConsumerError` with the reason if it fails."""

    def unresponsive(self) -> str | None:
        """Why that process is not running the consumers now (it does not answer), or None."""


class RunnerState:
    """What the parts of `ConsumerRunner` share: its attributes, and (for the type checker) the
    methods one part calls on another. The runner itself sets and defines them."""

    name: str
    consumer: Consumer
    store: Store
    metrics: Metrics
    lease: Lease
    position: int
    paused: bool
    failing: bool
    last_error: str | None
    max_attempts: int
    retry_base_s: float
    stall_s: float
    elsewhere: Elsewhere | None
    wakeloop: WakeLoop
    _executor: ThreadPoolExecutor
    _generation: int
    _single_until: int
    _replay_until: int
    _attempts: int
    _seen: tuple[int, float]
    _quiet: QuietLog

    if TYPE_CHECKING:

        async def _call(self, fn: Callable[..., Any], *args: Any) -> Any: ...  # noqa: ANN401
        def _new_executor(self) -> ThreadPoolExecutor: ...
        def _hold(self) -> bool: ...
        def _committed(self, tx: Session) -> None: ...
        def _write_cursor(self, tx: Session, position: int, *, fenced: bool = True) -> None: ...
