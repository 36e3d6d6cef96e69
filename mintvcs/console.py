"""The `mintvcs` console script, and `python -m mintvcs.cli` alike: run in Python's UTF-8 mode
whatever the locale; Ctrl-C while the command line loads ends it as it ends a command, and
SIGTERM, SIGHUP and SIGQUIT unwind a command as Ctrl-C does."""

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


class Terminated(BaseException):
    """SIGTERM, SIGHUP or SIGQUIT, raised in the main thread as Ctrl-C raises KeyboardInterrupt:
    what a command was writing (a temporary pack of up to the adapter's size, a lock) is removed
    as the exception unwinds through it, as git's sigchain removes its temporaries and locks."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# The signals that end jobs (`timeout`, a cancelled CI job, pod eviction, systemctl stop, a
# closed ssh session): Python's default lets them kill the process with no unwinding.
_TERMINATING = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _raise_terminated(signum: int, frame: object) -> None:
    # A second one while cleaning up ends the process at once, as asked.
    signal.signal(signum, signal.SIG_DFL)
    raise Terminated(signum)


def catch_terminating_signals() -> None:
    """Turn the signals that end jobs into Terminated; one the process started with ignored
    (nohup) stays ignored, and one somebody else handles stays theirs."""
    for signum in _TERMINATING:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _raise_terminated)


def die_of(signum: int) -> NoReturn:
    """End the process by `signum`, as git re-raises the signal once it has cleaned up: whoever
    waits sees death by the signal (128+N in a shell), not an exit status."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    sys.exit(128 + signum)  # only if the signal is blocked


def _started_as(module: str) -> bool:
    """Whether the interpreter's own command line runs `module` (`python [OPTIONS] -m MODULE`,
    `-mMODULE` and `-Im MODULE` too), read as Python reads its options: not a script, `-c`, or a
    program that runs the module in-process."""
    argv = sys.orig_argv
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--check-hash-based-pycs":
            i += 2
            continue
        if not arg.startswith("-") or arg == "-":
            return False  # a script, or stdin
        if arg.startswith("--"):
            i += 1
            continue
        for k, letter in enumerate(arg[1:], 2):
            if letter in "cmWX":  # the options that take a value, there or as the next word
                if letter in "cm":
                    value = arg[k:] or (argv[i + 1] if i + 1 < len(argv) else "")
                    return letter == "m" and value == module
                i += 1 if arg[k:] else 2
                break
        else:
            i += 1
    return False


def _utf8_mode(module: str | None = None) -> None:
    """Re-run this process in Python's UTF-8 mode where its file-system encoding is another: the
    console script, or `python -m MODULE` with `module`.

    Under a non-UTF-8 locale (LC_ALL=C with PYTHONUTF8=0, a Latin-1 one) Python decodes the
    arguments, file names and environment with the locale's codec: `-m café` was stored as
    double-encoded UTF-8 and a checkout of `naïve.md` wrote Latin-1 bytes or failed to encode
    it. git takes those bytes as they are; UTF-8 mode (UTF-8 with surrogate escapes) does too.
    The arguments as decoded encode back to the bytes they were given, so the new process sees
    the same ones. A UTF-8 locale, the common case, costs nothing."""
    if sys.flags.utf8_mode or sys.getfilesystemencoding().lower().replace("-", "") == "utf8":
        return
    if module is not None:
        # Every option given kept, -X utf8 first: if a later `-X utf8=0` still wins, the re-run
        # sees it was one and runs as it is.
        if _started_as(module) and sys.orig_argv[1:3] != ["-X", "utf8"]:
            with contextlib.suppress(OSError):  # no interpreter to exec: run as we are
                os.execv(sys.executable, [sys.executable, "-X", "utf8", *sys.orig_argv[1:]])
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


def main(module: str | None = None) -> Any:
    """Load mintvcs.cli and run it; an interrupt during the ~50 ms its imports take printed a
    Python traceback. `module`: the process is `python -m MODULE` (mintvcs.cli), not the script."""
    _utf8_mode(module)
    catch_terminating_signals()
    try:
        from mintvcs.cli import main as cli
    except KeyboardInterrupt:
        _interrupted()
    except Terminated as err:
        die_of(err.signum)
    try:
        return cli()
    except KeyboardInterrupt:  # before the command's own handling is in place, or after it
        _interrupted()
    except Terminated as err:
        die_of(err.signum)
