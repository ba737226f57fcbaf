"""The one loop of the jobs a cluster runs on one instance at a time (each consumer, the
sequencer, the notifier): woken when there is work (`wake()`) or every `poll_s` at the latest, it
runs the job's rounds until they say there is no more. A round that fails is logged by kind and
tried again after `retry_s`: a lost lease is taken on again when free, a database that refuses is
waited for, a bug is logged with its traceback; the loop itself never ends but by `stop()` or
cancellation. The job's lease is held with `Lease.hold` at the start of its rounds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from gateway.errors import StoreError
from gateway.logs import QuietLog
from gateway.runtime.leases import LeaseLostError

log = logging.getLogger("gateway.runtime")


class WakeLoop:
    """Run `rounds` when woken or polled; `begin` (optional) once per wake-up first, and only if it
    says go on (it holds the lease, say)."""

    def __init__(self, what: str, poll_s: float, *, retry_s: float = 1.0) -> None:
        self.what = what  # names the job in log lines ("consumer alerts", "sequencer")
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.wakeup = asyncio.Event()  # set: work waits; the first round runs at once
        self.wakeup.set()
        self.stopped = False
        self._quiet = QuietLog(log, every_s=10.0)

    def wake(self) -> None:
        """There is work: run a round now (or right after the one in hand)."""
        self.wakeup.set()

    def stop(self) -> None:
        """End `run` after the round in hand."""
        self.stopped = True
        self.wakeup.set()

    async def run(
        self, rounds: Callable[[], Awaitable[bool]], begin: Callable[[], Awaitable[bool]] | None = None
    ) -> None:
        """Until `stop()`: wait to be woken (or `poll_s`), then `begin`, then `rounds` while True."""
        while not self.stopped:
            # The slow poll: a missed wake-up costs at most poll_s.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), self.poll_s)
            self.wakeup.clear()
            try:
                if self.stopped or (begin is not None and not await begin()):
                    continue
                while not self.stopped and await rounds():
                    pass
            except LeaseLostError as exc:
                log.info("%s: %s; taking it on again if it is free", self.what, exc)
                self.wakeup.set()
            except StoreError as exc:
                self._quiet.warn("database", "%s: %s (retrying)", self.what, exc)
                await asyncio.sleep(self.retry_s)
            except Exception:
                # A bug in the job must not end it for good.
                log.exception("%s: unexpected error; retrying in %g s", self.what, self.retry_s)
                await asyncio.sleep(self.retry_s)
