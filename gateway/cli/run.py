"""`iotgw run` and the consumers' process it starts."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from gateway.cli.common import log, run_loop, settings_from, setup_logging, stop_event
from gateway.config import Settings

if TYPE_CHECKING:
    pass


def cmd_run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    setup_logging(settings.log_level)
    return run_loop(_run(settings), settings)


def cmd_consumer_process(_args: argparse.Namespace) -> int:
    from gateway.runtime.child import serve  # noqa: PLC0415 - keeps the other commands light

    settings = Settings()
    setup_logging(settings.log_level, process="consumers")
    return run_loop(serve(settings), settings)


async def _run(settings: Settings) -> int:
    from gateway.api.limits import worker_threads  # noqa: PLC0415
    from gateway.service import Gateway  # noqa: PLC0415 - keeps `iotgw simulate` light

    stop = stop_event()
    asyncio.get_running_loop().set_default_executor(worker_threads(settings.api_nice))
    gw = Gateway(settings)
    await gw.start()
    try:
        await stop.wait()
    finally:
        log.info("stopping: committing and acknowledging what was received")
        await gw.stop()
    return 0
