"""fsck and gc on hostile stores: links out of .mint/objects, and delta chains crafted to be deep."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mintvcs import codec, porcelain
from mintvcs.maintenance import MAX_DELTA_DEPTH, fsck
from mintvcs.objects import TensorRecord
from mintvcs.packs import _pack_entry_header
from mintvcs.plane_cache import PlaneCache
from mintvcs.store import Repository
from tests.mintvcs.storekit import blobs, git, mint, mutate, tensor_names

Tree = dict[str, tuple[int, bytes | str | None]]


def tree_state(root: Path) -> Tree:
    """Every path under `root`, no link followed: its mode and its bytes (a link: its target)."""
    out: Tree = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            st = path.lstat()
            if path.is_symlink():
                content: bytes | str | None = os.readlink(path)
            elif path.is_dir():
                content = None
            else:
                content = path.read_bytes()
            out[str(path.relative_to(root))] = (st.st_mode, content)
    return out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def gc_refuses(work: Path, *named: str) -> str:
    """Run gc expecting one refusal line naming each of `named`; .mint must come out unchanged."""
    before = tree_state(work / ".mint")
    result = mint(work, "gc", ok=False)  # asserts that no traceback was printed
    assert result.returncode == 128, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gc refused: "), result.stderr
    assert all(text in lines[0] for text in named), lines[0]
    assert result.stdout == ""
    assert tree_state(work / ".mint") == before, "a refused gc changed the repository"
    return lines[0]


def victim_with_old_object(victim: Path) -> None:
    """Give a victim fan-out directory files of its own: an old loose object of another
    repository (unreachable from ours: gc would prune it) and a plain file."""
    for n in range(100_000):  # a blob whose id falls in this fan-out directory
        body = b"a blob of another repository, take %d\n" % n
        raw = b"blob %d\0" % len(body) + body
        oid = hashlib.sha1(raw).hexdigest()
        if oid.startswith(victim.name):
            break
    old = victim / oid[2:]
    old.write_bytes(zlib.compress(raw))
    week_ago = time.time() - 7 * 24 * 3600
    os.utime(old, (week_ago, week_ago))
    (victim / "NOTES.txt").write_text("not an object at all\n")


def test_gc_refuses_a_fan_out_directory_linked_outside(work: Path, tmp_path: Path) -> None:
    # A tarball whose objects/xx is a link into another repository's objects (e17 of the review).
    oid = blobs(work)[0]
    fan = work / ".mint" / "objects" / oid[:2]
    victim = tmp_path / "other-repo-objects" / oid[:2]
    victim.parent.mkdir()
    shutil.copytree(fan, victim)  # the objects are there, behind the link: reads still work
    victim_with_old_object(victim)
    shutil.rmtree(fan)
    fan.symlink_to(victim)
    outside = tree_state(victim.parent)

    line = gc_refuses(work, str(fan), str(victim))
    assert "symbolic link" in line and "nothing was changed" in line
    assert tree_state(victim.parent) == outside, "gc touched files outside the repository"

    result = mint(work, "fsck", ok=False)
    assert result.returncode == 1
    (problem,) = error_lines(result.stderr)
    assert str(fan) in problem and "symbolic link" in problem
    report = json.loads(mint(work, "fsck", "--json", ok=False).stdout)
    assert not report["ok"] and report["problems"] == [problem.removeprefix("error: ")]
    assert tree_state(victim.parent) == outside


def test_gc_refuses_a_pack_directory_linked_outside(work: Path, tmp_path: Path) -> None:
    # Repacking through a linked objects/pack would write there and delete the packs it replaced.
    mint(work, "gc")
    # A new loose object: a gc following the link would write a new pack there and delete this one.
    (work / "new.txt").write_text("written after the last gc\n")
    git(work / ".mint", "hash-object", "-w", str(work / "new.txt"))
    packs = work / ".mint" / "objects" / "pack"
    victim = tmp_path / "elsewhere" / "pack"
    shutil.move(packs, victim)
    (victim / "NOTES.txt").write_text("not a pack at all\n")
    packs.symlink_to(victim, target_is_directory=True)
    outside = tree_state(victim.parent)
    gc_refuses(work, str(packs), str(victim))
    assert tree_state(victim.parent) == outside, "gc touched files outside the repository"
    assert str(packs) in error_lines(mint(work, "fsck", ok=False).stderr)[0]


def test_fsck_reports_every_link_in_the_store(work: Path, tmp_path: Path) -> None:
    # A linked loose object and a dangling link: fsck names each once and follows neither.
    objects = work / ".mint" / "objects"
    first = blobs(work)[0]
    target = tmp_path / "outside-object"
    shutil.move(objects / first[:2] / first[2:], target)
    (objects / first[:2] / first[2:]).symlink_to(target)
    free = next(f"{i:02x}" for i in range(256) if not (objects / f"{i:02x}").exists())
    (objects / free).symlink_to(tmp_path / "does-not-exist")  # a fan-out name no object uses
    result = mint(work, "fsck", "--json", ok=False)
    assert result.returncode == 1
    problems = json.loads(result.stdout)["problems"]
    # One line for each link (reading the linked object through the store may add its own).
    mark = " is a symbolic link (to "
    linked = [p.partition(mark)[0] for p in problems if mark in p]
    assert sorted(linked) == sorted([str(objects / first[:2] / first[2:]), str(objects / free)])
    gc_refuses(work, "(and 1 more link)")


# -- packs written by hand: git's format (Documentation/gitformat-pack.txt), then `git index-pack`.


def _size_varint(n: int) -> bytes:
    """A delta's source or target size: little-endian base-128."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ofs_distance(n: int) -> bytes:
    """OFS_DELTA's distance back to the base: big-endian base-128, each continuation minus one."""
    out = [n & 0x7F]
    n >>= 7
    while n:
        n -= 1
        out.insert(0, 0x80 | (n & 0x7F))
        n >>= 7
    return bytes(out)


