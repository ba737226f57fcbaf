"""The `iotgw` command's entry point: Ctrl-C at any moment, even while the gateway's modules are
still being imported, ends the command quietly with the shell's code for it (130)."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Sequence

from gateway.errors import GatewayError

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; 130 without a traceback when interrupted."""
    # While the modules load, a Ctrl-C is only noted: raised inside a C extension's import
    # (pydantic-core's), it turned into a Rust panic and a traceback instead of an interrupt.
    asked: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: asked.append(signum))
    try:
        from gateway.cli import main as run  # noqa: PLC0415 - the imports are what is guarded
        from gateway.plugins import plugin_classes  # noqa: PLC0415

        with contextlib.suppress(Exception):  # a plugin that cannot load is said by the command, in one line
            plugin_classes()
    except GatewayError as exc:  # a plugin's settings that cannot join the gateway's (gateway/config.py)
        print(f"iotgw: {str(exc).splitlines()[0]}", file=sys.stderr)  # noqa: T201
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    if asked:
        return _interrupted()
    try:
        return run(argv)
    except KeyboardInterrupt:
        return _interrupted()


def _interrupted() -> int:
    print("\niotgw: interrupted", file=sys.stderr)  # noqa: T201
    return INTERRUPTED
