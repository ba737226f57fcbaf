"""Stopping tasks: a cancellation that gets swallowed once must not leave a task running."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.tasks import stop_task

pytestmark = pytest.mark.anyio


async def test_a_task_that_swallowed_a_cancellation_is_stopped_anyway() -> None:
    swallowed = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed.append(True)  # as asyncio.wait_for can do on Python 3.11
        await asyncio.sleep(30)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task), 5)
    assert swallowed == [True]
    assert task.cancelled()


async def test_a_finished_or_failed_task_is_left_as_it_is() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    with contextlib.suppress(RuntimeError):
        await task
    await stop_task(task)  # no exception: already done, its error was retrieved
    await stop_task(None)
    assert task.done()