def _copy_all_then_insert(source_len: int, byte: int) -> bytes:
    """A delta whose target is its source plus one byte: copy [0, source_len), insert `byte`."""
    op, args = 0x80, bytearray()
    for i in range(3):  # offset 0 needs no offset bytes; the size fits three
        part = (source_len >> (8 * i)) & 0xFF
        if part:
            op |= 1 << (4 + i)
            args.append(part)
    body = bytes([op]) + bytes(args) + bytes([1, byte])
    return _size_varint(source_len) + _size_varint(source_len + 1) + body


def write_chain_pack(pack_dir: Path, depth: int, size: int) -> list[str]:
    """A pack of one blob of `size` bytes and a chain of `depth` deltas on it, alternately
    OFS_DELTA and REF_DELTA, each adding a byte; indexed by real git. Returns the ids, base first."""
    content = (bytes(range(256)) * (size // 256 + 1))[:size]
    raw_ids: list[bytes] = []
    body = bytearray(b"PACK" + struct.pack(">II", 2, depth + 1))
    previous_at = len(body)
    body += _pack_entry_header(3, len(content)) + zlib.compress(content, 1)
    raw_ids.append(hashlib.sha1(b"blob %d\0" % len(content) + content).digest())
    for i in range(depth):
        delta = _copy_all_then_insert(len(content), i & 0xFF)
        here = len(body)
        if i % 2:
            body += _pack_entry_header(7, len(delta)) + raw_ids[-1]
        else:
            body += _pack_entry_header(6, len(delta)) + _ofs_distance(here - previous_at)
        body += zlib.compress(delta)
        previous_at = here
        content += bytes([i & 0xFF])
        raw_ids.append(hashlib.sha1(b"blob %d\0" % len(content) + content).digest())
    body += hashlib.sha1(body).digest()
    pack = pack_dir / f"pack-chain{depth}.pack"
    pack.write_bytes(bytes(body))
    git(pack_dir.parent.parent, "index-pack", str(pack))  # real git accepts it
    return [raw.hex() for raw in raw_ids]


def test_fsck_resolves_a_deep_delta_chain_once(work: Path) -> None:
    # 3000 x 64 KiB: asking dulwich for each object rebuilt its chain (LRU cache overflowed),
    # 12 s here before the one-pass check; now about a quarter of a second.
    pack_dir = work / ".mint" / "objects" / "pack"
    pack_dir.mkdir(exist_ok=True)
    repo = Repository.open(work)
    try:
        before = fsck(repo).objects
    finally:
        repo.close()
    ids = write_chain_pack(pack_dir, 3000, 64 * 1024)
    repo = Repository.open(work)
    try:
        started = time.monotonic()
        report = fsck(repo)
        elapsed = time.monotonic() - started
        assert repo.read_blob(ids[-1])[-3:] == bytes([0xB5, 0xB6, 0xB7])  # the chain is real
    finally:
        repo.close()
    assert report.ok, report.problems
    assert report.objects == before + 3001
    assert elapsed < 5, f"fsck took {elapsed:.1f} s on a 3000-deep chain"


def test_delta_chain_deeper_than_git_allows_is_refused(work: Path) -> None:
    pack_dir = work / ".mint" / "objects" / "pack"
    pack_dir.mkdir(exist_ok=True)
    depth = MAX_DELTA_DEPTH + 5
    ids = write_chain_pack(pack_dir, depth, 64)

    started = time.monotonic()
    result = mint(work, "fsck", ok=False)
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    (problem,) = error_lines(result.stderr)  # one line for the pack, not one per object
    assert f"pack-chain{depth}.pack: 5 objects" in problem  # depths 4096..4100; 4095 is fine
    assert f"limit of {MAX_DELTA_DEPTH}" in problem and f"{ids[-1]} at depth {depth}" in problem
    assert "git --git-dir=.mint repack" in problem

    line = gc_refuses(work, f"{ids[-1]} at depth {depth}")
    assert "deeper than git's delta chain limit" in line


def test_fsck_decodes_what_commits_share_once(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 300 commits of HEAD's tree, as fast-import makes in a second: fsck read every revision and
    # decoded every tensor of each (20,000 such commits took minutes, where git fsck takes 0.2 s).
    from dulwich.objects import Commit

    repo = Repository.open(work)
    parent = repo.head_commit() or ""
    tree = repo.commit_info(parent).tree
    for n in range(300):
        commit = Commit()
        commit.tree, commit.parents = tree.encode(), [parent.encode()]
        commit.author = commit.committer = b"Eve <eve@example.com>"
        commit.author_time = commit.commit_time = n
        commit.author_timezone = commit.commit_timezone = 0
        commit.message = b"the same tree again\n"
        parent = repo.add_object(commit)
    git(work / ".mint", "update-ref", "refs/heads/same", parent)
    trees = {repo.commit_info(repo.resolve(spec)).tree for spec in ("HEAD", "HEAD~1", "HEAD~2")}
    read, decoded = [], []
    read_revision, verify_tensor = Repository.read_revision, Repository.verify_tensor

    def counting_read(self: Repository, commit_id: str) -> Any:
        read.append(commit_id)
        return read_revision(self, commit_id)

    def counting_decode(self: Repository, record: TensorRecord, planes: PlaneCache) -> None:
        decoded.append((record.blob, record.dtype, record.shape, record.sha256))
        verify_tensor(self, record, planes)

    monkeypatch.setattr(Repository, "read_revision", counting_read)
    monkeypatch.setattr(Repository, "verify_tensor", counting_decode)
    try:
        report = fsck(repo)
    finally:
        repo.close()
    assert report.ok, report.problems
    assert report.revisions == 303 and report.tensors == 303 * len(tensor_names(work))
    assert len(read) == len(trees) == 3  # a revision is read once per tree
    assert len(decoded) == len(set(decoded))  # a tensor blob once per record it is checked against


def test_fsck_decodes_each_link_of_a_chain_once(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each revision's tensors are XOR links on its parent's: fsck decoded every tensor's chain
    # from its root, so the link d revisions below a branch's tip was decoded d + 1 times over.
    # (A branch whose history fsck walks after its fork point's is still decoded once from the
    # root there: an unchanged cost per branch, not one per revision.)
    repo = Repository.open(work)
    for seed in range(3, 9):
        mutate(work, seed=seed)
        porcelain.commit(repo, f"rev {seed}", verify=False, show_progress=False)
    records = [
        record
        for n in range(9)
        for record in repo.read_revision(repo.resolve(f"HEAD~{n}")).manifest.tensors
    ]
    assert max(record.depth for record in records) == codec.MAX_CHAIN
    tensor_blobs = {record.blob for record in records}
    reads: Counter[str] = Counter()
    decodes = []
    blob_view, segment_planes = Repository.blob_view, codec._segment_planes

    def counting_view(self: Repository, oid: str, **kwargs: Any) -> bytes | memoryview:
        reads[oid] += 1
        return blob_view(self, oid, **kwargs)

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        decodes.append(args[1])  # the blob's header
        return segment_planes(*args, **kwargs)

    monkeypatch.setattr(Repository, "blob_view", counting_view)
    monkeypatch.setattr(codec, "_segment_planes", counting_decode)
    try:
        report = fsck(repo)
    finally:
        repo.close()
    assert report.ok, report.problems
    assert report.revisions == 9 and report.tensors == 9 * len(tensor_names(work))
    assert {oid: reads[oid] for oid in tensor_blobs} == dict.fromkeys(tensor_blobs, 1)
    assert len(decodes) == len(tensor_blobs)
