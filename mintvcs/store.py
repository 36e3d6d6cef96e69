"""The repository: a git directory (`.mint/`) whose commits are adapter revisions."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from mintvcs import codec
from mintvcs.adapter import GIT_DIR, AdapterFiles
from mintvcs.base import BaseModel
from mintvcs.errors import MintError
from mintvcs.objects import (
    CONFIG_PATH,
    FILES_DIR,
    HEADER_PATH,
    MANIFEST_PATH,
    TENSORS_DIR,
    FileRecord,
    Manifest,
    TensorRecord,
)
from mintvcs.refs import RefStore
from mintvcs.safetensors_file import TensorEntry, assemble

if TYPE_CHECKING:
    from dulwich.object_store import DiskObjectStore, ObjectContainer
    from dulwich.objects import Commit, ShaFile

DEFAULT_BRANCH = "main"
TMP_OBJECT_PREFIX = "tmp_obj_"  # git's own prefix for objects being written
BASE_FILE = "mint-base.json"  # inside .mint/: the base model's identity and linear shapes
_HEX = re.compile(r"^[0-9a-f]{4,40}$")
_OID = re.compile(r"^[0-9a-f]{40}$")
_SPEC = re.compile(r"^(?P<name>.*?)(?P<suffix>(?:[~^][0-9]*)*)$")
_WORKERS = max(1, min(8, os.cpu_count() or 1))
ProgressFn = Callable[[int], None]


class NotARepositoryError(MintError):
    """No `.mint/` directory where one was expected."""


class UnknownRevisionError(MintError):
    """A ref spec that names no branch, tag or commit."""

    exit_code = 128


class CorruptObjectError(MintError):
    """A git object that is missing, unreadable or fails verification."""


@dataclass(frozen=True)
class CommitInfo:
    """A commit's metadata, decoded."""

    id: str
    tree: str
    parents: tuple[str, ...]
    author: str
    committer: str
    time: int
    timezone: int
    message: str


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
        return self.repo.read_blob(self._tree[CONFIG_PATH], what=CONFIG_PATH)

    @cached_property
    def config(self) -> dict[str, Any]:
        """The parsed PEFT config."""
        parsed: dict[str, Any] = json.loads(self.config_bytes)
        return parsed

    def tensor(self, name: str) -> bytes:
        """The raw bytes of one tensor, verified."""
        record = self.manifest.tensor(name)
        if record is None:
            raise UnknownRevisionError(f"revision {self.commit[:12]} has no tensor {name!r}")
        return self.repo.tensor_bytes(record.blob, name)

    def tensors(
        self, progress: ProgressFn | None = None
    ) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
        """Every tensor as (safetensors dtype, shape, raw little-endian bytes)."""
        records = self.manifest.tensors
        with ThreadPoolExecutor(_WORKERS) as pool:
            datas = list(pool.map(lambda r: self._decoded(r, progress), records))
        return {r.name: (r.dtype, r.shape, d) for r, d in zip(records, datas, strict=True)}

    def _decoded(self, record: TensorRecord, progress: ProgressFn | None) -> bytes:
        data = self.repo.tensor_bytes(record.blob, record.name)
        if progress:
            progress(len(data))
        return data

    def safetensors_bytes(self, progress: ProgressFn | None = None) -> bytes:
        """adapter_model.safetensors, byte-identical to what was committed."""
        header = self.repo.read_blob(self.manifest.header_blob, what=HEADER_PATH)
        tensors = self.tensors(progress)
        parts = [
            (TensorEntry(r.name, r.dtype, r.shape, r.start, r.end), tensors[r.name][2])
            for r in self.manifest.tensors
        ]
        return assemble(header, parts)

    def files(self) -> dict[str, tuple[bytes, bool]]:
        """Extra files by relative path: (content, executable)."""
        return {
            f.path: (self.repo.read_blob(f.blob, what=f.path), f.executable)
            for f in self.manifest.files
        }


