"""gc and fsck beside other processes on one repository: the gc lock excludes, fsck stays quiet."""

from __future__ import annotations

import errno
import itertools
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from mintvcs import maintenance
from mintvcs.store import Repository
from tests.mintvcs.storekit import git

_HOLD_SECONDS = 0.02


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = mp.get_context("fork").Process(target=os._exit, args=(0,))
    child.start()
    child.join()
    assert child.pid is not None
    return child.pid


def _race_for_the_lock(work: Path, rounds: int, barrier: Barrier, out: Any) -> None:
    """Enter the gc lock once a round, all takers together; send back when each hold began and ended."""
    real_unlink = Path.unlink

    def slow_unlink(self: Path, missing_ok: bool = False) -> None:
        # Widens the gap between judging the leftover dead and removing it, where takers race.
        if self.name == "gc.pid":
            time.sleep(0.005)
        real_unlink(self, missing_ok=missing_ok)

    Path.unlink = slow_unlink  # type: ignore[method-assign]
    repo = Repository.open(work)
    held = []
    for round_ in range(rounds):
        barrier.wait()
        try:
            with maintenance._gc_lock(repo):
                start = time.monotonic()
                time.sleep(_HOLD_SECONDS)
                held.append((round_, start, time.monotonic()))
        except maintenance.GcLockedError:
            pass
        barrier.wait()
    out.put(held)


def test_takers_of_a_dead_gcs_lock_exclude_each_other(tmp_path: Path) -> None:
    Repository.init(tmp_path)
    lock = tmp_path / ".mint" / "gc.pid"
    takers, rounds = 3, 25
    context = mp.get_context("fork")
    barrier = context.Barrier(takers + 1)
    out = context.Queue()
    procs = [
        context.Process(target=_race_for_the_lock, args=(tmp_path, rounds, barrier, out))
        for _ in range(takers)
    ]
    for proc in procs:
        proc.start()
    leftover = f"{_dead_pid()} {socket.gethostname()}"
    for _ in range(rounds):
        lock.write_text(leftover)  # as a killed gc leaves it
        barrier.wait()
        barrier.wait()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    by_round: dict[int, list[tuple[float, float]]] = {}
    for held in results:
        for round_, start, end in held:
            by_round.setdefault(round_, []).append((start, end))
    assert len(by_round) == rounds  # every round, someone took the leftover over
    for round_, spans in by_round.items():
        spans.sort()
        overlaps = [(a, b) for a, b in itertools.pairwise(spans) if b[0] < a[1]]
        assert not overlaps, f"round {round_}: two gcs held the lock at once"
    assert not lock.exists()


@pytest.mark.parametrize("auto", [False, True])
def test_gc_that_lost_a_race_says_retry_not_fsck(
    work: Path, monkeypatch: pytest.MonkeyPatch, auto: bool
) -> None:
    gone = work / ".mint" / "objects" / "pack" / ("pack-" + "0" * 40 + ".pack")

    def removed_meanwhile(*_args: object, **_kwargs: object) -> None:
        # What reading a pack that a `git repack` deleted under gc raises.
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(gone))

    monkeypatch.setattr(maintenance, "_repack", removed_meanwhile)
    monkeypatch.setattr(maintenance, "_roll_up", removed_meanwhile)
    monkeypatch.setattr(maintenance, "auto_gc_due", lambda _repo: True)
    repo = Repository.open(work)
    with pytest.raises(maintenance.GcWriteError) as caught:
        if auto:
            maintenance.auto_gc(repo)
        else:
            maintenance.gc(repo)
    message = str(caught.value)
    assert "removed meanwhile" in message and str(gone) in message
    assert "fsck" not in message


@pytest.mark.parametrize("auto", [False, True], ids=["gc", "gc --auto"])
@pytest.mark.parametrize("how", ["pruned", "packed"])
def test_gc_skips_a_loose_object_removed_after_it_was_listed(
    work: Path, monkeypatch: pytest.MonkeyPatch, how: str, auto: bool
) -> None:
    # `git prune` (an unreachable object) or `git repack -d` (which packs loose objects, then
    # deletes them) need no gc lock: a loose file may go between gc's listing and its read.
    # git's gc skips such a file; it is not damage.
    repo = Repository.open(work)
    stray = repo.add_blob(b"nothing refers to this")
    real_loose = maintenance._loose_files

    def listed_then_removed(repo: Repository) -> Iterator[tuple[str, Path]]:
        listed = list(real_loose(repo))
        if how == "pruned":
            os.unlink(work / ".mint" / "objects" / stray[:2] / stray[2:])
        else:
            git(work / ".mint", "repack", "-d", "-q")  # packs what refs reach; no loose copies
        yield from listed

    monkeypatch.setattr(maintenance, "_loose_files", listed_then_removed)
    if auto:
        monkeypatch.setattr(maintenance, "auto_gc_due", lambda _repo: True)
        monkeypatch.setattr(maintenance, "auto_limits", lambda _repo: (1, 1))
        assert maintenance.auto_gc(repo).objects > 0
    else:
        assert maintenance.gc(repo).packed > 0
    monkeypatch.undo()
    report = maintenance.fsck(Repository.open(work))
    assert report.ok, report.problems
    assert report.revisions == 3


