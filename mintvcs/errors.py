"""The error root: every error mintvcs raises on purpose derives from MintError."""


class MintError(Exception):
    """A user-facing failure; its message is one line that names the value and the fix."""

    exit_code: int = 1


class OptionsError(MintError):
    """Options that cannot go together: a usage error, which the CLI reports as click's own
    (one line naming the command's --help, exit 2)."""

    exit_code = 2  # click's usage errors


class NewerFormatError(MintError):
    """Data (a manifest, a tensor blob) in a format newer than this mintvcs reads: not damage,
    and not misread either; a newer mintvcs reads it."""


def cannot_read(path: object, err: OSError) -> str:
    """'PATH cannot be read: permission denied' (or the system's reason): a file the process
    may not read is named as such, not taken for a missing or a corrupt one."""
    if isinstance(err, PermissionError):
        return f"{path} cannot be read: permission denied (check its owner and mode)"
    return f"{path} cannot be read ({err.strerror or type(err).__name__})"


def error_text(err: BaseException) -> str:
    """The message of `err`, never empty: a MemoryError or a bare exception has none of its own."""
    if isinstance(err, MemoryError) and not str(err):
        return "out of memory (this process's limit, or the machine's)"
    return str(err) or type(err).__name__
