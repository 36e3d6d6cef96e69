"""The repository: a git directory (`.mint/`) whose commits are adapter revisions."""

from __future__ import annotations

import atexit
import bisect
import contextvars
import errno
import hashlib
import inspect
import json
import os
import re
import stat
import struct
import sys
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, replace
from functools import cache, cached_property, wraps
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar

from mintvcs import codec
from mintvcs.adapter import GIT_DIR, AdapterFiles, open_small_file, read_patterns
from mintvcs.base import BaseModel
from mintvcs.bulk import collector_paused
from mintvcs.commits import parse_plain
from mintvcs.dates import zone_seconds, zone_text
from mintvcs.errors import MintError, cannot_read
from mintvcs.filemodes import make_dir, not_writable, write_file
from mintvcs.ids import is_object_id, shared_hex_digits
from mintvcs.keep import ReplacedWeights
from mintvcs.messages import decode_commit_texts, quote_path, unquote_c_style
from mintvcs.objects import (
    CONFIG_PATH,
    FILES_DIR,
    HEADER_PATH,
    MANIFEST_PATH,
    MAX_PATH_DEPTH,
    TENSORS_DIR,
    FileRecord,
    Manifest,
    TensorRecord,
    unsafe_path_reason,
)
from mintvcs.packs import (
    ADDING_OBJECTS,
    MAX_DELTA_HOPS,
    META_ZLIB_LEVEL,
    OBJECT_TYPE_NUMBERS,
    TENSOR_ZLIB_LEVEL,
    NotStored,
    PackFile,
    PackWriter,
    inflate,
    located_segments,
    object_zlib_level,
    place_file,
    read_fd,
    release_pack_maps,
    shared_digits_many,
    temp_file,
    zlib_stored,
    zlib_tensor,
)
from mintvcs.refs import InvalidRefNameError, RefFormatError, RefStore, RefUnreadableError
from mintvcs.repoformat import (
    MINT_FORMAT_VERSION,
    RepositoryFormat,
    _git_int,
    config_bool,
    read_format,
    shared_setting,
)
from mintvcs.safetensors_file import MAX_HEADER_BYTES
from mintvcs.treenames import colliding_paths

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from dulwich.file import SharedPerm
    from dulwich.object_store import DiskObjectStore
    from dulwich.objects import Commit, ShaFile, Tree

    from mintvcs.plane_cache import PlaneCache

DEFAULT_BRANCH = "main"
# A manifest or adapter config larger than this is refused unread: a real adapter's manifest is
# ~300 bytes per tensor (134 kB for a Llama-8B all-linear LoRA). A safetensors header blob may be
# as large as commit accepts one (safetensors_file.MAX_HEADER_BYTES, with its length prefix).
MAX_METADATA_BYTES = 64 << 20
SHALLOW_FILE = "shallow"  # inside .mint/: git's list of a shallow clone's boundary commits
BASE_FILE = "mint-base.json"  # inside .mint/: the base model's identity and linear shapes
_HEX = re.compile(r"^[0-9a-fA-F]{4,40}$")  # git takes ids in either case
# What may follow a spec's name, checked in one linear pass (counts below 10^9: a larger one
# names no commit, and Python's int() refuses very long digit strings).
_SUFFIX = re.compile(r"(?:\^\{(?:commit)?\}|[~^][0-9]{0,9})*\Z")
_STEP = re.compile(r"\^\{(?:commit)?\}|[~^][0-9]*")
_SELECTOR = re.compile(r"(?P<count>-?[0-9]{1,9})\}\Z")  # ASCII digits only, as git reads them
_PREVIOUS_CHECKOUT = re.compile(r"checkout: moving from (?P<name>\S+) to \S+")
_PREVIOUS_SPEC = re.compile(r"@\{-(?P<count>[0-9]{1,9})\}")  # `@{-N}` at a spec's start
_WORKERS = max(1, min(8, os.cpu_count() or 1))
# Commits of adapters with at least this many tensors write their new blobs into one pack
# instead of loose objects (git's fetch.unpackLimit default): creating hundreds of files
# costs more than encoding them.
PACK_THRESHOLD = 100
_THREADED_DECODE_BYTES = 1 << 20  # mean tensor size from which decoding uses threads
# Revision reads of small tensors hand tensors_into this many bytes, or tensors, at a time
# (progress steps: 16 MiB of 3 kB tensors took most of a second).
_DECODE_CHUNK_BYTES = 16 << 20
_DECODE_CHUNK_TENSORS = 1024
# Manifests remembered as agreeing with their safetensors header (~100 bytes each), per Repository.
_AGREEING_MANIFESTS_KEPT = 1 << 16
# Commits whose parents a Repository remembers for `~N`/`^N` (~300 bytes each, so ~10 MB at most).
_PARENTS_KEPT = 1 << 15
_COMMIT_TYPE = OBJECT_TYPE_NUMBERS[b"commit"]
# git's shortest abbreviation (MINIMUM_ABBREV), and the length it starts from in a small store.
_ABBREV_MIN, _ABBREV_DEFAULT = 4, 7
_LOOSE_NAME = re.compile(r"[0-9a-f]{38}")
# How long `abbrev` trusts its listing of packs and loose objects before it stats their
# directories again: a stat per id printed cost `log --oneline` 10 us a commit. An object
# written within that time by another process can go unseen, and an id sharing its digits
# printed one digit short (typed back, it is refused as ambiguous, never taken for another).
_ABBREV_TRUST_S = 1.0
# How deep git follows alternates files that name stores with alternates files of their own.
_ALTERNATES_DEPTH = 5
# Searches (ids x packs) from which `abbrev_many` imports numpy to search each pack at once.
_ABBREV_VECTORIZED = 8192
# Packs a REF_DELTA chain is followed through (each base stored outside its delta's pack).
_REF_DELTA_PACKS = 64
# In the git directory: oid -> when gc first found it unreachable, for the objects it keeps
# packed through their grace period (maintenance reads and writes it). A writer that reuses a
# packed object listed there writes a loose copy, which dates it anew (Repository.freshen).
UNREACHABLE_RECORD = "mint-unreachable.json"
ProgressFn = Callable[[int], None]


class NotARepositoryError(MintError):
    """No `.mint/` directory where one was expected."""


class BadGitfileError(NotARepositoryError):
    """A `.mint` file that names no repository: git's `fatal: not a git repository: PATH`."""

    exit_code = 128


class DubiousOwnershipError(NotARepositoryError):
    """A repository another user owns, which git refuses unless safe.directory lists it."""

    exit_code = 128


def check_ownership(repo: Repository) -> None:
    """Refuse a repository whose work tree or store another user owns, as git's safe.directory
    check does: a command run there (by root, a sudo session) leaves files its owner cannot
    replace. Lifted by safe.directory (the path, or `*`) in the global, system or command-line
    config; as git, root may use a root-owned one, or the one of the user sudo came from."""
    if not hasattr(os, "geteuid"):
        return
    me = os.geteuid()
    where = repo.work_tree if repo.work_tree is not None else repo.git_dir
    # A `.mint` gitfile counts too, as git checks a `.git` file's owner: it chooses the store.
    # So does a symlink to one (git lstats the `.git` it read); a `.mint` directory is the
    # store itself, checked as git_dir.
    gitfile = repo.work_tree / GIT_DIR if repo.work_tree is not None else None
    for path in (gitfile, repo.work_tree, repo.git_dir):
        if path is None:
            continue
        try:
            info = os.lstat(path)
            if path is gitfile and stat.S_ISDIR(info.st_mode):
                continue
            owner = info.st_uid
        except OSError:
            continue  # read next by whatever needs it, and reported there
        expected = me
        if me == 0 and owner != 0:
            with suppress(ValueError):
                expected = int(os.environ.get("SUDO_UID", "0"))
        if owner != expected and not _safe_directory(where, repo.git_dir):
            raise DubiousOwnershipError(
                f"detected dubious ownership in repository at '{where}' ({path} belongs to uid "
                f"{owner}, not to you, uid {me}); to add an exception for this directory, call: "
                f"git config --global --add safe.directory {where}"
            )


def _safe_directory(where: Path, git_dir: Path) -> bool:
    """Whether safe.directory, read as git reads it (system, global, then command-line config;
    an empty value drops those before it), lists `where` or `*`."""
    from dulwich.config import StackedConfig

    from mintvcs.gitconfig import env_overrides, home_path, user_configs

    configs = [*reversed(user_configs(git_dir)), *reversed(env_overrides())]
    safe = False
    for value in StackedConfig(configs).get_multivar((b"safe",), b"directory"):
        text = os.fsdecode(value)
        if not text:
            safe = False
        elif text == "*":
            safe = True
        elif (path := home_path(text)) is not None:
            safe = safe or os.path.realpath(path) == os.path.realpath(where)
    return safe


class UnknownRevisionError(MintError):
    """A ref spec that names no branch, tag or commit."""

    exit_code = 128


class StoreBusyError(MintError):
    """The store's packs kept changing under a read (another process's gc): try again."""


class CorruptObjectError(MintError):
    """A git object that is missing, unreadable or fails verification."""


class UnreadableObjectError(CorruptObjectError):
    """A git object whose file the system will not let this process read (permissions, an I/O
    error): not damage, and not missing either."""


class RepositoryGoneError(MintError):
    """The repository's directory went away (moved, deleted, unmounted) or became unreadable
    after it was opened: not an answer about any ref or object in it."""


class NotAnAdapterRevision(CorruptObjectError):
    """A commit mintvcs cannot read as an adapter: no manifest, or a tree changed with git since."""


@dataclass(frozen=True)
class LinkedWorktree:
    """A worktree `git worktree add` made of the store: its directory under `.mint/worktrees`,
    what its HEAD file holds (`ref: refs/heads/x` or a commit id; '' if unreadable) and where
    it is checked out."""

    admin: Path
    head: str
    where: str


@dataclass(frozen=True)
class CommitInfo:
    """A commit's metadata, decoded."""

    id: str
    tree: str
    parents: tuple[str, ...]
    author: str
    committer: str
    time: int  # the committer's: when the commit was made, what `log --json` reports
    timezone: int
    message: str
    author_time: int  # what `git log` prints as Date
    author_timezone: int
    author_zone: str  # the author's zone as git log prints it (`+0060` as the commit holds it)
    # The committer date git orders commits by (`-1` is 2^64 - 1, the newest): log's walks.
    date: int


class Revision:
    """One adapter revision read from the store, without touching the work tree."""

    def __init__(
        self, repo: Repository, info: CommitInfo, manifest: Manifest, tree: dict[str, str]
    ):
        self.repo = repo
        self.info = info
        self.manifest = manifest
        self._tree = tree  # top-level path -> blob id (nested paths flattened)

    @property
    def commit(self) -> str:
        """The commit id."""
        return self.info.id

    @property
    def base_fingerprint(self) -> str | None:
        """Fingerprint of the base model the revision was committed against."""
        return self.manifest.base_fingerprint

    @cached_property
    def config_bytes(self) -> bytes:
        """adapter_config.json, verbatim."""
        return self.repo.read_blob(
            self._tree[CONFIG_PATH], what=CONFIG_PATH, max_size=MAX_METADATA_BYTES
        )

    @cached_property
    def config(self) -> dict[str, Any]:
        """The parsed PEFT config."""
        where = f"{CONFIG_PATH} of {self.commit[:12]}"
        try:
            parsed = json.loads(self.config_bytes)
        except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, or nested too deeply
            problem = "nests too deeply" if isinstance(err, RecursionError) else f"({err})"
            raise CorruptObjectError(f"{where} is not valid JSON {problem}") from None
        if not isinstance(parsed, dict):
            raise CorruptObjectError(f"{where} is a JSON {type(parsed).__name__}, not an object")
        return parsed

    def tensor(self, name: str) -> bytes:
        """The raw bytes of one tensor, verified."""
        record = self.manifest.tensor(name)
        if record is None:
            raise UnknownRevisionError(f"revision {self.commit[:12]} has no tensor '{name}'")
        return self.repo.tensor_bytes(record.blob, name, expect=record)

    def tensors(
        self, progress: ProgressFn | None = None
    ) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
        """Every tensor as (safetensors dtype, shape, raw little-endian bytes)."""
        records = self.manifest.tensors
        # One buffer for all tensors: large numpy allocations are cheaper to fault in
        # than one fresh bytes object per tensor.
        offsets = [0]
        for record in records:
            offsets.append(offsets[-1] + record.end - record.start)
        buffer = self._decode_into(offsets[-1], offsets, progress)
        view = buffer.data
        return {
            r.name: (r.dtype, r.shape, bytes(view[offsets[i] : offsets[i + 1]]))
            for i, r in enumerate(records)
        }

    def _decode_into(
        self,
        size: int,
        offsets: list[int],
        progress: ProgressFn | None,
        previous: ReplacedWeights | None = None,
    ) -> npt.NDArray[np.uint8]:
        """Decode every tensor into `size` bytes of a new buffer, tensor i at offsets[i].

        With `previous` (the weights file a checkout replaces), each small tensor is first
        looked for at its own place in that file's data section: what has its sha256 there is
        kept (a checkout between two revisions of an MoE adapter that changed 1% of its 37k
        tensors decodes those only), the rest is decoded.
        """
        import numpy as np

        # A manifest may claim any size (4 TiB takes 300 bytes to write): past what the memory
        # holds numpy raises MemoryError, past what an index can address (2**63 bytes, F32
        # [2**31, 2**31, 4] say) a ValueError.
        try:
            if size > sys.maxsize:
                raise MemoryError
            buffer = np.empty(size, dtype=np.uint8)
        except (MemoryError, ValueError):
            raise MintError(
                f"revision {self.commit[:12]} holds {size:,} bytes of tensors, more than this "
                "machine can allocate"
            ) from None
        records = self.manifest.tensors
        todo: Sequence[int] = range(len(records))
        if previous is not None:
            todo = previous.keep_into(records, offsets, buffer)
            if progress:
                progress(
                    sum(r.end - r.start for r in records)
                    - sum(records[i].end - records[i].start for i in todo)
                )

        def decode(index: int) -> None:
            record = records[index]
            out = buffer[offsets[index] : offsets[index] + record.end - record.start]
            self.repo.tensor_into(record.blob, record.name, out, expect=record)
            if progress:
                progress(out.size)

        # Decoding a small tensor is mostly Python-level work that holds the GIL; a second
        # thread then only adds lock hand-offs (measured: 84 ms on one thread, 99-115 ms on
        # two for 392 tensors of 64-180 kB). Small tensors go through tensors_into (decoded
        # from the pack's map, hashed on two threads), in chunks so that progress moves.
        work = sum((records[i].end - records[i].start) * (records[i].depth + 1) for i in todo)
        threaded = work >= _THREADED_DECODE_BYTES * max(1, len(todo))
        if threaded:
            _parallel(decode, todo, key=lambda i: records[i].start - records[i].end)
            return buffer
        chunk: list[int] = []
        size = 0
        with collector_paused():  # a header, planes and views per tensor
            for count, index in enumerate(todo, 1):
                record = records[index]
                chunk.append(index)
                size += record.end - record.start
                if (
                    size >= _DECODE_CHUNK_BYTES
                    or len(chunk) == _DECODE_CHUNK_TENSORS
                    or count == len(todo)
                ):
                    self.repo.tensors_into(
                        [
                            (
                                records[i],
                                buffer[offsets[i] : offsets[i] + records[i].end - records[i].start],
                            )
                            for i in chunk
                        ]
                    )
                    if progress:
                        progress(size)
                    chunk, size = [], 0
        return buffer

    def safetensors_buffer(
        self,
        progress: ProgressFn | None = None,
        replacing: Path | None = None,
    ) -> npt.NDArray[np.uint8]:
        """adapter_model.safetensors as a uint8 array, byte-identical to what was committed.

        `replacing`, the weights file a checkout replaces, is where small tensors are taken
        from first: each one found at its place in its data section with the record's sha256
        is not decoded (mintvcs.keep).
        """
        header = self.repo.read_blob(
            self.manifest.header_blob, what=HEADER_PATH, max_size=MAX_HEADER_BYTES + 8
        )
        records = self.manifest.tensors
        data_size = max((r.end for r in records), default=0)
        previous = None if replacing is None else ReplacedWeights.read(replacing, self.manifest)
        try:
            buffer = self._decode_into(
                len(header) + data_size,
                [len(header) + r.start for r in records],
                progress,
                previous,
            )
        finally:
            if previous is not None:
                previous.close()
        buffer[: len(header)] = memoryview(header)
        return buffer

    def safetensors_bytes(self, progress: ProgressFn | None = None) -> bytes:
        """adapter_model.safetensors, byte-identical to what was committed."""
        return self.safetensors_buffer(progress).tobytes()

    def files(self) -> dict[str, tuple[bytes | memoryview, bool]]:
        """Extra files by relative path: (content, executable), for checkout to write; refuses a
        revision that holds one no checkout may write (FileRecord.unsafe_reason)."""
        for f in self.manifest.files:
            reason = f.unsafe_reason
            if reason is not None:
                raise MintError(
                    f"revision {self.commit[:12]} holds the extra file {quote_path(f.path)}, "
                    f"a name unsafe to write ({reason}); checkout writes no revision holding "
                    "one (an earlier mintvcs committed it), and nothing was changed"
                )
        return {  # views where they can be: an optimizer state is not copied once more
            f.path: (self.repo.blob_view(f.blob, what=f.path), f.executable)
            for f in self.manifest.files
        }


# `.mint/info/exclude` as init writes it: comments only, nothing left out until a line is added.
EXCLUDE_SAMPLE = """\
# Files that `mintvcs commit` and `status` leave out of every adapter directory of this
# repository, in .gitignore's syntax (.mintignore files in an adapter directory add
# theirs). A trainer's checkpoint holds state that a revision may do without; uncommented,
# these lines keep a Trainer's checkpoint to the adapter and its tokenizer files:
# optimizer.pt
# scheduler.pt
# rng_state*.pth
# training_args.bin
# trainer_state.json
"""


def _split_spec(spec: str) -> tuple[str, str] | None:
    """(name, suffix) of a revision spec, split at its first `~` or `^` (no ref name holds
    either); None when what follows is not a run of ~N, ^N, ^{} and ^{commit}."""
    cut = min((i for i in (spec.find("~"), spec.find("^")) if i >= 0), default=len(spec))
    name, suffix = spec[:cut], spec[cut:]
    return (name, suffix) if _SUFFIX.match(suffix) else None


