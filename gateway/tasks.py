"""Stopping asyncio tasks for sure.

On Python 3.11, `asyncio.wait_for` returns the inner result and swallows a cancellation that
arrives just as the inner awaitable completes (python/cpython#86296, fixed in 3.12): a single
`task.cancel()` can then leave a loop running forever, and a stop that awaits it hangs. So a
task is cancelled again until it is really done.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (again, if a cancellation was swallowed) until it has finished."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()  # retrieved, so asyncio does not log "exception was never retrieved"
