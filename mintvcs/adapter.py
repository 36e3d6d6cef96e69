"""A PEFT adapter directory on disk: its config, its safetensors weights and any extra files."""

from __future__ import annotations

import errno
import functools
import json
import mmap
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mintvcs.bulk import collector_paused
from mintvcs.errors import MintError
from mintvcs.messages import lone_surrogate_in, quote_path
from mintvcs.objects import (
    CONFIG_FILE,
    GIT_DIR,
    MAX_PATH_DEPTH,
    WEIGHTS_FILE,
    unsafe_path_reason,
)
from mintvcs.safetensors_file import SafetensorsLayout, parse_layout

if TYPE_CHECKING:
    from dulwich.ignore import Pattern

# Files a PEFT save may write that we must not take for adapter content.
_IGNORED = {GIT_DIR, ".git", "__pycache__", ".DS_Store"}
# gitignore-syntax patterns at the top of an adapter directory: files commit leaves out.
IGNORE_FILE = ".mintignore"
_MAX_SMALL_FILE_BYTES = 1 << 20  # open_small_file's bound


def holds_repository(path: str | os.PathLike[str], dir_fd: int | None = None) -> bool:
    """Whether the directory `path` is another repository's work tree: it holds a `.mint` or a
    `.git` (a directory, or a worktree's or submodule's gitfile), as git tells an embedded
    repository, whose files it never adds nor removes."""
    for name in (GIT_DIR, ".git"):
        try:
            os.lstat(os.path.join(path, name), dir_fd=dir_fd)
        except OSError:
            continue
        return True
    return False


class NotAnAdapterError(MintError):
    """A directory that is not a PEFT LoRA adapter in safetensors form."""


@dataclass(frozen=True)
class AdapterFiles:
    """The parsed content of a PEFT adapter directory."""

    root: Path
    config_bytes: bytes
    config: dict[str, Any]
    layout: SafetensorsLayout
    weights: bytes | memoryview  # the whole adapter_model.safetensors
    extra_files: dict[
        str, tuple[bytes | memoryview, bool]
    ]  # relative path -> (content, executable)
    # stat_key() of the weights file while it was read, and when the read began; None
    # when the file changed during the read.
    weights_stat: tuple[int, ...] | None = None
    read_ns: int = 0
    extra_stats: dict[str, tuple[int, ...] | None] = field(
        default_factory=dict
    )  # likewise, by path

    def tensor_bytes(self, index: int) -> memoryview:
        """The raw bytes of the index-th tensor of the layout."""
        entry = self.layout.tensors[index]
        offset = len(self.layout.header)
        return memoryview(self.weights)[offset + entry.start : offset + entry.end]


def adapter_paths(root: Path) -> tuple[Path, Path]:
    """The config and weights files of a PEFT adapter directory; NotAnAdapterError with a hint if either is missing."""
    root = Path(root)
    if not root.is_dir():
        raise NotAnAdapterError(f"{root} is not a directory")
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file():
        # save_pretrained(..., selected_adapters=[NAME]) writes NAME/ with the adapter inside.
        # A Trainer's output directory holds checkpoint-N/ adapters: the hint names the last.
        inside = sorted((p.parent.name for p in root.glob(f"*/{CONFIG_FILE}")), key=_natural)
        hint = ""
        if inside:
            more = f" and {len(inside) - 1} more such directories" if len(inside) > 1 else ""
            hint = f" (found {inside[-1]}/{CONFIG_FILE}{more}: use --from {root / inside[-1]})"
        raise NotAnAdapterError(f"{root} is not a PEFT adapter: {CONFIG_FILE} is missing{hint}")
    if not weights_path.is_file():
        hint = (
            " (adapter_model.bin found: save with safe_serialization=True)"
            if (root / "adapter_model.bin").exists()
            else ""
        )
        raise NotAnAdapterError(f"{root} is not a PEFT adapter: {WEIGHTS_FILE} is missing{hint}")
    for path in (config_path, weights_path):
        if path.is_symlink():  # followed as an extra file's link is, but not into `.mint`
            _refuse_link_into_repository(path, os.readlink(path))
    return config_path, weights_path


def _natural(name: str) -> tuple[tuple[int, str], ...]:
    """Sort key putting `checkpoint-10` after `checkpoint-9`, as a person counts."""
    return tuple(
        (int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"(\d+)", name)
    )