def _checked_spec(spec: str) -> tuple[str, str]:
    """(name, suffix) of revision spec `spec`; UnknownRevisionError for one no revision has."""
    if not isinstance(spec, str):
        raise TypeError(f"a revision is named by a str, not {type(spec).__name__}: {spec!r:.60}")
    if not spec or any(ord(c) < 32 or c == "\x7f" for c in spec) or ".." in spec:
        raise UnknownRevisionError(
            f"invalid revision '{spec}': it is empty or holds '..' or control characters"
        )
    parts = _split_spec(spec)
    if parts is None:
        raise UnknownRevisionError(
            f"unknown revision '{spec}': after a name come only ~N, ^N, ^{{}} and ^{{commit}}"
        )
    if not parts[0]:  # git reads no HEAD into `~1` or `^{}`: they name nothing
        raise UnknownRevisionError(
            f"invalid revision '{spec}': no branch, tag or commit id before '{spec[0]}'"
        )
    return parts


def is_full_hex(name: str) -> bool:
    """Whether a spec's name is a whole object id (40 hex digits, either case): it names that
    object, never a ref of the same name (git's get_oid_basic)."""
    return len(name) == 40 and _HEX.match(name) is not None


# A name git reads from the git directory itself before refs/ (refname_is_safe): FETCH_HEAD,
# ORIG_HEAD, MERGE_HEAD, CHERRY_PICK_HEAD, and any other of capitals and underscores.
_GIT_DIR_REF = re.compile(r"[A-Z][A-Z_]*\Z")


_HEAD_ID = re.compile(rb"[0-9a-fA-F]{40}\s*\Z")


def _head_link(path: Path) -> str | None:
    """The target of `path`/HEAD when it is a symbolic link to a name under refs/, which git
    reads as a symbolic ref (core.preferSymlinkRefs), whether or not that branch is born yet."""
    try:
        target = os.readlink(path / "HEAD")
    except OSError:
        return None
    return target if target.startswith("refs/") else None


def _ceiling(start: str) -> str | None:
    """The nearest GIT_CEILING_DIRECTORIES entry above `start` (a resolved path), or None, as
    git's discovery reads it: absolute entries only, each resolved through symbolic links
    unless an empty entry came before it, and one that is `start` itself is no ceiling."""
    best: tuple[int, str] | None = None
    literal = False
    for entry in os.environ.get("GIT_CEILING_DIRECTORIES", "").split(":"):
        if not entry:
            literal = True  # git: the entries after an empty one are taken as they are written
            continue
        if not os.path.isabs(entry):
            continue
        ceiling = entry if literal else os.path.realpath(entry)
        if len(ceiling) > 1 and ceiling.endswith("/"):
            ceiling = ceiling[:-1]  # as git: `/a/` is the ceiling `/a`
        length = 0 if ceiling == "/" else len(ceiling)  # "/" is above every path but itself
        above = start.startswith(ceiling[:length]) and start[length : length + 1] == "/"
        if above and start != "/" and (best is None or length > best[0]):
            best = (length, ceiling)
    return None if best is None else best[1]


def _has_head(git_dir: Path) -> bool:
    """Whether `git_dir` holds a HEAD: a file, or a link to a branch (born or not)."""
    return (git_dir / "HEAD").is_file() or _head_link(git_dir) is not None


def _gitfile_target(path: Path) -> Path:
    """The store a `.mint` gitfile names (`gitdir: PATH`, relative to the file's directory), as
    git reads a `.git` file; BadGitfileError when it is no gitfile or names no repository."""
    try:
        with open_small_file(path) as handle:  # a regular file under 1 MiB
            text = handle.read()
    except (OSError, ValueError) as err:
        raise BadGitfileError(f"{path} cannot be read ({err}); fix or remove it") from None
    if not text.startswith(b"gitdir: "):
        raise BadGitfileError(f"invalid gitfile format: {path}; fix or remove it")
    # Up to a NUL, as git reads the path (a C string): Path() would refuse it with a traceback.
    named = text[len(b"gitdir: ") :].rstrip(b"\r\n").split(b"\0", 1)[0]
    target = Path(os.fsdecode(named))
    target = path.parent / target  # an absolute one stays itself
    if not _has_head(target):
        raise BadGitfileError(f"not a mintvcs repository: {target} (named by the gitfile {path})")
    return Path(os.path.abspath(target))


def _is_git_directory(path: Path) -> bool:
    """git's is_git_directory test: objects/ and refs/ are directories, and HEAD is a symbolic
    ref under refs/ (a file, or a link as git's validate_headref reads one) or an object id."""
    if not ((path / "objects").is_dir() and (path / "refs").is_dir()):
        return False
    if _head_link(path) is not None:
        return True
    try:
        with open(path / "HEAD", "rb") as handle:
            head = handle.read(256)
    except OSError:
        return False
    if head.startswith(b"ref:"):
        return head[4:].lstrip(b" \t").startswith(b"refs/")
    return _HEAD_ID.match(head) is not None


def ref_candidates(name: str) -> list[str]:
    """The refs a spec's name may mean, in git's order (gitrevisions): the name itself when it is
    a full one or a pseudo-ref in the git directory (`FETCH_HEAD`, `ORIG_HEAD`), `refs/NAME`
    (`heads/main`), the tag, the branch, the remote-tracking branch (`origin/main`) and a
    remote's HEAD (`origin`); HEAD for `HEAD`, `@` and the empty name."""
    if name in ("HEAD", "@", ""):
        return ["HEAD"]
    itself = [name] if name.startswith("refs/") or _GIT_DIR_REF.match(name) else []
    return [
        *itself,
        f"refs/{name}",
        f"refs/tags/{name}",
        f"refs/heads/{name}",
        f"refs/remotes/{name}",
        f"refs/remotes/{name}/HEAD",
    ]


# Repositories still open at exit are closed while the interpreter is whole: dulwich's pack
# finalizers, run later during teardown, print "Exception ignored" tracebacks.
_OPEN: weakref.WeakSet[Repository] = weakref.WeakSet()


@atexit.register
def _close_open_repositories() -> None:
    for repo in list(_OPEN):
        with suppress(Exception):  # exiting anyway: a close that fails must not hide the real exit
            repo.close()


class WriteCount:
    """How many objects were stored inside `Repository.counting_writes` blocks."""

    def __init__(self) -> None:
        self.objects = 0
        self._lock = threading.Lock()  # a commit's encoding threads store objects at once

    def add(self) -> None:
        """Count one object stored."""
        with self._lock:
            self.objects += 1


# The counts open in this context, with their Repository. A context, not the Repository, holds
# them: threads committing through one Repository at once must not count each other's objects,
# and `_parallel` runs its workers in copies of the caller's context, so they count for it.
_WRITE_COUNTS: contextvars.ContextVar[tuple[tuple[Repository, WriteCount], ...]] = (
    contextvars.ContextVar("mint_write_counts", default=())
)


class HeldWrites:
    """Objects written inside a `Repository.holding_writes` block: temporary files, each with
    the path it is to be renamed to when the block ends."""

    def __init__(self) -> None:
        self.moves: list[tuple[str, str]] = []
        self._lock = threading.Lock()  # a commit's encoding threads store objects at once
        self.owner: weakref.ref[Generator[HeldWrites, None, None]] | None = None

    def in_force(self) -> bool:
        """Whether the block holding these writes is still running its body.

        Read from the state of the block's generator, which changes without a line of ours
        running: a Ctrl-C can land anywhere in the code that takes a hold off (even before its
        first bytecode), and a hold left on made every later object of the process, a gc's
        pack or a tag's, a temporary never stored while refs moved to it and gc deleted the
        loose copies. Once the generator resumes, finishes or is collected the hold is over.
        """
        owner = self.owner() if self.owner is not None else None
        return owner is not None and inspect.getgeneratorstate(owner) == inspect.GEN_SUSPENDED

    def add(self, tmp: str, final: str) -> None:
        """Hold temporary file `tmp`, to be renamed to `final`."""
        with self._lock:
            self.moves.append((tmp, final))

    def drop(self) -> None:
        """Delete every temporary held: nothing of them reaches the store."""
        with self._lock:
            for tmp, _ in self.moves:
                with suppress(OSError):
                    os.unlink(tmp)
            self.moves.clear()


_HELD_WRITES: contextvars.ContextVar[tuple[tuple[Repository, HeldWrites], ...]] = (
    contextvars.ContextVar("mint_held_writes", default=())
)


def _release_hold(held: HeldWrites) -> None:
    """Take `held` off this context's holds (a no-op where it never got on)."""
    _HELD_WRITES.set(tuple(entry for entry in _HELD_WRITES.get() if entry[1] is not held))


# How much of an object's content zlib is given at once (write_object).
_DEFLATE_STEP = 1 << 20


_V = TypeVar("_V")


class _Listing(Generic[_V]):
    """A value made from listing directories (`make`), made again when one of `paths` changed
    (its inode and mtime; a name added or removed changes its directory's mtime), which are
    stat'ed at most every _ABBREV_TRUST_S: `abbrev`'s view of the packs and loose objects."""

    def __init__(self, paths: Callable[[], Sequence[str]], make: Callable[[], _V]) -> None:
        self._paths = paths
        self._make = make
        # (value, the paths' stat keys when it was made, time.monotonic() of the last check),
        # replaced whole: threads that print ids at once each see one consistent tuple.
        self._known: tuple[_V, tuple[tuple[int, int] | None, ...], float] | None = None

    def get(self) -> _V:
        """The value, made again when a path changed since it was made."""
        known = self._known
        now = time.monotonic()
        if known is not None and now - known[2] < _ABBREV_TRUST_S:
            return known[0]
        # Stat'ed before listing: a change made during the listing is seen at the next check.
        token = tuple(_directory_key(path) for path in self._paths())
        value = known[0] if known is not None and known[1] == token else self._make()
        self._known = (value, token, now)
        return value


def _directory_key(path: str) -> tuple[int, int] | None:
    """(inode, mtime) of `path`, None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


@dataclass(frozen=True)
class _AbbrevState:
    """What `Repository.abbrev` knows of the store's packs."""

    packs: list[PackFile]  # ours and our alternates'
    auto_length: int  # git's abbreviation length for their objects
    foreign: bool  # objects our pack reader does not see: packs it cannot read
    stores: tuple[str, ...]  # the object directories: ours, then our alternates


@dataclass(frozen=True)
class NameAmbiguity:
    """A spec's name that means more than one thing (git warns "refname is ambiguous"): `refs`,
    the refs of that name in git's order, and `object`, the object it also names (a full id,
    which wins over them, or the one object an abbreviated id names; the refs win then)."""

    name: str
    refs: list[str]
    object: str | None


def undo_init(git_dir: Path, err: BaseException) -> BaseException:
    """Remove `git_dir`, which init made and then failed to fill (`err`): nothing of the user's
    is in it, and a `.mint/` without HEAD is no repository that a second init would complete.
    Returns the error to raise: an OSError that named no file names `git_dir`."""
    import shutil
    import traceback

    # dulwich's lock files whose write failed are closed by their finalizers, which fail
    # again and would print "Exception ignored ... Traceback" at exit: run them now, quietly.
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _unraisable: None
    try:
        traceback.clear_frames(err.__traceback__)
    finally:
        sys.unraisablehook = hook
    shutil.rmtree(git_dir, ignore_errors=True)
    if isinstance(err, OSError) and err.filename is None and err.errno is not None:
        return OSError(err.errno, err.strerror, os.fspath(git_dir))
    return err.with_traceback(None)


