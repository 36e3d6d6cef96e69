"""Refs: git's loose refs, packed-refs, reflogs and lock files, scaled to 10^6 branches.

The on-disk format is git's own (so `git --git-dir .mint ...` reads and writes the
same refs); see docs/format.md. Resolving one ref reads at most its loose file and
a binary search over an mmap of packed-refs, never all refs.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import mmap
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mintvcs.errors import MintError, cannot_read
from mintvcs.filemodes import adjust_fd, make_dirs, read_regular, write_failed
from mintvcs.ids import is_object_id
from mintvcs.messages import one_line

if TYPE_CHECKING:
    from dulwich.file import SharedPerm

ZERO = "0" * 40
HEAD = "HEAD"
DEFAULT_IDENTITY = "mintvcs <mintvcs@localhost>"
PACKED_HEADER = b"# pack-refs with: peeled fully-peeled sorted \n"
# git's SYMREF_MAXDEPTH: deeper chains are treated as loops.
SYMREF_MAXDEPTH = 5
# git waits up to core.packedRefsTimeout (1 s) for packed-refs.lock; rewrites are short.
PACKED_LOCK_TIMEOUT_S = 1.0


class _Any(enum.Enum):
    ANY = "ANY"


ANY: Literal[_Any.ANY] = _Any.ANY
"""Sentinel for `old=`: update or delete without checking the current value."""

OldValue = str | None | Literal[_Any.ANY]


def _quoted(name: str) -> str:
    """A ref name as ref errors give it: in single quotes, as git's do, its bytes that are not
    UTF-8 (surrogate escapes) left to print as they are, where Python's repr showed `\\udce9`;
    control characters escaped (messages.one_line), as the repr did."""
    return f"'{one_line(name)}'"


class InvalidRefNameError(MintError):
    """A ref or branch name that git would refuse."""

    def __init__(self, name: str, rule: str) -> None:
        self.name = name
        self.rule = rule
        super().__init__(
            f"invalid ref name {_quoted(name)}: {rule}; choose a name that git check-ref-format accepts"
        )


class InvalidRefValueError(MintError):
    """A value that is not a full lowercase hex object id."""

    def __init__(self, value: str) -> None:
        self.value = value
        super().__init__(
            f"invalid ref value {value!r}: expected a full 40-digit lowercase hex object id"
        )


class RefConflictError(MintError):
    """A compare-and-swap failed, or another process holds the ref's lock."""

    def __init__(
        self,
        name: str,
        expected: OldValue,
        actual: str | None,
        detail: str = "",
    ) -> None:
        self.name = name
        self.expected = expected
        self.actual = actual
        if detail:
            msg = f"cannot update ref {_quoted(name)}: {detail}"
        else:
            exp = "nothing" if expected in (None, ZERO) else str(expected)
            act = "nothing" if actual is None else actual
            msg = (
                f"cannot update ref {_quoted(name)}: expected {exp} but found {act}; "
                "it moved meanwhile, re-read it and retry"
            )
        super().__init__(msg)


class LockRemovedError(MintError):
    """A lock file was removed while this process held it: the update it guarded was not made."""


class RefNameConflictError(MintError):
    """A new ref would be a file where another ref needs a directory, or the reverse."""

    def __init__(self, name: str, other: str) -> None:
        self.name = name
        self.other = other
        super().__init__(
            f"cannot create ref {_quoted(name)}: ref {_quoted(other)} exists and one name is a prefix "
            "directory of the other; delete it or pick another name"
        )


class InvalidIdentityError(MintError):
    """A reflog identity or timezone that would break git's reflog line format."""

    def __init__(self, value: str, expected: str) -> None:
        self.value = value
        super().__init__(f"invalid reflog field {value!r}: expected {expected}")


class RefNotFoundError(MintError):
    """The named ref does not exist."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"ref {_quoted(name)} not found; list refs with `mintvcs branch --list`")


class SymbolicRefError(MintError):
    """A rename of a symbolic ref, which git refuses too."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"cannot rename {_quoted(name)}: it is a symbolic ref (`git symbolic-ref`), which git does "
            "not rename either; delete it and make one under the new name"
        )


