"""Keeping a repository sound: `fsck` verifies every object, `gc` packs what is reachable."""

from __future__ import annotations

import hashlib
import os
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mintvcs.errors import MintError
from mintvcs.packs import TMP_OBJECT_PREFIX
from mintvcs.store import Repository

if TYPE_CHECKING:
    from dulwich.objects import ObjectID

_LOOSE_NAME = re.compile(r"^[0-9a-f]{38}$")
_TYPES = {1: b"commit", 2: b"tree", 3: b"blob", 4: b"tag"}
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

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


def _check_loose(path: Path, oid: str) -> str | None:
    """Verify one loose object file: zlib stream, header and sha1."""
    try:
        raw = zlib.decompress(path.read_bytes())
    except zlib.error as err:
        return f"corrupt loose object {oid}: {err}"
    head, sep, body = raw.partition(b"\0")
    kind, _, size = head.partition(b" ")
    if not sep or kind not in _TYPES.values() or not size.isdigit() or int(size) != len(body):
        return f"corrupt loose object {oid}: bad header {head[:32]!r}"
    if hashlib.sha1(raw).hexdigest() != oid:
        return f"corrupt loose object {oid}: content hashes to {hashlib.sha1(raw).hexdigest()}"
    return None


def _check_packs(repo: Repository, report: FsckReport) -> None:
    """Verify each pack's checksum and every packed object's sha1."""
    for pack in repo.objects.packs:
        name = Path(pack._basename).name + ".pack"
        try:
            pack.check_length_and_checksum()
        except Exception as err:  # dulwich raises several kinds here; all mean "corrupt" to a user
            report.problems.append(f"corrupt pack {name}: {err}")
        for sha in pack.index:
            oid = sha.decode() if len(sha) == 40 else sha.hex()
            report.objects += 1
            try:
                type_num, data = pack.get_raw(sha)
                actual = hashlib.sha1(_TYPES[type_num] + b" %d\0" % len(data) + data).hexdigest()
            except Exception as err:
                report.problems.append(f"corrupt packed object {oid} in {name}: {err}")
                continue
            if actual != oid:
                report.problems.append(
                    f"corrupt packed object {oid} in {name}: content hashes to {actual}"
                )


def fsck(repo: Repository, *, progress: Callable[[int], None] | None = None) -> FsckReport:
    """Verify all objects (loose and packed), every ref's history, and decode every reachable tensor."""
    report = FsckReport()
    objects_dir = repo.git_dir / "objects"
    bad: set[str] = set()
    for fan in sorted(os.listdir(objects_dir)):
        if len(fan) != 2:
            continue
        for rest in sorted(os.listdir(objects_dir / fan)):
            if not _LOOSE_NAME.match(rest):
                continue  # a temporary file of an interrupted write, not an object (gc removes it)
            report.objects += 1
            problem = _check_loose(objects_dir / fan / rest, fan + rest)
            if problem:
                report.problems.append(problem)
                bad.add(fan + rest)
    _check_packs(repo, report)
    seen_commits: set[str] = set()
    for name, value in [("HEAD", repo.head_commit()), *repo.refs.iter_refs("refs/")]:
        if value is None:
            continue
        try:
            start = repo.peel(value)
        except MintError as err:
            report.problems.append(f"ref {name}: {err}")
            continue
        oid: str | None = start
        while oid is not None and oid not in seen_commits:
            seen_commits.add(oid)
            try:
                rev = repo.read_revision(oid)
                report.revisions += 1
                _ = rev.config_bytes
                for record in rev.manifest.tensors:
                    if oid in bad or record.blob in bad:
                        report.problems.append(
                            f"commit {oid[:12]}: tensor {record.name} is in corrupt object {record.blob}"
                        )
                        continue
                    repo.tensor_bytes(record.blob, record.name)
                    report.tensors += 1
                    if progress:
                        progress(1)
                for file in rev.manifest.files:
                    repo.read_blob(file.blob, what=file.path)
                parents = rev.info.parents
            except MintError as err:
                report.problems.append(f"commit {oid[:12]} (reachable from {name}): {err}")
                break
            oid = parents[0] if parents else None
    return report


def reachable_objects(repo: Repository) -> set[ObjectID]:
    """Ids of every object reachable from refs, HEAD and reflogs (so reset can be undone)."""
    from dulwich.objects import Commit, ObjectID, Tag, Tree

    roots: set[str] = {oid for _name, oid in repo.refs.iter_refs("refs/")}
    head = repo.head_commit()
    if head:
        roots.add(head)
    for name in ["HEAD", *(n for n, _ in repo.refs.iter_refs("refs/"))]:
        for entry in repo.refs.reflog(name):
            roots.update(o for o in (entry.old, entry.new) if o != "0" * 40)
    seen: set[ObjectID] = set()
    stack = [ObjectID(r.encode()) for r in roots]
    while stack:
        oid = stack.pop()
        if oid in seen or oid not in repo.objects:
            continue
        seen.add(oid)
        obj = repo.objects[oid]
        if isinstance(obj, Commit):
            stack.append(obj.tree)
            stack.extend(obj.parents)
        elif isinstance(obj, Tree):
            stack.extend(entry.sha for entry in obj.items())
        elif isinstance(obj, Tag):
            stack.append(obj.object[1])
    return seen


@dataclass(frozen=True)
class GcResult:
    """What `gc` did."""

    packed: int
    pruned: int
    bytes_before: int
    bytes_after: int


def _remove_stale_temporaries(repo: Repository, now: float) -> None:
    """Delete object files that writers killed mid-write left behind, once past the grace period."""
    for fan in (repo.git_dir / "objects").iterdir():
        if len(fan.name) != 2 or not fan.is_dir():
            continue
        for path in fan.iterdir():
            stale = now - path.stat().st_mtime >= GC_GRACE_SECONDS
            if stale and (path.name.startswith(TMP_OBJECT_PREFIX) or path.name.endswith(".lock")):
                path.unlink(missing_ok=True)


def _store_size(repo: Repository) -> int:
    return sum(p.stat().st_size for p in (repo.git_dir / "objects").rglob("*") if p.is_file())


def gc(repo: Repository, *, prune: bool = True) -> GcResult:
    """Pack reachable objects (no deltas, no zlib: tensors are zstd already), drop old unreachable ones, pack refs."""
    before = _store_size(repo)
    reachable = reachable_objects(repo)
    now = time.time()
    unreachable: set[ObjectID] = set()
    if prune:
        for oid in repo.objects:
            if oid in reachable:
                continue
            path = repo.git_dir / "objects" / oid[:2].decode() / oid[2:].decode()
            if path.exists() and now - path.stat().st_mtime < GC_GRACE_SECONDS:
                continue
            unreachable.add(oid)
    packed = repo.objects.repack(exclude=unreachable)
    _remove_stale_temporaries(repo, now)
    repo.refs.pack()
    for fan in (repo.git_dir / "objects").iterdir():
        if len(fan.name) == 2 and fan.is_dir() and not any(fan.iterdir()):
            fan.rmdir()
    return GcResult(packed, len(unreachable), before, _store_size(repo))
