"""Keeping a repository sound: `fsck` verifies every object, `gc` packs what is reachable."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import itertools
import json
import math
import mmap
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mintvcs import codec, gitdelta
from mintvcs.dates import ident_problem
from mintvcs.errors import MintError
from mintvcs.filemodes import adjust_fd, not_writable, write_failed, write_file
from mintvcs.ids import is_object_id
from mintvcs.messages import quote_path
from mintvcs.objects import MAX_PATH_DEPTH, TensorRecord
from mintvcs.packs import (
    META_ZLIB_LEVEL,
    OBJECT_TYPE_NUMBERS,
    PACK_HEADER,
    PACK_TRAILER,
    TENSOR_ZLIB_LEVEL,
    TMP_OBJECT_PREFIX,
    PackEntryError,
    PackWriter,
    entry_header,
    object_zlib_level,
    read_fd,
)
from mintvcs.plane_cache import PlaneCache
from mintvcs.progress import PhaseProgress
from mintvcs.refs import ReflogEntry, read_reflog
from mintvcs.repoformat import config_int
from mintvcs.store import (
    UNREACHABLE_RECORD,
    CommitInfo,
    CorruptObjectError,
    Repository,
    accepts_path,
    parse_object,
    unreadable_file_errors,
)
from mintvcs.treenames import dotgit_reason

if TYPE_CHECKING:
    from dulwich.object_store import DiskObjectStore
    from dulwich.objects import ObjectID
    from dulwich.pack import Pack

_LOOSE_NAME = re.compile(r"^[0-9a-f]{38}$")
_TYPES = {num: name for name, num in OBJECT_TYPE_NUMBERS.items()}
# What dulwich raises for an object whose content does not parse as its type.
_UNPARSABLE = (ValueError, KeyError, IndexError, AssertionError)
GC_GRACE_SECONDS = (
    3600  # unreachable loose objects younger than this may belong to a commit in progress
)


@dataclass
class FsckReport:
    """What `fsck` found: one line per problem, naming the object and, for tensors, the tensor."""

    objects: int = 0
    revisions: int = 0
    tensors: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # nothing damaged, but worth a look

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


_INFLATE_SLICE = 1 << 20  # fsck inflates a loose object this much input at a time


class _Damage(Exception):
    """An object (or pack) that cannot be read back as what its name says; the text says why."""


class _Gone(_Damage):
    """A loose object file removed after it was listed: a gc packed or pruned it meanwhile."""


def _read_loose(path: Path, oid: str) -> tuple[bytes, bytes]:
    """(type, content) of one loose object file, verified: zlib stream, header and sha1."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as err:
        raise _Gone(f"corrupt loose object {oid}: {err}") from None
    except OSError as err:
        _out_of_descriptors(err, f"loose object {oid}", path.parent.parent / "pack")
        raise _Damage(f"corrupt loose object {oid}: {err}") from None
    on_disk = -1
    try:
        on_disk = os.fstat(fd).st_size
        # Mapped and inflated a slice at a time, not read whole: a huge (sparse) file is damage
        # at its first bytes or after its stream, where reading it into memory ran out of it
        # and lost the rest of fsck's report.
        view = memoryview(read_fd(fd))
        stream = zlib.decompressobj()
        parts = []
        pos = 0
        while pos < len(view) and not stream.eof:
            parts.append(stream.decompress(view[pos : pos + _INFLATE_SLICE]))
            pos += _INFLATE_SLICE
        if not stream.eof:
            raise zlib.error("incomplete or truncated stream")
        if stream.unused_data or pos < len(view):
            # git fsck's "garbage at end of loose object"; a reader stops at the stream's end.
            raise _Damage(f"corrupt loose object {oid}: garbage after its zlib stream")
        raw = b"".join(parts)
    except (MemoryError, OSError) as err:
        if isinstance(err, MemoryError) or err.errno == errno.ENOMEM:
            raise _Damage(
                f"loose object {oid} is too large to check in this process's memory "
                f"({on_disk} bytes on disk)"
            ) from None
        _out_of_descriptors(err, f"loose object {oid}", path.parent.parent / "pack")
        raise _Damage(f"corrupt loose object {oid}: {err}") from None
    except zlib.error as err:
        raise _Damage(f"corrupt loose object {oid}: {err}") from None
    finally:
        os.close(fd)
    head, sep, body = raw.partition(b"\0")
    kind, _, size = head.partition(b" ")
    if not sep or kind not in _TYPES.values() or not size.isdigit() or int(size) != len(body):
        raise _Damage(f"corrupt loose object {oid}: bad header {head[:32]!r}")
    actual = hashlib.sha1(raw).hexdigest()
    if actual != oid:
        raise _Damage(f"corrupt loose object {oid}: content hashes to {actual}")
    return kind, body


def _format_problem(oid: str, kind: bytes, body: bytes) -> str | None:
    """Why a commit, tree or tag does not pass git's format checks, or None (blobs always pass).

    Catches what `git fsck` flags in a tree: names '', '.', '..', '.git' or with '/',
    unknown modes, unsorted or duplicate entries; and malformed commit or tag headers.
    """
    if kind == b"blob":
        return None
    from dulwich.errors import ObjectFormatException
    from dulwich.objects import ShaFile, Tree

    for start in _identities(kind, body):
        problem = ident_problem(body, start)
        if problem is not None:  # what git fsck says: dulwich checks a date only fits 64 bits
            return f"malformed {kind.decode()} {oid}: {problem}"
    try:
        obj = ShaFile.from_raw_string(OBJECT_TYPE_NUMBERS[kind], body)
        obj.check()
    except (ObjectFormatException, *_UNPARSABLE) as err:
        return f"malformed {kind.decode()} {oid}: {err}"
    if isinstance(obj, Tree):
        for item in obj.items():  # the case and file-system aliases dulwich does not check
            # Only .git's: git checks a .gitmodules, and passes a regular one (an extra file
            # an earlier mintvcs committed under that name is reported with its revision).
            reason = dotgit_reason(item.path.decode(errors="replace"))
            if reason is not None:
                return f"malformed tree {oid}: entry {reason}"
    return None


def _identities(kind: bytes, body: bytes) -> list[int]:
    """Where the identities git fsck checks start, each just past its keyword: a commit's
    author lines after its tree and parent lines, then its committer line; a tag's tagger line
    after its object, type and tag lines."""
    skipped: tuple[bytes, ...]
    checked: tuple[bytes, ...]
    if kind == b"commit":
        skipped, checked = (b"tree ", b"parent "), (b"author ", b"committer ")
    elif kind == b"tag":
        skipped, checked = (b"object ", b"type ", b"tag "), (b"tagger ",)
    else:
        return []
    starts = []
    i = 0
    while any(body.startswith(key, i) for key in skipped):
        i = body.find(b"\n", i) + 1 or len(body)
    while body.startswith(checked[0], i):
        starts.append(i + len(checked[0]))
        i = body.find(b"\n", i) + 1 or len(body)
    if len(checked) > 1 and body.startswith(checked[1], i):
        starts.append(i + len(checked[1]))
    return starts


def _loose_files(repo: Repository) -> Iterator[tuple[str, Path]]:
    """(id, path) of every loose object file, in id order; temporaries are not objects.

    Links are never followed (a fan-out directory linked elsewhere is reported by
    `_store_links`): what lies behind one is not this repository's.
    """
    objects_dir = repo.git_dir / "objects"
    with os.scandir(objects_dir) as entries:
        fans = sorted(
            e.name for e in entries if len(e.name) == 2 and e.is_dir(follow_symlinks=False)
        )
    for fan in fans:
        try:
            with os.scandir(objects_dir / fan) as entries:
                names = sorted(
                    e.name
                    for e in entries
                    if _LOOSE_NAME.match(e.name) and e.is_file(follow_symlinks=False)
                )
        except FileNotFoundError:  # emptied and removed by a gc meanwhile
            continue
        for rest in names:
            yield fan + rest, objects_dir / fan / rest


def _size(path: Path) -> int:
    """A loose file's size; 0 once it is gone (packed or pruned since it was listed)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _store_links(repo: Repository) -> list[tuple[Path, str]]:
    """(path, target) of every symbolic link at or under .mint/objects, none followed.

    git never puts a link in a store; one arrives with a repository unpacked from a tarball,
    and gc would prune or remove files through it, outside the repository.
    """
    objects_dir = repo.git_dir / "objects"
    found: list[tuple[Path, str]] = []
    pending = [objects_dir]
    while pending:
        folder = pending.pop()
        try:
            if folder.is_symlink():
                found.append((folder, os.readlink(folder)))
                continue
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        path = Path(entry.path)
                        found.append((path, os.readlink(path)))
                    elif entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
        except OSError:
            continue  # unreadable or gone meanwhile: the object checks report what matters
    return sorted(found)


def _link_problem(path: Path, target: str) -> str:
    """One line naming a link in the store, why it is refused and the fix."""
    return (
        f"{path} is a symbolic link (to {target}); mintvcs never follows links in its object "
        "store, since gc would delete files through them, outside the repository: replace the "
        "link with a copy of what it points to, or remove it (to share another repository's "
        "objects, name its objects directory in .mint/objects/info/alternates)"
    )


@dataclass(frozen=True)
class _Packed:
    """One entry of a pack index, read back: its content, or why it cannot be."""

    oid: str
    kind: bytes | None = None
    data: bytes | None = None
    problem: str | None = None


def _pack_name(pack: Pack) -> str:
    return Path(pack._basename).name + ".pack"


def _pack_checksum_problem(pack: Pack) -> str | None:
    """Why a pack's length or trailing checksum is wrong, or None."""
    try:
        pack.check_length_and_checksum()
    except Exception as err:  # dulwich raises several kinds here; all mean "corrupt" to a user
        _out_of_descriptors(err, _pack_name(pack), Path(pack._basename).parent)
        return f"corrupt pack {_pack_name(pack)}: {err}"
    return None


# git's ceiling for pack.depth: no pack git writes holds a longer delta chain. A longer one was
# crafted, and every read of its deepest objects rebuilds the whole chain.
MAX_DELTA_DEPTH = 4095


def _entry_header(buf: mmap.mmap, offset: int, end: int) -> tuple[int, int | bytes | None]:
    """(type, delta base) of the pack entry at `offset` (packs.entry_header); _Damage if unreadable."""
    try:
        kind, _size, _pos, base = entry_header(buf, offset, end)
    except PackEntryError as err:
        raise _Damage(str(err)) from None
    return kind, base


