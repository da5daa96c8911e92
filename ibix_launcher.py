"""Entry point of the ``ibix`` console script.

Python needs about a second to import IBIX (numpy, scipy, SimpleITK, ...). An interrupt (Ctrl-C) in that time, or
anywhere outside the command's own handling, ends the command like an interrupt during a run: one line on stderr,
exit code 130, no traceback. (Some extension modules turn an interrupt during their import into an ImportError,
so the interrupt itself is noted.) This module imports nothing heavy, so it lies outside the ``IBIXLogic`` package,
whose ``__init__`` imports the engine.
"""
from __future__ import annotations

import signal
import sys

INTERRUPTED = 130
_interrupts: list[int] = []


def _on_interrupt(signum: int, frame) -> None:
    _interrupts.append(signum)
    raise KeyboardInterrupt


def main() -> int:
    """Run ``IBIXLogic.cli.main``; an interrupt while it loads or outside its own handling exits 130."""
    previous = signal.signal(signal.SIGINT, _on_interrupt)
    try:
        try:
            from IBIXLogic.cli import main as run
        finally:
            signal.signal(signal.SIGINT, previous)
        return run()
    except BaseException:
        if not _interrupts and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
            raise
        print("ibix: interrupted; nothing was written", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
