"""A running server's log without floods: each distinct warning or error once a minute."""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
from typing import Any

# A corrupt object fails every request for its revision, an unreadable refs folder every poll
# of the watcher, a broken device every engine step: one line each per this many seconds.
REPEAT_INTERVAL = 60.0
# Distinct failures remembered at most; past it the oldest are forgotten (and so logged again).
_KEPT = 1024
# `extra=` for a line that reports a change of state (the repository gone, then back): never
# held back, or the log could end on "back" while the repository is gone again.
ALWAYS = {"mint_always": True}


class RepeatFilter(logging.Filter):
    """Lets a warning or error through once per REPEAT_INTERVAL, then says how many it held back.

    Repeats are records of the same level and message; for one logged with an exception, the
    same message template and exception (an engine step of 7 sequences fails as one of 3 did,
    and request 12 fails after its step as request 11 did: only 11's line is logged).
    """

    def __init__(self, interval: float = REPEAT_INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self._seen: dict[tuple[object, ...], tuple[float, int]] = {}  # key -> (logged at, held)
        self._lock = threading.Lock()  # the engine's thread and the event loop both log

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat within the interval; the next one logged counts those held back."""
        if record.levelno < logging.WARNING or getattr(record, "mint_always", False):
            return True
        try:
            key = _key(record)
        except Exception:  # a bad format call: logging's handler reports it, as without us
            return True
        now = time.monotonic()
        with self._lock:
            seen = self._seen.pop(key, None)
            if seen is not None and now - seen[0] < self.interval:
                self._seen[key] = (seen[0], seen[1] + 1)
                return False
            if len(self._seen) >= _KEPT:
                del self._seen[next(iter(self._seen))]  # the least recently logged or held
            self._seen[key] = (now, 0)
        if seen is not None and seen[1]:
            held, since = seen[1], now - seen[0]
            record.msg = (
                f"{record.getMessage()} ({held} more like it in the {since:.0f} s before, "
                "not logged)"
            )
            record.args = ()
        return True


def _key(record: logging.LogRecord) -> tuple[object, ...]:
    """What makes two records repeats of one another."""
    if record.exc_info and record.exc_info[1] is not None:
        err = record.exc_info[1]
        return (record.levelno, record.msg, type(err).__name__, str(err))
    return (record.levelno, record.getMessage())


# What asyncio's accept loop reports when accept() fails for want of a descriptor or memory.
ACCEPT_FAILED = "socket.accept() out of system resource"
# Such failures are logged once per this many seconds, with how many there were.
ACCEPT_FAILED_INTERVAL = 10.0
ExceptionHandler = Any  # asyncio's: (loop, context) -> None


class AcceptFailures:
    """An event loop exception handler that logs the accept loop's failures for want of a
    descriptor once per ACCEPT_FAILED_INTERVAL, one line with their count, and passes every
    other error the loop reports on to `previous` (asyncio's default handler when None).

    At its limit on open files a server fails each accept(): CPython 3.11's accept loop
    reports each of up to `backlog` (128) failures per wake-up, and each report was an error
    line and its traceback, megabytes a second while clients kept connecting.
    """

    def __init__(
        self,
        logger: logging.Logger,
        previous: ExceptionHandler | None,
        interval: float = ACCEPT_FAILED_INTERVAL,
    ) -> None:
        self.logger, self.previous, self.interval = logger, previous, interval
        self.failed = 0  # since the last line
        self.logged_at: float | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_FAILED:
            if self.previous is None:
                loop.default_exception_handler(context)
            else:
                self.previous(loop, context)
            return
        self.failed += 1
        now = time.monotonic()
        if self.logged_at is not None and now - self.logged_at < self.interval:
            return
        err = context.get("exception")
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        shown = "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
        self.logger.error(
            "cannot accept new connections: %s (%d failed accept() calls%s); open connections "
            "are still served, new ones wait until descriptors are freed; the limit on open "
            "files is %s (ulimit -n)",
            reason,
            self.failed,
            "" if self.logged_at is None else f" in the last {now - self.logged_at:.0f} s",
            shown,
        )
        self.failed = 0
        self.logged_at = now
