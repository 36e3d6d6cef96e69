"""The modes of what mintvcs creates, as git gives them: the process umask first, then, inside
`.mint/`, core.sharedRepository (git's adjust_shared_perm, as dulwich implements it).

git creates a file as 0666 (0777 executable, 0444 an object or pack) less the umask, and a
directory as 0777 less the umask; with core.sharedRepository it then widens what is in
`.mint/` for the group (`group`), for everybody to read (`all`), or sets it outright (an
octal `0660`: other users lose every bit), and directories get the setgid bit so that files
created in them belong to the repository's group. Users sharing a repository can then write
each other's files' directories, whatever their own umask.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dulwich.file import SharedPerm

__all__ = [
    "TempFile",
    "adjust_fd",
    "file_mode",
    "make_dir",
    "make_dirs",
    "not_writable",
    "read_regular",
    "umask",
    "write_file",
]


@functools.cache
def umask() -> int:
    """The process umask, read once.

    os.umask can only read it by setting it, and threads creating files meanwhile would get
    the stand-in value: Linux tells it in /proc/self/status; elsewhere it is set and put back
    once, at the first file mintvcs creates.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(base: int, shared: SharedPerm | None = None) -> int:
    """The mode git gives a file it creates as `base` (0o666; 0o777 executable; 0o444 an
    object, pack or index): the umask's bits off, then core.sharedRepository's rule."""
    mode = base & ~umask()
    if shared is None:
        return mode
    from dulwich.file import calc_shared_perm

    return calc_shared_perm(mode, shared)


def adjust_fd(fd: int, shared: SharedPerm | None) -> None:
    """Give a file opened with O_CREAT the mode core.sharedRepository asks for, as git's
    adjust_shared_perm does after it creates one; nothing without the setting. Another
    user's file (a reflog that was there) is left as it is: only its owner may chmod it."""
    if shared is None:
        return
    from dulwich.file import calc_shared_perm

    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    wanted = calc_shared_perm(mode, shared)
    if wanted != mode and st.st_uid == os.geteuid():
        os.fchmod(fd, wanted)


def make_dir(path: str | os.PathLike[str], shared: SharedPerm | None) -> bool:
    """mkdir (0o777 less the umask), then core.sharedRepository's mode and setgid bit; True
    when this call made it, False when a directory was there (a file there raises)."""
    for attempt in range(3):
        try:
            os.mkdir(path)
            break
        except FileExistsError:
            if os.path.isdir(path):
                return False
            # Gone between the two calls (a gc tidying an empty objects/XX): made again, as
            # git's writer does. A file, or a link to nothing, in the way raises.
            if os.path.lexists(path) or attempt == 2:
                raise
    if shared is not None:
        from dulwich.file import adjust_shared_perm

        adjust_shared_perm(path, shared)
    return True


def make_dirs(path: str | os.PathLike[str], shared: SharedPerm | None) -> None:
    """os.makedirs(path, exist_ok=True), each directory it makes given core.sharedRepository's
    mode as git's safe_create_leading_directories does (a file in the way raises as there)."""
    if shared is None:
        os.makedirs(path, exist_ok=True)
        return
    missing = []
    folder = os.fspath(path)
    while not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent in ("", folder):  # the top of a relative path, or the root
            break
        folder = parent
    for folder in reversed(missing):
        make_dir(folder, shared)