class Repository:
    """A mintvcs repository: `.mint/` (a git directory) and, usually, a work tree beside it.

    Use it as a context manager (or call close()) to release its pack files.
    """

    def __init__(self, git_dir: Path, work_tree: Path | None):
        self.git_dir = Path(git_dir)
        self.work_tree = work_tree
        self.refs = RefStore(self.git_dir)
        self._objects_dir = str(self.git_dir / "objects")
        # dulwich's object store is not thread-safe (its pack list fills in lazily): a commit's
        # encoding threads that read through it at once could each see a partial list.
        self._dulwich_lock = threading.Lock()
        # Our own pack list is shared by the same threads, and refreshed when a pack is missed.
        self._packs_lock = threading.Lock()
        # Set by a reader that follows a branch (the server): decoded XOR tips are kept here, so
        # a child revision decodes its last link only (see mintvcs.plane_cache).
        self.plane_cache: PlaneCache | None = None
        # `.mint/shallow` as last read: (its stat key, the commits it lists).
        self._shallow: tuple[tuple[int, int, int], frozenset[str]] | None = None
        self._shallow_path = str(self.git_dir / SHALLOW_FILE)
        # Manifest blobs whose safetensors header was found to agree with them (_check_header).
        self._agreeing_manifests: set[str] = set()
        # The tree and meta revision_meta read last (log --json reads one per commit).
        self._last_meta: tuple[str, dict[str, str] | None] | None = None
        # Commit id -> its parents as the object lists them, least recently used first (see
        # _parents_of); its own lock, as the server's ref watcher resolves on worker threads.
        self._parents: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._parents_lock = threading.Lock()
        _OPEN.add(self)

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- opening
    @classmethod
    def init(
        cls,
        work_tree: Path,
        base: BaseModel | None = None,
        *,
        default_branch: str = DEFAULT_BRANCH,
        shared: SharedPerm | None = None,
    ) -> Repository:
        """Create `.mint/` in `work_tree` as a git directory whose HEAD is `default_branch`;
        `shared` is its core.sharedRepository (repoformat.parse_shared), set as `git init
        --shared` sets it. Where a step fails (a full disk), the `.mint/` it made goes again
        (undo_init), so that init can be run again."""
        work_tree = Path(work_tree)
        work_tree.mkdir(parents=True, exist_ok=True)
        git_dir = work_tree / GIT_DIR
        if git_dir.exists() or not make_dir(git_dir, shared):
            raise MintError(f"{git_dir} already exists: this is a mintvcs repository already")
        try:
            return cls._fill_git_dir(git_dir, work_tree, base, default_branch, shared)
        except BaseException as err:
            raise undo_init(git_dir, err) from None

    @classmethod
    def _fill_git_dir(
        cls,
        git_dir: Path,
        work_tree: Path,
        base: BaseModel | None,
        default_branch: str,
        shared: SharedPerm | None,
    ) -> Repository:
        """Write the files of the new, empty `git_dir` (see init)."""
        from dulwich.repo import Repo

        setting = shared_setting(shared)
        repo = Repo.init_bare(
            str(git_dir), default_branch=default_branch.encode(), shared_repository=setting
        )
        config = repo.get_config()
        # Tensor blobs are zstd already; zlib on top only burns time (and git's delta search is useless on them).
        config.set(b"core", b"compression", b"0")
        config.set(b"core", b"looseCompression", b"0")
        config.set(b"pack", b"compression", b"0")
        config.set(b"core", b"logAllRefUpdates", b"true")
        if setting is not None:
            config.set(b"receive", b"denyNonFastforwards", b"true")  # as `git init --shared`
        config.set(b"mint", b"formatVersion", str(MINT_FORMAT_VERSION).encode())
        text = BytesIO()
        config.write_to_file(text)
        repo.close()
        # dulwich's files are 0644 whatever the umask: each is written again as git writes it.
        write_file(git_dir / "config", text.getvalue(), shared)
        write_file(git_dir / "HEAD", f"ref: refs/heads/{default_branch}\n".encode(), shared)
        make_dir(git_dir / "info", shared)
        write_file(git_dir / "info" / "attributes", f"{TENSORS_DIR}/** -delta\n".encode(), shared)
        write_file(git_dir / "info" / "exclude", EXCLUDE_SAMPLE.encode(), shared)
        write_file(git_dir / "description", b"mintvcs adapter repository\n", shared)
        if base is not None:
            data = json.dumps(base.to_json(), indent=1) + "\n"
            write_file(git_dir / BASE_FILE, data.encode(), shared)
        found = cls(git_dir, work_tree)
        found.refs.shared_perm = shared
        return found

    @classmethod
    def open(cls, path: str | os.PathLike[str] = ".") -> Repository:
        """Open the repository at `path` or its nearest parent; `path` may be the `.mint` directory itself."""
        start = Path(path).resolve()
        found: Repository | None = None
        # A work tree's own .mint first: its revision may hold files named HEAD and objects/.
        # `start` itself only when it is a git directory as git tests one, or a `.mint` one: an
        # adapter's directory holding a file HEAD and a directory objects/ is not.
        if not _has_head(start / GIT_DIR) and (
            _is_git_directory(start)
            or (start.name == GIT_DIR and _has_head(start) and (start / "objects").is_dir())
        ):
            found = cls(start, start.parent if start.name == GIT_DIR else None)
        else:
            ceiling = _ceiling(str(start))
            # git never looks in the ceiling or above; the root, as a ceiling, stops at "/".
            floor = -1 if ceiling is None else max(len(ceiling.rstrip("/")), 1)
            for candidate in (start, *start.parents):
                if candidate != start and len(str(candidate)) <= floor:
                    break
                if _has_head(candidate / GIT_DIR):
                    found = cls(candidate / GIT_DIR, candidate)
                    break
                if (candidate / GIT_DIR).is_file():
                    # A gitfile (`gitdir: PATH`), followed as git follows a `.git` file; one
                    # that names no repository stops here, never falls back to a parent's.
                    found = cls(_gitfile_target(candidate / GIT_DIR), candidate)
                    break
        if found is not None:
            # Read now, as git does: a broken config, or a format mintvcs cannot honour (a
            # SHA-256 or reftable repository, an unknown extension), fails every command before
            # it reads or writes anything, not only the ones that reach dulwich's object store
            # (loose reads do not). A missing one is left to whoever needs it, as before.
            if (found.git_dir / "config").exists():
                found.config  # noqa: B018
                found.refs.shared_perm = found.repo_format.shared
                # git refuses a bad core.abbrev in every command, before anything is written
                # (a commit must not be made and then fail to print its id).
                found.abbrev_setting  # noqa: B018
            return found
        up_to = "up to /" if ceiling is None else f"below {ceiling}, GIT_CEILING_DIRECTORIES"
        raise NotARepositoryError(
            f"not a mintvcs repository (or any parent {up_to}): {start}; run 'mintvcs init'"
        )

    @property
    def shared_perm(self) -> SharedPerm | None:
        """core.sharedRepository as read when the repository was opened: what is written into
        `.mint/` gets its modes (mintvcs.filemodes); None leaves them to the umask."""
        return self.refs.shared_perm

    @cached_property
    def objects(self) -> DiskObjectStore:
        """The git object store, as dulwich reads it (our own writers write packs: PackWriter).

        Built without the repository's config: dulwich's from_config reads pack.* and core.*
        tuning keys (pack.windowMemory, core.packedGitLimit, ...) with int(), so git's own form
        `512m` made every packed read fail as if the object were corrupt. mintvcs reads with
        them at their defaults and writes its own packs and loose objects, so none applies.
        """
        return _object_store_class()(str(self.git_dir / "objects"))

    @cached_property
    def config(self) -> Any:
        """The repository's git config (a dulwich Config, includes followed), read once.

        Its format is checked first (`repo_format`); with extensions.worktreeConfig,
        `.mint/config.worktree` is read over `.mint/config`, as git reads it.
        """
        from dulwich.config import StackedConfig

        local = self._local_config
        path = self.git_dir / "config.worktree"
        if not self.repo_format.worktree_config or not path.exists():
            return local
        return StackedConfig([_read_config(path), local])

    @cached_property
    def repo_format(self) -> RepositoryFormat:
        """`.mint/config`'s core.repositoryformatversion, extensions.* and mint.formatVersion,
        checked as git checks them (UnsupportedRepositoryError for what mintvcs cannot honour)."""
        # git reads the format from `config` alone, its includes unread (read_repository_format):
        # an include's extensions.* or repositoryformatversion counts for nothing there.
        return read_format(self._bare_config, str(self.git_dir / "config"))

    @cached_property
    def _bare_config(self) -> Any:
        """`.mint/config` alone, its includes unread, read once."""
        return _read_config(self.git_dir / "config", includes=False)

    @cached_property
    def _local_config(self) -> Any:
        """`.mint/config` with what it includes, read once (the bare one when it includes
        nothing)."""
        bare = self._bare_config
        if not any(section[0].lower() in (b"include", b"includeif") for section in bare.sections()):
            return bare
        return _read_config(self.git_dir / "config")

    @cached_property
    def excludes(self) -> tuple[bytes, ...]:
        """gitignore patterns of the files no commit takes from an adapter directory:
        `.mint/info/exclude`, git's own per-repository excludes file, read once."""
        path = self.git_dir / "info" / "exclude"
        try:
            with open_small_file(path) as handle:  # a regular file under 1 MiB, as the config
                return read_patterns(handle)
        except FileNotFoundError:
            return ()
        except (OSError, ValueError) as err:
            raise NotARepositoryError(f"{path} cannot be read ({err}); fix or remove it") from None

    @cached_property
    def base(self) -> BaseModel | None:
        """The base model recorded at init, if any."""
        path = self.git_dir / BASE_FILE
        if not path.is_file():
            return None
        return BaseModel.from_json(json.loads(path.read_text()))

    def close(self) -> None:
        """Release open pack files (a later read opens what it needs again)."""
        if "objects" in self.__dict__:
            self.objects.close()
        for pack in self.__dict__.pop("_pack_files", {}).values():
            pack.close()
        self.__dict__.pop("_packs_scanned", None)
        self.__dict__.pop("_last_pack", None)
        self.__dict__.pop("_abbrev_listing", None)  # it holds the packs just closed
        for pack in self.__dict__.pop("_alternate_pack_files", {}).values():
            pack.close()

    # ----------------------------------------------------------------- objects
    def get_object(self, oid: str, *, what: str = "object") -> ShaFile:
        """Read one git object, naming `what` if it is missing or unreadable."""
        from dulwich.errors import ObjectFormatException
        from dulwich.objects import ObjectID

        named = "" if what == "object" else f"{what}: "
        problem: str | None = None
        # In the pack the last lookup found its object in, first: a walk of a gc'd history
        # finds each commit there (a failed open of its loose path cost more than the read).
        key = bytes.fromhex(oid) if is_object_id(oid) else None  # dulwich names what is not
        packed = None if key is None else self._read_packed_object(key, last_only=True)
        # Then loose, with our reader: dulwich looks through every pack before the loose
        # files, and a training run's commits, trees and manifests stay loose until gc while
        # each commit adds a pack (2.3 ms per read with 300 packs). A loose copy that is
        # unreadable or holds other content falls through to dulwich, which reads packs first
        # (a good packed copy wins, as in git) and reports a bad loose one.
        try:
            loose = None if packed is not None else self._read_loose(oid, what)
        except CorruptObjectError:
            loose = None
        if loose is not None and (type_num := OBJECT_TYPE_NUMBERS.get(loose[0])) is not None:
            kind, body = loose
            if _named_by(oid, kind, body):
                try:
                    return parse_object(type_num, bytes(body), oid)
                except (
                    ObjectFormatException,
                    ValueError,
                    KeyError,
                    IndexError,
                    AssertionError,
                ) as err:
                    raise CorruptObjectError(
                        f"{named}object {oid} is corrupt ({err or type(err).__name__}); run 'mintvcs fsck'"
                    ) from None
        # Then the packs, with our reader: dulwich keeps every pack it looks in open (two
        # descriptors each, for the Repository's life), so a store of many packs ran out of
        # descriptors. dulwich still reads what ours does not (damage it reports, alternates).
        if packed is None and key is not None:
            packed = self._read_packed_object(key)
        if packed is not None:
            try:
                return parse_object(packed[0], bytes(packed[1]), oid)
            except (ObjectFormatException, ValueError, KeyError, IndexError, AssertionError) as err:
                raise CorruptObjectError(
                    f"{named}object {oid} is corrupt ({err or type(err).__name__}); run 'mintvcs fsck'"
                ) from None
        damaged = dulwich_damage_errors()
        try:
            return self._with_dulwich(lambda store: store[ObjectID(oid.encode())])
        except KeyError:
            problem = None
        except damaged as err:
            read = self._packed_read_as_git(oid) if isinstance(err, ObjectFormatException) else None
            if read is not None:
                return read
            problem = f"is corrupt ({err or type(err).__name__}); run 'mintvcs fsck'"
        except PermissionError as err:  # the file is there, for another user
            raise UnreadableObjectError(
                f"{named}object {oid}: {cannot_read(err.filename or 'its file', err)}"
            ) from None
        if problem is None:
            self.check_present()  # a store gone since it was opened misses every object
            problem = "is missing from the store" + self.missing_objects_hint()
        # Raised outside the except block so the error does not keep dulwich's frames (and a
        # view of the pack's memory map) alive.
        raise CorruptObjectError(f"{named}object {oid} {problem}")

    def shallow_commits(self) -> frozenset[str]:
        """The boundary commits of a shallow clone (`git clone --depth`), as `.mint/shallow`
        lists them: their parents were not fetched, and git treats them as having none. Empty
        for a whole repository; read again whenever the file changes (`git fetch --unshallow`
        deletes it)."""
        path = self._shallow_path  # asked once per commit a walk reads: no Path built each time
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return frozenset()
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._shallow is None or self._shallow[0] != key:
            try:
                text = Path(path).read_bytes().decode("ascii", "replace")
            except (FileNotFoundError, IsADirectoryError):
                return frozenset()
            lines = (line.strip() for line in text.splitlines())
            self._shallow = (key, frozenset(line for line in lines if is_object_id(line)))
        return self._shallow[1]

    def _packed_read_as_git(self, oid: str) -> ShaFile | None:
        """A stored commit or tag that dulwich refuses for an identity's date, read as git
        reads it (parse_object); None if it is no such object or does not hash to `oid`."""
        from dulwich.errors import ObjectFormatException
        from dulwich.objects import ObjectID

        try:
            with self._dulwich_lock:
                type_num, raw = self.objects.get_raw(ObjectID(oid.encode()))
        except (KeyError, ObjectFormatException, ValueError, zlib.error, OSError):
            return None
        lenient = _read_as_git().get(type_num)
        if lenient is None:
            return None
        if not _named_by(oid, lenient.type_name, raw):
            return None
        try:
            return parse_object(type_num, raw, oid)
        except (ObjectFormatException, ValueError, KeyError, IndexError, AssertionError):
            return None

    def missing_objects_hint(self) -> str:
        """Why this store may lack objects by design, for an error naming a missing one: an
        alternates line names a store that is not there, or it is a shallow clone, or a partial
        one (`git clone --filter`), whose objects git fetches on demand from its promisor
        remote and mintvcs cannot; '' for a whole repository."""
        git_dir = os.path.relpath(self.git_dir)  # `.mint` where commands run, in the work tree
        # First: the objects of a store moved or unmounted since are all missing, whatever
        # else this clone is.
        missing = read_alternates(self._objects_dir).missing
        if missing:
            listing, path = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            return (
                f": {os.path.relpath(listing)} names the object directory {path}, which does not "
                f"exist{more} (the store this one borrows from was moved or unmounted?); "
                "fix that line"
            )
        if (self.git_dir / SHALLOW_FILE).exists():
            return (
                ": this is a shallow clone (git clone --depth), without the older revisions whose "
                f"blobs XOR-encoded tensors build on; run `git --git-dir {git_dir} fetch --unshallow`"
            )
        if self._partial_clone():
            return (
                ": this is a partial clone (git clone --filter), whose objects git fetches only "
                "when it needs them and mintvcs cannot; clone without --filter"
            )
        return ""

    def _partial_clone(self) -> bool:
        """Whether git's config names a promisor remote (a partial clone's)."""
        try:
            config = self.config
        except MintError:
            return False
        with suppress(KeyError):
            if config.get((b"extensions",), b"partialclone"):
                return True
        for section in config.sections():
            if section[:1] == (b"remote",):
                with suppress(ValueError):  # git's `yes` too, which dulwich's get_boolean refuses
                    if config_bool(config, section, b"promisor", False):
                        return True
        return False

    def read_blob(self, oid: str, *, what: str = "blob", max_size: int | None = None) -> bytes:
        """The content of a blob (a loose one claiming more than `max_size` bytes is refused unread)."""
        content = self.blob_view(oid, what=what, max_size=max_size)
        return content if isinstance(content, bytes) else bytes(content)

    def blob_size(self, oid: str, *, what: str = "blob") -> int:
        """A blob's size as its headers give it (a loose object's, a pack entry's), not inflated
        (a 400 MB optimizer state is not read to be listed); read whole only where neither does."""
        if is_object_id(oid):
            fd = self._open_loose(oid, what)
            if fd is not None:
                try:
                    head = _loose_head(os.read(fd, 1024))
                finally:
                    os.close(fd)
                if head is not None and head[0] == b"blob" and head[1].isdigit():
                    return int(head[1])
            else:
                found = self._find_packed(bytes.fromhex(oid), rescan=True)
                size = None if found is None else found[0].entry_size(found[1])
                if size is not None:
                    return size
        return len(self.blob_view(oid, what=what))  # it names what is wrong, if anything

    def blob_view(
        self, oid: str, *, what: str = "blob", max_size: int | None = None
    ) -> bytes | memoryview:
        """The content of a blob without a copy where it can (a hot swap reads tensors this way)."""
        from dulwich.objects import Blob

        loose = self._read_loose_blob(oid, what, max_size)
        if loose is not None:
            return loose
        packed = self._read_packed_blob(oid, what)
        if packed is not None:
            return packed
        if max_size is not None:  # a deflated or deltified entry: its size is in its headers
            key = bytes.fromhex(oid)
            for pack in self._packs():
                offset = pack.find(key)
                size = None if offset is None else pack.object_size(offset)
                if size is not None and size > max_size:
                    raise _too_large(oid, size, max_size, what)
        obj = self.get_object(oid, what=what)
        if not isinstance(obj, Blob):
            raise CorruptObjectError(
                f"{what}: object {oid} is a {obj.type_name.decode()}, not a blob"
            )
        return obj.as_raw_string()

    def _read_loose_blob(
        self, oid: str, what: str, max_size: int | None = None
    ) -> bytes | memoryview | None:
        """Inflate a loose blob without building a dulwich object; None when it is not loose."""
        loose = self._read_loose(oid, what, max_size)
        if loose is None:
            return None
        kind, body = loose
        if kind != b"blob":
            raise CorruptObjectError(
                f"{what}: object {oid} is a {kind.decode(errors='replace')}, not a blob"
            )
        return body

    def _read_loose(
        self, oid: str, what: str, max_size: int | None = None
    ) -> tuple[bytes, memoryview] | None:
        """A loose object's type and content, its header checked; None when it is not loose."""
        if not is_object_id(oid):
            raise CorruptObjectError(f"{what}: {oid!r} is not an object id")
        fd = self._open_loose(oid, what)
        if fd is None:
            return None
        try:
            raw = read_fd(fd)
        except OSError as err:
            if err.errno != errno.ENOMEM:
                raise
            # The address space a process limit leaves (ulimit -v): not damage, and fsck goes
            # on with the rest of its report.
            raise UnreadableObjectError(
                f"{what}: object {oid} ({os.fstat(fd).st_size:,} bytes on disk) does not fit in "
                f"this process's memory to be read ({err.strerror})"
            ) from None
        finally:
            os.close(fd)
        if max_size is not None:
            _refuse_larger(raw, max_size, oid, what)
        try:
            data = inflate(raw)
        except zlib.error as err:
            raise CorruptObjectError(
                f"{what}: object {oid} is corrupt ({err}); run 'mintvcs fsck'"
            ) from None
        head = bytes(data[:32])
        nul = head.find(b"\0")
        kind, _, size = head[: max(nul, 0)].partition(b" ")
        if nul < 0 or not size.isdigit() or int(size) != len(data) - nul - 1:
            raise CorruptObjectError(
                f"{what}: object {oid} has a corrupt header; run 'mintvcs fsck'"
            )
        return kind, memoryview(data)[nul + 1 :]

    def _read_packed_blob(self, oid: str, what: str) -> memoryview | None:
        """A packed blob stored whole with zlib level 0, read from the pack's memory map.

        None when no pack holds it in that form (deltas, deflated or non-blob entries go
        through get_object). The copy out of the pack is checked against the entry's Adler-32.
        """
        for _attempt in range(2):  # again once, should the pack prove removed (a gc)
            found = self._find_packed(bytes.fromhex(oid), rescan=True)
            if found is None:
                return None
            pack, offset = found
            try:
                return pack.stored_blob(offset)
            except zlib.error as err:
                raise CorruptObjectError(
                    f"{what}: packed object {oid} is corrupt ({err}); run 'mintvcs fsck'"
                ) from None
            except NotStored:
                if not pack.gone:
                    return None
        return None

    def _read_packed_object(
        self, key: bytes, depth: int = 0, *, last_only: bool = False
    ) -> tuple[int, bytes] | None:
        """(type number, content) of object `key` (20 bytes) as our pack reader reads it (see
        PackFile.read_object); None where it cannot: in no pack it reads, or unreadable there
        (dulwich then reads it or says what is wrong). `last_only`: only if it is in the pack
        the last lookup found its object in."""
        for _attempt in range(1 if last_only else 2):  # again once, should the pack be gone
            if last_only:
                last: PackFile | None = self.__dict__.get("_last_pack")
                offset = None if last is None or last.gone else last.find(key)
                found = None if offset is None or last is None else (last, offset)
            else:
                found = self._find_packed(key, rescan=True)
            if found is None:
                return None
            pack, offset = found
            read = pack.read_object(offset, lambda base: self._read_base(base, depth))
            if read is not None or not pack.gone:
                return read
        return None

    def _read_base(self, key: bytes, depth: int) -> tuple[int, bytes] | None:
        """A REF_DELTA's base `key` stored outside its pack: loose, or in another pack."""
        if depth >= _REF_DELTA_PACKS:
            return None  # a cycle across packs, or damage: dulwich reports it
        try:
            loose = self._read_loose(key.hex(), "object")
        except MintError:
            return None
        if loose is not None:
            type_num = OBJECT_TYPE_NUMBERS.get(loose[0])
            return None if type_num is None else (type_num, bytes(loose[1]))
        return self._read_packed_object(key, depth + 1)

    def _with_dulwich(self, use: Callable[[DiskObjectStore], _R]) -> _R:
        """`use(self.objects)` under dulwich's lock; out of descriptors (EMFILE, ENFILE), once
        more after closing every pack dulwich and our reader hold, as git's close_one_pack."""
        with self._dulwich_lock:
            try:
                return use(self.objects)
            except OSError as err:
                if err.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                self.objects.close()
                release_pack_maps()
                return use(self.objects)

    def _find_packed(self, key: bytes, rescan: bool = False) -> tuple[PackFile, int] | None:
        """The pack holding object `key` and its offset there, or None (`rescan`: list the
        pack directory again on a miss, for packs written since)."""
        # A revision's blobs mostly sit in one pack (its commit's): try the last hit first.
        # With a pack per commit (a training run before gc) that spares a search of each pack.
        last: PackFile | None = self.__dict__.get("_last_pack")
        if last is not None and not last.gone:
            offset = last.find(key)
            if offset is not None:
                return last, offset
        for attempt in range(2 if rescan else 1):
            for pack in self._packs(refresh=attempt == 1):
                offset = pack.find(key)
                if offset is not None and not pack.gone:  # a removed one: listed again
                    self.__dict__["_last_pack"] = pack
                    return pack, offset
        return None

    def _packs(self, refresh: bool = False) -> list[PackFile]:
        """The packs of the store (their indexes mapped), rescanned on `refresh`."""
        with self._packs_lock:
            cached: dict[str, PackFile] = self.__dict__.setdefault("_pack_files", {})
            # A flag, not `not cached`: a store without packs would be rescanned on every lookup.
            if refresh or not self.__dict__.get("_packs_scanned"):
                directory = self.git_dir / "objects" / "pack"
                names = (
                    {p[: -len(".idx")] for p in os.listdir(directory) if p.endswith(".idx")}
                    if directory.is_dir()
                    else set()
                )
                replaced = {name for name in names & set(cached) if cached[name].replaced()}
                for name in (set(cached) - names) | replaced:
                    gone = cached.pop(name)
                    self.__dict__["_packs_let_go"] = self.packs_let_go() + 1
                    if self.__dict__.get("_last_pack") is gone:
                        self.__dict__.pop("_last_pack", None)
                    # Not closed: another thread may be reading it (its content is still
                    # right: objects are named by their content); its maps go with the last
                    # reference.
                if replaced:  # for dulwich's list too (release_removed_packs)
                    self.__dict__.setdefault("_replaced_packs", set()).update(replaced)
                unreadable = set()
                for name in sorted(names - set(cached)):
                    try:
                        cached[name] = _open_pack(directory / name)
                    except OSError as err:
                        if err.errno in (errno.EMFILE, errno.ENFILE):
                            raise  # not unreadable: out of descriptors, which dulwich needs too
                        unreadable.add(name)  # dulwich still reads it: has_object falls back
                    except ValueError:
                        unreadable.add(name)
                self.__dict__["_unreadable_packs"] = unreadable
                self.__dict__["_packs_scanned"] = True  # after the scan: others wait for it
            return list(cached.values())

    def packs_let_go(self) -> int:
        """How many packs this store's reader has let go of since it was opened (deleted or
        replaced on disk): an answer found while they were listed may name an object that is
        gone now, so a cache of such answers compares this count."""
        count: int = self.__dict__.get("_packs_let_go", 0)
        return count

    def release_removed_packs(self) -> None:
        """Let go of packs deleted since they were opened (a gc or repack by another process),
        so that the file system can free them: both pack lists are refreshed only on a miss,
        and a long-lived reader whose objects are all in an old pack never misses."""
        self._packs(refresh=True)
        replaced = self.__dict__.pop("_replaced_packs", set())
        if "objects" in self.__dict__:
            with self._dulwich_lock:
                # dulwich knows its packs by name too: one rewritten under its name is dropped
                # from its list here, so that the listing below opens the new file.
                known = getattr(self.objects, "_pack_cache", {})
                for name in replaced:
                    old = known.pop(name, None)
                    if old is not None:
                        old.close()
                _ = self.objects.packs  # dulwich lists the directory here, closing removed packs

    def add_blob(self, data: bytes | memoryview) -> str:
        """Store `data` as a blob; an existing identical blob costs nothing."""
        return self.write_object(b"blob", [data], *object_zlib_level(b"blob", data))

    def add_object(self, obj: ShaFile) -> str:
        """Store a dulwich object (tree, commit, tag) as a loose object."""
        return self.write_object(obj.type_name, [obj.as_raw_string()], META_ZLIB_LEVEL)

    def write_object(self, kind: bytes, parts: Sequence[Any], level: int, prefix: int = 0) -> str:
        """Write a loose object of type `kind` whose content is the concatenation of `parts`.

        Level 0 writes zlib "stored" blocks straight from `parts` (no copy, no compression:
        tensor blobs are zstd already), except that the first `prefix` bytes of the content
        (a tensor blob's JSON header) are deflated; other levels deflate it all. Objects are content-addressed,
        so two writers of one object cannot conflict, and a writer killed half-way leaves
        only a temporary file that gc removes. An object stored already, loose or in a pack, is
        freshened instead (see freshen), not written again.
        """
        views = [memoryview(p).cast("B") for p in parts]
        head = b"%s %d\0" % (kind, sum(v.nbytes for v in views))
        digest = hashlib.sha1(head)
        for view in views:
            digest.update(view)
        oid = digest.hexdigest()
        directory = self.git_dir / "objects" / oid[:2]
        path = directory / oid[2:]
        try:
            os.utime(path)  # already there: a fresh mtime keeps gc's grace period from pruning it
            return oid
        except FileNotFoundError:
            # Not loose: packed by a gc, most often (a commit's unchanged extra files, config
            # and trees), which is stored already, as git's writer finds it (has_object). Not
            # rescanned: a pack written since goes unseen, and the object is stored twice.
            found = self._find_packed(digest.digest())
            if found is not None and self._packed_copy_holds(oid, found[0]):
                return oid
        except PermissionError:
            # Another user's (read-only) file, whose date only its owner may set: it is
            # written again, as git does, and renamed over that one (same content).
            pass
        if level == 0 and prefix:
            body = zlib_tensor([memoryview(head), *views], len(head) + prefix)
        elif level == 0:
            body = zlib_stored([memoryview(head), *views])
        else:
            # Streamed a MiB at a time: a large extra file (a trainer's optimizer.pt) is neither
            # copied whole first nor held twice by zlib's growing output.
            deflate = zlib.compressobj(level)
            body = [
                deflate.compress(part[start : start + _DEFLATE_STEP])
                for part in [memoryview(head), *views]
                for start in range(0, part.nbytes, _DEFLATE_STEP)
            ]
            body.append(deflate.flush())
        shared = self.shared_perm
        for attempt in range(3):
            try:
                make_dir(directory, shared)
            except PermissionError as err:
                raise not_writable(err, directory.parent, ADDING_OBJECTS) from None
            try:
                held = self.held_writes()
                if held is None:
                    place_file(directory, path, body, shared)
                else:
                    temp = temp_file(directory, body, shared)  # removed if dropped unheld
                    held.add(temp.path, str(path))
                    temp.keep()
                break
            except FileNotFoundError:
                # git prune removes empty fan-out directories: make it again, as git's writer does.
                if attempt == 2:
                    raise
        self._count_written()
        self.__dict__.get("_loose_listings", {}).pop(oid[:2], None)  # abbrev() lists it again
        return oid

    def _count_written(self) -> None:
        for repo, count in _WRITE_COUNTS.get():
            if repo is self:
                count.add()

    def held_writes(self) -> HeldWrites | None:
        """The hold this context's writes to this Repository go into, None outside one."""
        for repo, held in _HELD_WRITES.get():
            if repo is self and held.in_force():
                return held
        return None

    def holding_writes(self) -> AbstractContextManager[HeldWrites]:
        """Keep the objects stored in this block (by this thread or the workers it starts) as
        temporary files out of the store, then rename them into place if the block ends
        without an error, or delete them if it raises: a commit refused after its tensors were
        encoded (its commit-msg hook) leaves the store as it was. Until then no reader, nor
        another writer of the same object, can see or rely on them; a process killed meanwhile
        leaves temporaries that gc removes once stale."""
        held = HeldWrites()
        manager = self._holding_writes(held)
        # The hold is in force only while this generator is suspended at its yield (in_force):
        # a weak reference, so that a block left without its exit running still ends it.
        held.owner = weakref.ref(manager.gen)
        return manager

    @contextmanager
    def _holding_writes(self, held: HeldWrites) -> Iterator[HeldWrites]:
        # Holds never nest: one found here is what a Ctrl-C left of an earlier block (it can
        # land inside the release below too), and its objects were never committed to.
        for repo, stale in _HELD_WRITES.get():
            if repo is self:
                stale.drop()
                _release_hold(stale)
        try:
            # Set inside the try, and taken back by identity rather than by token: a Ctrl-C
            # landing between the two would leave every later write of this thread held and
            # never stored, while its commits still moved their branches.
            _HELD_WRITES.set((*_HELD_WRITES.get(), (self, held)))
            try:
                yield held
            finally:
                _release_hold(held)
            for tmp, final in held.moves:  # a pack before its index, as readers find packs
                os.replace(tmp, final)
        except BaseException:
            held.drop()
            raise
        finally:
            listings = self.__dict__.get("_loose_listings", {})
            for _, final in held.moves:
                listings.pop(os.path.basename(os.path.dirname(final)), None)
            self.__dict__.pop("_abbrev_listing", None)  # abbrev() lists the packs again

    @contextmanager
    def counting_writes(self, count: WriteCount | None = None) -> Iterator[WriteCount]:
        """Add to `count` (default a new one) each object stored in this Repository until the
        block ends, by this thread or the worker threads it starts; other threads' are not."""
        count = count if count is not None else WriteCount()
        token = _WRITE_COUNTS.set((*_WRITE_COUNTS.get(), (self, count)))
        try:
            yield count
        finally:
            _WRITE_COUNTS.reset(token)

    def freshen(self, oid: str) -> None:
        """Mark `oid` as just used, as git does when a write finds the object already stored:
        touch its loose file, or its pack; a packed one that gc holds as unreachable (listed
        in UNREACHABLE_RECORD) gets a loose copy instead. gc keeps an unreachable object an
        hour past that, so a commit reusing an old abandoned object cannot lose it to a
        running gc."""
        # Another user's loose file, which only its owner may date, is written again (write_object).
        with suppress(FileNotFoundError, PermissionError):
            os.utime(f"{self._objects_dir}/{oid[:2]}/{oid[2:]}")
            return
        found = self._find_packed(bytes.fromhex(oid))
        if found is not None and self._packed_copy_holds(oid, found[0]):
            return
        obj = self.get_object(oid)
        data = obj.as_raw_string()
        self.write_object(obj.type_name, [data], *object_zlib_level(obj.type_name, data))

    def _packed_copy_holds(self, oid: str, pack: PackFile) -> bool:
        """Whether object `oid`, found in `pack`, is stored for good without a loose copy: its
        pack is still there (touched once, as git freshens a pack it reuses an object of) and
        gc does not hold it as unreachable (UNREACHABLE_RECORD), so no gc may prune it."""
        # The record first, then the pack: gc lists what it may prune until it has dropped the
        # packs that held it, so a reader that no longer sees an object listed finds its pack
        # gone, unless the object is stored for good (reachable, or unreachable only since).
        if oid in self._unreachable_packed():
            return False
        touched: set[str] = self.__dict__.setdefault("_touched_packs", set())
        try:
            if pack.pack_path in touched:
                os.stat(pack.pack_path)
            else:
                try:
                    os.utime(pack.pack_path)  # git's gc dates unreachable packed objects so
                except PermissionError:  # another user's pack: only its owner may date it
                    os.stat(pack.pack_path)
                touched.add(pack.pack_path)
        except FileNotFoundError:
            # Removed by a gc since we listed it: where the object went, if anywhere, is found
            # by listing the packs again.
            found = self._find_packed(bytes.fromhex(oid), rescan=True)
            return (
                found is not None
                and found[0] is not pack
                and self._packed_copy_holds(oid, found[0])
            )
        return True

    def _unreachable_packed(self) -> frozenset[str]:
        """The objects gc's record (UNREACHABLE_RECORD) lists, read again whenever it changes."""
        path = self.git_dir / UNREACHABLE_RECORD
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return frozenset()
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached: tuple[tuple[int, int, int], frozenset[str]] | None = self.__dict__.get(
            "_unreachable_record"
        )
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            raw = json.loads(path.read_bytes())
        except (OSError, ValueError):
            raw = {}  # gc takes an unreadable record for an empty one: nothing it may prune
        listed = frozenset(raw) if isinstance(raw, dict) else frozenset()
        self.__dict__["_unreachable_record"] = (key, listed)
        return listed

    def has_object(self, oid: str, *, loose: bool = True, rescan: bool = False) -> bool:
        """True when the store holds object `oid`, loose or packed (`loose` False: packed only;
        `rescan`: list the pack directory again first, for packs written since)."""
        if not is_object_id(oid):  # a damaged ref's value, say: no object has that name
            return False
        if loose and os.path.exists(f"{self._objects_dir}/{oid[:2]}/{oid[2:]}"):
            return True
        # Without `rescan`, packs another process wrote meanwhile are not seen: at worst an
        # object is stored twice, which git allows.
        if self._find_packed(bytes.fromhex(oid), rescan) is not None:
            return True
        # What our pack reader cannot see, dulwich reads: an alternate object store (a clone
        # made with --shared or --reference) or a pack with a version-1 index.
        if not self._has_foreign_objects():
            return False
        from dulwich.objects import ObjectID

        try:
            return self._with_dulwich(lambda store: ObjectID(oid.encode()) in store)
        except unreadable_file_errors() as err:
            unreadable = ", ".join(sorted(self.__dict__.get("_unreadable_packs", ()))) or "a pack"
            raise CorruptObjectError(
                f"{unreadable} cannot be read ({err or type(err).__name__}); "
                "run 'mintvcs fsck', and restore it from a good copy"
            ) from None

    def has_own_object(self, oid: str) -> bool:
        """True when this store's own object directory holds `oid`, loose or in one of its packs
        (listed again first), as git's `repack -l` counts an object local; one only an
        alternate holds is not."""
        if not is_object_id(oid):
            return False
        if os.path.exists(f"{self._objects_dir}/{oid[:2]}/{oid[2:]}"):
            return True
        if self._find_packed(bytes.fromhex(oid), rescan=True) is not None:
            return True
        if not self.__dict__.get("_unreadable_packs"):
            return False
        from dulwich.objects import ObjectID

        # A pack our reader cannot open (a version-1 index): dulwich's own packs, not its
        # alternates'.
        key = ObjectID(oid.encode())
        return self._with_dulwich(lambda store: any(key in pack for pack in store.packs))

    def read_borrowed(self, oid: str) -> ShaFile | None:
        """Object `oid` as an alternate object store holds it, where this store's own directory
        does not (loose, or in a pack of its last listing); else None, also where the read
        fails (get_object then says why). Neither pack directory is listed again for it, as
        has_object(rescan=True), get_object and has_own_object each did: gc asks this of every
        borrowed object, thousands in a `git clone --shared`."""
        from dulwich.objects import ObjectID

        if not is_object_id(oid) or not os.path.exists(f"{self._objects_dir}/info/alternates"):
            return None
        if os.path.exists(f"{self._objects_dir}/{oid[:2]}/{oid[2:]}"):
            return None
        if self._find_packed(bytes.fromhex(oid)) is not None:
            return None
        key = ObjectID(oid.encode())

        def lookup(store: DiskObjectStore) -> ShaFile | None:
            for alternate in store.alternates:
                with suppress(KeyError):
                    return alternate[key]  # a hit lists nothing: its packs are open
            return None

        try:
            return self._with_dulwich(lookup)
        except dulwich_damage_errors():
            return None

    def has_objects(self, oids: Sequence[str]) -> list[bool]:
        """has_object() of each of `oids` (after listing the pack directory again for one
        that is missing), the packs' indexes searched once for all of them: fsck asks of every
        entry of a revision's tree, 37k for a large MoE adapter."""
        valid = [oid for oid in oids if is_object_id(oid)]
        packed = {
            oid for oid, found in zip(valid, self._locate_packed(valid), strict=True) if found
        }
        # What no pack holds is looked for as has_object() looks: loose, foreign, packed since.
        return [
            oid in packed or self.has_object(oid) or self.has_object(oid, rescan=True)
            for oid in oids
        ]

    def _has_foreign_objects(self) -> bool:
        """True when some objects are outside our own reader's reach (alternates, unusual packs)."""
        self._packs()
        return bool(self.__dict__.get("_unreadable_packs")) or os.path.exists(
            f"{self._objects_dir}/info/alternates"
        )

    def _chain(
        self,
        blob_id: str,
        name: str,
        expect: TensorRecord | None = None,
        cache: PlaneCache | None = None,
    ) -> tuple[
        list[bytes | memoryview],
        list[codec.BlobHeader],
        tuple[codec.BlobHeader, codec.Planes] | None,
    ]:
        """The blobs of a tensor's XOR chain, tip first, their parsed headers (the tip's checked
        against `expect`), and the cached planes the walk stopped at (None: it reached the root)."""
        blobs: list[bytes | memoryview] = []
        headers: list[codec.BlobHeader] = []
        oid: str | None = blob_id
        while oid is not None:
            hit = cache.get(oid) if cache is not None else None
            if hit is not None:
                if expect is not None and not headers:
                    _check_record(expect, hit[0])
                return blobs, headers, hit
            if len(blobs) > codec.MAX_CHAIN:
                raise codec.CorruptBlobError(
                    name, f"xor chain from {blob_id} is longer than {codec.MAX_CHAIN}"
                )
            blob = self.blob_view(oid, what=f"tensor {name}")
            blobs.append(blob)
            headers.append(codec.read_header(blob, name=name))
            if expect is not None and len(headers) == 1:
                _check_record(expect, headers[0])
            oid = headers[-1].base
        return blobs, headers, None

    def tensor_bytes(self, blob_id: str, name: str, expect: TensorRecord | None = None) -> bytes:
        """Decode a tensor blob, following its XOR chain; the result's sha256 is verified.

        With `expect` (the manifest's record), the blob must hold what the record says.
        """
        blobs, headers, _ = self._chain(blob_id, name, expect)
        return codec.decode_chain(blobs, name=name, headers=headers).tobytes()

    def verify_tensor(self, record: TensorRecord, planes: PlaneCache) -> None:
        """Check a tensor as tensor_bytes does (against its record, then its sha256), over `planes`.

        `planes` holds verified tensors only: the chain is read down to the first blob whose
        planes it holds, and the tensor's planes are kept there once verified, a self-contained
        blob's too. fsck checks each history from its oldest revision, so a revision's XOR links
        find their bases there: each link is decoded once, not once per revision above it.
        """
        import numpy as np

        out = np.empty(record.end - record.start, dtype=np.uint8)
        self._tensor_into(record.blob, record.name, out, record, planes, keep_all=True)

    def verify_tensors(
        self, records: Sequence[TensorRecord], planes: PlaneCache
    ) -> list[MintError | None]:
        """verify_tensor() of each record, each one's failure in its place (None: sound).

        Packed blobs and their chains are decoded as tensors_into decodes them (the indexes
        searched once for all, small tensors merged a batch at a time), over `planes`; each
        verified tensor's planes are kept there. Other blobs take verify_tensor().
        """
        import numpy as np

        errors: list[MintError | None] = [None] * len(records)
        outs = [np.empty(record.end - record.start, dtype=np.uint8) for record in records]
        decoded: list[tuple[int, codec.BlobHeader, codec.Planes | None]] = []
        batch = codec.MergeBatch()
        located = self._locate_packed([record.blob for record in records])
        for index, (record, found) in enumerate(zip(records, located, strict=True)):
            try:
                got = None
                if found is not None:
                    got = self._decode_packed(record, outs[index], found, batch, planes, True)
                if got is None:
                    self.verify_tensor(record, planes)
                else:
                    decoded.append((index, *got))
            except MintError as err:
                errors[index] = err
        batch.flush()
        for index, header, grid in decoded:
            try:
                codec.verify_sha256(outs[index], header, name=records[index].name)
            except MintError as err:
                errors[index] = err
                continue
            if grid is not None:
                planes.put(header, grid)
        return errors

    def tensor_into(
        self,
        blob_id: str,
        name: str,
        out: npt.NDArray[np.uint8],
        expect: TensorRecord | None = None,
    ) -> None:
        """Decode a tensor blob (and its XOR chain) into `out`, a uint8 array of its size.

        With a plane_cache, the chain is read down to the first blob whose planes are cached,
        and a decoded XOR tip's planes are cached once its sha256 is verified.
        """
        self._tensor_into(blob_id, name, out, expect, self.plane_cache)

    def _tensor_into(
        self,
        blob_id: str,
        name: str,
        out: npt.NDArray[np.uint8],
        expect: TensorRecord | None,
        cache: PlaneCache | None,
        *,
        keep_all: bool = False,
    ) -> None:
        """tensor_into over `cache`; with `keep_all`, a self-contained blob's planes are kept
        too (a copy: they are views into the blob, maybe a pack's map)."""
        import numpy as np

        blobs, headers, cached = self._chain(blob_id, name, expect, cache)
        if not blobs:  # the tensor itself is cached: unchanged since a revision decoded before
            assert cached is not None
            header, planes = cached
            codec.merge_planes(list(planes.grid), header, out, name=name)
            return
        base = None
        if cached is not None:
            codec.check_base(headers[-1], cached[0], name=name)
            base = cached[1]
        tip, planes_, grid = codec.chain_planes(blobs, name=name, headers=headers, base=base)
        codec.merge_planes(planes_, tip, out, name=name)
        if cache is not None and grid is None and keep_all:
            grid = np.stack(planes_)
        if cache is not None and grid is not None:
            cache.put(tip, codec.Planes(grid, blob_id, tip.depth))

    def tensors_into(self, items: Sequence[tuple[TensorRecord, npt.NDArray[np.uint8]]]) -> None:
        """Decode many tensors, each (its manifest record, uint8 array of its size), into their arrays.

        Returns once every tensor's sha256 is verified; a failure raises naming its tensor.
        The read of a whole revision (a hot swap, a checkout): the packs' indexes are searched
        once for every blob, a packed blob and the links of its XOR chain are decoded straight
        from the pack's memory map (no gathered copy, no Adler-32 pass: each header has a
        CRC32, each zstd plane a CRC32, and the raw planes reach the sha256 unchanged), small
        tensors' planes are merged a batch at a time (codec.MergeBatch), and the sha256s are
        then computed on two threads. Other blobs (loose, anything unusual) take tensor_into().
        """
        if len(items) <= 1:
            for record, out in items:
                self.tensor_into(record.blob, record.name, out, expect=record)
            return
        # Decoded first, verified after: see _verify_all for why not side by side.
        jobs = []
        links: list[tuple[codec.BlobHeader, codec.Planes]] = []
        batch = codec.MergeBatch()
        located = self._locate_packed([record.blob for record, _ in items])
        for (record, out), found in zip(items, located, strict=True):
            decoded = None
            if found is not None:
                decoded = self._decode_packed(record, out, found, batch, self.plane_cache)
            if decoded is None:
                self.tensor_into(record.blob, record.name, out, expect=record)
                continue
            header, planes = decoded
            jobs.append((out, header, record.name))
            if planes is not None:
                links.append((header, planes))
        batch.flush()
        _verify_all(jobs)
        if self.plane_cache is not None:  # only verified planes become bases
            for header, planes in links:
                self.plane_cache.put(header, planes)

    def _locate_packed(self, blob_ids: Sequence[str]) -> list[tuple[PackFile, int] | None]:
        """Where each blob sits in the packs ((pack, offset), or None), a pack's index searched
        once for all of them; packs written since the last scan (a commit after the server
        started) are found by listing the pack directory again once, if any blob was missed."""
        keys = [bytes.fromhex(oid) for oid in blob_ids]
        located: list[tuple[PackFile, int] | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for attempt in range(2):
            for pack in self._packs(refresh=attempt == 1):
                if not missing:
                    return located
                if pack.gone:  # removed by a gc: its objects are elsewhere now
                    continue
                offsets = pack.find_many([keys[i] for i in missing])
                still = []
                for index, offset in zip(missing, offsets, strict=True):
                    if offset is None:
                        still.append(index)
                    else:
                        located[index] = (pack, offset)
                missing = still
            if not missing:
                break
        return located

    def _decode_packed(
        self,
        record: TensorRecord,
        out: npt.NDArray[np.uint8],
        found: tuple[PackFile, int],
        batch: codec.MergeBatch | None = None,
        cache: PlaneCache | None = None,
        keep_all: bool = False,
    ) -> tuple[codec.BlobHeader, codec.Planes | None] | None:
        """Decode the tensor blob at `found` (a pack and an offset) into `out` without its
        sha256 check (with `batch`, a small one only at `batch.flush()`).

        An XOR link's chain is read from the packs down to its root, or to a base whose planes
        `cache` holds. Returns the header to verify against and, with a cache, the planes of a
        link (with `keep_all`, of a self-contained blob too, copied) to cache once verified; or
        None (nothing written) when a blob of the chain is not in a pack in the form we write.
        """
        import numpy as np

        name = record.name
        links: list[tuple[codec.BlobHeader, list[bytes | memoryview]]] = []
        base = None
        pack, offset = found
        while True:
            try:
                size, head, pieces = pack.stored_layout(offset)
                mapped = pack.pack  # the same file's map, should it have been dropped meanwhile
            except NotStored:  # PackGone too: the general path finds where it went
                return None
            # Our writer deflates exactly the blob header; any other split takes the general path.
            span = codec.header_span(head)
            if span is None or len(head) < span:
                return None
            header = codec.header_of(head, size, name=name)
            if not links:
                _check_record(record, header)
            segments = located_segments(
                memoryview(mapped), head, pieces, header.payload_offset, header.segments
            )
            links.append((header, segments))
            if header.encoding != "xor" or header.base is None:
                break
            cached = cache.get(header.base) if cache is not None else None
            if cached is not None:
                codec.check_base(header, cached[0], name=name)
                base = cached[1]
                break
            if len(links) > codec.MAX_CHAIN:
                raise codec.CorruptBlobError(
                    name, f"xor chain from {record.blob} is longer than {codec.MAX_CHAIN}"
                )
            where = self._find_packed(bytes.fromhex(header.base))
            if where is None:  # loose, or in a pack written since: the general path reads it
                return None
            pack, offset = where
        if base is None and len(links) == 1 and not keep_all:  # most blobs of a revision
            codec.decode_segments(links[0][1], links[0][0], out, name=name, batch=batch)
            return links[0][0], None
        tip, planes, grid = codec.chain_segments(links, name=name, base=base)
        if keep_all and grid is None:  # views into the pack's map: the cache keeps a copy
            grid = np.stack(planes)
            planes = list(grid)
        codec.merge_into(planes, tip, out, batch=batch)
        if cache is None or grid is None:
            return tip, None
        return tip, codec.Planes(grid, record.blob, tip.depth)

    def tensor_planes(self, blob_id: str, name: str) -> codec.Planes:
        """A tensor in plane space, as the codec XORs the next revision against it."""
        blobs, headers, _ = self._chain(blob_id, name)
        return codec.decode_planes(blobs, blob_id, name=name, headers=headers)

    # --------------------------------------------------------------- revisions
    def commit_info(self, oid: str, shallow: frozenset[str] | None = None) -> CommitInfo:
        """Decode a commit object (`shallow`: shallow_commits() as read once for a whole walk,
        which would otherwise look at `.mint/shallow` once per commit)."""
        info = self._read_commit(oid)
        if info.parents and oid in (self.shallow_commits() if shallow is None else shallow):
            # A shallow clone's boundary: as git, it has no parents (they were never fetched),
            # so log, fsck and `~N` stop there instead of failing on a missing object.
            info = replace(info, parents=())
        return info

    def _read_commit(self, oid: str) -> CommitInfo:
        """A commit object decoded, its parents as it lists them (commit_info trims a shallow
        clone's boundary): read with commits.parse_plain where it is written as git writes
        it (a walk reads thousands), else parsed whole by dulwich."""
        body = self._commit_body(oid)
        plain = None if body is None else parse_plain(body)
        if plain is None:
            return self._read_whole_commit(oid)
        author, committer, message = decode_commit_texts(
            [plain.author, plain.committer, plain.message], plain.encoding
        )
        # CommitInfo(...) but for its frozen __init__, which sets each field through
        # object.__setattr__: ~4 us a commit, a tenth of a walk's time.
        info: CommitInfo = object.__new__(CommitInfo)
        info.__dict__.update(
            id=oid,
            tree=plain.tree,
            parents=plain.parents,
            author=author,
            committer=committer,
            time=plain.commit_time,
            timezone=zone_seconds(plain.commit_zone),
            message=message,
            author_time=plain.author_time,
            author_timezone=zone_seconds(plain.author_zone),
            author_zone=zone_text(plain.author_zone),
            date=plain.commit_time,  # the committer line is plain: the date git orders by
        )
        return info

    def _commit_body(self, oid: str) -> bytes | None:
        """The text of commit `oid` as our readers find it: in the pack the last lookup found
        its object in, loose (its id checked), or in another pack; None where they do not (not
        a commit, missing, damaged: get_object then says what it is)."""
        if not is_object_id(oid):
            return None
        key = bytes.fromhex(oid)
        # A walk's commits mostly lie whole in one pack: read there at once; anything else
        # (not there, deltified, the pack gone) through the general reader.
        last: PackFile | None = self.__dict__.get("_last_pack")
        offset = None if last is None or last.gone else last.find(key)
        packed = None
        if offset is not None and last is not None:
            whole = last.whole_object(offset, _COMMIT_TYPE)
            if whole is not None:
                return whole
            packed = self._read_packed_object(key, last_only=True)
        if packed is None:
            try:
                loose = self._read_loose(oid, "object")
            except MintError:
                return None
            if loose is not None:
                kind, body = loose
                if kind != b"commit":
                    return None
                return bytes(body) if _named_by(oid, kind, body) else None
            packed = self._read_packed_object(key)
        if packed is None or packed[0] != _COMMIT_TYPE:
            return None
        return bytes(packed[1])

    def _read_whole_commit(self, oid: str) -> CommitInfo:
        """A commit read through dulwich's parse (_read_commit for any commit)."""
        from dulwich.objects import Commit

        obj = self.get_object(oid, what=f"commit {oid[:12]}")
        if not isinstance(obj, Commit):
            raise UnknownRevisionError(f"{oid} is a {obj.type_name.decode()}, not a commit")
        return _commit_info(obj)

    def _commit_parents(self, oid: str) -> tuple[str, ...]:
        """_read_commit(oid).parents, without decoding the commit's texts and dates (a `~N`
        reads only the parents of each commit it passes: ~3 us a commit less)."""
        body = self._commit_body(oid)
        plain = None if body is None else parse_plain(body)
        return self._read_whole_commit(oid).parents if plain is None else plain.parents

    def _parents_of(self, oid: str, shallow: frozenset[str]) -> tuple[str, ...]:
        """A commit's parents as commit_info gives them (none at a `shallow` boundary), read
        once: a commit never changes, so the `~N` walks that the server's ref watcher resolves
        again after every move of their branch (`main~1` ... `main~K`) cost K remembered
        lookups each, not K commit reads. The most recently used _PARENTS_KEPT are kept."""
        with self._parents_lock:
            parents = self._parents.get(oid)
            if parents is not None:
                self._parents.move_to_end(oid)
        if parents is None:
            # Untrimmed: `.mint/shallow` may change (`fetch --deepen`), the commit cannot.
            parents = self._commit_parents(oid)
            with self._parents_lock:
                self._parents[oid] = parents
                while len(self._parents) > _PARENTS_KEPT:
                    self._parents.popitem(last=False)
        return () if parents and oid in shallow else parents

    def read_revision(self, commit_id: str, progress: ProgressFn | None = None) -> Revision:
        """Load a revision's manifest (tensors are decoded on demand); `progress(n)` hears of
        the tensor records read."""
        if not is_object_id(commit_id):
            raise UnknownRevisionError(
                f"{commit_id!r:.60} is not a commit id; resolve a ref or an abbreviation first "
                "(Repository.resolve)"
            )
        info, tree = self._root_of(commit_id)
        # We write UTF-8 names only; git accepts any bytes, and "replace" keeps such a tree
        # readable (its odd entries are never ours to read) instead of failing on it.
        entries = {e.path.decode("utf-8", "replace"): e.sha.decode() for e in tree.items()}
        missing = [path for path in (MANIFEST_PATH, CONFIG_PATH) if path not in entries]
        if missing:
            # Named as they are: a `git rm` in a worktree of the store may drop either one.
            raise NotAnAdapterRevision(
                f"commit {commit_id[:12]} is not an adapter revision: "
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
            )
        manifest_bytes = self.read_blob(
            entries[MANIFEST_PATH], what=MANIFEST_PATH, max_size=MAX_METADATA_BYTES
        )
        with collector_paused():  # a few objects per tensor, and a tree entry each
            manifest = Manifest.from_bytes(
                manifest_bytes, f"manifest of {commit_id[:12]}", progress
            )
            # The checks report nothing: a zero step draws a bar that came due meanwhile (a
            # third of a 37k-tensor read is in them).
            if progress:
                progress(0)
            self._check_tree(commit_id, tree, manifest)
            if progress:
                progress(0)
            self._check_header(commit_id, entries[MANIFEST_PATH], manifest)
        return Revision(self, info, manifest, entries)

    def _check_header(self, commit_id: str, manifest_blob: str, manifest: Manifest) -> None:
        """Refuse a revision whose safetensors header disagrees with its manifest (see
        Manifest.header_problem): checkout writes that header, everything else reads the manifest.

        A manifest blob names its header blob, and both are named by their content: one that
        agreed once always does, so each is checked once per Repository (a server reading a
        branch's revisions, fsck reading thousands that share a tree).
        """
        if manifest_blob in self._agreeing_manifests:
            return
        header = self.read_blob(
            manifest.header_blob, what=HEADER_PATH, max_size=MAX_HEADER_BYTES + 8
        )
        problem = manifest.header_problem(header)
        if problem is not None:
            raise CorruptObjectError(
                f"{HEADER_PATH} of {commit_id[:12]} ({manifest.header_blob[:12]}) disagrees with "
                f"the manifest: {problem}; a checkout would write other weights than diff, fsck "
                "and the server read (the revision is damaged, or was made to deceive)"
            )
        if len(self._agreeing_manifests) >= _AGREEING_MANIFESTS_KEPT:
            self._agreeing_manifests.clear()
        self._agreeing_manifests.add(manifest_blob)

    def _root_of(self, commit_id: str) -> tuple[CommitInfo, Tree]:
        """A commit and its root tree."""
        from dulwich.objects import Tree

        info = self.commit_info(commit_id)
        tree = self.get_object(info.tree, what=f"tree of {commit_id[:12]}")
        if not isinstance(tree, Tree):
            raise CorruptObjectError(f"commit {commit_id[:12]}: tree {info.tree} is not a tree")
        return info, tree

    def _check_tree(self, commit_id: str, root: Tree, manifest: Manifest) -> None:
        """Refuse a commit whose tree and manifest disagree (a `git commit` changed the tree).

        Revisions are read through the manifest, so git's change would otherwise be ignored
        without a word: checkout and the server would give the manifest's tensors while git
        shows others, and the next commit would revert it.
        """
        # The tensors tree, the largest by far (37k entries for an MoE adapter), is compared
        # whole with the bytes git writes for the manifest's records; when it differs it is
        # walked with the rest, so that each difference is named.
        whole = self._tensors_tree_is(root, manifest.tensors)
        expected = {HEADER_PATH: (manifest.header_blob, 0o100644)}
        if not whole:
            for record in manifest.tensors:
                expected[f"{TENSORS_DIR}/{record.name}"] = (record.blob, 0o100644)
        for file in manifest.files:
            expected[f"{FILES_DIR}/{file.path}"] = (
                file.blob,
                0o100755 if file.executable else 0o100644,
            )
        limit = len(expected) + 2  # the config and the manifest besides
        actual = self._tree_blobs(commit_id, root, limit, skip=TENSORS_DIR if whole else None)
        # Past the limit the walk stopped: a path it did not reach is not known to be missing.
        stopped = len(actual) > limit
        differences = []
        for path in (CONFIG_PATH, MANIFEST_PATH):
            found = actual.pop(path, None)
            # Read as a file whatever its mode; git would check out a link (120000) or see a
            # submodule (160000), not the file commit writes.
            if found is not None and found[1] != 0o100644:
                differences.append(f"{path} has mode {found[1]:o} in the tree, 100644 as written")
        if actual == expected and not differences:  # the usual case: no path is sorted
            return

        for path in sorted(expected.keys() | actual.keys()):
            want, have = expected.get(path), actual.get(path)
            if want == have or (have is None and stopped):
                continue
            name = quote_path(path)  # as git names it: `"files/\377"` for a byte not UTF-8
            if have is None:
                differences.append(f"{name} is in the manifest, not in the tree")
            elif want is None:
                differences.append(f"{name} is in the tree, not in the manifest")
            elif want[0] != have[0]:
                differences.append(
                    f"{name} is {have[0][:12]} in the tree, {want[0][:12]} in the manifest"
                )
            else:
                differences.append(
                    f"{name} has mode {have[1]:o} in the tree, {want[1]:o} in the manifest"
                )
        if differences:
            more = f" (and {len(differences) - 2} more)" if len(differences) > 2 else ""
            raise NotAnAdapterRevision(
                f"commit {commit_id[:12]} was changed with git: {'; '.join(differences[:2])}{more}. "
                "mintvcs reads a revision through its manifest and would ignore that change; make "
                "it with `mintvcs commit` instead (check out the last revision mintvcs wrote, "
                "change the adapter directory, commit)"
            )

    def _tensors_tree_is(self, root: Tree, tensors: Sequence[TensorRecord]) -> bool:
        """Whether `root`'s tensors tree holds exactly `tensors`' blobs, each a regular file named
        for its tensor: its content is the bytes git writes for those entries (read, and so
        checked to be present and sound, as the walk would)."""
        from dulwich.objects import Tree

        try:
            mode, oid = root[TENSORS_DIR.encode()]
        except KeyError:
            return False
        if not tensors or mode != stat.S_IFDIR:
            return False
        # git's order of file entries is their names' bytes; "\0" ends a name, so the whole
        # entries sort as their names do.
        body = b"".join(
            sorted(b"100644 %s\0%s" % (r.name.encode(), bytes.fromhex(r.blob)) for r in tensors)
        )
        tree = self.get_object(oid.decode(), what=f"tree {TENSORS_DIR}")
        return isinstance(tree, Tree) and tree.as_raw_string() == body

    def _tree_blobs(
        self, commit_id: str, tree: Tree, limit: int, skip: str | None = None
    ) -> dict[str, tuple[str, int]]:
        """Every blob under commit `commit_id`'s root `tree`: path -> (blob id, mode); a
        submodule counts as a blob; the root's subtree named `skip` is not walked.

        Walked without recursion, and refused below MAX_PATH_DEPTH levels (a received tree may
        nest thousands deep). It stops once it holds more than `limit` blobs: a tree may name one
        subtree under many names (two a level, 40 levels: 2**40 paths), and more blobs than the
        manifest records are a difference already.
        """
        from dulwich.objects import Tree

        blobs: dict[str, tuple[str, int]] = {}
        pending = [(tree, "", 0)]
        while pending and len(blobs) <= limit:
            tree, prefix, depth = pending.pop()
            for entry in tree.items():
                # A name that is not UTF-8 keeps its bytes (as surrogate escapes), so that two
                # such names stay two paths, and none is the name of a manifest's file (always
                # UTF-8): mintvcs never writes one, so it is a difference that git made.
                path = prefix + entry.path.decode("utf-8", "surrogateescape")
                if not stat.S_ISDIR(entry.mode):
                    blobs[path] = (entry.sha.decode(), entry.mode)
                    continue
                if depth == 0 and path == skip:
                    continue
                if depth >= MAX_PATH_DEPTH:
                    raise NotAnAdapterRevision(
                        f"commit {commit_id[:12]}: its tree nests more than {MAX_PATH_DEPTH} "
                        f"levels deep (at {path[:120]!r}…), which mintvcs never writes: an extra "
                        f"file's path has at most {MAX_PATH_DEPTH} components"
                    )
                sub = self.get_object(entry.sha.decode(), what=f"tree {path[:200]}")
                if not isinstance(sub, Tree):
                    raise CorruptObjectError(f"{path[:200]}: {entry.sha.decode()} is not a tree")
                pending.append((sub, path + "/", depth + 1))
        return blobs

    def revision_meta(self, commit_id: str, tree_id: str | None = None) -> dict[str, str] | None:
        """A revision's `--meta` strings, read without parsing its tensor records (log --json);
        None for a commit that is no adapter revision (one made with git, its tree holding no
        manifest), which a history may hold as git allows. `tree_id`: the commit's tree, where
        the caller has read the commit (log's walk), so that it is not read again."""
        from dulwich.objects import Tree

        if tree_id is None:
            tree_id = self.commit_info(commit_id).tree
        # Consecutive commits often share a tree (--allow-empty evaluations, a run's restarts):
        # the last one's meta is kept, a copy given out.
        last = self._last_meta
        if last is not None and last[0] == tree_id:
            return None if last[1] is None else dict(last[1])
        tree = self.get_object(tree_id, what=f"tree of {commit_id[:12]}")
        if not isinstance(tree, Tree):
            raise CorruptObjectError(f"commit {commit_id[:12]}: tree {tree_id} is not a tree")
        try:
            _, blob = tree[MANIFEST_PATH.encode()]
        except KeyError:
            meta = None
        else:
            manifest = self.read_blob(
                blob.decode(), what=MANIFEST_PATH, max_size=MAX_METADATA_BYTES
            )
            meta = Manifest.meta_from_bytes(manifest, f"manifest of {commit_id[:12]}")
        self._last_meta = (tree_id, meta)
        return None if meta is None else dict(meta)

    def write_revision(
        self,
        adapter: AdapterFiles,
        parent: Revision | None,
        meta: dict[str, str] | None = None,
        progress: ProgressFn | None = None,
        *,
        check_finite: bool = False,
    ) -> tuple[str, Manifest]:
        """Store an adapter's blobs and tree; returns the tree id and the manifest.

        With `check_finite`, a float tensor holding NaN or Inf raises codec.NonFiniteTensorError
        (the first such tensor in file order) before the tree is written.
        """
        # Refused before anything is written: the manifest stores metadata as strings.
        for key, value in (meta or {}).items():
            if not (isinstance(key, str) and key.strip() and isinstance(value, str)):
                raise MintError(
                    f"metadata {key!r:.40}: {value!r:.40} is not a non-empty string key with a "
                    "string value; convert values with str() (for example meta={'step': str(step)})"
                )
            # What `--meta KEY=VALUE` cannot give, so that a script reads back what the CLI
            # could have written: a key with '=' or spaces around it (the CLI splits at the
            # first '=' and strips the key), a NUL (as a commit message refuses one).
            if "=" in key or key != key.strip() or "\x00" in key + value:
                raise MintError(
                    f"metadata {key!a:.60}: a key holds no '=' nor spaces around it, and no "
                    "key or value a NUL character (what `--meta KEY=VALUE` can give)"
                )
            # JSON would store a lone surrogate (or a byte of argv that is not UTF-8, which
            # Python passes on as one) as an escape other readers take for U+FFFD.
            for part, text in (("key", key), ("value", value)):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise MintError(
                        f"metadata {key!a:.60}: its {part} is not valid UTF-8 text (bytes that "
                        "are not UTF-8, or a lone surrogate); give it in UTF-8"
                    ) from None
        # What a reader refuses (MAX_METADATA_BYTES) is refused here: a revision that could
        # not be read back would pass for a damaged one.
        _check_metadata_size(CONFIG_PATH, len(adapter.config_bytes))
        # A manifest is ~200 bytes per tensor beside the names and metadata the header holds.
        _check_metadata_size(
            MANIFEST_PATH,
            len(adapter.layout.header)
            + 200 * len(adapter.layout.tensors)
            + sum(len(k) + len(v) for k, v in (meta or {}).items()),
        )
        tensors = adapter.layout.tensors
        prior_of = {t.name: t for t in parent.manifest.tensors} if parent else {}
        refused: dict[int, int] = {}
        # As git's unpackLimit: a few objects go loose, many go into one pack.
        pack = None
        known: dict[int, str] = {}  # index -> sha256 of tensors that may be unchanged
        if len(tensors) >= PACK_THRESHOLD:
            # The pack's trailing SHA-1 starts with its object count: knowing it up front
            # lets the writer hash entries as they are appended instead of reading the pack
            # back. Only tensors with a same-shaped prior can be unchanged: hash those first.
            # In a fresh process (no numpy yet) every tensor is hashed while numpy imports.
            fresh = "numpy" not in sys.modules or "zstandard" not in sys.modules
            maybe = [
                i
                for i, t in enumerate(tensors)
                if fresh
                or (
                    (p := prior_of.get(t.name)) is not None
                    and (p.dtype, p.shape) == (t.dtype, t.shape)
                )
            ]
            known = _sha256_while_importing(adapter, maybe)
            unchanged = sum(
                (p := prior_of.get(tensors[i].name)) is not None
                and (p.sha256, p.dtype, p.shape) == (d, tensors[i].dtype, tensors[i].shape)
                for i, d in known.items()
            )
            pack = PackWriter(self, expected=len(tensors) - unchanged)

        def encode(index: int) -> TensorRecord:
            entry = tensors[index]
            raw = adapter.tensor_bytes(index)
            digest = known.get(index) or hashlib.sha256(raw).hexdigest()
            prior = prior_of.get(entry.name)
            if prior and (prior.sha256, prior.dtype, prior.shape) == (
                digest,
                entry.dtype,
                entry.shape,
            ):
                if check_finite and codec.nonfinite_count(raw, entry.dtype):
                    refused[index] = codec.nonfinite_count(raw, entry.dtype)
                blob_id, encoding, depth = prior.blob, prior.encoding, prior.depth
            else:
                base = None
                if (
                    prior
                    and (prior.dtype, prior.shape) == (entry.dtype, entry.shape)
                    and prior.depth < codec.MAX_CHAIN
                ):
                    base = self.tensor_planes(prior.blob, entry.name)
                # The planes are built in this thread's reused buffers: the blob is written
                # below, before the thread encodes its next tensor.
                encoded = codec.encode_parts(
                    raw, entry.dtype, entry.shape, base=base, sha256=digest, reuse=True
                )
                if check_finite and encoded.nonfinite:
                    refused[index] = encoded.nonfinite
                # Written even when refused: a commit holds its writes (holding_writes) and
                # drops them then; another caller's unreferenced blob gc prunes.
                blob_id = (pack.add if pack else self.write_object)(
                    b"blob", encoded.parts, TENSOR_ZLIB_LEVEL, encoded.header.payload_offset
                )
                encoding, depth = encoded.header.encoding, encoded.header.depth
            if progress:
                progress(entry.nbytes)
            return TensorRecord(
                entry.name,
                entry.dtype,
                entry.shape,
                entry.start,
                entry.end,
                blob_id,
                digest,
                encoding,
                depth,
            )

        try:
            records = tuple(
                _parallel(
                    encode, range(len(tensors)), key=lambda i: tensors[i].start - tensors[i].end
                )
            )
        except BaseException:
            # A write that failed (a full disk) may have left an entry half written: the pack
            # must never be installed then.
            if pack:
                pack.abort()
            raise
        # Sealed even when refused: a commit's hold drops it then; else gc drops its blobs.
        if pack:
            pack.finish()
            self.__dict__.pop("_abbrev_listing", None)  # abbrev() lists the packs again
        if refused:
            first = min(refused)
            raise codec.NonFiniteTensorError(tensors[first].name, refused[first])
        base = self.base
        for path in adapter.extra_files:  # the work tree's reader refuses them: its backstop
            reason = unsafe_path_reason(path)
            if reason is not None:
                raise MintError(f"{quote_path(path)}: this file name cannot be stored ({reason})")
        refuse_colliding_paths(adapter.extra_files)
        files = tuple(
            FileRecord(path, self.add_blob(content), executable)
            for path, (content, executable) in sorted(adapter.extra_files.items())
        )
        manifest = Manifest(
            base.model_id if base else None,
            base.fingerprint if base else None,
            self.add_blob(adapter.layout.header),
            records,
            files,
            dict(meta or {}),
        )
        manifest_bytes = manifest.to_bytes()
        _check_metadata_size(MANIFEST_PATH, len(manifest_bytes))  # the estimate's backstop
        entries: list[tuple[str, str, int]] = [
            (CONFIG_PATH, self.add_blob(adapter.config_bytes), 0o100644),
            (MANIFEST_PATH, self.add_blob(manifest_bytes), 0o100644),
            (HEADER_PATH, manifest.header_blob, 0o100644),
        ]
        entries += [(f"{TENSORS_DIR}/{r.name}", r.blob, 0o100644) for r in records]
        entries += [
            (f"{FILES_DIR}/{f.path}", f.blob, 0o100755 if f.executable else 0o100644) for f in files
        ]
        return self.write_tree(entries), manifest

    def write_tree(self, entries: Sequence[tuple[str, str, int]]) -> str:
        """Write the trees holding `entries` (path, blob id, mode); returns the root tree id.

        Serialized here rather than through dulwich, whose import alone is ~40 ms of a commit.
        """
        root: dict[str, Any] = {}
        for path, oid, mode in entries:
            *dirs, leaf = path.split("/")
            node = root
            for name in dirs:
                node = node.setdefault(name, {})
            node[leaf] = (oid, mode)
        return self._write_tree_node(root)

    def _write_tree_node(self, node: dict[str, Any]) -> str:
        """Write one tree (its subtrees first) in git's order: a subtree sorts as `name/`."""
        rows: list[tuple[bytes, bytes]] = []
        for name, value in node.items():
            key = name.encode()
            if isinstance(value, dict):
                rows.append(
                    (
                        key + b"/",
                        b"40000 %s\0%s" % (key, bytes.fromhex(self._write_tree_node(value))),
                    )
                )
            else:
                oid, mode = value
                rows.append((key, b"%o %s\0%s" % (mode, key, bytes.fromhex(oid))))
        rows.sort(key=lambda row: row[0])
        return self.write_object(b"tree", [b"".join(row[1] for row in rows)], META_ZLIB_LEVEL)

    def write_commit(
        self, tree: str, parents: list[str], message: str, author: str, committer: str
    ) -> str:
        """Write a commit object as git serializes it; `author`/`committer` are `Name <email> seconds +HHMM`."""
        from mintvcs.messages import check_message

        check_message(message, "commit")  # what porcelain.commit checked before encoding
        lines = [f"tree {tree}", *(f"parent {p}" for p in parents)]
        lines += [f"author {author}", f"committer {committer}", "", message]
        return self.write_object(b"commit", ["\n".join(lines).encode()], META_ZLIB_LEVEL)

    def walk(self, start: str, limit: int | None = None) -> Iterator[CommitInfo]:
        """Commits from `start` along first parents, newest first."""
        oid: str | None = start
        count = 0
        shallow = self.shallow_commits()
        while oid is not None and (limit is None or count < limit):
            info = self.commit_info(oid, shallow)
            yield info
            count += 1
            oid = info.parents[0] if info.parents else None

    # ------------------------------------------------------------------- refs
    def head_commit(self) -> str | None:
        """The commit HEAD points to, or None on an unborn branch."""
        return self.refs.read("HEAD")

    def linked_worktrees(self) -> list[LinkedWorktree]:
        """git's linked worktrees of this store (`git worktree add`), by name."""
        found = []
        for admin in sorted(p for p in (self.git_dir / "worktrees").glob("*") if p.is_dir()):
            head, gitdir = (_text_or_empty(admin / name).strip() for name in ("HEAD", "gitdir"))
            found.append(LinkedWorktree(admin, head, gitdir.removesuffix("/.git") or admin.name))
        return found

    def current_branch(self) -> str | None:
        """The short name of the checked-out branch, or None when HEAD is detached."""
        target = self.refs.read_symbolic("HEAD")
        return target.removeprefix("refs/heads/") if target else None

    def resolve(self, spec: str, *, commit_info: Callable[[str], CommitInfo] | None = None) -> str:
        """Resolve a branch, tag, (abbreviated) commit id, HEAD, with `~N`/`^N` suffixes, to a
        commit id; `commit_info` reads the commits the steps pass (log keeps them, as git's)."""
        name, suffix = _checked_spec(spec)
        base, at, selector = name.partition("@{")
        oid = self._resolve_reflog(base, selector, spec) if at else self._resolve_name(name, spec)
        steps = _STEP.findall(suffix)
        shallow = self.shallow_commits() if steps and commit_info is None else frozenset()

        def parents_of(oid: str) -> tuple[str, ...]:
            return (
                self._parents_of(oid, shallow) if commit_info is None else commit_info(oid).parents
            )

        for step in steps:
            if step.startswith("^{"):
                continue  # `^{}` / `^{commit}`: peel to a commit, which every step already did
            count = int(step[1:]) if len(step) > 1 else 1
            if step[0] == "~":
                for _ in range(count):
                    parents = parents_of(oid)
                    if not parents:
                        raise UnknownRevisionError(f"revision '{spec}' goes past the first commit")
                    oid = parents[0]
            elif count:  # `^0` is the commit itself: nothing to read
                parents = parents_of(oid)
                if count > len(parents):
                    raise UnknownRevisionError(
                        f"revision '{spec}': commit {oid[:12]} has no parent {count}"
                    )
                oid = parents[count - 1]
        return oid

    def resolve_object(self, spec: str) -> str:
        """The object `spec` names, as git's rev-parse reads it: an annotated tag's name (or its
        tag object's id) gives the tag object, not its commit; any other spec as `resolve`."""
        name, suffix = _checked_spec(spec)
        if suffix or "@{" in name:  # `~N`, `^{}`, a reflog entry: a commit
            return self.resolve(spec)
        return self._resolve_name(name, spec, peel=False)

    def _resolve_reflog(self, base: str, selector: str, spec: str) -> str:
        """`NAME@{N}`: NAME's value N moves ago (its reflog); `@{-N}`: the branch checked out before the last N switches."""
        chosen = _SELECTOR.match(selector)
        if chosen is None or chosen["count"] == "-0":
            raise UnknownRevisionError(
                f"revision '{spec}': only @{{N}} and @{{-N}} reflog selectors are supported"
            )
        count = int(chosen["count"])
        if count < 0:
            if base:
                raise UnknownRevisionError(f"revision '{spec}': @{{-N}} takes no name before it")
            return self.resolve(self._previous_checkout(-count, spec))
        if base in ("", "@"):  # git: the current branch's reflog (HEAD's when detached)
            ref = self.refs.read_symbolic("HEAD") or "HEAD"
        else:
            existing = [r for r in ref_candidates(base) if self._ref_exists(r)]
            if not existing:
                raise UnknownRevisionError(f"unknown revision '{spec}': no ref named '{base}'")
            # As git's: the first of them with a reflog file, even an emptied one (a tag of a
            # branch's name has none); a symbolic ref without one reads its target's.
            logged = (self.refs.reflog_of(r) for r in existing)
            found = next((r for r in logged if r is not None), None)
            if found is None:
                raise UnknownRevisionError(f"revision '{spec}': {existing[0]} has no reflog")
            ref = found
        entries = self.refs.reflog(ref)
        zero = "0" * 40
        if count == 0:
            # git: the newest entry's new value; with an empty reflog, the ref's current value.
            oid = entries[-1].new if entries else self.refs.read(ref)
            if oid is None or oid == zero:
                raise UnknownRevisionError(f"revision '{spec}': {ref} does not point to a commit")
            return self.peel(oid)
        # As git's read_ref_at: the value before the count-th newest move, i.e. that entry's old
        # id, or when it is zero (the ref was created there) the next older entry's. So
        # NAME@{N} with N entries is the oldest entry's old id when the ref existed before it.
        for entry in reversed(entries[: max(0, len(entries) - count + 1)]):
            if entry.old != zero:
                return self.peel(entry.old)
        raise UnknownRevisionError(
            f"revision '{spec}': the reflog of {ref} has only {len(entries)} entries"
        )

    def _previous_checkout(self, count: int, spec: str) -> str:
        """The branch name or commit id HEAD was moved from `count` checkouts ago (`@{-count}`)."""
        moves = [_PREVIOUS_CHECKOUT.match(e.message) for e in self.refs.reflog("HEAD")]
        # Only what a checkout can move from: a branch or a commit id. A hand-made line
        # naming `@{-1}` would otherwise send this lookup round in circles.
        previous = [m["name"] for m in reversed(moves) if m is not None and "@{" not in m["name"]]
        if len(previous) < count:
            raise UnknownRevisionError(
                f"revision '{spec}': only {len(previous)} checkout(s) in HEAD's reflog"
            )
        return previous[count - 1]

    def expand_previous(self, spec: str) -> str:
        """`spec` with a leading `@{-N}` replaced by the branch name or commit id it stands for,
        as git's checkout reads it (so `@{-1}` switches back to that branch); else `spec`."""
        found = _PREVIOUS_SPEC.match(spec)
        if found is None or int(found["count"]) == 0:
            return spec
        return self._previous_checkout(int(found["count"]), spec) + spec[found.end() :]

    def _ref_exists(self, ref: str) -> bool:
        try:
            return self._read_candidate(ref) is not None
        except InvalidRefNameError:
            return False

    def _read_candidate(self, ref: str) -> str | None:
        """`refs.read(ref)`, but a file of the git directory that holds no ref (COMMIT_EDITMSG)
        is no ref, as git skips it and tries the next reading of the name."""
        try:
            return self.refs.read(ref)
        except RefUnreadableError:
            raise  # not what it holds: the system's refusal, for its owner to fix
        except RefFormatError:
            if ref.startswith("refs/") or ref == "HEAD":
                raise
            return None

    def _resolve_name(self, name: str, spec: str, *, peel: bool = True) -> str:
        """Resolve the part of a spec before any `~`/`^` suffix (to the commit, unless not `peel`)."""
        # As git's get_oid_basic: 40 hex digits name that object, whatever ref has that name
        # (refs_named_by_id warns of one). Else a branch named by a commit's id would redirect
        # everything pinned to that commit, a server's requests included.
        for ref in [] if is_full_hex(name) else ref_candidates(name):
            try:
                oid = self._read_candidate(ref)
            except InvalidRefNameError:
                oid = None  # `name` cannot be this kind of ref: try the next reading
            if oid is not None and not peel:
                return oid
            if oid is not None:
                with self._parents_lock:
                    known = oid in self._parents  # a commit a walk read: no tag to peel
                return oid if known else self.peel(oid)
        # No ref of that name, or no repository any more: only the second is not the client's
        # answer (one stat, on this miss path only).
        self.check_present()
        if name in ("HEAD", "@"):
            raise UnknownRevisionError("HEAD does not point to a commit yet: make a first commit")
        if _HEX.match(name):
            hex_id = name.lower()
            matches = sorted(self._ids_with_prefix(hex_id) if len(hex_id) < 40 else {hex_id})
            commits = [o for o in matches if self._is_commit_or_tag(o)]
            if len(commits) == 1:
                return self.peel(commits[0]) if peel else commits[0]
            if len(commits) > 1:
                raise UnknownRevisionError(
                    f"revision '{name}' is ambiguous: {', '.join(c[:12] for c in commits[:5])}; give more digits"
                )
            if len(hex_id) == 40:  # as the server's load path says it: the id cannot be a typo
                kind = self._kind_if_held(hex_id)
                if kind is not None:  # as git: the object is there, of another type
                    raise UnknownRevisionError(
                        f"unknown revision '{spec}': {hex_id} is a {kind}, not a commit"
                    )
                raise UnknownRevisionError(
                    f"unknown revision '{spec}': no commit of that id in the repository (never "
                    "committed there, or pruned since)"
                )
        raise UnknownRevisionError(f"unknown revision '{spec}': not a branch, tag or commit id")

    def _kind_if_held(self, oid: str) -> str | None:
        """The type of object `oid` when the store holds it (None when it does not)."""
        kind = self.object_kind(oid)
        if kind is not None or not self.has_object(oid, rescan=True):
            return kind
        try:  # held where headers alone cannot tell (a borrowed store): read it
            return self.get_object(oid).type_name.decode()
        except (UnreadableObjectError, CorruptObjectError):
            return None

    def check_present(self) -> None:
        """Raise RepositoryGoneError when the store's objects directory is gone or unreadable
        (the repository moved, deleted or unmounted since it was opened): else a missing ref or
        object would read as the answer "no such ref"."""
        try:
            ok = stat.S_ISDIR(os.stat(self._objects_dir).st_mode)
            reason = "its objects directory is not a directory"
        except OSError as err:
            ok, reason = False, err.strerror or type(err).__name__
        if not ok:
            raise RepositoryGoneError(
                f"the repository {self.git_dir} is gone or unreadable ({reason}): was it "
                "moved, deleted or unmounted?"
            )

    def _ids_with_prefix(self, prefix: str) -> set[str]:
        """The ids of the objects whose hex id starts with `prefix`."""
        from dulwich.pack import PackFileDisappeared

        if not self._has_foreign_objects():
            # Loose, then packed (a gc packs an object before it deletes its loose file): our
            # reader's indexes, where dulwich would open every pack and keep it open.
            found = {
                prefix[:2] + name
                for name in _loose_names([f"{self._objects_dir}/{prefix[:2]}"])
                if name.startswith(prefix[2:])
            }
            for pack in self._packs(refresh=True):
                found.update(pack.with_prefix(prefix))
            if not self._has_foreign_objects():  # no pack ours cannot read turned up meanwhile
                return found

        def matching(store: DiskObjectStore) -> set[str]:
            try:
                return {o.decode() for o in store.iter_prefix(prefix.encode())}
            finally:
                store.close()  # it opened every pack: they stay closed until needed again

        for attempt in range(_PREFIX_ATTEMPTS):
            try:
                return self._with_dulwich(matching)
            except PackFileDisappeared:
                pass
            # Another process's gc removed a pack dulwich had listed; a gc removes its old
            # packs one by one, so the next walks may meet the next one: a few, a moment apart.
            time.sleep(0.01 * (attempt + 1))
        raise StoreBusyError(
            f"the store's packs kept changing while looking up ids starting '{prefix}' (a gc "
            "in another process?); try again"
        )

    @cached_property
    def config_with_user(self) -> Any:
        """The repository's config over the user's global and system files: how git reads a
        key a user sets once for every repository (core.abbrev, advice.*, core.commentChar)."""
        from dulwich.config import StackedConfig

        from mintvcs.gitconfig import user_configs

        return StackedConfig([self.config, *user_configs(self.git_dir)])

    @cached_property
    def abbrev_setting(self) -> int | None:
        """core.abbrev as git reads it: the digits an id is shortened to at least (40: ids are
        printed whole, as `no` or `false` ask), or None for `auto` or no setting (git's length
        for the store's size); BadConfigError for a value git refuses."""
        from mintvcs.gitconfig import BadConfigError

        try:
            raw = self.config_with_user.get((b"core",), b"abbrev")
        except KeyError:
            return None
        text = "true" if raw is None else raw.decode(errors="replace")  # a key with no `=`
        if text.lower() == "auto":
            return None
        if text.lower() in ("false", "no", "off", ""):
            return 40
        value = _git_int(text)
        if value is None or not _ABBREV_MIN <= value <= 40:
            raise BadConfigError(
                f"core.abbrev is {text!r:.40} in your git config: git takes `auto`, `no` or a "
                f"number of digits from {_ABBREV_MIN} to 40 (and refuses this one too); fix it"
            )
        return value

    def abbrev_length(self) -> int:
        """The digits `abbrev` starts from: core.abbrev, else git's length for the store's size
        (7; 8 from 2^14 packed objects, 9 from 2^16, one more each time they quadruple: git's
        repo_approximate_object_count counts the objects the packs' indexes list, not loose ones)."""
        setting = self.abbrev_setting
        return setting if setting is not None else self._abbrev_state().auto_length

    def abbrev(self, oid: str) -> str:
        """`oid` shortened as git prints it (find_unique_abbrev): to `abbrev_length()` digits,
        more while another object of the store (of any type) shares them, so that the id
        printed can be typed back."""
        return self.abbrev_many([oid])[oid]

    def abbrev_many(self, oids: Sequence[str]) -> dict[str, str]:
        """`abbrev` of each of `oids` (id -> short id), the packs' indexes searched once for all
        of them when there are many (a page of `log --oneline`)."""
        length = self.abbrev_length()
        if length >= 40:
            return {oid: oid for oid in oids}
        state = self._abbrev_state()
        wanted = [oid for oid in dict.fromkeys(oids) if is_object_id(oid)]
        keys = [bytes.fromhex(oid) for oid in wanted]
        shared = self._loose_shared_digits(wanted, state.stores)
        # A search per id and pack in Python costs ~10 us; numpy's search of a pack for all the
        # ids costs its import first (~0.1 s), unless something imported it already.
        searches = len(keys) * len(state.packs)
        if len(keys) >= 64 and (searches >= _ABBREV_VECTORIZED or "numpy" in sys.modules):
            found = shared_digits_many(state.packs, keys)
            shared = [max(a, b) for a, b in zip(shared, found, strict=True)]
        else:
            for pack in state.packs:
                found = [pack.shared_digits(key) for key in keys]
                shared = [max(a, b) for a, b in zip(shared, found, strict=True)]
        if state.foreign:  # objects only dulwich reads (packs ours cannot): ask it
            for i, (oid, key) in enumerate(zip(wanted, keys, strict=True)):
                try:
                    others = self._ids_with_prefix(oid[:length]) - {oid}
                except (OSError, ValueError, struct.error, MintError):
                    # A pack index dulwich cannot read either (truncated, say): an id is only
                    # printed here, and the command that reads that pack names the damage.
                    continue
                for other in others:
                    shared[i] = max(shared[i], shared_hex_digits(key, bytes.fromhex(other)))
        short = {oid: oid for oid in oids}  # what is not an object id stays as it is
        for oid, digits in zip(wanted, shared, strict=True):
            short[oid] = oid[: max(length, min(digits + 1, 40))]
        return short

    def _abbrev_state(self) -> _AbbrevState:
        """The packs of the store and of its alternates, and git's automatic abbreviation length
        for them, listed again when a pack directory or an alternates file changed (checked at
        most every _ABBREV_TRUST_S)."""
        listing: _Listing[_AbbrevState] | None = self.__dict__.get("_abbrev_listing")
        if listing is None:
            listing = self.__dict__["_abbrev_listing"] = _Listing(
                self._abbrev_paths, self._list_packs_for_abbrev
            )
        return listing.get()

    def _abbrev_paths(self) -> list[str]:
        """What _abbrev_state's listing is made from: each object store's pack directory and
        alternates file, ours and those it borrows from."""
        stores = [self._objects_dir, *map(str, self._alternate_stores())]
        return [path for store in stores for path in (f"{store}/pack", f"{store}/info/alternates")]

    def _list_packs_for_abbrev(self) -> _AbbrevState:
        """_abbrev_state's listing: the packs, and git's length for the objects they hold."""
        stores = self._alternate_stores()
        packs = self._packs(refresh=True)
        borrowed, unread = self._alternate_packs(stores)
        own = Path(self._objects_dir) / "pack"
        unread += [own / name for name in self.__dict__.get("_unreadable_packs", ())]
        # git counts every pack whose index and pack it can open, its alternates' too.
        count = sum(p.count for p in [*packs, *borrowed]) + sum(
            _idx_object_count(Path(f"{base}.idx"))
            for base in unread
            if Path(f"{base}.pack").is_file()
        )
        # git's find_unique_abbrev_r: ~2^bits objects expect a collision at 2^(bits/2), and a
        # hex digit holds 4 bits (git's msb() is bit_length() - 1).
        auto = max(_ABBREV_DEFAULT, -(-count.bit_length() // 2))
        return _AbbrevState(
            [*packs, *borrowed], auto, bool(unread), (self._objects_dir, *map(str, stores))
        )

    def _alternate_packs(self, stores: Sequence[Path]) -> tuple[list[PackFile], list[Path]]:
        """The packs of the alternate object stores `stores`, opened by our reader (kept open
        from one listing to the next), and where those it cannot open are (a version-1 index)."""
        with self._packs_lock:
            cached: dict[str, PackFile] = self.__dict__.setdefault("_alternate_pack_files", {})
            packs, unread, listed = [], [], set()
            for store in stores:
                try:
                    names = sorted(
                        n[: -len(".idx")] for n in os.listdir(store / "pack") if n.endswith(".idx")
                    )
                except OSError:
                    continue
                for name in names:
                    base = store / "pack" / name
                    listed.add(str(base))
                    pack = cached.get(str(base))
                    if pack is None:
                        try:
                            pack = cached[str(base)] = PackFile(base)
                        except (OSError, ValueError):
                            unread.append(base)  # dulwich reads it: abbrev asks dulwich
                            continue
                    packs.append(pack)
            for gone in set(cached) - listed:
                # Not closed: another thread may be searching it; its maps go with it.
                cached.pop(gone)
            return packs, unread

    def _alternate_stores(self) -> list[Path]:
        """The object directories `objects/info/alternates` lists, and those their own files
        list, as git reads them (read_alternates)."""
        return read_alternates(self._objects_dir).stores

    def _loose_shared_digits(self, oids: Sequence[str], stores: tuple[str, ...]) -> list[int]:
        """For each of `oids`, the most leading hex digits a loose object other than it shares
        with it, in object stores `stores` (ours, then our alternates): its neighbours in a
        sorted listing of their fan-out directories, listed again when one of them changed
        (checked at most every _ABBREV_TRUST_S); each listing looked at once for all `oids`."""
        listings: dict[str, tuple[tuple[str, ...], _Listing[list[str]]]] = self.__dict__.setdefault(
            "_loose_listings", {}
        )
        names_of: dict[str, list[str]] = {}
        shared = []
        for oid in oids:
            fan_out = oid[:2]
            names = names_of.get(fan_out)
            if names is None:
                names = names_of[fan_out] = self._loose_listing(listings, fan_out, stores)
            # A packed store's fan-out directories are empty: nothing to compare (~3 us an id).
            shared.append(self._loose_neighbours(names, oid[2:]) if names else 0)
        return shared

    @staticmethod
    def _loose_listing(
        listings: dict[str, tuple[tuple[str, ...], _Listing[list[str]]]],
        fan_out: str,
        stores: tuple[str, ...],
    ) -> list[str]:
        """The sorted names (less the fan-out's digits) of the loose objects of `fan_out` in
        `stores`, as `listings` keeps them."""
        known = listings.get(fan_out)
        if known is None or (known[0] is not stores and known[0] != stores):
            directories = [f"{store}/{fan_out}" for store in stores]
            known = listings[fan_out] = (
                stores,
                _Listing(lambda: directories, lambda: _loose_names(directories)),
            )
        return known[1].get()

    @staticmethod
    def _loose_neighbours(names: list[str], rest: str) -> int:
        """The most leading hex digits (with the fan-out's two) an entry of `names` other than
        `rest` shares with it: its neighbours where it sorts."""
        at = bisect.bisect_left(names, rest)
        after = at + 1 if at < len(names) and names[at] == rest else at
        shared = 0
        for position in (at - 1, after):
            if 0 <= position < len(names):
                other = bytes.fromhex(names[position])
                shared = max(shared, 2 + shared_hex_digits(other, bytes.fromhex(rest)))
        return shared

    def ambiguity(self, spec: str) -> NameAmbiguity | None:
        """What else a spec's name means besides what `resolve` takes, as git's get_oid_basic
        warns of it: refs of a name of 40 hex digits (the object wins), several refs of one
        name (a tag and a branch: the first wins), or a ref and the one object whose id the
        name abbreviates (the ref wins); else None. The refs are read once for all three."""
        parts = _split_spec(spec)
        if parts is None:
            return None
        name = parts[0]
        if name in ("", "HEAD", "@") or name.startswith("refs/"):
            return None
        refs = []
        for ref in ref_candidates(name):
            try:
                if self._read_candidate(ref) is not None:
                    refs.append(ref)
            except InvalidRefNameError:
                continue  # `name` cannot be this kind of ref
            except MintError:
                return None  # resolving it reports the ref at fault
        if not refs:
            return None
        if is_full_hex(name):
            return NameAmbiguity(name, refs, name.lower())
        if len(refs) > 1:
            return NameAmbiguity(name, refs, None)
        if _HEX.match(name) is None:
            return None
        # As git's get_short_oid with no type asked for: any object, one only.
        matches = self._ids_with_prefix(name.lower())
        return NameAmbiguity(name, refs, next(iter(matches))) if len(matches) == 1 else None

    def _open_loose(self, oid: str, what: str) -> int | None:
        """A descriptor of loose object `oid`'s file, None when it is not loose; CorruptObjectError
        when the name is taken by something that is not a regular file."""
        try:
            # Never through a link: a received repository's "object" could be /dev/zero.
            # Non-blocking: opening a FIFO planted there would wait for a writer for ever.
            fd = os.open(
                f"{self._objects_dir}/{oid[:2]}/{oid[2:]}",
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
            )
        except FileNotFoundError:
            return None
        except OSError as err:
            if isinstance(err, PermissionError):  # not damage: another user's file
                raise UnreadableObjectError(
                    f"{what}: object {oid}: {cannot_read(err.filename, err)}"
                ) from None
            raise CorruptObjectError(
                f"{what}: object {oid} cannot be read ({err.strerror}: a symlink?); run 'mintvcs fsck'"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptObjectError(
                f"{what}: object {oid} is not a regular file; run 'mintvcs fsck'"
            )
        return fd

    def _is_commit_or_tag(self, oid: str) -> bool:
        """Whether `oid` is a commit or tag, told from its header: a prefix shared with a
        tensor blob of hundreds of MB must not inflate that blob to learn it is one."""
        kind = self.object_kind(oid)
        if kind is not None:
            return kind in ("commit", "tag")
        try:
            return self.get_object(oid).type_name in (b"commit", b"tag")
        except UnreadableObjectError:
            raise  # it may well be a commit: say why it cannot be told
        except CorruptObjectError:
            return False

    def object_kind(self, oid: str) -> str | None:
        """The type of object `oid` ("commit", "tag", ...) from headers alone (a delta's base's
        for a deltified entry), or None when they cannot tell (a borrowed store, a damaged
        object): then read it.

        A ref listing asks this of every tag: a lightweight tag names a commit, and inflating
        10,000 commits to learn so took most of a second.
        """
        if not is_object_id(oid):
            return None
        key = bytes.fromhex(oid)
        # REF_DELTA bases followed across packs, each pack's OFS_DELTA chain in it, as far.
        for _ in range(MAX_DELTA_HOPS):
            found = self._find_packed(key)
            if found is None:
                break  # loose, or its REF_DELTA base is
            kind = found[0].whole_kind_at(found[1])
            if not isinstance(kind, bytes):
                return kind
            key = kind  # a REF_DELTA: its base may be in another pack (or loose)
        else:
            return None
        oid = key.hex()
        try:
            fd = self._open_loose(oid, "object")
        except CorruptObjectError:
            return None
        if fd is None:
            return None
        try:
            head = _loose_head(os.read(fd, 1024))
        finally:
            os.close(fd)
        kind = head[0] if head is not None else b""
        return kind.decode() if kind in (b"commit", b"tree", b"blob", b"tag") else None

    def peel(self, oid: str) -> str:
        """Follow annotated tags to the commit they name."""
        target, kind = self.peel_object(oid)
        if kind != "commit":
            raise UnknownRevisionError(f"{target} is a {kind}, not a commit")
        return target

    def peel_object(self, oid: str) -> tuple[str, str]:
        """(id, type) of the object `oid` names once annotated tags are followed: a git tag may name a tree or blob."""
        from dulwich.objects import Tag

        obj = self.get_object(oid)
        while isinstance(obj, Tag):
            oid = obj.object[1].decode()
            obj = self.get_object(oid)
        return oid, obj.type_name.decode()

    def list_refs(self) -> dict[str, str]:
        """Every ref that names a commit (tags peeled), with that commit; refs to trees or blobs are left out."""
        refs = {}
        for name, oid in self.refs.iter_refs("refs/"):
            target, kind = self.peel_object(oid)
            if kind == "commit":
                refs[name] = target
        return refs


_P = ParamSpec("_P")
_R = TypeVar("_R")


def accepts_path(
    verb: Callable[Concatenate[Repository, _P], _R],
) -> Callable[Concatenate[Repository | str | os.PathLike[str], _P], _R]:
    """Let `verb` take a repository's path as well as a Repository, as dulwich's porcelain does.

    A path is opened for the call and closed after it; anything else is a TypeError naming
    what was given (it used to surface as an AttributeError deep inside the verb).
    """

    @wraps(verb)
    def verb_on(
        repo: Repository | str | os.PathLike[str], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _R:
        if isinstance(repo, Repository):
            return verb(repo, *args, **kwargs)
        if isinstance(repo, (str, os.PathLike)):
            with Repository.open(repo) as opened:
                return verb(opened, *args, **kwargs)
        raise TypeError(
            f"{verb.__name__}() takes a Repository or a repository's path, not {type(repo).__name__}"
        )

    return verb_on


def _text_or_empty(path: Path) -> str:
    """A small file's text ("" if it cannot be read), bytes that are not UTF-8 as surrogate
    escapes: a worktree's HEAD names a branch, its gitdir a path, each as git wrote the bytes."""
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return ""


def refuse_colliding_paths(paths: Iterable[str]) -> None:
    """Refuse extra files that macOS or Windows would open as one file (git commits them, and
    warns of the collision only when a clone there has already kept one of the two)."""
    pair = colliding_paths(paths)
    if pair is not None:
        first, second = (quote_path(p) for p in pair)
        raise MintError(
            f"{first} and {second}: macOS and Windows open these names as one file (they differ "
            "only in case, Unicode normalization or trailing dots), so a checkout there would "
            "keep one of the two; rename one"
        )


def _check_metadata_size(what: str, size: int) -> None:
    if size > MAX_METADATA_BYTES:
        raise MintError(
            f"this adapter's {what} would be {size:,} bytes, over the {MAX_METADATA_BYTES:,} a "
            "revision's metadata may hold (tensor names and metadata too long, or too many)"
        )


def parse_object(type_num: int, body: bytes, oid: str | None = None) -> ShaFile:
    """A git object from its type number and content, as dulwich parses it (`oid`, if given,
    trusted as its id). A commit or tag whose author, committer or tagger date dulwich refuses
    (no zone, an empty one, text after it, `+1a00`) is read as git log reads it, the date it
    shows (the epoch where it finds none) in place of the line's, its bytes and id its own: git
    log, show and checkout read such objects, which old or buggy tools wrote, and only fsck
    flags them."""
    from dulwich.errors import ObjectFormatException
    from dulwich.objects import ObjectID, ShaFile

    sha = None if oid is None else ObjectID(oid.encode())
    try:
        return ShaFile.from_raw_string(type_num, body, sha=sha)
    # dulwich raises IndexError, not its format error, for a date with an empty zone
    # (`1700000000 ` then the line's end), which git log reads as it reads no zone.
    except (ObjectFormatException, IndexError):
        lenient = _read_as_git().get(type_num)
        if lenient is None:
            raise
        obj = lenient()
        try:
            obj.set_raw_chunks([body], sha)
        except (ObjectFormatException, IndexError):
            pass  # not (only) its dates: the first error says what
        else:
            return obj
        raise


@cache
def _read_as_git() -> dict[int, type[ShaFile]]:
    """dulwich's Commit and Tag by type number, their identity dates parsed as git reads them."""
    from dulwich.objects import Commit, Tag

    # The chunks are kept as they are (set_raw_chunks stored them): only what dulwich parses
    # has each date line rewritten to the date and zone git reads there.
    class CommitReadAsGit(Commit):
        __slots__ = ()

        def _deserialize(self, chunks: list[bytes]) -> None:
            super()._deserialize([_dates_as_git_reads_them(b"".join(chunks))])

    class TagReadAsGit(Tag):
        __slots__ = ()

        def _deserialize(self, chunks: list[bytes]) -> None:
            super()._deserialize([_dates_as_git_reads_them(b"".join(chunks))])

    return {Commit.type_num: CommitReadAsGit, Tag.type_num: TagReadAsGit}


def _dates_as_git_reads_them(body: bytes) -> bytes:
    """A commit's or tag's text with each author, committer and tagger line's date and zone
    rewritten to what git log reads there (`1700000000` alone: `0 +0000`; `1700000000 +0000
    extra`: its first two)."""
    from mintvcs.dates import ident_date

    head, sep, message = body.partition(b"\n\n")
    lines = head.split(b"\n")
    for n, line in enumerate(lines):
        key = line.partition(b" ")[0]
        if key in (b"author", b"committer", b"tagger") and b">" in line:
            seconds, zone = ident_date(line[len(key) + 1 :])
            end = line.rfind(b">") + 1
            lines[n] = b"%s %d %s" % (line[:end], seconds, zone_text(zone).encode())
    return b"\n".join(lines) + sep + message


def _commit_info(commit: Commit) -> CommitInfo:
    """Decode a dulwich commit: its text in the character set its `encoding` header names, as
    git log re-encodes the whole commit (identities too)."""
    from mintvcs.dates import commit_date

    # dulwich leaves the message None where no blank line ends the headers (git writes one,
    # other tools need not): git reads no message there, and shows the commit.
    author, committer, message = decode_commit_texts(
        [commit.author, commit.committer, commit.message or b""], commit.encoding
    )
    body = commit.as_raw_string()
    (author_time, author_zone), (commit_time, zone) = _ident_dates(body)
    return CommitInfo(
        id=commit.id.decode(),
        tree=commit.tree.decode(),
        parents=tuple(p.decode() for p in commit.parents),
        author=author,
        committer=committer,
        time=commit_time,
        timezone=zone_seconds(zone),
        message=message,
        author_time=author_time,
        author_timezone=zone_seconds(author_zone),
        author_zone=zone_text(author_zone),
        date=commit_date(body),
    )


def _ident_dates(body: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    """The first author and committer lines' dates, as git log reads them from their own text
    (dates.ident_date: `+0060` stays 60, `-1` or `1_700` is no date), not as dulwich parsed
    them; the epoch for a line that is not there."""
    from mintvcs.dates import ident_date

    found: dict[bytes, tuple[int, int]] = {}
    for line in body.partition(b"\n\n")[0].split(b"\n"):
        key, _, value = line.partition(b" ")
        if key in (b"author", b"committer") and key not in found:
            found[key] = ident_date(value)
    return found.get(b"author", (0, 0)), found.get(b"committer", (0, 0))


# ------------------------------------------------------------------ helpers
T = TypeVar("T")


def _parallel(
    fn: Callable[[int], T], items: Sequence[int], key: Callable[[int], int], threaded: bool = True
) -> list[T]:
    """fn over items on the worker threads, largest first (`key`), results in item order.

    numpy, zstd, hashlib and file writes release the GIL on large buffers, so tensors
    encode and decode in parallel. A failure stops workers from starting new items.
    """
    if len(items) <= 1 or _WORKERS == 1 or not threaded:
        return [fn(i) for i in items]
    order = sorted(items, key=key)
    results: dict[int, T] = {}
    failed: list[BaseException] = []
    lock = threading.Lock()
    position = iter(order)

    def worker() -> None:
        while not failed:
            with lock:
                index = next(position, None)
            if index is None:
                return
            try:
                results[index] = fn(index)
            except BaseException as err:  # handed to the caller below
                failed.append(err)

    # Each worker in a copy of the caller's context: a write count open there counts theirs too.
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(worker,))
        for _ in range(_WORKERS - 1)
    ]
    for thread in threads:
        thread.start()
    worker()
    for thread in threads:
        thread.join()
    if failed:
        raise failed[0]
    return [results[i] for i in items]


def _sha256_while_importing(adapter: AdapterFiles, indexes: list[int]) -> dict[int, str]:
    """sha256 of the given tensors, by index.

    In a fresh process (a CLI commit) the codec's numpy and zstandard are not imported yet:
    importing them takes ~80 ms of mostly one core, so one thread hashes meanwhile
    (hashlib releases the GIL). Otherwise the worker threads share the hashing.
    """
    tensors = adapter.layout.tensors
    if "numpy" in sys.modules and "zstandard" in sys.modules:
        digests = _parallel(
            lambda k: hashlib.sha256(adapter.tensor_bytes(indexes[k])).hexdigest(),
            range(len(indexes)),
            key=lambda k: tensors[indexes[k]].start - tensors[indexes[k]].end,
        )
        return dict(zip(indexes, digests, strict=True))
    out: dict[int, str] = {}
    failed: list[BaseException] = []

    def work() -> None:
        try:
            for i in indexes:
                out[i] = hashlib.sha256(adapter.tensor_bytes(i)).hexdigest()
        except BaseException as err:  # re-raised in the caller's thread
            failed.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    try:
        import numpy  # noqa: F401
        import zstandard  # noqa: F401
    finally:
        thread.join()
    if failed:
        raise failed[0]
    return out


def dulwich_damage_errors() -> tuple[type[Exception], ...]:
    """What dulwich raises reading a damaged object or pack (a corrupt one, or one it could
    not read whole)."""
    from dulwich.errors import ChecksumMismatch, ObjectFormatException

    return (
        zlib.error,
        ChecksumMismatch,
        ObjectFormatException,
        AssertionError,
        IndexError,
        *unreadable_file_errors(),
    )


def unreadable_file_errors() -> tuple[type[Exception], ...]:
    """What dulwich raises reading a damaged store file: an empty loose object or a pack index
    of the wrong kind (FileFormatException), a truncated index (struct.error), fields that
    make no sense (OverflowError, ValueError)."""
    from dulwich.errors import FileFormatException

    return (FileFormatException, ValueError, struct.error, OverflowError)


# Below this many decoded bytes a second hashing thread costs more than it saves.
_THREADED_HASH_BYTES = 4 << 20
_PREFIX_ATTEMPTS = 8  # walks of the packs for an abbreviated id while a gc replaces them


def _read_config(path: Path, *, includes: bool = True) -> Any:
    """A repository's git config file as a dulwich ConfigFile (mintvcs.gitconfig.read_config):
    includes followed unless `includes` is False, includeIf gitdir:/onbranch: matched against
    this repository; a line git refuses, or one dulwich would read otherwise than git, is
    BadConfigError naming the file (an included one, maybe) and its line.

    A received repository's config may name any file: `[include] path = /dev/zero` would
    be read without end (git refuses that one as a bad config line). So the config and
    every file it includes must be a regular file under 1 MiB.
    """
    from mintvcs.gitconfig import read_config

    try:
        return read_config(path, git_dir=path.parent, includes=includes)
    except (OSError, ValueError) as err:  # unreadable, or not a regular file under 1 MiB
        raise NotARepositoryError(
            f"{path} cannot be read ({err}); fix it, or restore it from a working repository"
        ) from None


def _refuse_larger(raw: bytes | memoryview, max_size: int, oid: str, what: str) -> None:
    """Refuse a loose object whose header claims more than `max_size` bytes, before inflating it.

    A megabyte of zlib inflates to a gigabyte of whitespace: metadata (a manifest, a config)
    that claims more than any real adapter's is refused unread.
    """
    head = _loose_head(raw)
    if head is None:
        return  # inflate() reports it
    size = head[1]
    if size.isdigit() and int(size) > max_size:
        raise _too_large(oid, int(size), max_size, what)


@dataclass(frozen=True)
class Alternates:
    """What a store's `objects/info/alternates` file names, followed as git follows it."""

    stores: list[Path]  # the object directories it borrows from, each once
    # (the alternates file, the path it names) of each line that names no directory: a store
    # moved or unmounted since
    missing: list[tuple[str, str]]


def read_alternates(objects_dir: str) -> Alternates:
    """The alternate object directories of the store `objects_dir`, as git's
    link_alt_odb_entries reads them: blank and `#` lines skipped, a line in double quotes
    unquoted (quote_c_style, `"sp\\040ace"`), a relative path taken from the store whose file
    names it, each store once (ours and cycles left out), five levels deep at most; and the
    lines that name no directory."""
    found: list[Path] = []
    missing: list[tuple[str, str]] = []
    seen = {os.path.realpath(objects_dir)}

    def read(store: str, depth: int) -> None:
        listing = os.path.join(store, "info", "alternates")
        try:
            text = Path(listing).read_bytes().decode("utf-8", "surrogateescape")
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith('"'):
                line = unquote_c_style(line) or line  # broken quoting: git takes it as it is
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(store, line))
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            if not os.path.isdir(path):
                missing.append((listing, path))
                continue
            found.append(Path(path))
            if depth < _ALTERNATES_DEPTH:
                read(path, depth + 1)

    read(objects_dir, 0)
    return Alternates(found, missing)


@cache
def _object_store_class() -> type[DiskObjectStore]:
    """dulwich's DiskObjectStore, but for its alternates: read_alternates' list, flat.

    dulwich reads `info/alternates` itself, and reads it differently from git: a blank line made
    the store its own alternate, and two stores naming each other were followed for ever, so
    any lookup of an absent object ended in a RecursionError."""
    from dulwich.object_store import BaseObjectStore, DiskObjectStore

    class ObjectStore(DiskObjectStore):
        """A DiskObjectStore whose alternates are those read_alternates lists (flat: none of
        them has alternates of its own), or none (`borrows` False)."""

        borrows = True

        @property
        def alternates(self) -> list[BaseObjectStore]:
            if self._alternates is None:
                stores = read_alternates(os.fspath(self.path)).stores if self.borrows else []
                borrowed: list[BaseObjectStore] = []
                for store in stores:
                    alternate = ObjectStore(str(store))
                    alternate.borrows = False
                    borrowed.append(alternate)
                self._alternates = borrowed
            return self._alternates

    return ObjectStore


def _open_pack(base: Path) -> PackFile:
    """PackFile(base), once more after letting go of the pack maps this process keeps should
    it be out of descriptors (an index is read with one, which a full table has not); still
    out of them, the OSError is raised: the pack is not unreadable, nor is dulwich to try it."""
    try:
        return PackFile(base)
    except OSError as err:
        if err.errno not in (errno.EMFILE, errno.ENFILE):
            raise
    release_pack_maps()
    return PackFile(base)


def _named_by(oid: str, kind: bytes, body: bytes | memoryview) -> bool:
    """Whether `oid` is the git id of a `kind` object whose content is `body`."""
    digest = hashlib.sha1(b"%s %d\0" % (kind, len(body)))
    digest.update(body)
    return digest.hexdigest() == oid


def _loose_names(directories: Sequence[str]) -> list[str]:
    """The loose objects' names (less their two digits) in fan-out directories `directories`
    of several stores, sorted, each once (a directory that cannot be listed holds none)."""
    names: set[str] = set()
    for directory in directories:
        with suppress(OSError):
            names.update(n for n in os.listdir(directory) if _LOOSE_NAME.fullmatch(n))
    return sorted(names)


def _idx_object_count(path: Path) -> int:
    """The objects a pack index lists (its fan-out table's last entry, versions 1 and 2), 0 if
    it cannot be read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8 + 1024)
    except OSError:
        return 0
    table = 8 if head[:8] == b"\xfftOc\0\0\0\2" else 0
    if len(head) < table + 1024:
        return 0
    return int(struct.unpack_from(">I", head, table + 255 * 4)[0])


def _loose_head(raw: bytes | memoryview) -> tuple[bytes, bytes] | None:
    """(type, size) as a loose object's header writes them, inflated from its first bytes only;
    None when they do not inflate."""
    try:
        head = zlib.decompressobj().decompress(bytes(raw[:1024]), 64)
    except zlib.error:
        return None
    kind, _, size = head.partition(b"\0")[0].partition(b" ")
    return kind, size


def _too_large(oid: str, size: int, max_size: int, what: str) -> CorruptObjectError:
    return CorruptObjectError(
        f"{what}: object {oid} claims {size:,} bytes, more than a {what} may hold "
        f"({max_size:,}); the repository was made to exhaust memory, or is damaged"
    )


def _check_record(record: TensorRecord, header: codec.BlobHeader) -> None:
    """The blob a manifest record names must hold that tensor: its dtype, shape, size and sha256.

    A record pointing at another tensor's blob of the same size would otherwise be decoded and
    verified against the blob's own sha256, and the wrong values written under its name.
    """
    if (header.dtype, header.shape, header.nbytes, header.sha256) != (
        record.dtype,
        record.shape,
        record.end - record.start,
        record.sha256,
    ):
        raise CorruptObjectError(
            f"tensor {record.name}: its blob {record.blob[:12]} holds {header.dtype} "
            f"{list(header.shape)} with sha256 {header.sha256[:12]}, but the manifest records "
            f"{record.dtype} {list(record.shape)} with sha256 {record.sha256[:12]}: the "
            "manifest and its blobs disagree; restore the repository from a good copy"
        )


def _verify_all(jobs: list[tuple[npt.NDArray[np.uint8], codec.BlobHeader, str]]) -> None:
    """Check each decoded tensor against its header's sha256; the first failure is raised.

    Two threads hash halves of a large batch: hashlib releases the GIL, so they run on two
    cores, and each holds the GIL only between calls. (Hashing beside the decode instead,
    tensor by tensor, measured slower on 2 vCPUs: every numpy call of the decoder hands the
    GIL over, and each hand-over waits for a cross-core wake-up.)
    """
    total = sum(data.size for data, _, _ in jobs)
    if _WORKERS == 1 or len(jobs) < 2 or total < _THREADED_HASH_BYTES:
        for data, header, name in jobs:
            codec.verify_sha256(data, header, name=name)
        return
    # Split by bytes, the second half to the helper thread.
    half, split = 0, len(jobs)
    for index, (data, _, _) in enumerate(jobs):
        half += data.size
        if 2 * half >= total:
            split = index + 1
            break
    failed: list[BaseException] = []

    def work() -> None:
        try:
            for data, header, name in jobs[split:]:
                codec.verify_sha256(data, header, name=name)
        except BaseException as err:  # re-raised in the caller's thread
            failed.append(err)

    thread = threading.Thread(target=work, name="mint-sha256", daemon=True)
    thread.start()
    try:
        for data, header, name in jobs[:split]:
            codec.verify_sha256(data, header, name=name)
    finally:
        thread.join()
    if failed:
        raise failed[0]
