"""The error root: every error mintvcs raises on purpose derives from MintError."""


class MintError(Exception):
    """A user-facing failure; its message is one line that names the value and the fix."""

    exit_code: int = 1