class TempFile:
    """A new file in `directory` named `prefix`, random letters and `suffix`, open for reading
    and writing (`fd`, close-on-exec), mode 0600, at `path`: what tempfile.mkstemp makes, but
    a Ctrl-C or signal landing anywhere never leaves the file or its descriptor behind.

    A signal handler runs as a call returns, so an fd or path a call returns can be dropped
    before any line of its caller holds it: mkstemp, interrupted as its open() returned, left
    a file nobody could name (a temporary pack of up to the adapter's size, until a gc) and its
    descriptor open. Here the object owns both from the open() on: discard() closes and removes
    them, as does leaving a `with` block, or the object being dropped unused (a KeyboardInterrupt
    as TempFile() returns); close() closes the fd only; keep() leaves the file in place (renamed
    or handed on by the caller). Open the fd as a file with closefd=False: only this closes it.
    """

    fd: int = -1
    path: str = ""
    # os.open was called and its fd may not be in self.fd yet (a signal as it returned).
    _opening: bool = False

    def __init__(self, directory: str | os.PathLike[str], prefix: str, suffix: str = "") -> None:
        try:
            self._create(directory, prefix, suffix)
        except BaseException:
            self.discard()
            raise

    def _create(self, directory: str | os.PathLike[str], prefix: str, suffix: str) -> None:
        """Make the file under a free random name."""
        for _ in range(100):
            path = os.path.join(directory, f"{prefix}{secrets.token_hex(4)}{suffix}")
            self.path, self._opening = path, True
            try:
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as err:
                # Nothing was made: a file of that name there is another's, not ours to remove.
                self.path, self._opening = "", False
                if isinstance(err, FileExistsError):
                    continue
                raise
            self._opening = False
            return
        raise FileExistsError(errno.EEXIST, "no free temporary file name", os.fspath(directory))

    def close(self) -> None:
        """Close the fd (once); the file stays until discard()."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        elif self._opening and self.path:
            _close_lost_fds(self.path)
        self._opening = False

    def keep(self) -> None:
        """Leave the file where it is when this closes: the caller renamed it or handed it on."""
        self.path = ""

    def discard(self) -> None:
        """Close the fd and remove the file (kept: only close); nothing once done."""
        try:
            self.close()
        finally:
            # No call before the unlink, and the path forgotten only after it: a signal
            # handler runs as a call returns, and one here would lose the path.
            if self.path:
                try:  # noqa: SIM105 (contextlib.suppress() is a call: see above)
                    os.unlink(self.path)
                except OSError:
                    pass
                self.path = ""

    def __enter__(self) -> TempFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def __del__(self) -> None:
        # Dropped unused: a signal as a call returned it, before its caller's `with` or try.
        if self.fd >= 0 or self.path:
            with contextlib.suppress(Exception):
                self.discard()


def _close_lost_fds(path: str) -> None:
    """Close this process's descriptors of the file at `path`, which os.open made and returned
    as a signal landed (the fd was dropped with the exception): a file of a random name just
    made, so no other descriptor of it is ours. Where the process's descriptors cannot be
    listed (no /proc/self/fd nor /dev/fd) the fd stays open."""
    try:
        made = os.lstat(path)
    except OSError:
        return  # the open failed: no descriptor
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(listing)
        except OSError:
            continue
        for name in names:
            with contextlib.suppress(OSError, ValueError):
                st = os.fstat(int(name))
                if (st.st_dev, st.st_ino) == (made.st_dev, made.st_ino):
                    os.close(int(name))
        return


def read_regular(fd: int) -> bytes | None:
    """All the bytes of open `fd` if it is a regular file; None for a FIFO, a directory, a
    device or a socket, left unread (open such a path O_NONBLOCK: a plain open of a FIFO waits
    for a writer, for ever once it is unlinked)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def write_file(path: Path, data: bytes, shared: SharedPerm | None, base: int = 0o666) -> None:
    """Replace `path` by a file holding `data`, as git writes its own files (config,
    description): mode `base` less the umask and as core.sharedRepository says, written aside
    and renamed into place, so another user's file there is replaced, not rewritten."""
    try:
        temp = TempFile(path.parent, f"{path.name}.", ".tmp")
    except OSError as err:  # the file is named, not a temporary that was never made
        raise OSError(err.errno, err.strerror, os.fspath(path)) from None
    with temp:  # closed, and removed unless renamed into place, whatever ends the block
        try:
            with open(temp.fd, "wb", closefd=False) as handle:
                os.fchmod(temp.fd, file_mode(base, shared))
                handle.write(data)
            temp.close()
            os.replace(temp.path, path)
            temp.keep()
        except OSError as err:  # a full disk: the file named, not the temporary
            raise write_failed(err, path, "unable to write") from None


def not_writable(err: OSError, directory: str | os.PathLike[str], what: str) -> OSError:
    """`err`, raised creating a temporary in `directory`, naming the directory, not the
    temporary that was never made: in git's words where the user may not write it, else in the
    system's (`Read-only file system`, a full disk). A missing directory stays a
    FileNotFoundError (a writer makes it again)."""
    if isinstance(err, PermissionError):
        return PermissionError(
            err.errno or errno.EACCES, f"insufficient permission for {what}", os.fspath(directory)
        )
    return OSError(err.errno, err.strerror, os.fspath(directory))


def write_failed(err: OSError, path: str | os.PathLike[str], what: str) -> OSError:
    """`err`, raised writing (a full disk, a file size limit), saying `what` was being written
    (as git words it: "unable to write loose object file") and naming `path`, where the system
    named no file."""
    if err.filename is not None or err.errno is None:
        return err
    return OSError(err.errno, f"{what}: {err.strerror}", os.fspath(path))
