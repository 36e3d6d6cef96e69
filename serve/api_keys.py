"""The bearer tokens of `--api-key-file`: one per line, re-read when the file changes, so a token
can be rotated without a restart (add the new one, move the clients over, remove the old one)."""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from pathlib import Path

from mintvcs.errors import MintError

log = logging.getLogger("mintvcs.serve")

# Seconds between looks at the file: a stat per authenticated request would be cheap too, but
# a second is already faster than anyone rotates a token.
CHECK_INTERVAL = 1.0


class ApiKeyFileError(MintError):
    """The token file cannot be used at start: unreadable, or holding no token."""


def parse_tokens(text: str) -> tuple[str, ...]:
    """The tokens of a key file: each non-blank line that is not a `#` comment, stripped."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


class ApiKeys:
    """Accepted bearer tokens, read from `path` now and again whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._tokens = self._read(at_start=True)
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _read(self, *, at_start: bool) -> tuple[bytes, ...]:
        try:
            text = self.path.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as err:
            raise ApiKeyFileError(
                f"cannot read --api-key-file {self.path}: {err.strerror or err}"
            ) from None
        tokens = parse_tokens(text)
        if not tokens:
            raise ApiKeyFileError(
                f"--api-key-file {self.path} holds no token; put one bearer token per line in it"
            )
        mode = os.stat(self.path).st_mode
        if mode & 0o077 and at_start:  # as ssh does for private keys: others can read it
            log.warning(
                "--api-key-file %s is readable by others (mode %03o); chmod 600 it",
                self.path,
                mode & 0o777,
            )
        return tuple(t.encode("utf-8", "surrogateescape") for t in tokens)

    def tokens(self) -> tuple[bytes, ...]:
        """The tokens accepted now; the file is looked at again at most once per CHECK_INTERVAL."""
        now = time.monotonic()
        if now - self._checked < CHECK_INTERVAL:
            return self._tokens
        with self._lock:
            if now - self._checked < CHECK_INTERVAL:
                return self._tokens
            self._checked = now
            signature = self._stat()
            if signature is not None and signature != self._signature:
                try:
                    tokens = self._read(at_start=False)
                except ApiKeyFileError as err:
                    # Mid-rewrite, or emptied by mistake: locking every client out is worse
                    # than keeping the tokens that worked a second ago.
                    log.warning("%s; keeping the %d token(s) read before", err, len(self._tokens))
                else:
                    if tokens != self._tokens:
                        log.info("--api-key-file %s re-read: %d token(s)", self.path, len(tokens))
                    self._tokens = tokens
                    self._signature = signature
            return self._tokens

    def accepts(self, token: bytes) -> bool:
        """Whether `token` is one of the accepted tokens (each compared in constant time)."""
        # No early exit: how long the check takes must not tell which token nearly matched.
        matched = False
        for expected in self.tokens():
            matched |= hmac.compare_digest(token, expected)
        return matched