def read_adapter(root: Path, exclude: Sequence[bytes] = ()) -> AdapterFiles:
    """Read and validate a PEFT adapter directory (`exclude`: gitignore patterns of files that
    are not part of it, beside those of its .mintignore files)."""
    root = Path(root)
    config_path, weights_path = adapter_paths(root)
    config_bytes = config_path.read_bytes()
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NotAnAdapterError(f"{config_path}: invalid JSON ({err})") from None
    except RecursionError:
        raise NotAnAdapterError(f"{config_path}: invalid JSON (nested too deeply)") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise NotAnAdapterError(
            f"{config_path}: peft_type {kind!r} is not supported; mintvcs stores LoRA adapters"
        )
    # Refused as a tensor name holding one is: Python and PEFT read the escape, but strict
    # JSON readers refuse the show --json that repeats it, and no UTF-8 text holds it.
    odd = lone_surrogate_in(config)
    if odd is not None:
        raise NotAnAdapterError(
            f"{config_path}: {odd!a:.80} holds a lone surrogate escape, which is no Unicode "
            "text (mintvcs stores none); write the character it stands for"
        )
    started = time.time_ns()
    weights, stat = read_stable(weights_path)
    with collector_paused():  # a dict and an entry per tensor
        layout = parse_layout(weights, str(weights_path))
    files, file_stats = read_extra_files(root, exclude)
    return AdapterFiles(
        root, config_bytes, config, layout, weights, files, stat, started, file_stats
    )


def stat_key(st: os.stat_result) -> tuple[int, ...]:
    """What a later stat must match for a file to be taken as unchanged without reading it."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _open_regular(path: Path | str, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """A descriptor of `path` opened for reading, and its stat; OSError unless a regular file.

    O_NONBLOCK: opening a FIFO that a work tree holds where a file goes would wait for a
    writer for ever (a regular file ignores the flag).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    return fd, st


def read_regular(path: Path | str) -> bytes:
    """A regular file's bytes (a FIFO, a device: OSError, unread), for a small file such as the
    config."""
    fd, st = _open_regular(path)
    try:
        return _read_all(fd, st.st_size + 1)
    finally:
        os.close(fd)


def read_stable(
    path: Path | str, *, mapped: bool = True, dir_fd: int | None = None
) -> tuple[bytes | memoryview, tuple[int, ...] | None]:
    """The file's bytes, and its stat_key() if it did not change while read; a large one is
    mapped unless not `mapped` (then read whole: a private copy). `dir_fd`: `path` is relative
    to that directory. Anything but a regular file (a FIFO, a device) is an OSError, unread."""
    fd, before = _open_regular(path, dir_fd)
    try:
        if before.st_size < 1 << 20 or not mapped:
            data: bytes | memoryview = _read_all(fd, before.st_size + 1)
        else:
            # Mapped, not read: no copy, and no fresh memory to fault in (reading 84 MB into
            # new pages costs 2-5x more on this class of VM). A file truncated while mapped
            # (a trainer re-saving it mid-commit) kills the command with SIGBUS rather than
            # committing a torn file; the repository stays valid, as after kill -9.
            data = memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if len(data) > before.st_size:  # it grew while read: take what stat promised
        data = data[: before.st_size]
    stable = stat_key(before) == stat_key(after) and len(data) == before.st_size
    return data, (stat_key(after) if stable else None)


