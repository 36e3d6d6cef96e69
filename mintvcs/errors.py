"""The error root: every error mintvcs raises on purpose derives from MintError."""


class MintError(Exception):
    """A user-facing failure; its message is one line that names the value and the fix."""

    exit_code: int = 1


class NewerFormatError(MintError):
    """Data (a manifest, a tensor blob) in a format newer than this mintvcs reads: not damage,
    and not misread either; a newer mintvcs reads it."""
