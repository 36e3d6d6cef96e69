"""Loose objects are read before packs: whatever sits at a loose path, a good packed copy still wins."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from mintvcs import maintenance, porcelain
from mintvcs.store import CorruptObjectError, Repository
from tests.mintvcs.storekit import ENV, deleted_packs_held, git, git_log, loose_path, mint


def _head(work: Path) -> str:
    return git_log(work)[0]


def _messages(work: Path) -> list[str]:
    with Repository.open(work) as repo:
        return [c.message.strip() for c in porcelain.log(repo, "HEAD")]


@pytest.mark.parametrize("planted", ["garbage", "empty", "other object", "fifo", "directory"])
def test_a_bad_loose_copy_does_not_hide_the_packed_one(work: Path, planted: str) -> None:
    expected = _messages(work)
    mint(work, "gc")  # every object packed now
    head = _head(work)
    path = loose_path(work, head)
    path.parent.mkdir(exist_ok=True)
    if planted == "garbage":
        path.write_bytes(b"not zlib at all")
    elif planted == "empty":
        path.write_bytes(b"")
    elif planted == "other object":  # another commit's content under HEAD's name
        older = git_log(work)[1]
        raw = git(work / ".mint", "cat-file", "commit", older).stdout.encode()
        path.write_bytes(zlib.compress(b"commit %d\0" % len(raw) + raw))
    elif planted == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer for ever
    else:
        path.mkdir()
    assert _messages(work) == expected
    assert expected[0] in mint(work, "log", "-n", "1").stdout


def test_a_loose_only_object_with_other_content_is_named_corrupt(work: Path) -> None:
    head, older = git_log(work)[:2]
    raw = git(work / ".mint", "cat-file", "commit", older).stdout.encode()
    loose_path(work, head).write_bytes(zlib.compress(b"commit %d\0" % len(raw) + raw))
    with Repository.open(work) as repo, pytest.raises(CorruptObjectError, match=head):
        repo.get_object(head)


def test_a_commit_that_does_not_parse_is_an_error_not_a_traceback(work: Path) -> None:
    tree = git(work / ".mint", "rev-parse", "HEAD^{tree}").stdout.strip()
    # An author header with no value: dulwich's parser raises a plain ValueError on it. (An
    # empty time zone, its IndexError, was the example before: it now reads as git reads it.)
    body = f"tree {tree}\nauthor\ncommitter A <a@b> 1700000000 +0000\n\nx\n"
    raw = body.encode()
    oid = hashlib.sha1(b"commit %d\0" % len(raw) + raw).hexdigest()
    path = loose_path(work, oid)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(zlib.compress(b"commit %d\0" % len(raw) + raw))
    with Repository.open(work) as repo, pytest.raises(CorruptObjectError, match=oid):
        repo.get_object(oid)


def test_a_repository_held_open_survives_another_process_gc(work: Path) -> None:
    with Repository.open(work) as repo:
        porcelain.log(repo, "HEAD")  # the packs (none yet) and maps are now cached
        mint(work, "gc")
        mint(work, "gc")  # the first gc's pack is replaced: a second list goes stale
        assert maintenance.fsck(repo).ok
        maintenance.gc(repo)
        assert not maintenance.auto_gc(repo).rewritten
        assert _messages(work)[0] == porcelain.log(repo, "HEAD")[0].message.strip()


def test_gc_sweeps_an_index_left_without_its_pack(work: Path) -> None:
    mint(work, "gc")
    pack_dir = work / ".mint" / "objects" / "pack"
    orphan = pack_dir / ("pack-" + "0" * 40 + ".idx")
    orphan.write_bytes((next(pack_dir.glob("*.idx"))).read_bytes())
    old = 1_600_000_000
    os.utime(orphan, (old, old))
    mint(work, "gc")
    assert not orphan.exists()


def test_a_repository_held_open_lets_go_of_packs_another_process_removed(work: Path) -> None:
    # A server reads old revisions out of the pack it first opened and never misses: until it
    # lets go, the pack another process's repack deleted keeps its disk space.
    mint(work, "gc")
    with Repository.open(work) as repo:
        head = _head(work)
        record = repo.read_revision(head).manifest.tensors[0]  # read through dulwich
        repo.tensor_bytes(record.blob, record.name)  # and through our own pack reader
        git(work / ".mint", "repack", "-a", "-d", "-f", "-q")
        assert deleted_packs_held(work / ".mint")
        repo.release_removed_packs()
        assert deleted_packs_held(work / ".mint") == []
        assert repo.read_revision(head).commit == head  # read from the new pack


def test_a_repository_held_open_lets_go_of_a_pack_rewritten_under_its_name(work: Path) -> None:
    # git gc on a store where nothing changed writes the same pack again: same name, a new
    # file, the old one unlinked. Known by name only, it stayed mapped for the reader's life.
    mint(work, "gc")
    git(work / ".mint", "gc", "-q")
    pack_dir = work / ".mint" / "objects" / "pack"
    with Repository.open(work) as repo:
        head = _head(work)
        record = repo.read_revision(head).manifest.tensors[0]
        repo.tensor_bytes(record.blob, record.name)
        before = sorted(p.name for p in pack_dir.glob("*.pack"))
        git(work / ".mint", "gc", "-q")
        assert sorted(p.name for p in pack_dir.glob("*.pack")) == before  # the same name
        assert deleted_packs_held(work / ".mint")
        repo.release_removed_packs()
        assert deleted_packs_held(work / ".mint") == []
        assert repo.tensor_bytes(record.blob, record.name)  # read from the new file


def _fsck_within(work: Path, address_space: int) -> subprocess.CompletedProcess[str]:
    """`mintvcs fsck` as a real process whose address space is capped (ulimit -v)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", "fsck"],
        cwd=work, env=ENV, capture_output=True, text=True, check=False, timeout=300,
        preexec_fn=cap,
    )  # fmt: skip


