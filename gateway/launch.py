"""The `iotgw` command's entry point: Ctrl-C at any moment, even while the gateway's modules are
still being imported, ends the command quietly with the shell's code for it (130)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; 130 without a traceback when interrupted."""
    try:
        from gateway.cli import main as run  # noqa: PLC0415 - the import is what may be interrupted

        return run(argv)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # a library that wrapped the interrupt in an error of its own (pydantic-core)
        if not _interrupted(exc):
            from gateway.errors import GatewayError  # noqa: PLC0415

            if not isinstance(exc, GatewayError):
                raise
            # A plugin that cannot be loaded with the settings (gateway/config.py): one line.
            print(f"iotgw: {str(exc).splitlines()[0]}", file=sys.stderr)  # noqa: T201
            return 1
    print("\niotgw: interrupted", file=sys.stderr)  # noqa: T201
    return INTERRUPTED


def _interrupted(exc: BaseException | None) -> bool:
    """Whether a Ctrl-C is somewhere in the chain of causes of `exc`."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
