"""The bearer tokens of `--api-key-file`: one per line, re-read when the file changes, so a token
can be rotated without a restart (add the new one, move the clients over, remove the old one)."""

from __future__ import annotations

import hmac
import logging
import os
import select
import stat
import threading
import time
from pathlib import Path

from mintvcs.errors import MintError
from mintvcs.filemodes import read_regular
from mintvcs.serve.log_repeats import ALWAYS

log = logging.getLogger("mintvcs.serve")

# Seconds between reads of the file: a read per authenticated request would be cheap too, but
# a second is already faster than anyone rotates a token. A change is taken within two.
CHECK_INTERVAL = 1.0
# A read under way for this many intervals is told as stalled (a hung mount): until it ends,
# no rotation is taken, and the operator must know that.
STALLED_INTERVALS = 5
# A pipe given at start (`--api-key-file <(pass show ...)`, a FIFO a writer fills) is read once,
# within these seconds to its end, and at most this many bytes: no later read can find it again.
PIPE_TIMEOUT = 5.0
PIPE_MAX_BYTES = 1 << 20


class ApiKeyFileError(MintError):
    """The token file cannot be used at start: unreadable, or holding no token."""


def parse_tokens(text: str) -> tuple[str, ...]:
    """The tokens of a key file: each non-blank line that is not a `#` comment, stripped."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


class ApiKeys:
    """Accepted bearer tokens, read from `path` at start and again when its content changes.

    The file is read again at most once per CHECK_INTERVAL (it is a few bytes; comparing the
    content, not its mtime, sees a rewrite on file systems with coarse timestamps). A new
    content is taken only once two reads an interval apart agree, so a rewrite caught half
    done never becomes the token set. A file that is gone, unreadable or holds no token keeps
    the tokens read before, with a warning: an accident must not lock every client out.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        tokens, problem = self._read(at_start=True)
        if problem is not None:
            raise ApiKeyFileError(problem)
        self._tokens = tokens
        self._candidate: tuple[bytes, ...] | None = None  # seen once, not yet taken
        self._problem: str | None = None  # the last one warned about
        if self._piped:
            log.warning(
                "--api-key-file %s is a pipe: its %d token(s) were read once, at start, and "
                "cannot be rotated; use a regular file to rotate tokens without a restart",
                self.path,
                len(tokens),
            )
            # Its later reads find it not a regular file: that was told just now.
            self._problem = self._not_regular()
        self._checked = time.monotonic()
        self._read_since: float | None = None  # when the read under way began
        self._stall_told = False  # the read under way was told as stalled
        # The two above, between the loop's stall check and the read's thread: a read ending
        # between the check's look and its mark would leave the mark for the next read. Not
        # _lock, which a stalled read holds.
        self._stall_lock = threading.Lock()
        self._warn_if_open()

    def _not_regular(self) -> str:
        """The problem of a path that is no regular file, as re-reads warn of it."""
        return (
            f"--api-key-file {self.path} is not a regular file (a FIFO, socket, device or "
            "directory); write the tokens to a regular file and rename it over the path"
        )

    def _read(self, at_start: bool = False) -> tuple[tuple[bytes, ...], str | None]:
        """The file's tokens, or a problem saying why there are none (at start, a pipe is read too)."""
        self._piped = False
        try:
            data = self._read_bytes(at_start)
        except OSError as err:
            return (), f"cannot read --api-key-file {self.path}: {err.strerror or err}"
        except _PipeError as err:
            return (), f"--api-key-file {self.path} is a pipe that {err}"
        if data is None:
            return (), self._not_regular()
        tokens = parse_tokens(data.decode("utf-8", "surrogateescape"))
        if not tokens:
            return (
                (),
                f"--api-key-file {self.path} holds no token; put one bearer token per line in it",
            )
        return tuple(t.encode("utf-8", "surrogateescape") for t in tokens), None

    def _read_bytes(self, at_start: bool = False) -> bytes | None:
        """The file's bytes, or None when it is not a regular file (left unread); at start, a
        pipe's bytes (read to its end within PIPE_TIMEOUT, else _PipeError)."""
        # O_NONBLOCK: a plain open of a FIFO waits for a writer, for ever once the FIFO is
        # unlinked, and would hold the lock so that no later rotation is read (a regular file
        # ignores the flag). A directory opens read-only too; fstat tells them all apart.
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if at_start and stat.S_ISFIFO(os.fstat(fd).st_mode):
                data = _read_pipe(fd)
                self._piped = True
                return data
            return read_regular(fd)
        finally:
            os.close(fd)

    def _warn_if_open(self) -> None:
        try:
            mode = os.stat(self.path).st_mode
        except OSError:
            return
        if mode & 0o077:  # as ssh does for private keys: others on the machine can read it
            log.warning(
                "--api-key-file %s is readable by others (mode %03o); chmod 600 it",
                self.path,
                mode & 0o777,
            )

    def due(self) -> bool:
        """Whether refresh() would read the file: CHECK_INTERVAL has passed and no read is under way."""
        return time.monotonic() - self._checked >= CHECK_INTERVAL and not self._lock.locked()

    def warn_if_stalled(self) -> None:
        """Log once when the read under way has lasted STALLED_INTERVALS intervals (a hung mount)."""
        with self._stall_lock:
            since = self._read_since
            if since is None or self._stall_told:
                return
            lasted = time.monotonic() - since
            if lasted < STALLED_INTERVALS * CHECK_INTERVAL:
                return
            self._stall_told = True
            # Under the lock: the read's "ended" line cannot come before this one.
            log.warning(
                "reading --api-key-file %s has not ended after %.0f s; keeping the %d token(s) "
                "read before, and no change to the file is taken until the read ends",
                self.path,
                lasted,
                len(self._tokens),
                extra=ALWAYS,
            )

    def refresh(self) -> tuple[bytes, ...]:
        """Read the file again if due, and return the tokens accepted now (file I/O: keep it off the event loop).

        While another read is under way (a file system that hangs), it returns the current tokens
        at once rather than queue behind it.
        """
        if not self._lock.acquire(blocking=False):
            return self._tokens
        try:
            now = time.monotonic()
            if now - self._checked < CHECK_INTERVAL:
                return self._tokens
            self._checked = now
            with self._stall_lock:
                self._read_since = now
            try:
                tokens, problem = self._read()
            finally:
                with self._stall_lock:
                    self._read_since = None
                    stall_told, self._stall_told = self._stall_told, False
            if stall_told:
                log.warning(
                    "reading --api-key-file %s ended after %.0f s",
                    self.path,
                    time.monotonic() - now,
                    extra=ALWAYS,
                )
            if problem is not None:
                self._candidate = None
                if problem != self._problem:
                    log.warning(
                        "%s; keeping the %d token(s) read before",
                        problem,
                        len(self._tokens),
                        extra=ALWAYS,  # a change of state: broken, fixed, broken again is told
                    )
                    self._problem = problem
            elif tokens == self._tokens:
                self._candidate = self._problem = None
            elif tokens != self._candidate:
                self._candidate = tokens  # taken at the next look if it still reads the same
            else:
                self._tokens, self._candidate, self._problem = tokens, None, None
                log.info("--api-key-file %s re-read: %d token(s)", self.path, len(tokens))
                self._warn_if_open()
            return self._tokens
        finally:
            self._lock.release()

    def accepts(self, token: bytes) -> bool:
        """Whether `token` is one of the tokens accepted now (each compared in constant time); reads nothing."""
        # No early exit: how long the check takes must not tell which token nearly matched.
        matched = False
        for expected in self._tokens:
            matched |= hmac.compare_digest(token, expected)
        return matched


class _PipeError(Exception):
    """A pipe given as the key file that did not end in time, or held too much."""


def _read_pipe(fd: int) -> bytes:
    """All of a non-blocking pipe's bytes, to its end (its writers gone), within PIPE_TIMEOUT."""
    deadline = time.monotonic() + PIPE_TIMEOUT
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    size = 0
    hung_up = False
    while True:
        try:
            chunk: bytes | None = os.read(fd, 1 << 16)
        except BlockingIOError:  # a writer is there, with nothing written yet
            chunk = None
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
            if size > PIPE_MAX_BYTES:
                raise _PipeError(f"holds more than {PIPE_MAX_BYTES} bytes")
            continue
        # An empty read is the end once something was read or a writer came and went; before
        # that it is a FIFO no writer has opened yet (or one that went before this open).
        if chunk == b"" and (chunks or hung_up):
            return b"".join(chunks)
        left = deadline - time.monotonic()
        events = poller.poll(left * 1000) if left > 0 else []
        if not events:
            raise _PipeError(
                f"gave no end within {PIPE_TIMEOUT:.0f} s (no writer, or one still writing)"
            )
        hung_up = any(e & select.POLLHUP for _, e in events)