def open_small_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open `path` only if it is a regular file under 1 MiB (a config, a list of patterns);
    ValueError otherwise. A received repository may name any file: `/dev/zero` would be read
    without end, and opening a FIFO would wait for a writer (O_NONBLOCK: a regular file
    ignores it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_SMALL_FILE_BYTES:
        os.close(fd)
        raise ValueError(f"{os.fspath(path)} is not a regular file under 1 MiB")
    return os.fdopen(fd, "rb")


def read_patterns(handle: BinaryIO) -> tuple[bytes, ...]:
    """The patterns of a gitignore-syntax file, read as git reads them (dir.c)."""
    # dulwich's reader keeps a UTF-8 BOM (the first pattern never matched) and trims a space
    # after an escaped backslash (`a\\ ` then ignored the file `a ` where git ignores `a\`).
    patterns = []
    for line in handle.read().removeprefix(b"\xef\xbb\xbf").split(b"\n"):
        line = line.removesuffix(b"\r")
        if line and not line.startswith(b"#"):
            line = _trim_trailing_spaces(line)
            if line:  # blank: git's empty pattern, which matches nothing
                patterns.append(line)
    return tuple(patterns)


def _trim_trailing_spaces(line: bytes) -> bytes:
    """`line` less its trailing spaces that no backslash escapes (git's trim_trailing_spaces);
    the escapes stay, for the matcher."""
    last_space = None
    i = 0
    while i < len(line):
        if line[i] == 0x20:
            last_space = i if last_space is None else last_space
        else:
            if line[i] == 0x5C:  # a backslash escapes the next byte, whatever it is
                i += 1
                if i == len(line):
                    return line
            last_space = None
        i += 1
    return line if last_space is None else line[:last_space]


def _compile(patterns: Sequence[bytes]) -> list[Pattern]:
    """dulwich Patterns of `patterns`, skipping the malformed ones (such as `[`) silently, as git
    skips them: dulwich's IgnoreFilter logs a warning naming no file on every read."""
    from dulwich.ignore import Pattern
    from dulwich.wildmatch import MalformedPattern

    compiled = []
    for pattern in patterns:
        try:
            compiled.append(Pattern(pattern))
        except MalformedPattern:
            continue
    return compiled


# The symlinked ignore files already warned about: status reads the tree more than once.
_warned: set[str] = set()


def _read_ignore_file(path: Path, rel: str, dir_fd: int | None) -> list[Pattern] | None:
    """The patterns of the .mintignore at `path` (`rel` under `dir_fd`, when given); None if
    there is none, as git reads an in-tree .gitignore: not through a symlink (with git's
    warning), and one that is not a regular file (a directory, a FIFO) is skipped."""
    try:
        # O_NONBLOCK: opening a FIFO would wait for a writer (git 2.39 hangs there).
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW
        fd = os.open(path, flags) if dir_fd is None else os.open(rel, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            if str(path) not in _warned:
                _warned.add(str(path))
                sys.stderr.write(
                    f"warning: unable to access {_in_quotes(str(path))}: {os.strerror(err.errno)}\n"
                )
            return None
        if err.errno == errno.ENXIO:  # a socket
            return None
        raise NotAnAdapterError(
            f"{quote_path(str(path))} cannot be read ({err.strerror or err})"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_SMALL_FILE_BYTES:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        raise NotAnAdapterError(
            f"{quote_path(str(path))} is over 1 MiB, too large for a file of patterns; fix or "
            "remove it"
        )
    with os.fdopen(fd, "rb") as handle:
        try:
            return _compile(read_patterns(handle))
        except OSError as err:
            raise NotAnAdapterError(
                f"{quote_path(str(path))} cannot be read ({err.strerror or err})"
            ) from None


def _ignore_filter(
    root: Path, exclude: Sequence[bytes], dir_fd: int | None = None
) -> Callable[[str, bool], bool]:
    """Whether a relative posix path (a directory's if the flag is set) is left out: by the
    .mintignore files of its directory and those above it, then `exclude`, as git reads its
    .gitignore files and info/exclude (gitignore's syntax, matched by dulwich). What an ignored
    directory holds is never asked: the caller does not enter it, as git does not. `dir_fd`:
    `root`'s descriptor, the files are opened under it."""
    excluded = _compile(exclude)
    levels: dict[str, list[Pattern] | None] = {}

    def patterns_of(folder: str) -> list[Pattern] | None:
        """The patterns of `folder`'s .mintignore ("" the top, else "a/b/"), read once."""
        if folder not in levels:
            levels[folder] = _read_ignore_file(
                root / folder / IGNORE_FILE, folder + IGNORE_FILE, dir_fd
            )
        return levels[folder]

    def ignored(rel: str, is_dir: bool) -> bool:
        # The deepest file with a pattern for the path decides, by its last such pattern;
        # info/exclude comes after every .mintignore: git's order of precedence.
        parts = rel.split("/")
        for depth in range(len(parts) - 1, -1, -1):
            rules = patterns_of("".join(part + "/" for part in parts[:depth]))
            if rules is not None:
                name = os.fsencode("/".join(parts[depth:]))
                for pattern in reversed(rules):
                    if pattern.matches(name, is_dir):
                        return pattern.is_exclude
        for pattern in reversed(excluded):
            if pattern.matches(os.fsencode(rel), is_dir):
                return pattern.is_exclude
        return False

    return ignored


@dataclass(frozen=True)
class _Found:
    """An extra file as the walk finds it: its relative posix path, the directory descriptor
    its name is opened under (open only while the walk stands at it), and its stat."""

    rel: str
    path: Path  # for messages; opened through dir_fd, so a long path is no limit
    dir_fd: int
    st: os.stat_result


def _in_quotes(path: str) -> str:
    """A path as git's warnings name it (`'secret/'`), C-quoted when it must be."""
    quoted = quote_path(path)
    return quoted if quoted.startswith('"') else f"'{quoted}'"


def _refuse_link_into_repository(path: Path, target: str) -> None:
    """Refuse `path`, a symbolic link to `target`, when the file it leads to lies inside a
    repository's `.mint` directory (one holding a HEAD): its files (the config, which may hold
    credentials, hooks, objects) are never adapter content, and a link there would commit them.
    A link anywhere else is followed (a Hugging Face cache snapshot links into ../../blobs/)."""
    real = os.path.realpath(path)
    parts = Path(real).parts
    for depth, part in enumerate(parts[:-1]):
        if part.lower() != GIT_DIR:
            continue
        inside = os.path.join(*parts[: depth + 1])
        if os.path.lexists(os.path.join(inside, "HEAD")):  # a repository's, not any `.mint`
            raise NotAnAdapterError(
                f"{quote_path(str(path))} is a symlink to {quote_path(target)}, a file of the "
                f"repository directory {quote_path(inside)}, which commit never takes; remove "
                "the link (or copy the file in, if it is adapter content)"
            )


def _unreadable(rel_dir: str, err: OSError) -> NotAnAdapterError:
    """The refusal for a directory of the adapter that cannot be listed: read as empty, its
    files would be committed as deleted (git warns "could not open directory")."""
    reason = err.strerror or type(err).__name__
    name = _in_quotes(rel_dir + "/") if rel_dir else "'.'"  # git's words for the top
    return NotAnAdapterError(
        f"could not open directory {name} of the adapter: {reason}; its "
        "files can be neither compared nor committed (make it readable, or list it in "
        f"{IGNORE_FILE})"
    )


def _extra_paths(root: Path, exclude: Sequence[bytes] = ()) -> Iterator[_Found]:
    """Every regular file besides the config and weights, but for those ignored
    (_ignore_filter), in git's order within a directory. A directory that cannot be listed
    (permissions, an I/O error) is an error, never an empty one. Entries are opened relative
    to the adapter directory's descriptor, so that a tree of any depth is listed; a file whose
    full path is past PATH_MAX is refused all the same, as checkout could not write it back."""
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as err:  # one status reports, as it does a subdirectory's
        raise _unreadable("", err) from None
    try:
        ignored = _ignore_filter(root, exclude, root_fd)
        yield from _walk_dir(root, root_fd, "", ignored)
    finally:
        os.close(root_fd)


def _walk_dir(
    root: Path,
    root_fd: int,
    prefix: str,
    ignored: Callable[[str, bool], bool],
) -> Iterator[_Found]:
    """_extra_paths() of the directory `prefix` ("" the top, else "a/b/") and those below it."""
    where = prefix.rstrip("/")
    try:
        # O_NOFOLLOW: a symlinked directory is not followed, as os.walk did not.
        fd = os.open(where or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return  # replaced by a symlink since it was listed: not followed
        raise _unreadable(where, err) from None
    files: list[tuple[str, bool]] = []
    dirs: list[str] = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    files.append((entry.name, entry.is_symlink()))
                elif not entry.is_symlink():  # a symlinked directory is not followed
                    dirs.append(entry.name)
    except OSError as err:
        raise _unreadable(where, err) from None
    finally:
        os.close(fd)
    base = len(os.fsencode(os.path.abspath(root))) + 1  # a file's full path: base + its own
    dirs = sorted(
        d
        for d in dirs
        if d not in _IGNORED
        and not ignored(prefix + d, True)
        # Another repository's work tree (`mintvcs init sub`, a `git worktree` of the store):
        # its files are that repository's, as git leaves an embedded repository's to it.
        and not holds_repository(prefix + d, root_fd)
    )
    if dirs and where.count("/") >= MAX_PATH_DEPTH:
        # The walk recurses once per level: refused before it runs out of stack.
        raise NotAnAdapterError(
            f"{quote_path(str(root / where))[:200]}…: directories nest more than "
            f"{MAX_PATH_DEPTH} levels deep, and a stored path has at most {MAX_PATH_DEPTH} "
            "components; move them out"
        )
    for filename, is_link in sorted(files):
        rel = prefix + filename
        if rel in (CONFIG_FILE, WEIGHTS_FILE) or filename in _IGNORED or ignored(rel, False):
            continue  # the adapter itself is never ignored
        path = root / rel
        try:
            rel.encode("utf-8")  # names that are not UTF-8 come as surrogate escapes
        except UnicodeEncodeError:
            raise NotAnAdapterError(
                f"{quote_path(str(path))}: the file name is not UTF-8, which a stored name must "
                "be; rename it"
            ) from None
        reason = unsafe_path_reason(rel)
        if reason is not None:
            raise NotAnAdapterError(
                f"{quote_path(str(path))}: this file name cannot be stored ({reason}); rename it"
            )
        full = base + len(rel.encode("utf-8"))
        if full >= _path_max():
            # The walk opens it relative to the adapter directory, but checkout writes and
            # removes a work tree's files by their full paths: committed, it could not be
            # checked out again (File name too long), nor the work tree leave its revision.
            raise NotAnAdapterError(
                f"{quote_path(str(path))[:200]}…: the full path is {full} bytes, past the "
                f"system's limit ({_path_max() - 1}), so a checkout could not write it back; "
                "shorten it, or move the adapter directory nearer the root"
            )
        # A link to a file is stored by its content, as `cp -L` copies it: a Hugging Face
        # cache snapshot is a directory of such links, and a checkout writes plain files.
        try:
            st = os.stat(rel, dir_fd=root_fd)
        except FileNotFoundError:
            if not is_link:
                continue  # removed since it was listed
            st = None
        except OSError as err:
            if not is_link:
                raise
            # A loop (`loop -> loop`), a target this user may not reach: reported as a dangling
            # link is, not as a bare OSError that ends status.
            target = os.readlink(rel, dir_fd=root_fd)
            raise NotAnAdapterError(
                f"{quote_path(str(path))} is a symlink to {quote_path(target)}, which cannot be "
                f"followed ({err.strerror or err}); remove it or point it at a file"
            ) from None
        if is_link and (st is None or not stat.S_ISREG(st.st_mode)):
            target = os.readlink(rel, dir_fd=root_fd)
            raise NotAnAdapterError(
                f"{quote_path(str(path))} is a symlink to {quote_path(target)}, which is not a "
                "file; remove it or point it at a file"
            )
        if is_link:
            _refuse_link_into_repository(path, os.readlink(rel, dir_fd=root_fd))
        assert st is not None
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read for ever
            raise NotAnAdapterError(
                f"{quote_path(str(path))} is not a regular file (a pipe, socket or device); only "
                "files are stored: move it out of the adapter directory"
            )
        yield _Found(rel, path, root_fd, st)
    for d in dirs:
        yield from _walk_dir(root, root_fd, prefix + d + "/", ignored)


@functools.cache
def _path_max() -> int:
    """The system's PATH_MAX (the terminating NUL included): 4096 on Linux."""
    try:
        return os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def _executable(st: os.stat_result) -> bool:
    """Executable as git decides it: by the owner's bit, whoever commits."""
    return bool(st.st_mode & stat.S_IXUSR)


def _read_all(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes of an open file, read as they come (a read may return fewer)."""
    chunks = []
    while limit > 0:
        chunk = os.read(fd, min(limit, 1 << 30))
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def read_extra_files(
    root: Path, exclude: Sequence[bytes] = ()
) -> tuple[dict[str, tuple[bytes | memoryview, bool]], dict[str, tuple[int, ...] | None]]:
    """Every extra file's (content, executable) by relative posix path, and its stat_key() while
    it was read (None if it changed meanwhile)."""
    files: dict[str, tuple[bytes | memoryview, bool]] = {}
    stats: dict[str, tuple[int, ...] | None] = {}
    for found in _extra_paths(root, exclude):
        # Read, not mapped: a trainer re-saving its optimizer state in place would change a
        # map between the hash of a blob and its write (a corrupt object), or cut it (SIGBUS).
        content, stats[found.rel] = read_stable(found.rel, mapped=False, dir_fd=found.dir_fd)
        files[found.rel] = (content, _executable(found.st))
    return files, stats


def extra_files(
    root: Path, exclude: Sequence[bytes] = ()
) -> dict[str, tuple[bytes | memoryview, bool]]:
    """Every regular file besides the config and weights, by relative posix path."""
    return read_extra_files(root, exclude)[0]


def extra_file_stats(
    root: Path, exclude: Sequence[bytes] = ()
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """(stat_key(), executable) of every extra file, by relative posix path; nothing is read."""
    return {f.rel: (stat_key(f.st), _executable(f.st)) for f in _extra_paths(root, exclude)}