def _gc_elsewhere(work: Path) -> None:
    """A gc by another Repository, as another process's: it packs or replaces what fsck listed."""
    maintenance.gc(Repository.open(work))


@pytest.mark.parametrize("when", ["loose listed", "packs listed", "second revision"])
def test_fsck_is_quiet_when_a_gc_moves_objects_under_it(
    work: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    if when == "packs listed":
        git(work / ".mint", "repack", "-a", "-d", "-q")  # a pack that gc replaces
    if when == "loose listed":
        real_loose = maintenance._loose_files

        listings = []

        def loose_then_gc(repo: Repository) -> Iterator[tuple[str, Path]]:
            listed = list(real_loose(repo))
            listings.append(listed)
            if len(listings) == 1:  # fsck's; the gc lists them too
                _gc_elsewhere(work)
            yield from listed

        monkeypatch.setattr(maintenance, "_loose_files", loose_then_gc)
    elif when == "packs listed":
        real_checksum = maintenance._pack_checksum_problem
        calls = []

        def gc_then_checksum(pack: Any) -> str | None:
            calls.append(pack)
            if len(calls) == 1:  # fsck's; the gc checks the pack too
                _gc_elsewhere(work)
            return real_checksum(pack)

        monkeypatch.setattr(maintenance, "_pack_checksum_problem", gc_then_checksum)
    else:
        real_read = Repository.read_revision
        reads = []

        def gc_then_read(self: Repository, oid: str) -> Any:
            reads.append(oid)
            if len(reads) == 2:
                _gc_elsewhere(work)
            return real_read(self, oid)

        monkeypatch.setattr(Repository, "read_revision", gc_then_read)
    report = maintenance.fsck(Repository.open(work))
    assert report.ok, report.problems
    assert report.revisions == 3 and report.tensors > 0


def test_fsck_is_quiet_while_gcs_replace_packs(work: Path) -> None:
    stop = threading.Event()
    failures: list[BaseException] = []

    def churn() -> None:
        # Each round rewrites every object into a new pack and deletes the old one.
        try:
            while not stop.is_set():
                git(work / ".mint", "repack", "-a", "-d", "-q")
                _gc_elsewhere(work)
        except BaseException as err:
            failures.append(err)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(15):
            report = maintenance.fsck(Repository.open(work))
            assert report.ok, report.problems
    finally:
        stop.set()
        worker.join()
    assert not failures


def test_a_commit_makes_again_a_fan_out_directory_a_gc_removes_under_it(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gc removes the objects/XX directories its packing emptied. A writer whose mkdir found
    # one there, and then found nothing, failed with FileExistsError and lost its commit.
    from mintvcs import porcelain

    repo = Repository.open(work)
    objects = repo.git_dir / "objects"
    for i in range(256):
        (objects / f"{i:02x}").mkdir(exist_ok=True)
    real_mkdir = os.mkdir
    tidied: list[str] = []

    def mkdir_as_a_gc_tidies(path: Any, *args: Any, **kwargs: Any) -> None:
        try:
            real_mkdir(path, *args, **kwargs)
        except FileExistsError:
            if os.path.dirname(os.fspath(path)) == os.fspath(objects) and not tidied:
                os.rmdir(path)  # empty: what gc's tidy-up does to it now
                tidied.append(os.fspath(path))
            raise

    monkeypatch.setattr(os, "mkdir", mkdir_as_a_gc_tidies)
    parent = repo.resolve("HEAD")
    source = work / "extra-file.txt"
    source.write_text("a change, so that there is something to commit\n")
    commit = porcelain.commit(repo, "through a gc's tidy-up", show_progress=False).commit
    monkeypatch.undo()
    assert tidied and commit != parent
    report = maintenance.fsck(Repository.open(work))
    assert report.ok, report.problems