def test_fsck_reports_a_huge_sparse_loose_object_and_carries_on(work: Path) -> None:
    # fsck read the whole file: it printed only "out of memory" and lost the rest of its report.
    blobs = git(work / ".mint", "rev-list", "--objects", "--no-object-names", "--all").stdout
    loose = [oid for oid in blobs.split() if loose_path(work, oid).is_file()]
    huge, garbled = loose[-1], loose[-2]
    os.truncate(loose_path(work, huge), 50 << 30)  # sparse: its stream, then 50 GB of zeros
    loose_path(work, garbled).chmod(0o644)
    loose_path(work, garbled).write_bytes(b"not zlib at all")
    limited = _fsck_within(work, 8 << 30)
    assert limited.returncode == 1 and "Traceback" not in limited.stderr, limited.stderr
    assert "out of memory" not in limited.stderr + limited.stdout
    lines = (limited.stdout + limited.stderr).splitlines()
    assert any(f"loose object {huge} is too large to check" in line for line in lines), lines
    assert any(f"corrupt loose object {garbled}" in line for line in lines), lines
    # With room to map it, what lies after its zlib stream is damage, as git fsck's "garbage at
    # end of loose object".
    report = json.loads(mint(work, "fsck", "--json", ok=False).stdout)["problems"]
    assert f"corrupt loose object {huge}: garbage after its zlib stream" in report
    assert any(f"corrupt loose object {garbled}" in line for line in report), report


def test_fsck_flags_a_loose_object_whose_header_misstates_its_size(work: Path) -> None:
    """A loose object hashing right but whose header says 5 bytes for 3 is damage, as git fsck says."""
    raw = b"blob 5\0abc"
    oid = hashlib.sha1(raw).hexdigest()
    path = loose_path(work, oid)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(zlib.compress(raw))
    oracle = git(work / ".mint", "fsck", ok=False)
    assert oracle.returncode != 0 and oid[2:] in oracle.stderr, oracle.stderr
    result = mint(work, "fsck", ok=False)
    assert result.returncode == 1 and oid in result.stdout + result.stderr