class Repository:
    """A mintvcs repository: `.mint/` (a git directory) and, usually, a work tree beside it."""

    def __init__(self, git_dir: Path, work_tree: Path | None):
        self.git_dir = Path(git_dir)
        self.work_tree = work_tree
        self.refs = RefStore(self.git_dir)

    # ----------------------------------------------------------------- opening
    @classmethod
    def init(
        cls, work_tree: Path, base: BaseModel | None = None, *, default_branch: str = DEFAULT_BRANCH
    ) -> Repository:
        """Create `.mint/` in `work_tree` as a git directory whose HEAD is `default_branch`."""
        from dulwich.repo import Repo

        work_tree = Path(work_tree)
        work_tree.mkdir(parents=True, exist_ok=True)
        git_dir = work_tree / GIT_DIR
        if git_dir.exists():
            raise MintError(f"{git_dir} already exists: this is a mintvcs repository already")
        git_dir.mkdir()
        repo = Repo.init_bare(str(git_dir), default_branch=default_branch.encode())
        config = repo.get_config()
        # Tensor blobs are zstd already; zlib on top only burns time (and git's delta search is useless on them).
        config.set(b"core", b"compression", b"0")
        config.set(b"core", b"looseCompression", b"0")
        config.set(b"pack", b"compression", b"0")
        config.set(b"core", b"logAllRefUpdates", b"true")
        config.set(b"mint", b"formatVersion", b"1")
        config.write_to_path()
        repo.close()
        (git_dir / "info").mkdir(exist_ok=True)
        (git_dir / "info" / "attributes").write_text(f"{TENSORS_DIR}/** -delta\n")
        (git_dir / "description").write_text("mintvcs adapter repository\n")
        if base is not None:
            (git_dir / BASE_FILE).write_text(json.dumps(base.to_json(), indent=1) + "\n")
        return cls(git_dir, work_tree)

    @classmethod
    def open(cls, path: Path | str = ".") -> Repository:
        """Open the repository at `path` or its nearest parent; `path` may be the `.mint` directory itself."""
        start = Path(path).resolve()
        if (start / "HEAD").is_file() and (start / "objects").is_dir():
            return cls(start, start.parent if start.name == GIT_DIR else None)
        for candidate in (start, *start.parents):
            if (candidate / GIT_DIR / "HEAD").is_file():
                return cls(candidate / GIT_DIR, candidate)
        raise NotARepositoryError(
            f"not a mintvcs repository (or any parent up to /): {start}; run 'mintvcs init'"
        )

    @cached_property
    def objects(self) -> DiskObjectStore:
        """The git object store, with the compression levels of `.mint/config`."""
        from dulwich.config import ConfigFile
        from dulwich.object_store import DiskObjectStore

        config = ConfigFile.from_path(str(self.git_dir / "config"))
        return DiskObjectStore.from_config(str(self.git_dir / "objects"), config)

    @cached_property
    def base(self) -> BaseModel | None:
        """The base model recorded at init, if any."""
        path = self.git_dir / BASE_FILE
        if not path.is_file():
            return None
        return BaseModel.from_json(json.loads(path.read_text()))

    def close(self) -> None:
        """Release open pack files."""
        if "objects" in self.__dict__:
            self.objects.close()

    # ----------------------------------------------------------------- objects
    def get_object(self, oid: str, *, what: str = "object") -> ShaFile:
        """Read one git object, naming `what` if it is missing or unreadable."""
        import zlib

        from dulwich.errors import ChecksumMismatch, ObjectFormatException
        from dulwich.objects import ObjectID

        problem: str | None = None
        try:
            return self.objects[ObjectID(oid.encode())]
        except KeyError:
            problem = "is missing from the store"
        except (
            zlib.error,
            ChecksumMismatch,
            ObjectFormatException,
            ValueError,
            AssertionError,
        ) as err:
            problem = f"is corrupt ({err}); run 'mintvcs fsck'"
        # Raised outside the except block so the error does not keep dulwich's frames (and a
        # view of the pack's memory map) alive.
        raise CorruptObjectError(f"{what}: object {oid} {problem}")

    def read_blob(self, oid: str, *, what: str = "blob") -> bytes:
        """The content of a blob."""
        content = self.blob_view(oid, what=what)
        return content if isinstance(content, bytes) else bytes(content)

    def blob_view(self, oid: str, *, what: str = "blob") -> bytes | memoryview:
        """The content of a blob without a copy where it can (a hot swap reads tensors this way)."""
        from dulwich.objects import Blob

        loose = self._read_loose_blob(oid, what)
        if loose is not None:
            return loose
        obj = self.get_object(oid, what=what)
        if not isinstance(obj, Blob):
            raise CorruptObjectError(
                f"{what}: object {oid} is a {obj.type_name.decode()}, not a blob"
            )
        return obj.as_raw_string()

    def _read_loose_blob(self, oid: str, what: str) -> memoryview | None:
        """Inflate a loose blob without building a dulwich object; None when it is not loose."""
        import zlib

        if not _OID.match(oid):
            raise CorruptObjectError(f"{what}: {oid!r} is not an object id")
        try:
            raw = (self.git_dir / "objects" / oid[:2] / oid[2:]).read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = zlib.decompress(raw)
        except zlib.error as err:
            raise CorruptObjectError(
                f"{what}: object {oid} is corrupt ({err}); run 'mintvcs fsck'"
            ) from None
        nul = data.find(b"\0", 0, 32)
        kind, _, size = data[: max(nul, 0)].partition(b" ")
        if nul < 0 or not size.isdigit() or int(size) != len(data) - nul - 1:
            raise CorruptObjectError(
                f"{what}: object {oid} has a corrupt header; run 'mintvcs fsck'"
            )
        if kind != b"blob":
            raise CorruptObjectError(
                f"{what}: object {oid} is a {kind.decode(errors='replace')}, not a blob"
            )
        return memoryview(data)[nul + 1 :]

    def add_blob(self, data: bytes) -> str:
        """Store `data` as a blob; an existing identical blob costs nothing."""
        from dulwich.objects import Blob

        return self.add_object(Blob.from_string(data))

    def add_object(self, obj: ShaFile) -> str:
        """Write a loose object as git does: to a temporary file renamed into place.

        Objects are content-addressed, so two writers of one object cannot conflict, and a
        writer killed half-way leaves only a temporary file that gc removes.
        """
        oid = obj.id.decode()
        directory = self.git_dir / "objects" / oid[:2]
        path = directory / oid[2:]
        try:
            os.utime(path)  # already there: a fresh mtime keeps gc's grace period from pruning it
            return oid
        except FileNotFoundError:
            pass
        directory.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_OBJECT_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(
                    obj.as_legacy_object(compression_level=self.objects.loose_compression_level)
                )
            os.chmod(tmp, 0o444)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return oid

    def tensor_bytes(self, blob_id: str, name: str) -> bytes:
        """Decode a tensor blob, following its XOR chain, verifying each link."""
        blob = self.blob_view(blob_id, what=f"tensor {name}")
        header = codec.read_header(blob, name=name)
        base = self.tensor_bytes(header.base, name) if header.base is not None else None
        data = codec.decode(blob, base, name=name)
        return data

    # --------------------------------------------------------------- revisions
    def commit_info(self, oid: str) -> CommitInfo:
        """Decode a commit object."""
        from dulwich.objects import Commit

        obj = self.get_object(oid, what=f"commit {oid[:12]}")
        if not isinstance(obj, Commit):
            raise UnknownRevisionError(f"{oid} is a {obj.type_name.decode()}, not a commit")
        return _commit_info(obj)

    def read_revision(self, commit_id: str) -> Revision:
        """Load a revision's manifest (tensors are decoded on demand)."""
        from dulwich.objects import Tree

        info = self.commit_info(commit_id)
        tree = self.get_object(info.tree, what=f"tree of {commit_id[:12]}")
        if not isinstance(tree, Tree):
            raise CorruptObjectError(f"commit {commit_id[:12]}: tree {info.tree} is not a tree")
        entries = {e.path.decode(): e.sha.decode() for e in tree.items()}
        if MANIFEST_PATH not in entries or CONFIG_PATH not in entries:
            raise CorruptObjectError(
                f"commit {commit_id[:12]} is not an adapter revision: {MANIFEST_PATH} is missing"
            )
        manifest = Manifest.from_bytes(
            self.read_blob(entries[MANIFEST_PATH], what=MANIFEST_PATH),
            f"manifest of {commit_id[:12]}",
        )
        return Revision(self, info, manifest, entries)

    def write_revision(
        self,
        adapter: AdapterFiles,
        parent: Revision | None,
        meta: dict[str, str] | None = None,
        progress: ProgressFn | None = None,
    ) -> tuple[str, Manifest]:
        """Store an adapter's blobs and tree; returns the tree id and the manifest."""
        from dulwich.index import commit_tree
        from dulwich.objects import ObjectID

        def encode(index: int) -> TensorRecord:
            entry = adapter.layout.tensors[index]
            raw = adapter.tensor_bytes(index)
            digest = hashlib.sha256(raw).hexdigest()
            prior = parent.manifest.tensor(entry.name) if parent else None
            if prior and (prior.sha256, prior.dtype, prior.shape) == (
                digest,
                entry.dtype,
                entry.shape,
            ):
                blob_id, encoding, depth = prior.blob, prior.encoding, prior.depth
            else:
                kwargs: dict[str, Any] = {}
                if (
                    prior
                    and (prior.dtype, prior.shape) == (entry.dtype, entry.shape)
                    and prior.depth < codec.MAX_CHAIN
                ):
                    kwargs = {
                        "base": self.tensor_bytes(prior.blob, entry.name),
                        "base_id": prior.blob,
                        "base_depth": prior.depth,
                    }
                blob = codec.encode(raw, entry.dtype, entry.shape, **kwargs)
                header = codec.read_header(blob, name=entry.name)
                blob_id, encoding, depth = self.add_blob(blob), header.encoding, header.depth
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

        with ThreadPoolExecutor(_WORKERS) as pool:
            records = tuple(pool.map(encode, range(len(adapter.layout.tensors))))
        base = self.base
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
        entries: list[tuple[bytes, ObjectID, int]] = [
            (
                CONFIG_PATH.encode(),
                ObjectID(self.add_blob(adapter.config_bytes).encode()),
                0o100644,
            ),
            (
                MANIFEST_PATH.encode(),
                ObjectID(self.add_blob(manifest.to_bytes()).encode()),
                0o100644,
            ),
            (HEADER_PATH.encode(), ObjectID(manifest.header_blob.encode()), 0o100644),
        ]
        entries += [
            (f"{TENSORS_DIR}/{r.name}".encode(), ObjectID(r.blob.encode()), 0o100644)
            for r in records
        ]
        entries += [
            (
                f"{FILES_DIR}/{f.path}".encode(),
                ObjectID(f.blob.encode()),
                0o100755 if f.executable else 0o100644,
            )
            for f in files
        ]
        tree_id: bytes = commit_tree(cast("ObjectContainer", self), entries)
        return tree_id.decode(), manifest

    def write_commit(self, tree: str, parents: list[str], message: str, identity: str) -> str:
        """Write a commit object."""
        from dulwich.objects import Commit, ObjectID

        commit = Commit()
        commit.tree = ObjectID(tree.encode())
        commit.parents = [ObjectID(p.encode()) for p in parents]
        commit.author = commit.committer = identity.encode()
        commit.author_time = commit.commit_time = int(time.time())
        offset = -time.altzone if time.localtime().tm_isdst > 0 else -time.timezone
        commit.author_timezone = commit.commit_timezone = offset
        commit.encoding = b"UTF-8"
        commit.message = message.encode()
        self.add_object(commit)
        return commit.id.decode()

    def walk(self, start: str, limit: int | None = None) -> Iterator[CommitInfo]:
        """Commits from `start` along first parents, newest first."""
        oid: str | None = start
        count = 0
        while oid is not None and (limit is None or count < limit):
            info = self.commit_info(oid)
            yield info
            count += 1
            oid = info.parents[0] if info.parents else None

    # ------------------------------------------------------------------- refs
    def head_commit(self) -> str | None:
        """The commit HEAD points to, or None on an unborn branch."""
        return self.refs.read("HEAD")

    def current_branch(self) -> str | None:
        """The short name of the checked-out branch, or None when HEAD is detached."""
        target = self.refs.read_symbolic("HEAD")
        return target.removeprefix("refs/heads/") if target else None

    def resolve(self, spec: str) -> str:
        """Resolve a branch, tag, (abbreviated) commit id, HEAD, with `~N`/`^N` suffixes, to a commit id."""
        if not spec or any(ord(c) < 32 or c == "\x7f" for c in spec) or ".." in spec:
            raise UnknownRevisionError(
                f"invalid revision {spec!r}: it is empty or holds '..' or control characters"
            )
        match = _SPEC.match(spec)
        assert match is not None
        name, suffix = match["name"], match["suffix"]
        oid = self._resolve_name(name or "HEAD", spec)
        for step in re.findall(r"[~^][0-9]*", suffix):
            count = int(step[1:]) if len(step) > 1 else 1
            parents = self.commit_info(oid).parents
            if step[0] == "~":
                for _ in range(count):
                    if not parents:
                        raise UnknownRevisionError(f"revision {spec!r} goes past the first commit")
                    oid = parents[0]
                    parents = self.commit_info(oid).parents
            elif count:
                if count > len(parents):
                    raise UnknownRevisionError(
                        f"revision {spec!r}: commit {oid[:12]} has no parent {count}"
                    )
                oid = parents[count - 1]
        return oid

    def _resolve_name(self, name: str, spec: str) -> str:
        """Resolve the part of a spec before any `~`/`^` suffix."""
        candidates = (
            ["HEAD"] if name in ("HEAD", "@") else [name, f"refs/heads/{name}", f"refs/tags/{name}"]
        )
        for ref in candidates:
            if ref != "HEAD" and not ref.startswith("refs/"):
                continue
            try:
                oid = self.refs.read(ref)
            except MintError:
                oid = None
            if oid is not None:
                return self.peel(oid)
        if ref == "HEAD" and name in ("HEAD", "@"):
            raise UnknownRevisionError("HEAD does not point to a commit yet: make a first commit")
        if _HEX.match(name):
            matches = sorted(
                {o.decode() for o in self.objects.iter_prefix(name.encode())}
                if len(name) < 40
                else {name}
            )
            commits = [o for o in matches if self._is_commit_or_tag(o)]
            if len(commits) == 1:
                return self.peel(commits[0])
            if len(commits) > 1:
                raise UnknownRevisionError(
                    f"revision {name!r} is ambiguous: {', '.join(c[:12] for c in commits[:5])}; give more digits"
                )
        raise UnknownRevisionError(f"unknown revision {spec!r}: not a branch, tag or commit id")

    def _is_commit_or_tag(self, oid: str) -> bool:
        try:
            return self.get_object(oid).type_name in (b"commit", b"tag")
        except CorruptObjectError:
            return False

    def peel(self, oid: str) -> str:
        """Follow annotated tags to the commit they name."""
        from dulwich.objects import Tag

        obj = self.get_object(oid)
        while isinstance(obj, Tag):
            oid = obj.object[1].decode()
            obj = self.get_object(oid)
        if obj.type_name != b"commit":
            raise UnknownRevisionError(f"{oid} is a {obj.type_name.decode()}, not a commit")
        return oid

    def list_refs(self) -> dict[str, str]:
        """Every branch and tag with the commit it points to (tags peeled)."""
        return {name: self.peel(oid) for name, oid in self.refs.iter_refs("refs/")}


def _commit_info(commit: Commit) -> CommitInfo:
    """Decode a dulwich commit."""
    return CommitInfo(
        id=commit.id.decode(),
        tree=commit.tree.decode(),
        parents=tuple(p.decode() for p in commit.parents),
        author=commit.author.decode("utf-8", "replace"),
        committer=commit.committer.decode("utf-8", "replace"),
        time=commit.commit_time,
        timezone=commit.commit_timezone,
        message=commit.message.decode("utf-8", "replace"),
    )
