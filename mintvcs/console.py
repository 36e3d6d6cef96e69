"""The `mintvcs` console script: Ctrl-C while the command line loads ends it as it ends a command."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any, NoReturn


def _interrupted() -> NoReturn:
    """What mintvcs.cli does on Ctrl-C, without it (it may be half imported): `interrupted` on
    stderr, then death by SIGINT, as git dies."""
    with contextlib.suppress(OSError):  # stderr closed or full: the status still tells
        os.write(2, b"interrupted\n")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    sys.exit(130)  # only if the signal is blocked


def main() -> Any:
    """Load mintvcs.cli and run it; an interrupt during the ~50 ms its imports take printed a
    Python traceback."""
    try:
        from mintvcs.cli import main as cli
    except KeyboardInterrupt:
        _interrupted()
    try:
        return cli()
    except KeyboardInterrupt:  # before the command's own handling is in place, or after it
        _interrupted()
