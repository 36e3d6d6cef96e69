"""The `mintvcs` console script: run in Python's UTF-8 mode whatever the locale; Ctrl-C while the
command line loads ends it as it ends a command."""

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


def _utf8_mode() -> None:
    """Re-run this process in Python's UTF-8 mode where its file-system encoding is another.

    Under a non-UTF-8 locale (LC_ALL=C with PYTHONUTF8=0, a Latin-1 one) Python decodes the
    arguments, file names and environment with the locale's codec: `-m café` was stored as
    double-encoded UTF-8 and a checkout of `naïve.md` wrote Latin-1 bytes or failed to encode
    it. git takes those bytes as they are; UTF-8 mode (UTF-8 with surrogate escapes) does too.
    The arguments as decoded encode back to the bytes they were given, so the new process sees
    the same ones. A UTF-8 locale, the common case, costs nothing."""
    if sys.flags.utf8_mode or sys.getfilesystemencoding().lower().replace("-", "") == "utf8":
        return
    script = sys.argv[0] if sys.argv else ""
    if not script or not os.path.isfile(script):  # not started as the script: nothing to re-run
        return
    # The flags a script's #! line may give, kept (-X utf8 has priority over PYTHONUTF8=0).
    flags = [
        flag
        for flag, on in (
            ("-I", sys.flags.isolated),
            ("-E", sys.flags.ignore_environment and not sys.flags.isolated),
            ("-s", sys.flags.no_user_site and not sys.flags.isolated),
        )
        if on
    ]
    with contextlib.suppress(OSError):  # no interpreter to exec: run as we are
        # argv[0] stays the script, so the program name click prints stays `mintvcs`.
        os.execv(sys.executable, [sys.executable, *flags, "-X", "utf8", script, *sys.argv[1:]])


def main() -> Any:
    """Load mintvcs.cli and run it; an interrupt during the ~50 ms its imports take printed a
    Python traceback."""
    _utf8_mode()
    try:
        from mintvcs.cli import main as cli
    except KeyboardInterrupt:
        _interrupted()
    try:
        return cli()
    except KeyboardInterrupt:  # before the command's own handling is in place, or after it
        _interrupted()
