"""A disk that fills up while a command runs, injected at the system calls that write.

`python -m tests.mintvcs.fullkit N [--errno NAME] -- ARGS` runs `mintvcs ARGS` as a real
process in which the first N writes succeed and, from then on, every write that needs space a
file does not have yet fails with ENOSPC (or NAME): what another process filling the disk
meanwhile does to this one (`strace -e inject=write:error=ENOSPC:when=N+`, with room still in
the files already written). A write within the 4 KiB blocks a file has (checkout's in-place
weights, a short line appended to a log) still succeeds, as on a real full disk. The failure is injected at os.write, os.pwrite,
os.writev, os.pwritev, os.sendfile and the write() of every file opened for writing (open,
os.fdopen, pathlib): no code of mintvcs is replaced. Run in-process, `install(n)` does the same
until `uninstall()`.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.mintvcs.storekit import ENV

_BLOCK = 4096  # a write within the blocks a file has needs no space: tmpfs pages, ext4 blocks


class _Disk:
    """How many writes are still allowed before the disk is full, and the error it gives then."""

    def __init__(self, allowed: int, error: int) -> None:
        self.allowed = allowed
        self.error = error

    def check(self, fd: int, size: int, offset: int | None) -> None:
        """Count one write of `size` bytes to `fd` (at `offset`, else its position); fail it
        once the disk is full, unless it stays within the file's existing bytes."""
        if fd in (0, 1, 2):
            return
        if self.allowed > 0:
            self.allowed -= 1
            return
        try:
            length = os.fstat(fd).st_size
            if offset is None:
                appending = (_fcntl_flags(fd) & os.O_APPEND) != 0
                offset = length if appending else os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            length, offset = 0, 0
        if -(-(offset + size) // _BLOCK) > -(-length // _BLOCK):
            raise OSError(self.error, os.strerror(self.error))


def _fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _nbytes(data: Any) -> int:
    return memoryview(data).nbytes


class _Writer:
    """A file opened for writing, whose writes the full disk may fail (everything else is the
    file's). A buffered file's bytes reach the disk, and fail, when its buffer is flushed (on
    flush(), close(), or a write that fills it), as a real one's do."""

    def __init__(self, file: Any, disk: _Disk) -> None:
        self._file = file
        self._disk = disk
        self._buffered = hasattr(file, "raw")
        self._pending = 0

    def _settle(self, size: int) -> None:
        """Count the write of the buffer's `size` bytes, as the flush that writes them."""
        if size:
            self._disk.check(self._file.fileno(), size, self._file.tell() - self._pending)
            self._pending = 0

    def write(self, data: Any) -> int:
        size = len(data.encode()) if isinstance(data, str) else _nbytes(data)
        if self._buffered and self._pending + size < io.DEFAULT_BUFFER_SIZE:
            self._pending += size
        else:
            self._settle(self._pending + size)
        return int(self._file.write(data))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._settle(self._pending)
        self._file.flush()

    def close(self) -> None:
        try:
            self._settle(self._pending)
        except OSError:
            # As a real buffered file: closed all the same, its unwritten bytes lost.
            with contextlib.suppress(OSError, ValueError):
                self._file.raw.close()
            raise
        self._file.close()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Any:
        return iter(self._file)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


_saved: dict[tuple[object, str], Any] = {}


def _patch(owner: object, name: str, value: Any) -> None:
    _saved.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, value)


def install(allowed: int, error: int = errno.ENOSPC) -> None:
    """Let `allowed` more writes succeed in this process, then fail those that need space."""
    disk = _Disk(allowed, error)
    real_open = io.open
    real = {
        name: getattr(os, name) for name in ("write", "pwrite", "writev", "pwritev", "sendfile")
    }

    def opener(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return _Writer(handle, disk) if any(c in mode for c in "wax+") else handle

    def write(fd: int, data: Any) -> int:
        disk.check(fd, _nbytes(data), None)
        return int(real["write"](fd, data))

    def pwrite(fd: int, data: Any, offset: int) -> int:
        disk.check(fd, _nbytes(data), offset)
        return int(real["pwrite"](fd, data, offset))

    def writev(fd: int, buffers: Any) -> int:
        buffers = list(buffers)
        disk.check(fd, sum(_nbytes(b) for b in buffers), None)
        return int(real["writev"](fd, buffers))

    def pwritev(fd: int, buffers: Any, offset: int, *flags: int) -> int:
        buffers = list(buffers)
        disk.check(fd, sum(_nbytes(b) for b in buffers), offset)
        return int(real["pwritev"](fd, buffers, offset, *flags))

    def sendfile(out_fd: int, in_fd: int, offset: Any, count: int) -> int:
        disk.check(out_fd, count, None)
        return int(real["sendfile"](out_fd, in_fd, offset, count))

    wrappers: dict[str, Callable[..., Any]] = {
        "write": write,
        "pwrite": pwrite,
        "writev": writev,
        "pwritev": pwritev,
        "sendfile": sendfile,
    }
    for name, wrapper in wrappers.items():
        _patch(os, name, wrapper)
    _patch(io, "open", opener)
    _patch(builtins, "open", opener)


def uninstall() -> None:
    """The real system calls again."""
    for (owner, name), value in _saved.items():
        setattr(owner, name, value)
    _saved.clear()


def command(allowed: int, *args: str, error: str = "ENOSPC") -> list[str]:
    """The argv that runs `mintvcs ARGS` with a disk that fills after `allowed` writes."""
    return [sys.executable, "-m", "tests.mintvcs.fullkit", str(allowed), error, "--", *args]


def run(cwd: Path, allowed: int, *args: str, error: str = "ENOSPC") -> Any:
    """Run `mintvcs ARGS` in `cwd` as a real process whose disk fills after `allowed` writes."""
    import subprocess

    return subprocess.run(
        command(allowed, *args, error=error),
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


if __name__ == "__main__":
    count, name, separator, *rest = sys.argv[1:]
    assert separator == "--"
    install(int(count), getattr(errno, name))
    sys.argv = ["mintvcs", *rest]
    runpy.run_module("mintvcs.cli", run_name="__main__", alter_sys=True)