class RefFormatError(MintError):
    """A loose ref, packed-refs or reflog file that does not parse."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        super().__init__(f"corrupt ref file {path}: {detail}; restore it or run `git fsck`")


class RefUnreadableError(RefFormatError):
    """A ref file the system will not let this process read (permissions, a symlink loop, an
    I/O error): not damage, so nothing tells to restore it. A RefFormatError all the same, so
    that listings leave it out as they leave out a broken one."""

    def __init__(self, path: str, err: OSError, kind: str = "ref file") -> None:
        self.path = path
        MintError.__init__(self, f"{kind} {cannot_read(path, err)}")


@dataclass(frozen=True)
class ReflogEntry:
    """One line of logs/<ref>: a move from `old` to `new`, by whom, when and why."""

    old: str
    new: str
    identity: str
    timestamp: int
    tz: str
    message: str


# --- names -----------------------------------------------------------------------

# git refuses ASCII control characters, space and ~ ^ : ? * [ \ anywhere in a name.
# The common shape (plain characters, two or more components), accepted without the
# rule-by-rule walk; everything else takes the slow path that names the broken rule.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_-][A-Za-z0-9_.-]*)+\Z")
_BAD_CHAR = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_LOGGED_REFS = ("refs/heads/", "refs/remotes/", "refs/notes/")
_PSEUDO = re.compile(r"[A-Z][A-Z0-9_]*\Z")
_IDENTITY = re.compile(r"[^<>\n]* <[^<>\n]*>\Z")
_TZ = re.compile(r"[+-][0-9]{4}\Z")
_WS = re.compile(r"[ \t\n\v\f\r]+")
# Each component is a file or directory name, and a ref's lock file adds '.lock' to it.
_MAX_COMPONENT = 250


def check_ref_name(name: str, *, long_names: bool = False) -> None:
    """Raise InvalidRefNameError unless `git check-ref-format` accepts the full name (and a file
    system can hold it: unless `long_names`, no component is over 250 bytes)."""
    if (
        _PLAIN_NAME.match(name)
        and (
            long_names
            or len(name) <= _MAX_COMPONENT
            or max(map(len, name.split("/"))) <= _MAX_COMPONENT
        )
        and ".." not in name
        and ".lock/" not in name
        and not name.endswith((".", ".lock"))
    ):
        return
    if not name:
        raise InvalidRefNameError(name, "it is empty")
    m = _BAD_CHAR.search(name)
    if m:
        ch = m.group()
        what = "a control character or space" if ch <= " " or ch == "\x7f" else repr(ch)
        raise InvalidRefNameError(name, f"it contains {what}")
    if name == "@":
        raise InvalidRefNameError(name, "it is the single character '@'")
    if "@{" in name:
        raise InvalidRefNameError(name, "it contains '@{'")
    if ".." in name:
        raise InvalidRefNameError(name, "it contains '..'")
    if name.startswith("/") or name.endswith("/"):
        raise InvalidRefNameError(name, "it begins or ends with '/'")
    if name.endswith("."):
        raise InvalidRefNameError(name, "it ends with '.'")
    parts = name.split("/")
    if len(parts) < 2:
        raise InvalidRefNameError(name, "it has one level; full names look like refs/heads/NAME")
    for part in parts:
        if not part:
            raise InvalidRefNameError(name, "it contains '//'")
        if part.startswith("."):
            raise InvalidRefNameError(name, f"component {_quoted(part)} begins with '.'")
        if part.endswith(".lock"):
            raise InvalidRefNameError(name, f"component {_quoted(part)} ends with '.lock'")
        if not long_names and (rule := _too_long(part)):
            raise InvalidRefNameError(name, rule)


def _valid_ref_name(name: str) -> bool:
    """Whether git check-ref-format accepts `name` (a symbolic link's target, read as a ref)."""
    try:
        check_ref_name(name, long_names=True)
    except InvalidRefNameError:
        return False
    return True


def _too_long(part: str) -> str | None:
    """Why no file system could hold a ref file for name component `part`, or None."""
    size = len(part.encode("utf-8", "surrogateescape"))
    if size <= _MAX_COMPONENT:
        return None
    return (
        f"component {_quoted(part[:24])}... is {size} bytes; a file name holds at most "
        f"{_MAX_COMPONENT} (255 less room for '.lock')"
    )


def fits_files(name: str) -> bool:
    """Whether every component of ref `name` fits a file name (with '.lock' added).

    git takes longer ones, and `git clone` writes them to packed-refs, which has no such limit;
    mintvcs does not use them (no loose ref or lock file could be written for one), but lists
    them as ignored, keeps what they point to in gc, and deletes them.
    """
    return _name_too_long(name) is None


def _name_too_long(name: str) -> str | None:
    """Why no file could hold ref `name` (its first component over the limit), or None."""
    if name.isascii() and len(name) <= _MAX_COMPONENT:  # else count each part's bytes
        return None
    return next(filter(None, map(_too_long, name.split("/"))), None)


def check_name_type(name: object) -> None:
    """TypeError unless a branch or tag name given from Python is a str."""
    if not isinstance(name, str):
        raise TypeError(f"a branch or tag name is a str, not {type(name).__name__}")


def check_branch_name(name: str, *, utf8: bool = True) -> None:
    """Raise InvalidRefNameError unless `name` is a valid short branch name (`utf8`: and UTF-8,
    which mintvcs asks and git does not)."""
    check_name_type(name)
    if not name:
        raise InvalidRefNameError(name, "it is empty")
    if name.startswith("-"):
        raise InvalidRefNameError(name, "it begins with '-'")
    if name in ("HEAD", "@"):
        raise InvalidRefNameError(name, f"{_quoted(name)} is reserved for the current revision")
    try:
        check_ref_name("refs/heads/" + name)
    except InvalidRefNameError as e:
        raise InvalidRefNameError(name, e.rule) from None
    if utf8:
        check_utf8_name(name)


def check_utf8_name(name: str) -> None:
    """Raise InvalidRefNameError for a name that is not UTF-8 (bytes of argv that are not come
    as surrogate escapes): git takes any bytes, but JSON, /v1/models and a client sending the
    name back cannot carry them, as mintvcs refuses such file names and messages."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(name[err.start])
        what = f"the byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else "a surrogate"
        raise InvalidRefNameError(
            name, f"{what} is not UTF-8 (git takes it; mintvcs names refs in UTF-8 only)"
        ) from None


def read_reflog(path: str | os.PathLike[str]) -> list[ReflogEntry]:
    """The entries of a reflog file, oldest first; [] when there is none (see RefStore.reflog)."""
    try:
        raw = _read_bytes(os.fspath(path))
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:  # a packed ref's name no file can hold: no reflog
            return []
        raise RefUnreadableError(os.fspath(path), err, "reflog") from None
    if raw is None:
        return []
    data = raw.decode("utf-8", "replace")
    out = []
    for line in data.splitlines():
        head, _, message = line.partition("\t")
        try:
            ids, ts, tz = head.rsplit(" ", 2)
            old, new, identity = ids[:40], ids[41:81], ids[82:]
            entry = ReflogEntry(old, new, identity, int(ts), tz, message)
        except ValueError:
            continue
        if is_object_id(old) and is_object_id(new) and ids[40:41] == ids[81:82] == " ":
            out.append(entry)
    return out


def _check_store_name(name: str, *, long_names: bool = False) -> None:
    """Names the store reads and writes: HEAD-like pseudo-refs or full names under refs/
    (`long_names`: also those only packed-refs can hold, see fits_files)."""
    if _PSEUDO.match(name):
        return
    check_ref_name(name, long_names=long_names)
    if not name.startswith("refs/"):
        raise InvalidRefNameError(name, "full ref names begin with 'refs/' (or are HEAD)")


def _log_line(old: str, new: str, identity: str, ts: int, tz: str, message: str) -> bytes:
    """One reflog line as git writes it (the message, if any, after a tab). A name in the
    message that is not UTF-8 (a branch git made: `reset --hard` to it, `branch -m` away from
    it) is written as its bytes, as git writes it, not a traceback."""
    line = f"{old} {new} {identity} {ts} {tz}"
    if message:
        line += "\t" + message
    return (line + "\n").encode("utf-8", "surrogateescape")


def add_note(err: BaseException, note: str) -> None:
    """Add `note` to the one line `err` will be reported in (a failed command's undo that left
    something as another process set it meanwhile)."""
    if isinstance(err, OSError) and err.strerror:
        err.strerror = f"{err.strerror} ({note})"
    elif isinstance(err, MintError) and err.args:
        err.args = (f"{err.args[0]} ({note})", *err.args[1:])


def _no_such_ref(err: OSError) -> bool:
    """Whether `err`, from looking at a loose ref's file, means there is no such ref: no file, a
    file where a directory of its path goes, or a name no file could have (check_ref_name lets
    packed-refs hold such refs)."""
    return err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG)


def _read_bytes(path: str) -> bytes | None:
    """A regular file's bytes, or None when there is none: nothing there, or a directory, a FIFO
    or a device (as git's files backend, which takes only a regular file for a reflog). Opened
    O_NONBLOCK: a plain open of a FIFO waits for a writer for ever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        return read_regular(fd)
    finally:
        os.close(fd)


def _check_value(value: str) -> None:
    if not is_object_id(value):
        raise InvalidRefValueError(value)


def _when(timestamp: int | None, tz: str | None) -> tuple[int, str]:
    """A reflog line's time and zone: now and the local zone unless given; a bad zone is refused."""
    ts = int(time.time()) if timestamp is None else timestamp
    tz = local_tz(ts) if tz is None else tz
    if not _TZ.match(tz):
        raise InvalidIdentityError(tz, "a timezone like +0000 or -0530")
    return ts, tz


def _check_identity(identity: str) -> None:
    if not _IDENTITY.match(identity):
        raise InvalidIdentityError(identity, "'Name <email>' without '<', '>' or newlines inside")


def _clean_message(msg: str) -> str:
    # git's copy_reflog_msg: whitespace runs become one space, ends trimmed, so that a
    # message can never break the one-line-per-entry format.
    return _WS.sub(" ", msg).strip(" ")


def tz_text(minutes: int) -> str:
    """A UTC offset in minutes as git writes it (`+0100`, `-0530`)."""
    sign = "+" if minutes >= 0 else "-"
    hours, rest = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}{rest:02d}"


def local_tz(ts: int) -> str:
    """This machine's UTC offset at `ts`, as git writes it (`+0100`): an offset's seconds are
    dropped toward zero, as git's int division drops them (-3:30:30 is -0330, not -0331)."""
    return tz_text(int(time.localtime(ts).tm_gmtoff / 60))


# --- packed-refs -------------------------------------------------------------------


class _Packed:
    """An immutable snapshot of packed-refs: an mmap plus the traits from its header."""

    def __init__(self, path: str, fd: int, st: os.stat_result) -> None:
        self.path = path
        self.key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        self.end = st.st_size
        self.start = 0
        self.traits: frozenset[str] = frozenset()
        mm = self.mm
        if mm[self.end - 1] != 0x0A:
            raise RefFormatError(path, "last line is not terminated by a newline")
        if mm[0] == 0x23:  # '#'
            nl = mm.find(b"\n")
            header = mm[:nl].decode("utf-8", "replace")
            if header.startswith("# pack-refs with:"):
                self.traits = frozenset(header[len("# pack-refs with:") :].split())
            self.start = nl + 1
        self.sorted = "sorted" in self.traits
        # Only for files written without the "sorted" trait (old git, dulwich): parsed once.
        self._table: dict[bytes, tuple[bytes, bytes | None]] | None = None

    def close(self) -> None:
        self.mm.close()

    def _record_start(self, lo: int, pos: int) -> int:
        mm = self.mm
        p = mm.rfind(b"\n", lo, pos) + 1 or lo
        if mm[p] == 0x5E:  # '^': a peeled line belongs to the record before it
            p = max(mm.rfind(b"\n", lo, p - 1) + 1, lo)
        return p

    def _record_end(self, rec: int) -> int:
        mm = self.mm
        e = mm.find(b"\n", rec, self.end) + 1
        if e < self.end and mm[e] == 0x5E:
            e = mm.find(b"\n", e, self.end) + 1
        return e

    def _record_name(self, rec: int) -> bytes:
        mm = self.mm
        sp = mm.find(b" ", rec, self.end)
        nl = mm.find(b"\n", rec, self.end)
        if sp < 0 or sp > nl:
            raise RefFormatError(self.path, f"bad line at byte {rec}")
        return mm[sp + 1 : nl]

    def lower_bound(self, key: bytes) -> int:
        """Offset of the first record whose name is >= key (self.end if none)."""
        lo, hi = self.start, self.end
        while lo < hi:
            rec = self._record_start(lo, (lo + hi) // 2)
            if self._record_name(rec) < key:
                lo = self._record_end(rec)
            else:
                hi = rec
        return lo

    def record(self, rec: int) -> tuple[bytes, bytes, bytes | None, int]:
        """(name, value, peeled or None, offset of the next record) of the record at rec."""
        mm = self.mm
        nl = mm.find(b"\n", rec, self.end)
        line = mm[rec:nl]
        value, _, name = line.partition(b" ")
        if not name or len(value) != 40:
            # The line itself stays out of the message: packed-refs may be a link to any file.
            raise RefFormatError(self.path, f"bad line at byte {rec}")
        nxt = nl + 1
        peeled = None
        if nxt < self.end and mm[nxt] == 0x5E:
            pnl = mm.find(b"\n", nxt, self.end)
            peeled = mm[nxt + 1 : pnl]
            nxt = pnl + 1
        return name, value, peeled, nxt

    def _linear(self) -> dict[bytes, tuple[bytes, bytes | None]]:
        if self._table is None:
            table: dict[bytes, tuple[bytes, bytes | None]] = {}
            pos = self.start
            while pos < self.end:
                name, value, peeled, pos = self.record(pos)
                table[name] = (value, peeled)
            self._table = table
        return self._table

    def get(self, name: bytes) -> tuple[bytes, bytes | None] | None:
        """The (value, peeled) of one ref, by binary search when the file is sorted."""
        if not self.sorted:
            return self._linear().get(name)
        rec = self.lower_bound(name)
        if rec >= self.end:
            return None
        rname, value, peeled, _ = self.record(rec)
        return (value, peeled) if rname == name else None

    def find_range(self, name: bytes) -> tuple[int, int] | None:
        """Byte range [start, end) of one ref's record (with its peeled line)."""
        if self.sorted:
            rec = self.lower_bound(name)
            if rec < self.end:
                rname, _, _, nxt = self.record(rec)
                if rname == name:
                    return rec, nxt
            return None
        pos = self.start
        while pos < self.end:
            rname, _, _, nxt = self.record(pos)
            if rname == name:
                return pos, nxt
            pos = nxt
        return None

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes, bytes | None]]:
        """Records whose names start with prefix, in file order (sorted if the file is)."""
        if self.sorted:
            pos = self.lower_bound(prefix)
            while pos < self.end:
                name, value, peeled, pos = self.record(pos)
                if not name.startswith(prefix):
                    return
                yield name, value, peeled
        else:
            for name, (value, peeled) in sorted(self._linear().items()):
                if name.startswith(prefix):
                    yield name, value, peeled


