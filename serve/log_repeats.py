"""A running server's log without floods: each distinct warning or error once a minute."""

from __future__ import annotations

import logging
import threading
import time

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