def _pack_objects(pack: Pack, too_deep: list[tuple[str, int]]) -> Iterator[_Packed]:
    """Every object a pack's index lists, inflated, delta-resolved and checked against its id.

    One pass: each entry is inflated once and each delta applied once, from the whole objects
    down their chains (asking the store for each object instead rebuilds its chain every
    time: quadratic, hours on a crafted 50,000-deep chain). Objects deeper than
    MAX_DELTA_DEPTH are not resolved: their (id, depth) go to `too_deep`.
    """
    name = _pack_name(pack)
    try:
        names: dict[int, list[str]] = {}
        for sha, offset, _crc in pack.index.iterentries():
            names.setdefault(offset, []).append(sha.decode() if len(sha) == 40 else sha.hex())
    except Exception as err:  # a lying fan-out table or a short file: dulwich asserts or raises
        _out_of_descriptors(err, f"the index of {name}", Path(pack._basename).parent)
        yield _Packed(
            "0" * 40, problem=f"corrupt pack index of {name}: {err or type(err).__name__}"
        )
        return
    try:
        with open(Path(pack._basename + ".pack"), "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as err:  # gone, unreadable, or empty (mmap refuses size 0)
        _out_of_descriptors(err, name, Path(pack._basename).parent)
        if isinstance(err, OSError) and err.errno == errno.ENOMEM:
            # The address space a process limit leaves: not damage.
            raise OutOfMemoryError(
                f"{name} does not fit in this process's memory to be checked ({err.strerror}); "
                "nothing was changed: raise the memory limit (ulimit -v) and retry"
            ) from None
        for oids in names.values():
            for oid in oids:
                yield _Packed(oid, problem=f"corrupt packed object {oid} in {name}: {err}")
        return
    with buf:
        yield from _walk_pack(pack, name, buf, names, too_deep)


def _walk_pack(
    pack: Pack,
    name: str,
    buf: mmap.mmap,
    names: dict[int, list[str]],
    too_deep: list[tuple[str, int]],
) -> Iterator[_Packed]:
    """The resolving pass of `_pack_objects` over the mapped pack `buf`."""
    from dulwich.objects import RawObjectID
    from dulwich.pack import apply_delta, unpack_object_at

    end = len(buf) - PACK_TRAILER
    # Read every listed entry's header and, transitively, its delta base's.
    children: dict[int, list[int]] = {}  # base offset -> offsets of the deltas against it
    external: dict[bytes, list[int]] = {}  # REF_DELTA base found outside this pack -> deltas
    roots: list[int] = []
    broken: dict[int, str] = {}  # offset -> why its header cannot be read
    seen: set[int] = set()
    todo = list(names)
    while todo:
        offset = todo.pop()
        if offset in seen:
            continue
        seen.add(offset)
        try:
            if not PACK_HEADER <= offset < end:
                raise _Damage(f"offset {offset} is outside the pack's object area")
            _kind, base = _entry_header(buf, offset, end)
        except _Damage as damage:
            broken[offset] = str(damage)
            continue
        if isinstance(base, bytes):
            base_id = base
            try:  # as the store reads it: the base in this pack if listed, else anywhere
                base = pack.index.object_offset(RawObjectID(base_id))
            except KeyError:
                external.setdefault(base_id, []).append(offset)
                continue
        if base is None:
            roots.append(offset)
        else:
            children.setdefault(base, []).append(offset)
            todo.append(base)

    done: set[int] = set()

    def unresolved(offset: int) -> Iterator[tuple[int, int]]:
        """(entry, levels below `offset`) of `offset` and every delta built on it, each once."""
        stack = [(offset, 0)]
        while stack:
            at, level = stack.pop()
            if at in done:
                continue
            done.add(at)
            yield at, level
            stack.extend((child, level + 1) for child in children.get(at, ()))

    def fail(offset: int, reason: str) -> Iterator[_Packed]:
        """Problems for the entry at `offset` and every delta built on it."""
        base = " or ".join(names.get(offset, ())) or "unlisted"  # named as a reader knows it
        below = f"delta base {base} (offset {offset}) in its chain cannot be read ({reason})"
        for at, level in unresolved(offset):
            why = below if level else reason
            for oid in names.get(at, ()):
                yield _Packed(oid, problem=f"corrupt packed object {oid} in {name}: {why}")

    def mark_deep(offset: int, depth: int) -> None:
        """Record the listed objects at and below `offset` as too deep, without resolving them."""
        for at, level in unresolved(offset):
            too_deep.extend((oid, depth + level) for oid in names.get(at, ()))

    # (offset, type, base content or None for a whole object, depth): depth-first, so only the
    # bases of the chains in progress are held in memory.
    Item = tuple[int, int, bytes | None, int]
    pending: list[Item] = [(offset, 0, None, 0) for offset in roots]
    for offset in broken:
        yield from fail(offset, broken[offset])
    for base_id, deltas in external.items():
        # A thin pack's base lives elsewhere in the store; dulwich reads it from there too.
        try:
            if pack.resolve_ext_ref is None:
                raise KeyError(base_id)
            kind, content = pack.resolve_ext_ref(RawObjectID(base_id))
            data = content if isinstance(content, bytes) else b"".join(content)
        except Exception:  # missing or unreadable: the store cannot read these deltas either
            for offset in deltas:
                yield from fail(offset, f"its delta base {base_id.hex()} is not in the store")
            continue
        pending.extend((offset, kind, data, 1) for offset in deltas)
    while pending:
        offset, kind, base_data, depth = pending.pop()
        if offset in done:
            continue
        if depth > MAX_DELTA_DEPTH:
            mark_deep(offset, depth)
            continue
        try:
            unpacked, _ = unpack_object_at(buf, offset, hashlib.sha1)
            if base_data is None:
                kind = unpacked.pack_type_num
                data = b"".join(unpacked.decomp_chunks)
            else:
                data = b"".join(apply_delta(base_data, unpacked.decomp_chunks))
        except Exception as err:  # zlib, size and delta errors alike mean a damaged entry
            yield from fail(offset, str(err) or type(err).__name__)
            continue
        done.add(offset)
        type_name = _TYPES[kind]
        actual = hashlib.sha1(type_name + b" %d\0" % len(data) + data).hexdigest()
        for oid in names.get(offset, ()):
            if actual == oid:
                yield _Packed(oid, type_name, data)
            else:
                problem = f"corrupt packed object {oid} in {name}: content hashes to {actual}"
                yield _Packed(oid, problem=problem)
        pending.extend((child, kind, data, depth + 1) for child in children.get(offset, ()))
    # What is left never reached a whole object: REF_DELTAs whose bases form a cycle.
    for offset, oids in names.items():
        if offset not in done:
            for oid in oids:
                yield _Packed(
                    oid,
                    problem=f"corrupt packed object {oid} in {name}: its delta chain never "
                    "reaches a whole object (its bases form a cycle)",
                )


def _depth_problem(pack: Pack, too_deep: list[tuple[str, int]]) -> str:
    """One line for the objects of a pack that sit deeper than MAX_DELTA_DEPTH."""
    oid, depth = max(too_deep, key=lambda item: item[1])
    count, name = len(too_deep), _pack_name(pack)
    return (
        f"pack {name}: {count} object{'s' if count > 1 else ''} sit deeper than git's delta chain "
        f"limit of {MAX_DELTA_DEPTH} (deepest: {oid} at depth {depth}); git never writes such a "
        "pack, and reading those objects rebuilds the whole chain each time: get the repository "
        "again from a trusted source, or rewrite the pack with `git --git-dir=.mint repack -a -d "
        f"-f` (git leaves a pack not named pack-<hash>: remove {name} and its .idx if still there)"
    )


def _check_pack(pack: Pack, report: FsckReport, progress: PhaseProgress) -> list[str]:
    """The problems of one pack: its checksum, and every object's sha1 and format."""
    problems = []
    problem = _pack_checksum_problem(pack)
    if problem:
        problems.append(problem)
    too_deep: list[tuple[str, int]] = []
    for entry in _pack_objects(pack, too_deep):
        report.objects += 1
        progress("objects", 1)
        problem = entry.problem
        if problem is None and entry.kind is not None and entry.data is not None:
            problem = _format_problem(entry.oid, entry.kind, entry.data)
        if problem:
            problems.append(problem)
    if too_deep:
        report.objects += len(too_deep)
        problems.append(_depth_problem(pack, too_deep))
    return problems


def _pack_gone(pack: Pack) -> bool:
    """Whether the pack's index or data file is gone (the store lists only packs that have both)."""
    return not all(os.path.exists(pack._basename + suffix) for suffix in (".idx", ".pack"))


def _check_packs(repo: Repository, report: FsckReport, progress: PhaseProgress) -> None:
    """Verify each pack's checksum and every packed object's sha1.

    A gc running meanwhile writes new packs and deletes the ones it replaced: a pack deleted
    while it was read is not damage (its objects are in a new pack by then), and the packs
    that appeared while these were read are checked too, since they now hold objects that
    were loose when fsck listed them.
    """
    checked: set[str] = set()
    for _listing in range(2):
        for pack in repo.objects.packs:
            if pack._basename in checked:
                continue
            checked.add(pack._basename)
            try:
                problems = _check_pack(pack, report, progress)
            finally:
                pack.close()  # its descriptors: a store may hold more packs than the limit
            if problems and _pack_gone(pack):
                continue
            report.problems.extend(problems)


def _missing_in_tree(
    repo: Repository, tree_id: str, complete: set[str]
) -> Iterator[tuple[str, str]]:
    """(path, id) of each object under a tree that the store lacks, as git fsck's connectivity check.

    The manifest names the blobs that decoding reads; this also covers the rest (the
    safetensors header, nested files) that a checkout needs. Walked without recursion, each
    tree once, and no deeper than MAX_PATH_DEPTH: a received tree may nest thousands deep, or
    name one subtree under many names. Trees in `complete` (found whole before) are not walked
    again; a walk that finds nothing missing adds the trees it read.
    """
    from dulwich.objects import Tree

    pending = [(tree_id, "", 0)]
    walked: set[str] = set()
    whole = True
    while pending:
        oid, prefix, depth = pending.pop()
        if oid in walked or oid in complete:
            continue
        walked.add(oid)
        where = prefix[:200] or "/"
        tree = repo.get_object(oid, what=f"tree {where}")
        if not isinstance(tree, Tree):
            raise CorruptObjectError(f"object {oid} ({where}) is not a tree")
        # Not a submodule's commit, which lives in another repository.
        items = [item for item in tree.items() if item.mode != 0o160000]
        children = [item.sha.decode() for item in items]
        # Listed again on a miss: a gc may have packed a loose object into a pack written since.
        present = repo.has_objects(children)
        for item, child, found in zip(items, children, present, strict=True):
            path = prefix + item.path.decode(errors="replace")
            if not found:
                whole = False
                yield path[:200], child
            elif item.mode == 0o040000:
                if depth >= MAX_PATH_DEPTH:
                    raise CorruptObjectError(
                        f"tree {oid} ({where}…) nests more than {MAX_PATH_DEPTH} levels deep, "
                        "which mintvcs never writes; fsck looks no deeper"
                    )
                pending.append((child, path + "/", depth + 1))
    if whole:
        _remember(complete, walked)


# Refs whose commits are adapter revisions; others (refs/notes/, refs/stash, ...) are git's.
_REVISION_REFS = ("HEAD", "refs/heads/", "refs/tags/", "refs/remotes/")


def _check_git_history(
    repo: Repository,
    start: str,
    kind: str,
    name: str,
    seen: set[str],
    report: FsckReport,
    verified: _Verified,
) -> None:
    """git fsck's connectivity check from a ref that names no adapter revision."""
    pending = [(start, kind)]
    while pending:
        oid, kind = pending.pop()
        if oid in seen:
            continue
        seen.add(oid)
        try:
            if kind == "commit":
                info = repo.commit_info(oid)
                pending.append((info.tree, "tree"))
                pending.extend((parent, "commit") for parent in info.parents)
            elif kind == "tree":
                for where, missing in _missing_in_tree(repo, oid, verified.trees):
                    report.problems.append(
                        f"{name}: object {missing} ({where!r}) is missing from the store"
                        f"{repo.missing_objects_hint()}"
                    )
        except MintError as err:
            report.problems.append(f"{kind} {oid[:12]} (reachable from {name}): {err}")


# A ref lock is held for milliseconds; one this old was left by a writer that was killed.
STALE_LOCK_SECONDS = 600


def _stale_locks(repo: Repository, now: float) -> list[str]:
    """Warnings for ref lock files old enough to have been left by a killed writer."""
    found = []
    candidates = [*repo.git_dir.glob("*.lock"), *(repo.git_dir / "refs").rglob("*.lock")]
    for path in sorted(candidates):
        with suppress(FileNotFoundError):
            age = now - path.stat().st_mtime
            if age >= STALE_LOCK_SECONDS:
                found.append(
                    f"{path.relative_to(repo.git_dir)} is {age / 60:.0f} minutes old: a writer was "
                    "killed while updating the ref, and updates of it fail until the file is "
                    "removed; remove it if no mintvcs or git process is running"
                )
    return found


def _no_progress(_phase: str, _n: int) -> None:
    pass


@dataclass
class _RevisionCheck:
    """What checking one revision found: what it decoded, and its problems."""

    revisions: int = 0
    tensors: int = 0
    problems: list[str] = field(default_factory=list)


# How many entries each of _Verified's records keeps before it starts again (a cache: what it
# forgets is checked again); ~100 bytes each.
_VERIFIED_KEPT = 1 << 20
# The verified planes fsck keeps (_Verified.planes), in revisions of the largest one checked so
# far: a revision's XOR links find their bases in its parent's tensors, checked just before. At
# most _PLANES_KEPT_BYTES: past it, a link's chain is decoded down to what is still kept.
_PLANES_KEPT_REVISIONS = 2
# Tensors decoded per Repository.verify_tensors call: progress moves between calls.
_VERIFY_CHUNK = 1024
_PLANES_KEPT_BYTES = 1 << 30


def _remember(record: set[Any], items: Iterable[Any]) -> None:
    """Add `items` to one of _Verified's records, emptied first when it holds _VERIFIED_KEPT."""
    if len(record) >= _VERIFIED_KEPT:
        record.clear()
    record.update(items)


class _Verified:
    """What this fsck found sound. Objects are named by their content, so what one revision's
    check verified holds for every revision that names it: 20,000 commits of one tree (or a
    history whose frozen modules never change) are decoded once, not once per commit."""

    def __init__(self) -> None:
        self.trees: set[str] = set()  # trees with every object below them present
        self.blobs: set[str] = set()  # config and extra-file blobs read
        # (tensor blob, the record it was decoded against), as a keyed 16-byte hash: a blob
        # verified against one record says nothing of another record naming it.
        self.tensors: set[bytes] = set()
        self.revisions: dict[str, int] = {}  # root tree checked clean -> its tensor count
        # Verified tensors' planes, the bases the next revision's XOR links are decoded over.
        self.planes = PlaneCache(0)
        self._key = os.urandom(16)  # a received repository cannot aim a collision at it

    def keep_planes_of(self, revision_bytes: int) -> None:
        """Let `planes` hold _PLANES_KEPT_REVISIONS revisions of this size (_PLANES_KEPT_BYTES at most)."""
        wanted = min(_PLANES_KEPT_REVISIONS * revision_bytes, _PLANES_KEPT_BYTES)
        self.planes.max_bytes = max(self.planes.max_bytes, wanted)

    def tensor_key(self, record: TensorRecord) -> bytes:
        """A record, but for its name (only messages use it), with its blob, as 16 bytes."""
        # repr, not JSON: as unambiguous for strings and ints, and a third of the cost.
        fields = (record.blob, record.dtype, record.shape, record.end - record.start, record.sha256)
        return hashlib.blake2b(repr(fields).encode(), digest_size=16, key=self._key).digest()


def _check_revision(
    repo: Repository,
    oid: str,
    tree: str,
    name: str,
    bad: set[str],
    progress: PhaseProgress,
    verified: _Verified,
) -> _RevisionCheck:
    """Read one revision (`tree`: its root tree, "" if its commit was not read), decode each
    tensor, read each file, and check its tree is complete; what `verified` holds already is not
    read again, and what is found sound is added to it."""
    check = _RevisionCheck()
    try:
        known = verified.revisions.get(tree)
        if known is not None and oid not in bad:
            # A revision is its root tree (the commit adds parents and a message): one checked
            # clean under another commit is clean under this one.
            check.revisions, check.tensors = 1, known
            progress("tensors", known)
            return check
        rev = repo.read_revision(oid)
        check.revisions = 1
        _ = rev.config_bytes
        verified.keep_planes_of(rev.manifest.nbytes)
    except MintError as err:
        check.problems.append(f"commit {oid[:12]} (reachable from {name}): {err}")
        return check
    # Each tensor and file on its own: every missing or damaged one is named.
    todo: dict[bytes, list[TensorRecord]] = {}  # records to decode, by key (each key once)
    for record in rev.manifest.tensors:
        if oid in bad or record.blob in bad:
            check.problems.append(
                f"commit {oid[:12]}: tensor {record.name} is in corrupt object {record.blob}"
            )
            progress("tensors", 1)
            continue
        key = verified.tensor_key(record)
        if key in verified.tensors:
            # Kept as recently used: what the next revision changes is XOR-ed on this one.
            verified.planes.get(record.blob)
            check.tensors += 1
            progress("tensors", 1)
        else:
            todo.setdefault(key, []).append(record)
    pending = list(todo.items())
    for at in range(0, len(pending), _VERIFY_CHUNK):  # in chunks, so that progress moves
        chunk = pending[at : at + _VERIFY_CHUNK]
        errors = repo.verify_tensors([records[0] for _, records in chunk], verified.planes)
        for (key, records), error in zip(chunk, errors, strict=True):
            # Another record of the same key (a tensor under two names) counts as checked with
            # the first; after a failure, each is checked, and named, on its own.
            results = [error]
            if error is not None and len(records) > 1:
                results += repo.verify_tensors(records[1:], verified.planes)
            for result in results:
                if result is not None:
                    check.problems.append(f"commit {oid[:12]}: {result}")
            if error is None:
                _remember(verified.tensors, (key,))
                check.tensors += len(records)
            else:
                check.tensors += results.count(None)
            progress("tensors", len(records))
    for file in rev.manifest.files:
        unsafe = file.unsafe_reason
        if unsafe is not None:
            check.problems.append(
                f"commit {oid[:12]}: extra file {quote_path(file.path)} has a name unsafe to "
                f"write ({unsafe}); checkout refuses the revision (an earlier mintvcs committed "
                "it)"
            )
        if file.blob in verified.blobs:
            continue
        try:
            repo.read_blob(file.blob, what=file.path)
            _remember(verified.blobs, (file.blob,))
        except MintError as err:
            check.problems.append(f"commit {oid[:12]}: {err}")
    try:
        for where, missing in _missing_in_tree(repo, rev.info.tree, verified.trees):
            check.problems.append(
                f"commit {oid[:12]}: object {missing} ({where!r}) is missing from the store"
                f"{repo.missing_objects_hint()}"
            )
    except MintError as err:
        check.problems.append(f"commit {oid[:12]}: {err}")
    if not check.problems:
        if len(verified.revisions) >= _VERIFIED_KEPT:
            verified.revisions.clear()
        verified.revisions[rev.info.tree] = check.tensors
    return check


def _commit_info(repo: Repository, oid: str) -> CommitInfo | None:
    """A commit, for fsck's walk: None when it cannot be read (its check says why)."""
    for _attempt in range(2):
        try:
            return repo.commit_info(oid)
        except MintError:
            repo.close()  # a gc may have replaced its pack under the store's cached view
    return None


@accepts_path
def fsck(repo: Repository, *, progress: PhaseProgress = _no_progress) -> FsckReport:
    """Verify all objects (loose and packed), every ref's history, and decode every reachable tensor.

    `progress(phase, n)` hears of each object ("objects") and tensor ("tensors") checked.
    """
    repo.close()  # a long-lived Repository's pack list may name packs another gc deleted
    report = FsckReport()
    report.warnings.extend(_stale_locks(repo, time.time()))
    report.problems.extend(_link_problem(path, target) for path, target in _store_links(repo))
    bad: set[str] = set()
    for loose_id, path in _loose_files(repo):
        report.objects += 1
        progress("objects", 1)
        try:
            kind, body = _read_loose(path, loose_id)
        except _Gone:
            # Packed or pruned by a gc since it was listed: if a ref needs it, the checks of
            # the packs listed since and of every revision find it there or report it missing.
            report.objects -= 1
            continue
        except _Damage as damage:
            report.problems.append(str(damage))
            bad.add(loose_id)
            continue
        problem = _format_problem(loose_id, kind, body)
        if problem:
            report.problems.append(problem)
    _check_packs(repo, report, progress)
    seen_commits: set[str] = set()
    seen_git: set[str] = set()  # apart: a revision also reached from a notes ref is still decoded
    verified = _Verified()
    for name, value in [("HEAD", repo.head_commit()), *repo.refs.iter_refs("refs/")]:
        if value is None:
            continue
        try:
            start, target = repo.peel_object(value)
        except MintError as err:
            report.problems.append(f"ref {name}: {err}")
            continue
        if target != "commit" or not name.startswith(_REVISION_REFS):
            # A git tag of a tree or blob, git notes, a stash: git objects, not revisions.
            _check_git_history(repo, start, target, name, seen_git, report, verified)
            continue
        # Every parent, not only the first: a merge made with git brings in a second history.
        # Each commit after its parents (oldest first): its XOR links' bases are then the
        # tensors just verified, whose planes `verified` keeps. (commit, None) until its
        # parents are pushed, then (commit, its root tree) to be checked.
        pending: list[tuple[str, str | None]] = [(start, None)]
        while pending:
            oid, tree = pending.pop()
            if tree is None:
                if oid not in seen_commits:
                    seen_commits.add(oid)
                    info = _commit_info(repo, oid)
                    pending.append((oid, info.tree if info else ""))
                    parents = info.parents if info else ()
                    pending.extend((parent, None) for parent in reversed(parents))
                continue
            check = _check_revision(repo, oid, tree, name, bad, progress, verified)
            if check.problems:
                # A gc may have moved what this read between loose files and packs, or replaced
                # a pack, under the store's cached view: only what a fresh view confirms counts.
                # (`verified` holds only what was found sound, which a gc does not change.)
                repo.close()
                check = _check_revision(repo, oid, tree, name, bad, _no_progress, verified)
            report.revisions += check.revisions
            report.tensors += check.tensors
            report.problems.extend(check.problems)
    return report


def reachable_objects(repo: Repository) -> set[ObjectID]:
    """Ids of every object reachable from refs, HEAD and reflogs (so reset can be undone).

    Raises GcMissingObjectError for an object that refs or HEAD need and the store lacks, and
    GcCorruptObjectError for one that cannot be read; a reflog entry whose commit is gone is
    skipped, as git does ("reflog references pruned commits").
    """
    roots = _roots(repo)
    scan = _scan_store(repo, _no_progress)
    _refuse_damage(scan)
    return _walk(repo, scan, roots)


class OutOfMemoryError(MintError):
    """The system refused the memory a check needs: a limit was met, nothing is damaged."""


class OutOfDescriptorsError(MintError):
    """The system refused a file descriptor a check needs (EMFILE, ENFILE): a limit was met,
    nothing is damaged."""


_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def _out_of_descriptors(err: BaseException, what: str, pack_dir: Path) -> None:
    """Raise OutOfDescriptorsError if `err` is the system refusing a descriptor to read `what`
    (a pack, an index, a loose object): not damage, whatever else failing there would mean."""
    if not isinstance(err, OSError) or err.errno not in _OUT_OF_DESCRIPTORS:
        return
    try:
        held = f"; the store holds {sum(n.endswith('.pack') for n in os.listdir(pack_dir))} packs"
    except OSError:  # listing takes a descriptor too
        held = ""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    allowed = "" if limit == resource.RLIM_INFINITY else f" ({limit} for this process)"
    raise OutOfDescriptorsError(
        f"too many open files reading {what} ({err.strerror}{held}); nothing was changed: "
        f"raise the limit on open files{allowed} (ulimit -n), or close what holds them, and "
        "retry; nothing is damaged"
    ) from None


class GcRefusedError(MintError):
    """gc stopped before changing anything in the repository."""

    exit_code = 128  # git's exit status for `fatal:`


class GcCorruptObjectError(GcRefusedError):
    """gc found an object (or a pack) that does not read back as what its id says."""


class GcMissingObjectError(GcRefusedError):
    """gc found an object that a ref needs missing from the store."""


class GcLockedError(GcRefusedError):
    """Another gc holds the repository's gc.pid."""


class GcSymlinkError(GcRefusedError):
    """gc found a symbolic link in the object store, through which it would delete outside files."""


class GcWriteError(MintError):
    """Packing failed after the store was verified; no object was deleted."""


_FIX = "nothing was changed; run `mintvcs fsck`, then restore the object from a clone or backup"
_LOCK_FILE = "gc.pid"  # git's name and format ("<pid> <host>"): git gc and ours exclude each other
_LOCK_STALE_SECONDS = 12 * 3600  # git's limit too: a gc.pid older than this is a leftover
# Only ever locked with flock, never removed: removing it would let two takers lock two files.
_TAKEOVER_FILE = "gc.pid.flock"
_TAKEOVER_WAIT_SECONDS = 10.0


@dataclass
class _Scan:
    """Every object in the store, read back and verified once."""

    ids: set[str] = field(default_factory=set)  # readable objects, loose or packed
    loose: set[str] = field(default_factory=set)
    # Objects the walk went through that only an alternate object store holds (`git clone
    # --shared`): they belong to the other repository, and are neither packed nor pruned here.
    borrowed: set[str] = field(default_factory=set)
    # XOR bases that reachable tensor blobs name and a shallow or partial clone never fetched:
    # not damage, and nothing gc could delete.
    absent_bases: set[str] = field(default_factory=set)
    # Commits, trees and tags are small; keeping their content spares the walk a second read.
    meta: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    # XOR tensor blob -> the blob it is encoded against: a link inside the blob's content that
    # git's reachability cannot see (a history rewritten with git may leave it only here).
    bases: dict[str, str] = field(default_factory=dict)
    damage: list[str] = field(default_factory=list)
    # The packs scanned, by name: the only ones gc may rewrite and delete (a commit landing
    # meanwhile writes a pack of its own, whose objects the scan did not see).
    packs: dict[str, Pack] = field(default_factory=dict)

    def add(self, oid: str, kind: bytes, body: bytes, *, borrowed: bool = False) -> None:
        """Record a readable object: what the walk needs of it (`borrowed`: only an alternate
        holds it)."""
        (self.borrowed if borrowed else self.ids).add(oid)
        if kind != b"blob":
            self.meta.setdefault(oid, (kind, body))
        elif body.startswith(codec.MAGIC):
            with suppress(MintError):  # not a tensor blob after all, or one nothing can decode
                header = codec.read_header(body)
                if header.base is not None:
                    self.bases[oid] = header.base


def _scan_store(repo: Repository, progress: PhaseProgress) -> _Scan:
    """Read every loose and packed object, check it against its id, and keep what the walk needs."""
    scan = _Scan()
    for oid, path in _loose_files(repo):
        progress("checking objects", 1)
        try:
            kind, body = _read_loose(path, oid)
        except _Gone:
            # Packed or pruned since it was listed (`git repack -d`, `git prune`), which git's
            # own gc skips too: not damage. If a ref needs it, the walk finds it in a pack
            # written since (_borrowed) or reports it missing.
            continue
        except _Damage as damage:
            scan.damage.append(str(damage))
            continue
        scan.add(oid, kind, body)
        scan.loose.add(oid)
    for pack in repo.objects.packs:
        scan.packs[os.path.basename(pack._basename)] = pack
        pack_damage: list[str] = []
        too_deep: list[tuple[str, int]] = []
        try:
            for entry in _pack_objects(pack, too_deep):
                progress("checking objects", 1)
                if entry.problem is not None or entry.kind is None or entry.data is None:
                    pack_damage.append(entry.problem or f"corrupt packed object {entry.oid}")
                    continue
                scan.add(entry.oid, entry.kind, entry.data)
            if too_deep:
                pack_damage.append(_depth_problem(pack, too_deep))
            # A broken checksum whose objects all read back still means a damaged pack file:
            # name the objects when we can, the pack when no object is at fault.
            checksum = _pack_checksum_problem(pack)
        finally:
            pack.close()  # its descriptors: a store may hold more packs than the limit
        scan.damage.extend(pack_damage or ([checksum] if checksum else []))
    return scan


def _refuse_damage(scan: _Scan) -> None:
    """Raise GcCorruptObjectError naming the first damaged object, if any."""
    if not scan.damage:
        return
    more = len(scan.damage) - 1
    also = f" (and {more} more damaged object{'s' if more > 1 else ''})" if more else ""
    raise GcCorruptObjectError(f"gc refused: {scan.damage[0]}{also}; {_FIX}")


def _children(
    oid: str, kind: bytes, body: bytes, shallow: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """(id, what it is) of each object a commit, tree or tag points at; GcCorruptObjectError if
    it does not parse. A commit in `shallow` (a shallow clone's boundary) has no parents, as git
    reads it: they were never fetched."""
    from dulwich.errors import ObjectFormatException
    from dulwich.objects import Commit, Tag, Tree

    try:
        obj = parse_object(OBJECT_TYPE_NUMBERS[kind], body)  # a date git reads, gc walks past
        if isinstance(obj, Commit):
            return [
                (obj.tree.decode(), f"tree of commit {oid[:12]}"),
                *(
                    (p.decode(), f"parent of commit {oid[:12]}")
                    for p in obj.parents
                    if oid not in shallow
                ),
            ]
        if isinstance(obj, Tree):
            return [
                (item.sha.decode(), f"{item.path.decode(errors='replace')!r} in tree {oid[:12]}")
                for item in obj.items()
                if item.mode != 0o160000  # a submodule's commit lives in another repository
            ]
        if isinstance(obj, Tag):
            return [(obj.object[1].decode(), f"target of tag {oid[:12]}")]
    except (ObjectFormatException, *_UNPARSABLE) as err:
        raise GcCorruptObjectError(
            f"gc refused: {kind.decode()} {oid} does not parse ({err}); {_FIX}"
        ) from None
    return []


def _borrowed(repo: Repository, scan: _Scan, oid: str) -> bool:
    """Whether `oid` is stored though the scan did not see it (an alternate object store, `git
    clone --shared`, or written since by a commit); recorded in `scan` if so, as borrowed when
    the store's own object directory lacks it.

    An alternate's objects belong to the other repository: gc walks through them but neither
    packs nor prunes them, as git does. Objects written since are kept like any young one.
    """
    # An alternate's object first, our pack directory not listed again for it: the rescans
    # below listed it five times for each of a shared clone's thousands of borrowed objects.
    borrowed = repo.read_borrowed(oid)
    if borrowed is not None:
        scan.add(oid, borrowed.type_name, borrowed.as_raw_string(), borrowed=True)
        return True
    # Rescanning: a commit landing during gc may have written its pack after the scan.
    if not repo.has_object(oid, rescan=True):
        return False
    obj = repo.get_object(oid)
    scan.add(oid, obj.type_name, obj.as_raw_string(), borrowed=not repo.has_own_object(oid))
    return True


# (id, what it is to whoever points at it, the root it was reached from, strict)
_Root = tuple[str, str, str, bool]


def _roots(repo: Repository) -> list[_Root]:
    """What refs, HEAD and reflogs name now, in walk order (popped last-in first-out: HEAD and
    refs on top, so damage is blamed on them before reflogs).

    Read before the store is scanned: a commit landing meanwhile writes its objects before it
    moves its ref, so everything these roots need is already there for the scan to see (read
    after, a new commit's objects were missing from the scan and gc refused a sound store).
    """
    stack: list[_Root] = []
    refs = list(repo.refs.iter_refs("refs/"))
    for name in ["HEAD", *(name for name, _ in refs)]:
        stack.extend(_reflog_roots(repo.refs.reflog(name), f"the reflog of {name}"))
    stack.extend(_worktree_roots(repo))
    stack.extend((oid, "the object it names", name, True) for name, oid in reversed(refs))
    head = repo.head_commit()
    if head:
        stack.append((head, "the commit it names", "HEAD", True))
    return stack


def _reflog_roots(entries: list[ReflogEntry], root: str) -> list[_Root]:
    """The commits a reflog names, old and new, as roots to keep where they still exist."""
    return [
        (logged, "a commit", root, False)
        for entry in entries
        for logged in (entry.old, entry.new)
        if logged != "0" * 40
    ]


def _worktree_roots(repo: Repository) -> list[_Root]:
    """What git's own roots name beside refs and HEAD, as `git gc` keeps them: each linked
    worktree's detached HEAD and reflog (`git worktree add`), and what an index stages there
    or in the store's own index (blobs `git add`ed but not committed yet)."""
    roots: list[_Root] = []
    worktrees = repo.linked_worktrees()
    for worktree in worktrees:
        label = f"worktree {worktree.admin.name}"
        if is_object_id(worktree.head):  # detached; a branch's value is a ref's, a root already
            roots.append((worktree.head, "the commit it names", f"the HEAD of {label}", False))
        reflog = read_reflog(worktree.admin / "logs" / "HEAD")
        roots.extend(_reflog_roots(reflog, f"the HEAD reflog of {label}"))
    for where in [repo.git_dir, *(w.admin for w in worktrees)]:
        label = "the store" if where == repo.git_dir else f"worktree {where.name}"
        if not (where / "index").is_file():
            continue
        try:
            staged = _staged_ids(where / "index")
        except Exception as err:  # dulwich raises several kinds on a damaged index
            raise MintError(
                f"gc refused: the index of {label} cannot be read ({err}); gc would not know "
                "which staged objects to keep. Fix it with git (`git reset` there) first"
            ) from None
        roots.extend((oid, "a staged file", f"the index of {label}", False) for oid in staged)
    return roots


def _staged_ids(path: Path) -> list[str]:
    """The ids an index stages, at every stage, with those of the shared index a split index
    (`core.splitIndex`) links to: a superset of what git reads (entries the split index deletes
    or replaces are kept too), which is all gc needs."""
    from dulwich.index import read_index

    # dulwich's Index knows no `link` extension and fails a split index's checksum.
    data = path.read_bytes()
    body, trailer = data[:-20], data[-20:]
    if trailer != hashlib.sha1(body).digest() and trailer != bytes(20):  # zeros: index.skipHash
        raise ValueError(f"{path.name}: its checksum does not match")
    stream = io.BytesIO(body)
    ids = [entry.sha.decode() for entry in read_index(stream)]
    rest = stream.read()
    while len(rest) >= 8:  # extensions: a signature, a 32-bit size, the data
        if rest[:4] == b"link":  # the shared index, beside the split one, named by its checksum
            ids += _staged_ids(path.parent / f"sharedindex.{rest[8:28].hex()}")
        rest = rest[8 + int.from_bytes(rest[4:8], "big") :]
    return ids


def _walk(repo: Repository, scan: _Scan, roots: list[_Root]) -> set[ObjectID]:
    """Every object reachable from `roots`, each confirmed present in `scan`."""
    from dulwich.objects import ObjectID

    stack = list(roots)
    seen: set[str] = set()
    shallow = repo.shallow_commits()
    # A shallow clone lacks the bases of its boundary revisions' XOR blobs, a partial one those
    # its filter left out: such a blob is kept as it is, its base noted, not called damage.
    incomplete = bool(shallow) or repo._partial_clone()
    grafts = _grafts(repo)
    while stack:
        oid, what, root, strict = stack.pop()
        if oid in seen:
            continue
        if not is_object_id(oid):  # a damaged packed-refs or reflog line
            if not strict:
                continue
            raise GcMissingObjectError(
                f"gc refused: {root} holds {oid!r:.60}, which is not an object id; fix or "
                f"delete that ref; {_FIX}"
            )
        if oid not in scan.ids and oid not in scan.borrowed and not _borrowed(repo, scan, oid):
            if not strict:
                continue  # a reflog entry whose commit was pruned: git skips it too
            # Where the store lacks objects by design (a shallow or partial clone, a moved
            # alternate), the hint says what to do; restoring from a backup is not it.
            hint = repo.missing_objects_hint()
            raise GcMissingObjectError(
                f"gc refused: object {oid} ({what}, reachable from {root}) is missing from the "
                f"store{hint}; {'nothing was changed' if hint else _FIX}"
            )
        seen.add(oid)
        if oid not in scan.meta:
            base = scan.bases.get(oid)  # a blob: present and verified, and its XOR base too
            if base is None:
                continue
            if (
                incomplete
                and base not in scan.ids
                and base not in scan.borrowed
                and not _borrowed(repo, scan, base)
            ):
                scan.absent_bases.add(base)
                continue
            stack.append((base, f"XOR base of blob {oid[:12]}", root, True))
            continue
        # Below a root, everything is needed: a missing tree or blob is fatal even from a reflog.
        stack.extend(
            (child, kind, root, True) for child, kind in _children(oid, *scan.meta[oid], shallow)
        )
        # What `info/grafts` makes a parent: mintvcs reads history without grafts, but git's
        # gc keeps them, and git finds the repository broken once one is gone.
        stack.extend(
            (parent, f"graft parent of commit {oid[:12]}", root, False)
            for parent in grafts.get(oid, ())
        )
    return {ObjectID(oid.encode()) for oid in seen}


def _grafts(repo: Repository) -> dict[str, list[str]]:
    """The parents `.mint/info/grafts` gives commits (git's deprecated grafts file: `COMMIT
    [PARENT...]` a line), lines git would refuse left out; {} without the file."""
    try:
        text = (repo.git_dir / "info" / "grafts").read_text(errors="replace")
    except OSError:
        return {}
    grafts: dict[str, list[str]] = {}
    for line in text.splitlines():
        ids = line.split()
        if ids and not line.startswith("#") and all(is_object_id(i) for i in ids):
            grafts.setdefault(ids[0], []).extend(ids[1:])
    return grafts


@dataclass(frozen=True)
class GcResult:
    """What `gc` did."""

    packed: int  # objects in the store's pack afterwards
    pruned: int
    bytes_before: int
    bytes_after: int
    rewritten: bool = True  # False: nothing new since the pack gc wrote last, left as it was
    refs_packed: int = 0  # loose refs moved into packed-refs
    # XOR bases of reachable tensor blobs that a shallow or partial clone lacks by design:
    # those blobs were kept unverified
    absent_bases: int = 0


# oid -> unix time gc first found it unreachable (or its loose file's mtime): the age of
# unreachable objects inside packs, which have no file of their own to date them.
FIRST_SEEN_FILE = UNREACHABLE_RECORD


def _read_first_seen(repo: Repository, now: float) -> dict[str, float]:
    """The record of young unreachable objects; an entry that is not a plain past time is left
    out (the object then counts as first seen now), as is the whole record when unreadable."""
    try:
        raw = json.loads((repo.git_dir / FIRST_SEEN_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        k: float(v)
        for k, v in raw.items()
        if type(v) in (int, float) and math.isfinite(v) and 0 <= v <= now
    }


def _last_touched(repo: Repository, oid: str, first_seen: dict[str, float], now: float) -> float:
    """When an unreachable object was last written or reused: its loose file's mtime (a commit
    that reuses a packed object writes a loose copy: Repository.freshen), else when gc first
    found it unreachable."""
    with suppress(FileNotFoundError):
        return (repo.git_dir / "objects" / oid[:2] / oid[2:]).stat().st_mtime
    return first_seen.get(oid, now)


def _young(repo: Repository, oid: str, first_seen: dict[str, float], now: float) -> bool:
    """Whether an unreachable object was written, reused or first found unreachable within
    the grace period (see _last_touched)."""
    return now - _last_touched(repo, oid, first_seen, now) < GC_GRACE_SECONDS


def _needed_now(
    repo: Repository,
    scan: _Scan,
    reachable: set[ObjectID],
    unreachable: set[ObjectID],
    first_seen: dict[str, float],
) -> set[ObjectID]:
    """The objects of `unreachable` that refs moved since reach, or that a writer reused since
    (and others the moved refs reach)."""
    known = {oid.decode() for oid in reachable}
    fresh = [root for root in _roots(repo) if root[0] not in known]
    needed = _walk(repo, scan, fresh) if fresh else set()
    now = time.time()
    return needed | {key for key in unreachable if _young(repo, key.decode(), first_seen, now)}


def _write_first_seen(repo: Repository, seen: dict[str, float]) -> None:
    """Replace the record atomically (a crash leaves the old one, which only keeps objects longer)."""
    path = repo.git_dir / FIRST_SEEN_FILE
    if not seen:
        path.unlink(missing_ok=True)
        return
    write_file(path, json.dumps(seen, sort_keys=True).encode(), repo.shared_perm)


def _remove_stale_temporaries(repo: Repository, now: float) -> None:
    """Delete files that writers killed mid-write left behind, once past the grace period: loose
    object temporaries, pack temporaries and locks (a killed gc leaves a store-sized `tmp*.pack`,
    or a `pack-X.pack` without its index and the index's `.lock`), and the `*.tmp` files and
    commit-msg hook messages that commands write in the git directory itself (a killed checkout
    leaves a file of the work tree there), and branch -m's reflogs written aside."""
    for entry in _real_entries(repo.git_dir):
        name = entry.name
        if entry.is_file(follow_symlinks=False) and (
            name.endswith(".tmp") or name.startswith("COMMIT_EDITMSG.")
        ):
            _remove_if_stale(Path(entry.path), now)
    # A branch -m killed (or failing) while it wrote a reflog aside (refs._place_log).
    with suppress(OSError):
        for entry in _real_entries(repo.git_dir / "logs" / "refs"):
            if entry.name.startswith(".tmp-renamed-log.") and entry.is_file(follow_symlinks=False):
                _remove_if_stale(Path(entry.path), now)
    objects = repo.git_dir / "objects"
    for folder in _real_entries(objects):
        if folder.is_dir(follow_symlinks=False) and (
            len(folder.name) == 2 or folder.name == "pack"
        ):
            for entry in _real_entries(Path(folder.path)):
                path, name = Path(entry.path), entry.name
                temporary = name.startswith((TMP_OBJECT_PREFIX, "tmp")) or name.endswith(".lock")
                if folder.name == "pack" and name.endswith(".pack"):
                    temporary = temporary or not path.with_suffix(".idx").exists()
                if folder.name == "pack" and name.endswith(".idx"):  # an older gc's leftover
                    temporary = temporary or not path.with_suffix(".pack").exists()
                if temporary:
                    _remove_if_stale(path, now)


def _remove_if_stale(path: Path, now: float) -> None:
    """Delete a writer's leftover once past the grace period (a younger one may be in use)."""
    with suppress(FileNotFoundError):
        if now - path.stat().st_mtime >= GC_GRACE_SECONDS:
            path.unlink()


def _real_entries(folder: Path) -> list[os.DirEntry[str]]:
    """The entries of `folder` that are not symbolic links (gc refuses a store with any)."""
    with os.scandir(folder) as entries:
        return [entry for entry in entries if not entry.is_symlink()]


def _store_size(repo: Repository) -> int:
    """Disk space the files under .mint/objects take (allocated blocks, as du counts), no link followed.

    Not their lengths: packing thousands of small loose files frees a block each, which the
    sum of their sizes does not show.
    """
    total, pending = 0, [repo.git_dir / "objects"]
    while pending:
        try:
            entries = _real_entries(pending.pop())
        except FileNotFoundError:  # a fan-out directory removed meanwhile
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                with suppress(FileNotFoundError):  # a temporary removed meanwhile
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def _refuse_links(repo: Repository) -> None:
    """Raise GcSymlinkError naming the first symbolic link under .mint/objects, if any."""
    links = _store_links(repo)
    if not links:
        return
    more = len(links) - 1
    also = f" (and {more} more link{'s' if more > 1 else ''})" if more else ""
    raise GcSymlinkError(f"gc refused: {_link_problem(*links[0])}{also}; nothing was changed")


def _lock_holder(text: str, age: float) -> str | None:
    """Who holds a gc.pid of this content and age ("pid N on HOST"); None for a dead gc's leftover."""
    pid_text, _, host = text.strip().partition(" ")
    if age > _LOCK_STALE_SECONDS or not pid_text.isdigit():
        return None
    if host == socket.gethostname():
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return None  # that gc died without removing its lock
        except PermissionError:
            pass  # alive, another user's
    return f"pid {pid_text} on {host or 'an unknown host'}"


@contextmanager
def _takeover_guard(repo: Repository) -> Iterator[None]:
    """Hold a kernel lock while judging and replacing a dead gc's gc.pid, so takers run one at a time.

    Judging a leftover and removing it are two steps: without this, two takers that both
    judged it dead could each remove what the other just linked and both run. The kernel
    drops the lock when its holder dies, so unlike a lock file it can never be left behind.
    """
    path = repo.git_dir / _TAKEOVER_FILE
    # Never removed (the lock is on its inode), so every user's gc must be able to open it:
    # read-only is all flock needs, and it is created as git creates its files, 0666 less the
    # umask, then as core.sharedRepository says.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        adjust_fd(fd, repo.shared_perm)
        deadline = time.monotonic() + _TAKEOVER_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # Held for the few milliseconds of a takeover; a holder stopped for longer
                # must not hang a background gc for good.
                if time.monotonic() > deadline:
                    raise GcLockedError(
                        f"gc refused: another gc is taking over {repo.git_dir / _LOCK_FILE}; retry"
                    ) from None
                time.sleep(0.01)
            except OSError:
                break  # a file system without locks (ENOLCK): take over unguarded, as git does
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def _gc_lock(repo: Repository) -> Iterator[None]:
    """Hold `.mint/gc.pid` for the duration: two gcs repacking at once would delete each other's packs."""
    path = repo.git_dir / _LOCK_FILE
    mine = f"{os.getpid()} {socket.gethostname()}"
    # Written aside and hard-linked into place: the lock appears with its content, so no
    # other gc can read it empty and take it for a leftover.
    tmp = repo.git_dir / f"{_LOCK_FILE}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    except OSError as err:
        raise not_writable(
            err, repo.git_dir, "taking gc's lock (gc.pid) in the git directory"
        ) from None
    try:
        adjust_fd(fd, repo.shared_perm)
        os.write(fd, mine.encode())
    except BaseException as err:
        with suppress(OSError):  # a full disk: the temporary goes, not left for a later gc
            tmp.unlink()
        if isinstance(err, OSError):  # named as the lock it was to become (the temporary is gone)
            raise write_failed(err, path, "unable to write") from None
        raise
    finally:
        os.close(fd)
    try:
        for _attempt in range(2):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                try:
                    text = path.read_text(errors="replace")
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile
                holder = _lock_holder(text, age)
                if holder is not None:
                    raise GcLockedError(
                        f"gc refused: another gc is running ({holder}, lock {path}); wait for "
                        "it, or remove the file if no gc is running"
                    ) from None
                # A leftover: remove it only if it still is the one judged dead, and link ours
                # before another taker may look, so no two takers can both succeed.
                with _takeover_guard(repo):
                    try:
                        if path.read_text(errors="replace") == text:
                            path.unlink()
                            os.link(tmp, path)
                            break
                    except (FileNotFoundError, FileExistsError):
                        pass  # released, or linked by a gc that found it free: look again
        else:
            raise GcLockedError(f"gc refused: {path} keeps changing hands; retry")
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield
    finally:
        # Only our own: a gc that outlived the stale limit may have been taken over.
        with suppress(OSError):
            if path.read_text(errors="replace") == mine:
                path.unlink()


# The name of the pack gc wrote last: while it is the store's only pack and nothing is loose or
# due for pruning, the next gc has nothing to rewrite.
LAST_PACK_FILE = "mint-gc-pack"


def _pack_checked(
    writer: PackWriter, oid: str, kind: bytes, raw: bytes, who: str, layout: tuple[int, int]
) -> None:
    """Append an object read back to `writer` with its object_zlib_level() `layout`, as our
    writers store it; GcWriteError if its content hashes to another id."""
    level, prefix = layout
    if writer.add(kind, [raw], level, prefix) != oid:
        raise GcWriteError(
            f"{who} failed while packing: object {oid} read back as other content; nothing was "
            "deleted; run `mintvcs fsck`"
        )


# gc stores a revision's large metadata objects (its manifest and its tensors/ tree: megabytes
# each for an adapter of tens of thousands of tensors, a few lines apart from its parent's) as
# git deltas, as `git repack -adf` does; tensor blobs never (zstd already, `-delta` in
# .mint/info/attributes). Objects under this size are written whole: a delta saves bytes there.
DELTA_MIN_BYTES = 4096
# How many deltas deep a chain may go (git's pack.depth: 50 by default). Reading an object at
# depth d applies d deltas, ~12 ms each for a 12 MB manifest: 20 keeps the deepest read of such
# a revision within ~0.25 s more (a few % of the bytes a deeper chain would save). The newest
# revisions are whole.
DELTA_DEPTH = 20
# A delta is kept only when its zlib stream is at most half the object's own; one over half the
# object's size is given up as it is made (its new bytes deflate no better than the object's).
_DELTA_GAIN = 2


class _Deltas:
    """Holds back a pack's large metadata objects while the rest is written, then writes them
    after it, each one a delta against the same path in its child revision's tree where that is
    clearly smaller (`_delta_bases`), base before delta (OFS_DELTA: git's normal form)."""

    def __init__(
        self, repo: Repository, writer: PackWriter, who: str, progress: PhaseProgress
    ) -> None:
        self.repo, self.writer, self.who, self.progress = repo, writer, who, progress
        self.held: dict[str, bytes] = {}  # id -> type

    def add(self, oid: str, kind: bytes, raw: bytes) -> None:
        """Write an object now, or hold it back for write(): a large tree, or a large blob that
        is no tensor's and that deflate shrinks (whose level is then META_ZLIB_LEVEL)."""
        layout = object_zlib_level(kind, raw)  # once: a large blob's costs a deflate probe
        if (
            kind in (b"tree", b"blob")
            and len(raw) >= DELTA_MIN_BYTES
            and not (
                kind == b"blob"
                and (raw[: len(codec.MAGIC)] == codec.MAGIC or layout[0] == TENSOR_ZLIB_LEVEL)
            )
        ):
            self.held[oid] = kind
            return
        _pack_checked(self.writer, oid, kind, raw, self.who, layout)
        self.progress("packing", 1)

    def write(
        self,
        commits: Iterable[str],
        read_meta: Callable[[str], tuple[bytes, bytes] | None],
        read: Callable[[str], tuple[bytes, bytes]],
    ) -> None:
        """Write every held object: `commits` (ids) and `read_meta` (a commit's or tree's type
        and content, None if unknown) say which revision each belongs to; `read` gives a held
        object's type and content again."""
        if not self.held:
            return
        bases = _delta_bases(commits, read_meta, self.held)
        below: dict[str, list[str]] = {}
        for target, base_id in bases.items():
            below.setdefault(base_id, []).append(target)
        # (object, its planned base's id and content): each chain from its whole object down,
        # so only the bases of the chains in progress are held in memory.
        pending: list[tuple[str, tuple[str, bytes] | None]] = [
            (oid, None) for oid in sorted(self.held, reverse=True) if oid not in bases
        ]
        written = 0
        while pending:
            oid, base = pending.pop()
            kind, raw = read(oid)
            self._add(oid, kind, raw, base)
            written += 1
            self.progress("packing", 1)
            pending.extend((child, (oid, raw)) for child in below.get(oid, ()))
        if written != len(self.held):  # _delta_bases plans no cycle; this keeps it so
            raise GcWriteError(
                f"{self.who} failed while packing: {len(self.held) - written} objects were left "
                "out of the delta plan; nothing was deleted"
            )

    def _add(self, oid: str, kind: bytes, raw: bytes, base: tuple[str, bytes] | None) -> None:
        """Write one held object: a delta against `base` when that is clearly smaller, else whole."""
        level = META_ZLIB_LEVEL  # what object_zlib_level gives every object held
        if base is None or self.held[base[0]] != kind:
            _pack_checked(self.writer, oid, kind, raw, self.who, (level, 0))
            return
        digest = hashlib.sha1(b"%s %d\0" % (kind, len(raw)))
        digest.update(raw)
        if digest.hexdigest() != oid:
            raise GcWriteError(
                f"{self.who} failed while packing: object {oid} read back as other content; "
                "nothing was deleted; run `mintvcs fsck`"
            )
        delta = self._delta(oid, raw, *base)
        if delta is None:
            _pack_checked(self.writer, oid, kind, raw, self.who, (level, 0))
            return
        deflated = zlib.compress(delta, level)
        # Far below what deflate alone makes of any object: kept without deflating the whole.
        if len(deflated) * 8 * _DELTA_GAIN <= len(raw):
            self.writer.add_delta(oid, base[0], len(delta), deflated)
            return
        whole = zlib.compress(raw, level)
        if len(deflated) * _DELTA_GAIN <= len(whole):
            self.writer.add_delta(oid, base[0], len(delta), deflated)
        else:
            self.writer.add(kind, [raw], level, deflated=whole)

    def _delta(self, oid: str, raw: bytes, base_id: str, base: bytes) -> bytes | None:
        """A delta that rebuilds `raw` from `base`: the one a pack holds already (an earlier
        gc's: only a new revision's objects cost a delta search, as `git repack -ad` reuses
        deltas), else a new one (`gitdelta.create`); None if neither rebuilds it or the new one
        is over half the object's size. Each is applied (by dulwich, as readers do) and compared
        first."""
        from dulwich.errors import ApplyDeltaError
        from dulwich.pack import apply_delta

        found = self.repo._find_packed(bytes.fromhex(oid))
        stored = found[0].delta_against(found[1], bytes.fromhex(base_id)) if found else None
        for delta in (stored, None):
            if delta is None:
                delta = gitdelta.create(base, raw, len(raw) // _DELTA_GAIN)
                if delta is None:
                    return None
            with suppress(ApplyDeltaError):
                if b"".join(apply_delta(base, delta)) == raw:
                    return delta
        return None


def _delta_bases(
    commits: Iterable[str],
    read: Callable[[str], tuple[bytes, bytes] | None],
    held: dict[str, bytes],
) -> dict[str, str]:
    """Which held objects to store as deltas, and against which (target id -> base id).

    Each held object at the root of a commit's tree (its manifest, its tensors/ tree) is paired
    with the object at the same path in a child's tree (a commit whose first parent it is): the
    newer stays whole and the older is a delta against it, git's recency order, so the tips a
    server loads read fastest. Chains are cut every DELTA_DEPTH + 1 commits counted from the
    root along first parents, not from the tips, so the next gc finds the same pairs in the
    store and reuses their deltas. Children are planned before their parents, so a base's own
    depth is known when it is used, and an object once used as a base gets no base of its own
    afterwards: no chain cycles or grows past DELTA_DEPTH, whatever objects revisions share.
    `read` gives a commit's or tree's type and content (None if unknown).
    """
    from dulwich.errors import ObjectFormatException
    from dulwich.objects import Commit, ShaFile, Tree

    def parsed(oid: str) -> ShaFile | None:
        found = read(oid)
        if found is None:
            return None
        try:
            return parse_object(OBJECT_TYPE_NUMBERS[found[0]], found[1])
        except (ObjectFormatException, *_UNPARSABLE):
            return None  # gc's walk reports what it needs; this only plans

    parent: dict[str, str | None] = {}
    tree: dict[str, str] = {}
    for oid in commits:
        commit = parsed(oid)
        if isinstance(commit, Commit):
            parent[oid] = commit.parents[0].decode() if commit.parents else None
            tree[oid] = commit.tree.decode()
    entries: dict[str, dict[bytes, str]] = {}

    def root(commit: str) -> dict[bytes, str]:
        """A commit's root tree entries (name -> id), read once."""
        if commit not in entries:
            top = parsed(tree[commit])
            items = top.items() if isinstance(top, Tree) else []
            entries[commit] = {item.path: item.sha.decode() for item in items}
        return entries[commit]

    # Children before parents (Kahn's order over first parents).
    children = {oid: 0 for oid in parent}
    for first in parent.values():
        if first in children:
            children[first] += 1
    order = sorted(oid for oid, count in children.items() if not count)
    for oid in order:  # grows as it goes
        first = parent[oid]
        if first in children:
            children[first] -= 1
            if not children[first]:
                order.append(first)
    generation: dict[str, int] = {}
    for oid in reversed(order):
        first = parent[oid]
        generation[oid] = generation[first] + 1 if first in generation else 0
    bases: dict[str, str] = {}
    depth: dict[str, int] = {}
    used: set[str] = set()
    for oid in order:
        first = parent[oid]
        if first is None or generation[oid] % (DELTA_DEPTH + 1) == 0:
            # A root (or a commit whose parent is not among those given), or the first commit
            # of a stretch: its parent's objects stay whole.
            continue
        older = root(first)
        for name, base in root(oid).items():
            target = older.get(name)
            if (
                target is None
                or target == base
                or target in bases
                or target in used
                or held.get(target) is None
                or held.get(target) != held.get(base)
                or depth.get(base, 0) >= DELTA_DEPTH
            ):
                continue
            bases[target] = base
            depth[target] = depth.get(base, 0) + 1
            used.add(base)
    return bases


# Files git keeps beside a pack (`git repack --write-bitmap-index`, `pack.writeReverseIndex`,
# cruft packs, a partial clone's fetched packs), each meaningless once its pack is gone; git
# warns about orphans.
_PACK_SIDECARS = (".rev", ".bitmap", ".mtimes", ".promisor")


def _drop_pack(store: DiskObjectStore, pack: Pack) -> None:
    """Delete a pack, its index first, as git does: killed in between, gc leaves a `.pack`
    without its index, which the next gc sweeps, not an index that names a missing pack."""
    with suppress(FileNotFoundError):
        os.unlink(pack._basename + ".idx")
    store._remove_pack(pack)
    for suffix in _PACK_SIDECARS:
        with suppress(FileNotFoundError):
            os.unlink(pack._basename + suffix)


def _kept(pack: Pack) -> bool:
    """A pack marked `.keep` (`git index-pack --keep`, or by hand): git never repacks or deletes it."""
    return os.path.exists(pack._basename + ".keep")


def _drop_git_caches(repo: Repository) -> None:
    """Delete git's multi-pack-index and commit-graph after gc changed the store.

    They name packs and commits gc may just have removed, and git reads a stale one as
    damage (`git fsck` fails, and `git gc` does not repair a stale multi-pack-index); git
    writes them again at its next gc or maintenance run. Neither is needed to read the store.
    The multi-pack-index's bitmap and reverse index go with it, as git's repack deletes them.
    `objects/info/packs`, where git wrote it (`update-server-info`, run by every git repack), is
    written again from the packs now present, as git's repack does: a dumb-HTTP client fetches
    the packs it names, and one naming a deleted pack fails the clone.
    """
    objects = repo.git_dir / "objects"
    for path in [
        objects / "pack" / "multi-pack-index",
        *(objects / "pack").glob("multi-pack-index-*"),  # its -<id>.bitmap and -<id>.rev
        objects / "info" / "commit-graph",
    ]:
        with suppress(FileNotFoundError):
            path.unlink()
    for folder in (objects / "pack" / "multi-pack-index.d", objects / "info" / "commit-graphs"):
        shutil.rmtree(folder, ignore_errors=True)
    info_packs = objects / "info" / "packs"
    if info_packs.is_file():
        packs = sorted(
            idx.with_suffix(".pack").name
            for idx in (objects / "pack").glob("pack-*.idx")
            if idx.with_suffix(".pack").is_file()
        )
        listing = "".join(f"P {name}\n" for name in packs) + "\n"  # git ends it with a blank line
        write_file(info_packs, listing.encode(), repo.shared_perm)


def _last_pack(repo: Repository) -> str | None:
    try:
        return (repo.git_dir / LAST_PACK_FILE).read_text().strip() or None
    except (OSError, ValueError):  # a reader may ignore it: unreadable, it names no pack
        return None


def _repack(
    repo: Repository,
    scan: _Scan,
    unreachable: set[ObjectID],
    progress: PhaseProgress,
    needed_late: Callable[[], set[ObjectID]],
) -> tuple[int, bool, int]:
    """Write every object the scan found, but `unreachable`, into one new pack, one object at a
    time; then delete the loose objects and the packs it replaces, but for the objects of
    `unreachable` that `needed_late()` says are needed after all. Returns the objects packed,
    whether anything was written, and how many of `unreachable` were kept so.

    The new pack is complete and in place before anything is deleted, so a failure loses
    nothing; objects written after the scan (a commit landing meanwhile) are left alone.
    (dulwich's repack held every object of the store in memory: 1.5 GB of heap for a
    1.5 GB store.)
    """
    from dulwich.objects import ObjectID

    store = repo.objects
    old_packs = {name: pack for name, pack in scan.packs.items() if not _kept(pack)}
    kept = [pack for pack in scan.packs.values() if _kept(pack)]
    # A kept pack stays as it is, with every object in it, as git leaves it.
    keep = sorted(
        oid
        for oid in scan.ids
        if ObjectID(oid.encode()) not in unreachable
        and not any(ObjectID(oid.encode()) in pack for pack in kept)
    )
    if (
        not scan.loose
        and not unreachable
        and (not old_packs or set(old_packs) == {_last_pack(repo)})
    ):
        # Nothing new since our last gc wrote the one pack (or no object at all, as in a new
        # store): rewriting it would give the same file.
        return len(keep), False, 0
    if keep:
        writer = PackWriter(repo, expected=len(keep), repack=True)
        wanted = set(keep)
        deltas = _Deltas(repo, writer, "gc", progress)

        def add(oid: str, kind: bytes, raw: bytes) -> None:
            wanted.discard(oid)
            deltas.add(oid, kind, raw)

        def read(oid: str) -> tuple[bytes, bytes]:
            if oid in scan.meta:
                return scan.meta[oid]
            obj = repo.get_object(oid)
            return obj.type_name, obj.as_raw_string()

        try:
            # Pack by pack, in each one's order, not object by object: looking each object up
            # searched every pack (28 s of a 37 s gc with a pack per commit), and a revision's
            # blobs stay next to each other as its commit wrote them.
            for pack in sorted(old_packs.values(), key=_pack_name):
                try:
                    for entry in _pack_objects(pack, []):
                        if (
                            entry.oid in wanted
                            and entry.kind is not None
                            and entry.data is not None
                        ):
                            add(entry.oid, entry.kind, entry.data)
                finally:
                    pack.close()
            for oid in keep:  # loose, or in a pack written since the scan
                if oid in wanted:
                    add(oid, *read(oid))
            commits = (oid for oid in keep if scan.meta.get(oid, (b"",))[0] == b"commit")
            deltas.write(commits, scan.meta.get, read)
        except BaseException:
            writer.abort()
            raise
        name = writer.finish()
        if name is not None:
            old_packs.pop(name, None)  # the same objects as a pack we had: that file was replaced
            write_file(repo.git_dir / LAST_PACK_FILE, f"{name}\n".encode(), repo.shared_perm)
    # A commit during the repack may have reused an object found unreachable (it freshens it)
    # or moved a ref onto one: look once more, now, just before deleting, and keep those, loose
    # or in the old packs that hold them (the next gc packs them).
    late = {key.decode() for key in needed_late() & unreachable} if unreachable else set()
    pruned = {key.decode() for key in unreachable}
    for oid in scan.loose - late:  # packed now, or pruned
        if oid in pruned and _young(repo, oid, {}, time.time()):
            continue  # a commit reused it after that last look (it freshens what it reuses)
        with suppress(FileNotFoundError):
            store.delete_loose_object(ObjectID(oid.encode()))
    held = late - scan.loose
    for pack in old_packs.values():
        needed = any(ObjectID(oid.encode()) in pack for oid in held)
        pack.close()
        if not needed:
            _drop_pack(store, pack)
    _drop_git_caches(repo)
    repo.close()  # our maps and dulwich's pack list name the old packs
    return len(keep), True, len(late)


def _refuse_precious(repo: Repository) -> None:
    """Refuse a full gc where extensions.preciousObjects is set, as `git prune` and `git repack
    -d` refuse (and `git gc` skips both): other repositories may borrow these objects."""
    if repo.repo_format.precious_objects:
        raise GcRefusedError(
            f"gc refused: {repo.git_dir / 'config'} sets extensions.preciousObjects: other "
            "repositories may borrow this store's objects (`git clone --shared`), so none may be "
            "repacked away or pruned (git refuses too); nothing was changed"
        )


@accepts_path
def gc(repo: Repository, *, prune: bool = True, progress: PhaseProgress = _no_progress) -> GcResult:
    """Pack reachable objects (tensor blobs whole and unzlibbed: zstd already; manifests and trees
    as deltas where they pay, `_Deltas`), drop old unreachable ones, pack refs.

    `progress(phase, n)` hears of the objects checked ("checking objects") and packed ("packing").

    Every object is read back and checked first, and every object a ref needs must be
    present: on a damaged store gc raises a GcRefusedError and changes nothing, since
    packing would carry the damage into the new pack and pruning could delete what a
    restore still needs.
    """
    from dulwich.objects import ObjectID

    _refuse_precious(repo)
    with _gc_lock(repo):
        repo.close()  # a long-lived Repository's pack list may name packs another gc deleted
        # First of all: repacking and pruning through a link delete files outside the repository.
        _refuse_links(repo)
        before = _store_size(repo)
        roots = _roots(repo)
        scan = _scan_store(repo, progress)
        _refuse_damage(scan)
        reachable = _walk(repo, scan, roots)
        now = time.time()
        unreachable: set[ObjectID] = set()
        first_seen: dict[str, float] = {}

        def needed_now() -> set[ObjectID]:
            # A commit that started meanwhile may reuse an old unreachable object (it freshens
            # it) or have moved a ref to it: asked before packing and again before deleting.
            return _needed_now(repo, scan, reachable, unreachable, first_seen)

        if prune:
            # Unreachable objects are kept until an hour after they were last written or reused
            # (a loose file's mtime) or first found unreachable (packed: a commit of many tensors
            # packs its blobs before its ref moves, and this gc packs young loose ones), so a
            # commit in progress loses nothing.
            first_seen = _read_first_seen(repo, now)
            still_young: dict[str, float] = {}
            old: dict[str, float] = {}
            for oid in sorted(scan.ids):
                key = ObjectID(oid.encode())
                if key in reachable:
                    continue
                seen = _last_touched(repo, oid, first_seen, now)
                if now - seen < GC_GRACE_SECONDS:
                    still_young[oid] = seen
                    continue
                old[oid] = seen
                unreachable.add(key)
            # What may be pruned stays listed until it is gone: a commit that reuses a packed
            # object the record lists writes a loose copy of it (Repository.freshen), which
            # the deleting below spares.
            _write_first_seen(repo, {**still_young, **old})
            unreachable -= needed_now()
        _remove_stale_temporaries(repo, now)  # a killed gc's store-sized temporary pack, first
        with _packing_errors_named("gc"):
            packed, rewritten, spared = _repack(repo, scan, unreachable, progress, needed_now)
        if prune:
            _write_first_seen(repo, still_young)
        refs_packed = repo.refs.pack()
        for fan in _real_entries(repo.git_dir / "objects"):
            if len(fan.name) == 2 and fan.is_dir(follow_symlinks=False):
                # Tidying only: a fan-out directory that is not empty (a commit just wrote to
                # it) or not removable stays, and gc has still done its work.
                with suppress(OSError):
                    os.rmdir(fan.path)
        pruned = len(unreachable) - spared
        return GcResult(
            packed,
            pruned,
            before,
            _store_size(repo),
            rewritten,
            refs_packed,
            len(scan.absent_bases),
        )


# `gc --auto` does nothing below these (git's own are 50 and 6700), set per repository by
# git's config keys gc.autoPackLimit and gc.auto: each commit of a real adapter writes a pack,
# and every pack is one more index that a lookup of a new object searches.
AUTO_PACK_LIMIT = 32
AUTO_LOOSE_LIMIT = 6700
GEOMETRIC_FACTOR = 2


def auto_limits(repo: Repository) -> tuple[int | None, int | None]:
    """(packs, loose objects) past which `gc --auto` merges: gc.autoPackLimit and gc.auto, or
    the defaults; None where the key is 0 or less, which turns that trigger off, as in git. As
    in git, gc.auto 0 or less turns both off: `gc --auto` then never runs."""

    def read(name: bytes, default: int) -> int | None:
        try:
            value = config_int(repo.config, (b"gc",), name)
        except ValueError as err:  # read as git reads it: 010 is 8, 0x10 16, "5 " refused
            raise GcRefusedError(
                f"{err} in .mint/config (git's form: 100, 1k, 2m, 0x10); fix it"
            ) from None
        if value is None:
            return default
        return value if value > 0 else None

    loose = read(b"auto", AUTO_LOOSE_LIMIT)
    if loose is None:  # git's need_to_gc returns at once for gc.auto <= 0, packs uncounted
        return None, None
    return read(b"autoPackLimit", AUTO_PACK_LIMIT), loose


def _over(count: int, limit: int | None) -> bool:
    return limit is not None and count > limit


@dataclass(frozen=True)
class RollUpResult:
    """What `gc --auto` did: the small packs and loose objects it merged into one pack."""

    objects: int  # in the new pack
    packs_merged: int
    loose_packed: int
    packs_after: int
    bytes_before: int
    bytes_after: int
    busy: bool = False  # another gc held the lock: nothing was done

    @property
    def rewritten(self) -> bool:
        """Whether anything was merged."""
        return self.objects > 0


def geometric_split(sizes: list[int], loose: int, factor: int = GEOMETRIC_FACTOR) -> int:
    """How many of the smallest packs (`sizes` ascending) to merge, with `loose` bytes of loose
    objects, so that each remaining pack is at least `factor` times the one below it, the
    merged one first (git's `repack --geometric`): the big old packs are left alone."""
    for count in range(len(sizes) + 1):
        rest = sizes[count:]
        if not rest:
            break
        below = [loose + sum(sizes[:count]), *rest[:-1]]  # what each remaining pack sits on
        if all(size >= factor * under for size, under in zip(rest, below, strict=True)):
            return count
    return len(sizes)


def _pack_bytes(pack: Pack) -> int:
    return os.path.getsize(pack._basename + ".pack")


@accepts_path
def auto_gc(repo: Repository, *, progress: PhaseProgress = _no_progress) -> RollUpResult:
    """`gc --auto`: past gc.autoPackLimit packs or gc.auto loose objects (auto_limits), merge the
    smallest packs and the loose objects into one pack, geometrically; else nothing.

    Nothing is pruned and nothing unmerged is read, so it costs in proportion to what it merges
    (amortised, each object is rewritten about log2 of the store's growth times). Every object
    merged is read back and checked against its id first; the new pack is in place before the
    files it replaces are deleted. A full `gc` still verifies and prunes the whole store.
    """

    pack_limit, loose_limit = auto_limits(repo)
    # Counted before the lock, as git's --auto: under the limits there is nothing to wait for.
    if not auto_gc_due(repo):
        size = _store_size(repo)
        return RollUpResult(0, 0, 0, pack_count(repo), size, size)
    try:
        with _gc_lock(repo), _packing_errors_named("gc --auto"):
            return _roll_up(repo, pack_limit, loose_limit, progress)
    except GcLockedError:
        # Another gc is at work: --auto is a hint to tidy up, not worth an error (git's too).
        size = _store_size(repo)
        return RollUpResult(0, 0, 0, pack_count(repo), size, size, busy=True)


@accepts_path
def auto_gc_due(repo: Repository) -> bool:
    """Whether `gc --auto` would merge now: past gc.autoPackLimit packs or gc.auto loose objects
    (never with extensions.preciousObjects, where git's `gc --auto` does not repack either)."""
    if repo.repo_format.precious_objects:
        return False
    pack_limit, loose_limit = auto_limits(repo)
    if _over(pack_count(repo), pack_limit):
        return True
    return loose_limit is not None and _loose_over(repo, loose_limit)


class GcStartError(MintError):
    """`gc --auto` could not be started in a process of its own."""


# Both processes run in the repository's directory, and `python -c` puts it first on sys.path
# (its '' entry): a repository whose .mint came from elsewhere (a project that tracks one) could
# hold a `subprocess.py` or `mintvcs/cli.py` there. So each drops that entry before importing
# anything. (Not -I: it would also drop PYTHONPATH and the user's site-packages, where this
# mintvcs may have been found; -P needs Python 3.11.)
_NO_CWD = "import sys\nif sys.path and sys.path[0] == '':\n    del sys.path[0]\n"
# Run by a short-lived intermediate process: it starts the gc in a session of its own, prints
# its pid and exits, as git double-forks its detached gc.
_DETACH = _NO_CWD + (
    "import subprocess\nprint(subprocess.Popen(sys.argv[1:], start_new_session=True, "
    "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)\n"
)
# The gc itself: `mintvcs gc --auto`, as the console script starts it.
_GC_AUTO = _NO_CWD + "from mintvcs.cli import main\nsys.exit(main(prog_name='mintvcs'))\n"


@accepts_path
def auto_gc_detached(repo: Repository) -> int | None:
    """When gc --auto is due, start it in a process of its own and return its pid at once (else None)."""
    return start_auto_gc(repo) if auto_gc_due(repo) else None


@accepts_path
def start_auto_gc(repo: Repository) -> int:
    """Start `gc --auto` in a process of its own, due or not, and return its pid at once."""
    # Through an intermediate that exits at once: the gc is no child of this process (a
    # training loop), which then has nothing to reap: no zombie, no "still running" warning.
    try:
        spawned = subprocess.run(
            [sys.executable, "-c", _DETACH, sys.executable, "-c", _GC_AUTO, "gc", "--auto"],
            cwd=repo.git_dir,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return int(spawned.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise GcStartError(
            f"could not start gc --auto in the background ({err}); run `mintvcs gc --auto`"
        ) from None


@contextmanager
def _packing_errors_named(who: str) -> Iterator[None]:
    """Turn what can fail while packing (disk full, an unreadable entry) into one GcWriteError."""
    from dulwich.errors import ChecksumMismatch, ObjectFormatException

    try:
        yield
    except (OSError, zlib.error, ChecksumMismatch, ObjectFormatException, ValueError) as err:
        if isinstance(err, FileNotFoundError) and "objects" in Path(err.filename or "").parts:
            # A pack or loose object removed under us: another gc or a `git repack` that does
            # not take gc.pid ran at once. Nothing is damaged, so fsck is not the advice.
            raise GcWriteError(
                f"{who} failed while packing: {err.filename} was removed meanwhile, most likely "
                f"by another gc or `git repack` running at once; nothing was deleted; run "
                f"`mintvcs {who}` again once it is done"
            ) from None
        if isinstance(err, OSError) and err.errno != errno.EIO:
            # The system refused a write or read (a full disk, a file size limit): nothing is
            # damaged, so fsck is not the advice.
            where = f": {err.filename}" if err.filename else ""
            raise GcWriteError(
                f"{who} failed while packing: {err.strerror or err}{where}; nothing was "
                f"deleted; run `mintvcs {who}` again once that is fixed"
            ) from None
        raise GcWriteError(
            f"{who} failed while packing ({err}); nothing was deleted; run `mintvcs fsck`"
        ) from None


def pack_count(repo: Repository) -> int:
    """How many packs the store has now."""
    try:
        return sum(n.endswith(".pack") for n in os.listdir(repo.git_dir / "objects" / "pack"))
    except FileNotFoundError:
        return 0


# From this gc.auto on, the loose objects are counted in one fan-out directory, as git does:
# every commit asks, and listing thousands of files cost more than the commit itself.
_ESTIMATE_FROM = 2560


def _loose_over(repo: Repository, limit: int) -> bool:
    """Whether there are more than `limit` loose objects (estimated from objects/17 past _ESTIMATE_FROM)."""
    if limit < _ESTIMATE_FROM:  # few files to list at most: count them, stopping past the limit
        return sum(1 for _ in itertools.islice(_loose_files(repo), limit + 1)) > limit
    try:
        with os.scandir(repo.git_dir / "objects" / "17") as entries:
            sample = sum(1 for e in entries if _LOOSE_NAME.match(e.name))
    except FileNotFoundError:
        return False
    return sample > -(-limit // 256)  # git's: more than ceil(gc.auto / 256) in one of 256


def _roll_up(
    repo: Repository, pack_limit: int | None, loose_limit: int | None, progress: PhaseProgress
) -> RollUpResult:
    """auto_gc under gc's lock: merge the loose objects and the smallest packs (geometric_split)."""
    from dulwich.objects import ObjectID

    repo.close()  # a long-lived Repository's pack list may name packs another gc deleted
    _refuse_links(repo)
    # As git's gc --auto, once due, prunes its expired temporaries: a killed commit's or gc's
    # tmp_obj_* and tmp_pack_* (store-sized) were otherwise left until a manual gc.
    _remove_stale_temporaries(repo, time.time())
    before = _store_size(repo)
    store = repo.objects
    packs = sorted(
        (p for p in store.packs if not _kept(p)), key=lambda p: (_pack_bytes(p), _pack_name(p))
    )
    loose = list(_loose_files(repo))
    if not _over(len(packs), pack_limit) and not _over(len(loose), loose_limit):
        return RollUpResult(0, 0, 0, len(packs), before, before)
    loose_bytes = sum(_size(path) for _, path in loose)
    merged = packs[: geometric_split([_pack_bytes(p) for p in packs], loose_bytes)]
    wanted = {oid for oid, _ in loose}
    for pack in merged:
        try:
            wanted.update(
                sha.decode() if len(sha) == 40 else sha.hex()
                for sha, _offset, _crc in pack.index.iterentries()
            )
        except unreadable_file_errors() as err:
            raise GcCorruptObjectError(
                f"gc refused: corrupt pack index of {_pack_name(pack)} "
                f"({err or type(err).__name__}); {_FIX}"
            ) from None
        finally:
            pack.close()  # its descriptors: a store may hold more packs than the limit
    if not wanted:
        return RollUpResult(0, 0, 0, len(packs), before, before)
    total = len(wanted)
    writer = PackWriter(repo, expected=total, repack=True)
    deltas = _Deltas(repo, writer, "gc --auto", progress)
    commits: list[str] = []

    def add(oid: str, kind: bytes, raw: bytes) -> None:
        if oid not in wanted:
            return  # stored twice (two packs, or a pack and a loose file): packed once
        wanted.discard(oid)
        if kind == b"commit":
            commits.append(oid)
        deltas.add(oid, kind, raw)

    def read(oid: str) -> tuple[bytes, bytes]:
        obj = repo.get_object(oid)
        return obj.type_name, obj.as_raw_string()

    def read_meta(oid: str) -> tuple[bytes, bytes] | None:
        try:  # a merged commit or its root tree: small
            return read(oid)
        except MintError:
            return None  # unreadable: no delta planned for it

    try:
        for pack in merged:
            too_deep: list[tuple[str, int]] = []
            try:
                for entry in _pack_objects(pack, too_deep):
                    if entry.problem is not None or entry.kind is None or entry.data is None:
                        raise GcCorruptObjectError(
                            f"gc refused: {entry.problem or f'corrupt packed object {entry.oid}'}; {_FIX}"
                        )
                    add(entry.oid, entry.kind, entry.data)
            finally:
                pack.close()
            if too_deep:
                raise GcCorruptObjectError(f"gc refused: {_depth_problem(pack, too_deep)}; {_FIX}")
        for oid, path in loose:
            try:
                kind, body = _read_loose(path, oid)
            except _Gone:
                continue  # packed or pruned since it was listed: as in the full gc's scan
            except _Damage as damage:
                raise GcCorruptObjectError(f"gc refused: {damage}; {_FIX}") from None
            add(oid, kind, body)
        deltas.write(commits, read_meta, read)
    except BaseException:
        writer.abort()
        raise
    name = writer.finish()
    for oid, _ in loose:  # packed now
        with suppress(FileNotFoundError):
            store.delete_loose_object(ObjectID(oid.encode()))
    for pack in merged:
        if name is None or os.path.basename(pack._basename) != name:
            _drop_pack(store, pack)
    _drop_git_caches(repo)
    repo.close()  # our maps and dulwich's pack list name the merged packs
    return RollUpResult(
        objects=total,
        packs_merged=len(merged),
        loose_packed=len(loose),
        packs_after=pack_count(repo),  # a commit landing meanwhile adds its own
        bytes_before=before,
        bytes_after=_store_size(repo),
    )