# --- the store -----------------------------------------------------------------------


def _held_elsewhere(path: str) -> str:
    return (
        f"{path}.lock exists: locked by another process; retry, or remove the "
        "file if no mintvcs or git process is running"
    )


class _Lock:
    """A git lock file: `<path>.lock` created exclusively, committed by rename."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.lock_path = path + ".lock"
        self.fd: int | None = fd
        self.held = True
        self._identity = _file_identity(os.fstat(fd))

    def write_commit(self, data: bytes) -> None:
        """Write data, fsync and rename over the target, so readers see old or new."""
        assert self.fd is not None
        try:
            os.write(self.fd, data)
            os.fsync(self.fd)
        except OSError as err:
            raise write_failed(err, self.lock_path, "unable to write") from None
        # Forgotten before it is closed: a Ctrl-C between the two must not make release()
        # close the number again, by then perhaps another file's.
        fd, self.fd = self.fd, None
        os.close(fd)
        try:
            os.rename(self.lock_path, self.path)
        except FileNotFoundError:
            raise LockRemovedError(
                f"{self.lock_path} was removed while this process held it (by hand, or by "
                f"another process's cleanup): {self.path} was not changed; retry"
            ) from None
        # From here the lock path may already be another process's lock: never touch it.
        self.held = False

    def renamed(self) -> bool:
        """Whether the lock file went over the target: an interrupt (Ctrl-C) can land between
        the rename and the line that records it. Asked of the target, which is our file once
        it moved: a lock file gone does not say so (someone may have removed it, as the
        message for a leftover lock advises, and the rename then failed)."""
        return self._is_ours(self.path)

    def _is_ours(self, path: str) -> bool:
        """Whether `path` holds the file this lock created."""
        try:
            return _file_identity(os.stat(path)) == self._identity
        except OSError:
            return False

    def release(self) -> None:
        """Drop the lock without changing the target (idempotent)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
        if self.held:
            self.held = False
            # Not when renamed (a Ctrl-C after the rename): the lock path may already be
            # another process's lock then.
            if self._is_ours(self.lock_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock_path)


def _file_identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class _Appended:
    """A reflog line just appended: where, so that a move that then fails can take it back."""

    path: str
    start: int
    length: int

    def undo(self) -> None:
        """Remove the line, if it is still the log's last (HEAD's log takes lines unlocked)."""
        with contextlib.suppress(OSError):
            if os.path.getsize(self.path) == self.start + self.length:
                if self.start:
                    os.truncate(self.path, self.start)
                else:
                    os.unlink(self.path)


class RefStore:
    """git's files ref backend over a git directory: loose refs, packed-refs, reflogs."""

    def __init__(self, git_dir: Path, shared_perm: SharedPerm | None = None) -> None:
        self.git_dir = Path(git_dir)
        self._dir = os.fspath(git_dir)
        self._packed_path = os.path.join(self._dir, "packed-refs")
        self._snap: _Packed | None = None
        # core.sharedRepository, for the modes of the files and directories written here
        # (Repository.open sets it from the config it reads).
        self.shared_perm = shared_perm

    def close(self) -> None:
        """Release the packed-refs mapping."""
        if self._snap is not None:
            self._snap.close()
            self._snap = None

    def __enter__(self) -> RefStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def _packed(self) -> _Packed | None:
        """The current packed-refs snapshot, re-mapped only when the file changed."""
        path = self._packed_path
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._snap = None
            return None
        except OSError as err:
            raise RefUnreadableError(path, err) from None
        snap = self._snap
        if snap is not None and snap.key == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
            return snap
        # Drop, don't close, the old mapping: a reader elsewhere may still be searching
        # it; it unmaps when the last reference goes.
        self._snap = None
        try:  # O_NONBLOCK: a FIFO, see _read_loose
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise RefUnreadableError(path, err) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RefFormatError(path, "it is not a regular file (a pipe or a device)")
            if st.st_size == 0:
                return None
            snap = _Packed(path, fd, st)
        finally:
            os.close(fd)
        self._snap = snap
        return snap

    def _read_loose(self, name: str) -> str | None:
        """Raw content of a loose ref ('ref: X' or a hex id), or None when absent.

        As git's files backend reads one: a symbolic link whose target is a ref name under
        refs/ (core.preferSymlinkRefs' HEAD -> refs/heads/main) is that symbolic ref, and any
        other link is read through.
        """
        path = self._path(name)
        for _ in range(3):  # lstat, then read: a link replaced between the two is looked at again
            try:
                st = os.lstat(path)
            except OSError as err:
                if _no_such_ref(err):
                    return None
                raise RefUnreadableError(path, err) from None
            if not stat.S_ISLNK(st.st_mode):
                break
            try:
                target = os.readlink(path)
            except OSError as err:
                if err.errno in (errno.ENOENT, errno.EINVAL):
                    continue  # no longer a link
                raise RefUnreadableError(path, err) from None
            if target.startswith("refs/") and _valid_ref_name(target):
                return "ref: " + target
            break  # a link to anything else: read what it points to
        try:
            # O_NONBLOCK: opening a FIFO would wait for a writer for ever (git 2.39's does).
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            if _no_such_ref(err):
                return None
            # A symlink loop, no permission, a socket: that ref is unreadable (not corrupt: it
            # may be fine for its owner).
            raise RefUnreadableError(path, err) from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):  # a directory of refs (or a link to one), no ref itself
                return None
            if not stat.S_ISREG(mode):
                raise RefFormatError(path, "it is not a regular file (a pipe or a device)")
            data = os.read(fd, 4096)
        except OSError as err:
            raise RefUnreadableError(path, err) from None
        finally:
            os.close(fd)
        if data.startswith(b"ref:"):
            # The target's bytes as a directory listing gives a ref's name: those that are not
            # UTF-8 as surrogate escapes. Replaced by U+FFFD, HEAD on a branch git named so
            # named another one, which commit then created and status took for unborn.
            return "ref: " + data[4:].strip().decode("utf-8", "surrogateescape")
        text = data.decode("utf-8", "replace").rstrip()
        value = text[:40]
        if not is_object_id(value) or (len(text) > 40 and not text[40].isspace()):
            # Never the content: a ref may be a link to any file this process can read (a
            # repository unpacked from a tarball), and the server sends this message to
            # clients. git's "ignoring broken ref" shows none either.
            raise RefFormatError(path, "it holds neither 'ref: NAME' nor an object id")
        return value

    def _target(self, name: str, raw: str) -> str:
        """The target of symbolic ref `name`, whose loose content is `raw` ('ref: X'), checked."""
        target = raw[5:]
        try:
            _check_store_name(target)
        except InvalidRefNameError:
            # The name is the file's content, not given here: it stays out of the message.
            raise RefFormatError(
                self._path(name), "it is a symbolic ref to an invalid or over-long ref name"
            ) from None
        return target

    def _read_direct(self, name: str) -> str | None:
        """Loose then packed content of one ref, without following symrefs."""
        raw = self._read_loose(name)
        if raw is not None:
            return raw
        if not name.startswith("refs/"):
            return None
        snap = self._packed()
        if snap is None:
            return None
        hit = snap.get(name.encode("utf-8", "surrogateescape"))
        return None if hit is None else hit[0].decode()

    def _resolve(self, name: str) -> tuple[list[str], str | None]:
        """Follow symrefs from name: (chain of names visited, final value or None)."""
        chain = [name]
        for _ in range(SYMREF_MAXDEPTH + 1):
            raw = self._read_direct(chain[-1])
            if raw is None:
                return chain, None
            if not raw.startswith("ref: "):
                return chain, raw
            chain.append(self._target(chain[-1], raw))
        raise RefFormatError(self._path(name), f"symbolic ref chain deeper than {SYMREF_MAXDEPTH}")

    def read(self, name: str, *, long_names: bool = False) -> str | None:
        """The object id a ref (or HEAD) points to, following symbolic refs; None if absent.

        A name no ref file could hold (see fits_files) is refused unless `long_names`.
        """
        _check_store_name(name, long_names=long_names)
        return self._resolve(name)[1]

    def read_symbolic(self, name: str, *, long_names: bool = False) -> str | None:
        """The target of a symbolic ref ('HEAD' -> 'refs/heads/main'); None if not symbolic."""
        _check_store_name(name, long_names=long_names)
        raw = self._read_loose(name)
        if raw is not None and raw.startswith("ref: "):
            return raw[5:]
        return None

    def peeled(self, name: str) -> str | None:
        """The peeled object id recorded in packed-refs for an annotated tag, if any."""
        _check_store_name(name)
        chain, value = self._resolve(name)
        if value is None:
            return None
        final = chain[-1]
        snap = self._packed()
        if snap is None:
            return None
        hit = snap.get(final.encode("utf-8", "surrogateescape"))
        # A loose value that differs from the packed one makes the packed peel stale.
        if hit is None or hit[1] is None or hit[0].decode() != value:
            return None
        return hit[1].decode()

    def exists(self, name: str) -> bool:
        """Whether the ref resolves to an object id."""
        return self.read(name) is not None

    # -- locking --

    def check_unlocked(self, name: str) -> None:
        """Raise RefConflictError now if another process holds `name`'s lock (a later update would fail)."""
        _check_store_name(name)
        path = self._path(name)
        if os.path.exists(path + ".lock"):
            raise RefConflictError(name, ANY, None, detail=_held_elsewhere(path))

    def check_lockable(self, name: str) -> None:
        """Raise now what taking `name`'s lock later would (another process holds it, a
        `.mint/` the user may not write), by taking it and letting it go: as git takes
        index.lock before a checkout writes the work tree, so that the work tree is not written
        for a move that cannot be made."""
        _check_store_name(name)
        self._lock(name).release()

    def _lock(self, name: str, expected: OldValue = ANY) -> _Lock:
        path = self._path(name)
        retries = 2
        while True:
            try:
                make_dirs(os.path.dirname(path), self.shared_perm)
            except (NotADirectoryError, FileExistsError):
                # A loose ref sits where this name needs a directory.
                raise RefNameConflictError(name, self._file_ancestor(name) or name) from None
            try:
                fd = self._create(path + ".lock")
            except FileExistsError:
                raise RefConflictError(name, expected, None, detail=_held_elsewhere(path)) from None
            except FileNotFoundError:
                # Another update removed the empty directory meanwhile (git does too): again.
                if not retries:
                    raise
                retries -= 1
                continue
            except NotADirectoryError:
                raise RefNameConflictError(name, self._file_ancestor(name) or name) from None
            return _Lock(path, fd)

    def _lock_packed(self) -> _Lock:
        path = self._packed_path
        deadline = time.monotonic() + PACKED_LOCK_TIMEOUT_S
        delay = 0.001
        while True:
            try:
                fd = self._create(path + ".lock")
                return _Lock(path, fd)
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise RefConflictError(
                        "packed-refs",
                        ANY,
                        None,
                        detail=(
                            f"{path}.lock exists: locked by another process; retry, or remove "
                            "the file if no mintvcs or git process is running"
                        ),
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _create(self, path: str) -> int:
        """Create `path` exclusively for writing, as git creates its lock files: 0666 less the
        umask, then core.sharedRepository's mode."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            adjust_fd(fd, self.shared_perm)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return fd

    def _file_ancestor(self, name: str) -> str | None:
        parts = name.split("/")
        for i in range(2, len(parts)):
            anc = "/".join(parts[:i])
            if self._read_direct(anc) is not None:
                return anc
        return None

    def _check_df(self, name: str, but: str | None = None) -> None:
        """Refuse to create `name` where an ancestor is a ref or `name/` holds refs (other than
        `but`, the ref a rename takes the name from)."""
        anc = self._file_ancestor(name)
        if anc is not None and anc != but:
            raise RefNameConflictError(name, anc)
        for child, _ in self._iter_raw(name + "/"):
            if child != but:
                raise RefNameConflictError(name, child)
        path = self._path(name)
        if os.path.isdir(path) and not (but or "").startswith(name + "/"):
            # Empty directories left behind by deleted refs: git removes them too.
            for root, _dirs, _files in os.walk(path, topdown=False):
                try:
                    os.rmdir(root)
                except OSError:
                    raise RefNameConflictError(name, os.path.relpath(root, self._dir)) from None

    # -- reflog --

    def _logs(self, name: str) -> bool:
        """Whether a move of `name` is logged: git's core.logAllRefUpdates=true rule.

        HEAD, branches, remote-tracking branches and notes get a reflog; other refs (tags)
        only when one already exists. git gc's reflog expiry complains about tag reflogs.
        """
        return (
            name == HEAD
            or name.startswith(_LOGGED_REFS)
            or os.path.exists(os.path.join(self._dir, "logs", name))
        )

    def _append_log(
        self, name: str, old: str, new: str, identity: str, ts: int, tz: str, message: str
    ) -> _Appended:
        data = _log_line(old, new, identity, ts, tz, message)
        path = os.path.join(self._dir, "logs", name)
        make_dirs(os.path.dirname(path), self.shared_perm)
        # One O_APPEND write per entry: concurrent appenders never interleave within a line.
        # O_NONBLOCK: a FIFO there fails (ENXIO), where a plain open waited for a reader for ever.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK
        try:
            fd = os.open(path, flags | os.O_EXCL, 0o666)
            made = True
        except FileExistsError:
            fd = os.open(path, flags, 0o666)
            made = False
        try:
            adjust_fd(fd, self.shared_perm)
            start = os.fstat(fd).st_size
            os.write(fd, data)
        except BaseException as err:
            if made:  # left empty (a full disk): it goes, as no line made it
                _Appended(path, 0, 0).undo()
            if isinstance(err, OSError):
                raise write_failed(err, path, "unable to append to the reflog") from None
            raise
        finally:
            os.close(fd)
        return _Appended(path, start, len(data))

    def reflog_of(self, name: str) -> str | None:
        """The ref whose reflog `name@{N}` reads, as git's dwim_log picks it: `name` when its
        reflog file exists (an emptied one counts), else the ref a symbolic `name` ends at when
        that one's does; None when `name` does not resolve or neither has a reflog file."""
        _check_store_name(name)
        chain, value = self._resolve(name)
        if value is None:
            return None
        for ref in dict.fromkeys((name, chain[-1])):
            if os.path.isfile(os.path.join(self._dir, "logs", ref)):
                return ref
        return None

    def reflog(self, name: str) -> list[ReflogEntry]:
        """The reflog of a ref, oldest entry first (as stored); [] when it has none.

        A line that does not parse is skipped, as git skips it: a torn or hand-edited reflog
        must not block gc, `@{n}` or the server's admission check. A packed ref whose name no
        file could hold has none.
        """
        _check_store_name(name, long_names=True)
        return read_reflog(os.path.join(self._dir, "logs", name))

    # -- writing --

    def update(
        self,
        name: str,
        new: str,
        *,
        old: OldValue = ANY,
        message: str,
        identity: str,
        timestamp: int | None = None,
        tz: str | None = None,
        deref: bool = True,
    ) -> None:
        """Compare-and-swap `name` (through symbolic refs unless deref=False) from `old` to `new`, with a reflog entry."""
        _check_store_name(name)
        _check_value(new)
        if new == ZERO:
            raise InvalidRefValueError(new + " (use delete() to remove a ref)")
        if old is not ANY and old is not None:
            _check_value(old)
        _check_identity(identity)
        ts, tz = _when(timestamp, tz)
        message = _clean_message(message)

        locks: list[_Lock] = []
        try:
            # Lock each ref along the symref chain, as git does, so HEAD cannot be
            # retargeted while its branch moves; re-read each one under its lock.
            chain = [name]
            locks.append(self._lock(name, old))
            for _ in range(SYMREF_MAXDEPTH + 1):
                raw = self._read_loose(chain[-1])
                if raw is None or not raw.startswith("ref: ") or not deref:
                    break
                target = self._target(chain[-1], raw)
                chain.append(target)
                locks.append(self._lock(target, old))
            else:
                raise RefFormatError(self._path(name), "symbolic ref chain too deep")
            final = chain[-1]
            current = self._read_direct(final)
            # HEADs that name a ref not made yet (an unborn branch, a first commit's): its
            # undo may delete it; one that names it later was a checkout of it meanwhile.
            named = self._heads_naming(final) if current is None else set()
            final_symbolic = current is not None and current.startswith("ref: ")
            if final_symbolic:
                if deref:
                    raise RefFormatError(self._path(final), "symbolic ref chain too deep")
                # Detaching a symbolic ref: its old value is what it pointed to.
                current = self.read(final)
            if old is not ANY:
                want = None if old in (None, ZERO) else old
                if current != want:
                    raise RefConflictError(
                        final if final == name else f"{name} -> {final}", old, current
                    )
            if current is None:
                self._check_df(final)
            # As git's files backend: a ref left at the value it had gets no reflog line, but the
            # symbolic refs the update went through still do (git's LOG_ONLY updates): `reset
            # --hard HEAD` logs HEAD, not the branch, so `main@{1}` stays the branch's last move.
            logged = chain[:-1] if current == new and not final_symbolic else list(chain)
            if HEAD not in chain and self.read_symbolic(HEAD) in chain:
                # git also logs to HEAD when the branch HEAD names moves, itself or through it
                # (HEAD -> alias -> main): else HEAD@{0} would not be HEAD after a commit.
                logged.append(HEAD)
            prev = current or ZERO
            logged = [ref for ref in logged if self._logs(ref)]
            if current is not None:
                # The line goes first, as git writes it: a crash between the two leaves a line
                # for a move that did not happen, never a move without its line (after which
                # `main@{1}` would name the value before the last move, not the one undone).
                appended: list[_Appended] = []
                try:
                    for ref in logged:
                        appended.append(self._append_log(ref, prev, new, identity, ts, tz, message))
                    locks[-1].write_commit((new + "\n").encode())
                except BaseException:
                    if not locks[-1].renamed():  # the lines of a move that happened stay
                        for entry in appended:
                            entry.undo()
                    raise
                return
            # A new ref is logged once it exists (still under its lock): a log file written
            # first could stand in the way of a concurrent `final/...`, the ref that won the race.
            # Where a line cannot be written (a full disk, a Ctrl-C just after the rename), the
            # ref goes again, as git creates none then: a failed `branch x` leaves no `x` that
            # its retry would be refused for, nor an `x` without its line. Not one another
            # process has checked out meanwhile (its HEAD would name no ref).
            created: list[_Appended] = []
            try:
                try:
                    locks[-1].write_commit((new + "\n").encode())
                except (IsADirectoryError, NotADirectoryError, FileExistsError) as err:
                    # Another process created `final/...` since the check: its directory now
                    # stands where this ref's file would go.
                    raise RefNameConflictError(final, f"{final}/...") from err
                for ref in logged:
                    created.append(self._append_log(ref, prev, new, identity, ts, tz, message))
            except BaseException as err:
                for entry in created:
                    entry.undo()
                if locks[-1].renamed() and not self._take_back(
                    final, new, named=named, head_held=HEAD in chain
                ):
                    add_note(err, f"{final} was left: another process has checked it out or set it")
                raise
        finally:
            for lk in locks:
                lk.release()

    def _put_back(
        self,
        name: str,
        raw: str | None,
        *,
        written: str | None = None,
        log: tuple[bytes | None, bytes] | None = None,
    ) -> bool:
        """Give `name` its content `raw` again (None: delete it), under its lock again, after a
        change this process made (to `written`, where given) that then failed; left alone
        where another process holds or moved it since. `log`: the reflog `name` had before and
        the one this process gave it, put back too while it is still that one (under the
        lock every move of `name` logs under). False when it was left alone so."""
        try:
            lock = self._lock(name)
        except RefConflictError:
            return False  # another process holds it
        except (MintError, OSError):
            return True
        try:
            if written is not None and self._read_loose(name) != written:
                return False
            if log is not None:
                before, placed = log
                if _read_bytes(os.path.join(self._dir, "logs", name)) == placed:
                    self._restore_log(name, before)
            if raw is None:
                os.unlink(self._path(name))
                return True
            data = (raw + "\n").encode()
            try:
                lock.write_commit(data)
            except OSError:
                # No block for the lock's content (a full disk): the ref's own, in place.
                fd = os.open(self._path(name), os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    os.pwrite(fd, data, 0)
                    os.ftruncate(fd, len(data))
                finally:
                    os.close(fd)
        except (MintError, OSError):
            pass
        finally:
            lock.release()
        return True

    def _heads_naming(self, name: str) -> set[str]:
        """The HEADs that name `name` now: "HEAD" for this repository's, the directory of each
        linked worktree (`.mint/worktrees/*`) whose HEAD names it."""
        found = {HEAD} if self.read_symbolic(HEAD) == name else set()
        with contextlib.suppress(OSError):
            for entry in os.scandir(os.path.join(self._dir, "worktrees")):
                with contextlib.suppress(OSError, MintError):
                    if RefStore(Path(entry.path)).read_symbolic(HEAD) == name:
                        found.add(entry.path)
        return found

    def _take_back(
        self, name: str, value: str, *, named: set[str], head_held: bool = False, log: bool = False
    ) -> bool:
        """Delete `name`, which this process has just created at `value` (with `log`, its reflog
        too), under its lock again and this repository's HEAD's (`head_held`: this process holds
        it already), unless another process has taken or moved it since or a HEAD not among
        `named` (those that named it before it was made: an unborn branch) names it now: a
        checkout of it meanwhile, which the deletion would leave on a branch that is not there.
        False when it was left so."""
        locks: list[_Lock] = []
        try:
            locks.append(self._lock(name))
            if not head_held:
                locks.append(self._lock(HEAD))
            if self._read_loose(name) != value or self._heads_naming(name) - named:
                return False
            if log:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(os.path.join(self._dir, "logs", name))
            os.unlink(self._path(name))
        except RefConflictError:
            return False  # another process holds it, or HEAD: it may be checking it out
        except (MintError, OSError):
            return True
        finally:
            for lock in locks:
                lock.release()
        self._prune_dirs(name)
        return True

    def take_back(self, name: str, value: str) -> bool:
        """Delete branch `name`, which this process has just created at `value` and no HEAD named
        then (`checkout -b` whose HEAD could not follow), with its reflog; left where another
        process has moved or checked it out since. False when it was left so."""
        _check_store_name(name)
        return self._take_back(name, value, named=set(), log=True)

    def set_symbolic(
        self,
        name: str,
        target: str,
        *,
        message: str = "",
        identity: str = DEFAULT_IDENTITY,
        timestamp: int | None = None,
        tz: str | None = None,
    ) -> None:
        """Point symbolic ref `name` (usually HEAD) at `target`; log the move if a message is given."""
        _check_store_name(name)
        check_ref_name(target)
        if not target.startswith("refs/"):
            raise InvalidRefNameError(target, "symbolic refs point at names under 'refs/'")
        _check_identity(identity)
        ts, tz = _when(timestamp, tz)
        lock = self._lock(name)
        appended: _Appended | None = None
        try:
            message = _clean_message(message)
            if message:
                _, old = self._resolve(name)
                _, new = self._resolve(target)
                # git logs a symref move only when the new target resolves (not unborn).
                if new is not None:
                    appended = self._append_log(name, old or ZERO, new, identity, ts, tz, message)
            lock.write_commit(f"ref: {target}\n".encode())
        except BaseException:
            # As update(): a move that failed (a full disk) keeps no line, else `checkout -`
            # would go back to the branch HEAD never left; one that happened (a Ctrl-C just
            # after the rename) keeps it, else `checkout -` would name the branch HEAD is on.
            if appended is not None and not lock.renamed():
                appended.undo()
            raise
        finally:
            lock.release()

    def delete(
        self,
        name: str,
        *,
        old: OldValue = ANY,
        message: str = "",
        identity: str = DEFAULT_IDENTITY,
    ) -> None:
        """Delete a ref (itself, not a symref's target): loose file, packed line and reflog.

        One whose name no file could hold (see fits_files) is only packed: packed-refs' lock
        is all it takes, since no process can create its loose file or lock either.
        """
        _check_store_name(name, long_names=True)
        _check_identity(identity)
        if old is not ANY and old is not None:
            _check_value(old)
        lock = self._lock(name, old) if fits_files(name) else None
        plock: _Lock | None = None
        try:
            if name.startswith("refs/"):
                # Held across the whole delete, as git does: a concurrent pack() cannot
                # read the loose value before we unlink it and resurrect it as packed.
                plock = self._lock_packed()
            raw = self._read_direct(name)
            if raw is None:
                raise RefNotFoundError(name)
            symbolic = raw.startswith("ref: ")
            current = raw[5:] if symbolic else raw
            if old is not ANY:
                want = None if old in (None, ZERO) else old
                if current != want:
                    raise RefConflictError(name, old, current)
            # Packed line first, loose file second: a reader never sees an older packed
            # value resurface after the loose file is gone.
            if plock is not None:
                self._remove_packed(plock, name)
            if lock is not None:
                # The reflog before the ref: a crash between the two leaves a ref without its
                # reflog, not a reflog that a later ref of this name would take for its own.
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(os.path.join(self._dir, "logs", name))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(name))
            if not symbolic and name != HEAD and self.read_symbolic(HEAD) == name:
                # git records the deletion of the checked-out branch in HEAD's reflog.
                ts = int(time.time())
                self._append_log(
                    HEAD, current, ZERO, identity, ts, local_tz(ts), _clean_message(message)
                )
        finally:
            if plock is not None:
                plock.release()
            if lock is not None:
                lock.release()
        self._prune_dirs(name)

    def _remove_packed(self, plock: _Lock, *names: str) -> None:
        """Rewrite packed-refs without the records of `names`; the caller holds its lock."""
        snap = self._packed()
        if snap is None:
            return
        found = (snap.find_range(name.encode("utf-8", "surrogateescape")) for name in names)
        ranges = sorted(rng for rng in found if rng is not None)
        if not ranges:
            return
        mm = snap.mm
        # Splice out the records' bytes; everything else, header included, stays as is.
        kept, start = [], 0
        for begin, end in ranges:
            kept.append(mm[start:begin])
            start = end
        kept.append(mm[start:])
        plock.write_commit(b"".join(kept))

    def _prune_dirs(self, name: str) -> None:
        """Remove directories emptied by a deleted ref, keeping refs/<kind>/ itself."""
        parts = name.split("/")
        for base in (self._dir, os.path.join(self._dir, "logs")):
            for i in range(len(parts) - 1, 2, -1):
                try:
                    os.rmdir(os.path.join(base, *parts[:i]))
                except OSError:
                    break

    # -- renaming --

    def rename(
        self,
        old: str,
        new: str,
        *,
        force: bool = False,
        message: str,
        identity: str = DEFAULT_IDENTITY,
        timestamp: int | None = None,
        tz: str | None = None,
        worktrees: Iterable[str | os.PathLike[str]] = (),
    ) -> tuple[str | None, str | None]:
        """Rename ref `old` to `new` with its reflog, as `git branch -m` does; returns (the value
        renamed, None when `old` is unborn; the value `new` had, None when it had none).

        HEAD, and the HEAD of each linked worktree directory in `worktrees`, follows when it
        names `old`, with git's reflog lines. `new` must not exist unless `force`. An `old` that
        does not exist but HEAD names (unborn) only moves the HEADs. `new` is written before
        `old` is deleted: a crash in between leaves both names, never neither.
        """
        for name in (old, new):
            _check_store_name(name)
            if not name.startswith("refs/"):
                raise InvalidRefNameError(name, "only names under 'refs/' are renamed")
        _check_identity(identity)
        ts, tz = _when(timestamp, tz)
        message = _clean_message(message)

        def log(store: RefStore, name: str, a: str, b: str) -> _Appended:
            return store._append_log(name, a, b, identity, ts, tz, message)

        locks: list[_Lock] = []
        try:
            # HEADs first, the order update() takes them in (HEAD, then the branch it names).
            heads: list[tuple[RefStore, _Lock]] = []
            for store in (self, *(RefStore(Path(w), self.shared_perm) for w in worktrees)):
                if store.read_symbolic(HEAD) == old:
                    lock = store._lock(HEAD)
                    locks.append(lock)
                    if store.read_symbolic(HEAD) == old:  # still, now that it is locked
                        heads.append((store, lock))
            old_lock = self._lock(old)
            locks.append(old_lock)
            # `a` -> `a/b`: no `a/b.lock` while `a` is a file; holding `a.lock` keeps `a/b` away.
            new_lock = None if new == old or new.startswith(old + "/") else self._lock(new)
            if new_lock is not None:
                locks.append(new_lock)
            value = self._read_direct(old)
            if value is not None and value.startswith("ref: "):
                raise SymbolicRefError(old)
            if value is None and not (heads and heads[0][0] is self):
                raise RefNotFoundError(old)
            replaced = value if new == old else self._resolve(new)[1]
            if replaced is not None and new != old and not force:
                raise RefConflictError(new, None, replaced, detail="it already exists")
            if value is None:
                # Unborn: no ref to move, HEAD names the new name (git logs only a target that
                # resolves: one that -M took over).
                for store, lock in heads:
                    if replaced is not None:
                        log(store, HEAD, ZERO, replaced)
                    lock.write_commit(f"ref: {new}\n".encode())
                return None, replaced
            if new == old:
                # As git: the branch logs the "rename", HEAD its deletion and return.
                log(self, old, value, value)
                for store, _ in heads:
                    if store is self:
                        log(self, HEAD, value, ZERO)
                    log(store, HEAD, value, value)
                return value, replaced
            nested = new.startswith(old + "/") or old.startswith(new + "/")
            if self._read_direct(new) is None:
                self._check_df(new, but=old)
            self._check_log_way(new, old)
            history = _read_bytes(os.path.join(self._dir, "logs", old))
            logged = history is not None or self._logs(new)
            entry = _log_line(value, value, identity, ts, tz, message)
            plock = self._lock_packed()  # from here to old's deletion, as delete() holds it
            locks.append(plock)
            packed_before = self._packed()
            previous: bytes | None = None
            placed = (history or b"") + entry
            if nested:
                # Both names cannot be loose files at once: one packed-refs write adds `new` (and
                # drops a packed `old`), then the reflog moves and a loose `old` goes below.
                self._swap_packed(plock, old, new, value)
                if logged:
                    self._place_log(new, placed, drop=old)
            else:
                previous = _read_bytes(os.path.join(self._dir, "logs", new))
                if logged:
                    self._place_log(new, placed)
                assert new_lock is not None
                try:
                    new_lock.write_commit((value + "\n").encode())
                except BaseException as err:
                    self._restore_log(new, previous)
                    if isinstance(err, (IsADirectoryError, NotADirectoryError, FileExistsError)):
                        raise RefNameConflictError(new, f"{new}/...") from err
                    raise
            lines: list[_Appended] = []
            switched: list[RefStore] = []
            try:
                for store, lock in heads:
                    # git deletes `old` first, which HEAD logs, then points HEAD at `new`.
                    if store is self:
                        lines.append(log(self, HEAD, value, ZERO))
                    lines.append(log(store, HEAD, ZERO, value))
                    lock.write_commit(f"ref: {new}\n".encode())
                    switched.append(store)
                if not nested:
                    # A packed record of a replaced `new` goes too (git deletes `new` first).
                    self._remove_packed(plock, old, new)
            except BaseException as err:
                # A HEAD that cannot follow, or a packed `old` that cannot go (a full disk): the
                # rename is taken back, HEAD's lines, the HEADs already moved, `new` and its
                # log, so that `old` alone is left and the retry is not refused for `new`. Only
                # what is still as this process wrote it: a HEAD another process has moved
                # since (a checkout), or a `new` it has set, stays as that process left it.
                kept = []
                # A HEAD whose rename went through just before the failure (a Ctrl-C) is put
                # back with the others.
                switched += [
                    store for store, lock in heads if store not in switched and lock.renamed()
                ]
                for line in reversed(lines):
                    line.undo()
                for store in switched:
                    if not store._put_back(HEAD, f"ref: {old}", written=f"ref: {new}"):
                        where = "" if store is self else f" of worktree {store.git_dir.name}"
                        kept.append(f"HEAD{where} was left as another process set it")
                if not nested and not self._put_back(
                    new, replaced, written=value, log=(previous, placed) if logged else None
                ):
                    kept.append(f"{new} was left as another process set it, with its reflog")
                if kept:
                    add_note(err, "; ".join(kept))
                raise
            if not nested:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._dir, "logs", old))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(old))
            if nested:
                old_lock.release()  # `a/b.lock` would keep `a/` from going
                self._prune_dirs(old)
                self._unpack(old, new, value, packed_before, locks, new_lock)
        finally:
            for lk in locks:
                lk.release()
        self._prune_dirs(old)
        return value, replaced

    def _unpack(
        self,
        old: str,
        new: str,
        value: str,
        before: _Packed | None,
        locks: list[_Lock],
        lock: _Lock | None,
    ) -> None:
        """Move `new`, packed at `value` by a nested rename of `old`, to a loose file as git
        leaves it; packed-refs gets back the header it had `before` if nothing else changed.
        `lock` is `new`'s, if held (`a/b` -> `a`; `a` -> `a/b` could not take it before)."""
        if lock is None:
            try:
                lock = self._lock(new)
            except (OSError, MintError):
                return  # it stays packed: read just as well
            locks.append(lock)
        try:
            lock.write_commit((value + "\n").encode())
        except OSError:
            return
        plock = self._lock_packed()
        locks.append(plock)
        entries = _packed_entries(self._packed())
        entries.pop(new, None)
        expected = _packed_entries(before)
        for name in (old, new):
            expected.pop(name, None)
        if entries != expected:  # another writer's records: keep its header
            self._remove_packed(plock, new)
        elif before is None:  # packed-refs was made for the rename alone
            os.unlink(self._packed_path)
        else:
            # The records left are the file's own, peeled lines and all: its traits still hold.
            header = bytes(before.mm[: bytes(before.mm[:4096]).find(b"\n") + 1])
            if not header.startswith(b"# pack-refs with:"):
                header = b""
            plock.write_commit(_serialize_packed(entries, header))

    def _check_log_way(self, new: str, old: str) -> None:
        """Refuse a rename whose reflog could not be put at logs/`new`: a reflog (of no ref, left
        by a crash) where `new` needs a directory, or in a directory where `new`'s would go."""
        logs = os.path.join(self._dir, "logs")
        mine = os.path.join(logs, old)
        parts = new.split("/")
        for i in range(2, len(parts)):
            above = os.path.join(logs, *parts[:i])
            if os.path.isfile(above) and above != mine:
                raise RefNameConflictError(new, os.path.relpath(above, self._dir))
        for root, _dirs, files in os.walk(os.path.join(logs, new)):
            for f in files:
                if os.path.join(root, f) != mine:
                    raise RefNameConflictError(
                        new, os.path.relpath(os.path.join(root, f), self._dir)
                    )

    def _place_log(self, name: str, data: bytes, *, drop: str | None = None) -> None:
        """Make `data` the whole reflog of `name` at once (written aside, renamed into place);
        with `drop`, that ref's reflog is removed first (`a` -> `a/b`: one stands in the way)."""
        logs = os.path.join(self._dir, "logs")
        path = os.path.join(logs, name)
        # A name with a '.'-led component is no ref's, so neither git nor mintvcs reads it as a log.
        tmp = os.path.join(logs, "refs", f".tmp-renamed-log.{os.getpid()}.{os.urandom(4).hex()}")
        make_dirs(os.path.dirname(tmp), self.shared_perm)
        fd = self._create(tmp)
        try:
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk: no empty temporary left behind
                os.unlink(tmp)
            raise
        dropped = False
        try:
            if drop is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(logs, drop))
                dropped = True
            # Empty directories (of deleted refs' reflogs, or `drop`'s: `a/b` -> `a`).
            if os.path.isdir(path):
                for root, _dirs, _files in os.walk(path, topdown=False):
                    os.rmdir(root)
            make_dirs(os.path.dirname(path), self.shared_perm)
            os.rename(tmp, path)
        except BaseException:
            if not dropped:  # else the history is only there now: leave it, as git leaves its
                with contextlib.suppress(FileNotFoundError):  # .tmp-renamed-log
                    os.unlink(tmp)
            raise

    def _restore_log(self, name: str, data: bytes | None) -> None:
        """Put back the reflog `name` had before a rename that then failed."""
        path = os.path.join(self._dir, "logs", name)
        with contextlib.suppress(OSError):
            if data is None:
                os.unlink(path)
            else:
                self._place_log(name, data)

    def _swap_packed(self, plock: _Lock, old: str, new: str, value: str) -> None:
        """Rewrite packed-refs with `new` at `value` and without `old`; the caller holds its lock."""
        entries = _packed_entries(self._packed())
        entries.pop(old, None)
        entries[new] = (value, None)
        # The new record has no peeled line (it may be a tag this store cannot peel): claim none.
        plock.write_commit(_serialize_packed(entries, b"# pack-refs with: sorted \n"))

    # -- listing --

    def _iter_loose(
        self, prefix: str, on_broken: Callable[[str, MintError], None] | None = None
    ) -> Iterator[tuple[str, str]]:
        """(name, raw content) of loose refs under prefix, unsorted (see iter_refs for on_broken)."""
        # Walk only the deepest directory that contains every name with this prefix.
        top = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        root = os.path.join(self._dir, top) if top else self._dir
        stack = [(root, top)]
        while stack:
            path, rel = stack.pop()
            try:
                it = os.scandir(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for ent in it:
                    full = f"{rel}/{ent.name}" if rel else ent.name
                    if ent.is_dir(follow_symlinks=False):
                        if full.startswith(prefix) or prefix.startswith(full + "/"):
                            stack.append((ent.path, full))
                    elif full.startswith(prefix) and not ent.name.endswith(".lock"):
                        try:
                            check_ref_name(full)
                        except InvalidRefNameError:
                            continue
                        try:
                            raw = self._read_loose(full)
                        except RefFormatError as err:
                            if on_broken is None:
                                raise
                            on_broken(full, err)
                            continue
                        if raw is not None:
                            yield full, raw

    def _iter_raw(
        self, prefix: str, on_broken: Callable[[str, MintError], None] | None = None
    ) -> Iterator[tuple[str, str]]:
        """(name, raw) of refs under prefix sorted by name, loose overriding packed."""
        loose = dict(self._iter_loose(prefix, on_broken)) if prefix.startswith("refs/") else {}
        snap = self._packed()
        packed: Iterable[tuple[bytes, bytes, bytes | None]] = (
            snap.iter_prefix(prefix.encode("utf-8", "surrogateescape")) if snap is not None else ()
        )
        loose_sorted = sorted(loose.items())
        i = 0
        for bname, bvalue, _ in packed:
            pname = bname.decode("utf-8", "surrogateescape")  # as loose names from listdir
            while i < len(loose_sorted) and loose_sorted[i][0] < pname:
                yield loose_sorted[i]
                i += 1
            if i < len(loose_sorted) and loose_sorted[i][0] == pname:
                yield loose_sorted[i]
                i += 1
                continue
            yield pname, bvalue.decode()
        yield from loose_sorted[i:]

    def iter_refs(
        self, prefix: str = "refs/", *, on_broken: Callable[[str, MintError], None] | None = None
    ) -> Iterator[tuple[str, str]]:
        """(name, object id) of refs whose names start with prefix, sorted by name.

        A loose ref file that cannot be read raises RefFormatError; with `on_broken`, it is
        called with the name and the error and the listing goes on (git's "ignoring broken ref").
        With `on_broken`, a packed ref whose name no file could hold (see fits_files) is left
        out the same way, with an InvalidRefNameError; without, it is listed (gc keeps it).
        """
        if not prefix.startswith("refs/") and prefix != "refs":
            raise InvalidRefNameError(prefix, "listing prefixes begin with 'refs/'")
        for name, raw in self._iter_raw(prefix, on_broken):
            if on_broken is not None and (rule := _name_too_long(name)) is not None:
                on_broken(name, InvalidRefNameError(name, rule))
                continue
            if raw.startswith("ref: "):
                # Symbolic refs list with their target's value, as git for-each-ref does.
                try:
                    _, value = self._resolve(name)
                except MintError:
                    continue
                if value is None:
                    continue
                yield name, value
            else:
                yield name, raw

    # -- packing --

    def pack(self, peel: Callable[[str], str | None] | None = None) -> int:
        """Move every loose ref into packed-refs, like `git pack-refs --all`; the number of
        loose refs it found.

        `peel(id)` returns the object an annotated tag points to (or None); with it the
        file records peeled lines and says "peeled fully-peeled", as git writes it.
        """
        plock = self._lock_packed()
        moved: dict[str, str] = {}
        try:
            for name, raw in self._iter_loose("refs/"):
                if not raw.startswith("ref: "):
                    moved[name] = raw
            old_snap = self._packed()
            entries = _packed_entries(old_snap)
            old_full = old_snap is not None and "fully-peeled" in old_snap.traits
            for name, value in moved.items():
                prev = entries.get(name)
                if prev is not None and prev[0] == value and prev[1] is not None:
                    continue
                entries[name] = (value, None if peel is None else peel(value))
            if peel is not None and not old_full:
                for name, (value, peeled) in entries.items():
                    if peeled is None and name not in moved:
                        entries[name] = (value, peel(value))
            header = PACKED_HEADER if peel is not None else b"# pack-refs with: sorted \n"
            plock.write_commit(_serialize_packed(entries, header))
        finally:
            plock.release()
        self.close()
        # Drop loose files only if they still hold what we packed (git does the same).
        for name, value in moved.items():
            try:
                lock = self._lock(name)
            except RefConflictError:
                continue
            try:
                if self._read_loose(name) == value:
                    os.unlink(self._path(name))
            finally:
                lock.release()
            self._prune_dirs(name)
        return len(moved)

    def bulk_create(self, items: Iterable[tuple[str, str]]) -> int:
        """Add many new refs straight into packed-refs (no reflog); for imports and benchmarks.

        Refuses names that already exist or that clash as directory and file. Returns the
        number of refs added.
        """
        new: dict[str, str] = {}
        for name, value in items:
            _check_store_name(name)
            if not name.startswith("refs/"):
                raise InvalidRefNameError(name, "packed refs begin with 'refs/'")
            _check_value(value)
            new[name] = value
        plock = self._lock_packed()
        try:
            entries = _packed_entries(self._packed())
            loose = {n for n, _ in self._iter_loose("refs/")}
            for name in new:
                if name in entries or name in loose:
                    raise RefConflictError(name, None, self.read(name), detail="it already exists")
            allnames = entries.keys() | loose | new.keys()
            # Every directory any ref needs; a ref named like one of them clashes.
            dirs: dict[str, str] = {}
            for name in allnames:
                cut = name.rfind("/")
                while cut > 5:
                    d = name[:cut]
                    if d in dirs:
                        break
                    dirs[d] = name
                    cut = name.rfind("/", 0, cut)
            for name in allnames & dirs.keys():
                raise RefNameConflictError(dirs[name], name)
            for name, value in new.items():
                entries[name] = (value, None)
            # New refs may be annotated tags we cannot peel here, so claim no peeling.
            plock.write_commit(_serialize_packed(entries, b"# pack-refs with: sorted \n"))
        finally:
            plock.release()
        self.close()
        return len(new)


def _packed_entries(snap: _Packed | None) -> dict[str, tuple[str, str | None]]:
    """Every record of a packed-refs snapshot: name -> (value, peeled or None)."""
    entries: dict[str, tuple[str, str | None]] = {}
    if snap is not None:
        for bname, bvalue, bpeeled in snap.iter_prefix(b""):
            entries[bname.decode("utf-8", "surrogateescape")] = (
                bvalue.decode(),
                None if bpeeled is None else bpeeled.decode(),
            )
    return entries


def _serialize_packed(entries: dict[str, tuple[str, str | None]], header: bytes) -> bytes:
    # Sorted by name as bytes, as git does (names that are not UTF-8 hold surrogate escapes).
    lines = [header.decode()]
    for name in sorted(entries, key=lambda n: n.encode("utf-8", "surrogateescape")):
        value, peeled = entries[name]
        lines.append(f"{value} {name}\n")
        if peeled is not None:
            lines.append(f"^{peeled}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")
