"""`mintvcs gc` on a damaged store refuses as `git gc` does, and changes nothing while refusing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.mintvcs.storekit import (
    blobs,
    copy_adapter,
    damage_checks,
    git,
    git_fsck,
    loose_path,
    mint,
    mint_fails,
    mutate,
    pack_objects,
)

Snapshot = dict[str, tuple[int, bytes | None]]


def snapshot(git_dir: Path) -> Snapshot:
    """Every path under `git_dir`: its mode and, for files, its bytes."""
    out: Snapshot = {}
    for path in sorted(git_dir.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(git_dir))] = (
            st.st_mode,
            None if path.is_dir() else path.read_bytes(),
        )
    return out


def rewrite(path: Path, data: bytes) -> None:
    """Replace a read-only object file's bytes, keeping its mode and mtime."""
    st = path.stat()
    path.chmod(0o644)
    path.write_bytes(data)
    path.chmod(st.st_mode)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def gc_refuses(work: Path, oid: str) -> str:
    """Run gc expecting a refusal naming `oid`; the repository must come out unchanged."""
    before = snapshot(work / ".mint")
    checks = damage_checks(work)
    assert checks[0], "the test should have damaged the store"
    result = mint(work, "gc", ok=False)  # asserts that no traceback was printed
    assert result.returncode == 128, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gc refused: "), result.stderr
    line = lines[0]
    assert oid in line and "mintvcs fsck" in line and "backup" in line, line
    assert result.stdout == "", "gc must not report packing after refusing"
    assert snapshot(work / ".mint") == before, "a refused gc changed the repository"
    assert damage_checks(work) == checks
    return line


def test_gc_refuses_bit_flipped_loose_blob(work: Path) -> None:
    oid = blobs(work)[0]
    path = loose_path(work, oid)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the stored (zstd) part of the tensor blob
    rewrite(path, bytes(data))
    line = gc_refuses(work, oid)
    assert "corrupt loose object" in line


def test_gc_refuses_recompressed_blob_with_wrong_content(work: Path) -> None:
    oid, other = blobs(work)[:2]
    path = loose_path(work, oid)
    body = zlib.decompress(loose_path(work, other).read_bytes())
    # A well-formed object whose content is another blob's: only its hash gives it away.
    rewrite(path, zlib.compress(body))
    line = gc_refuses(work, oid)
    assert "hashes to" in line


@pytest.mark.parametrize("which", [0, -1], ids=["largest-tensor", "safetensors-header"])
def test_gc_refuses_missing_reachable_blob(work: Path, which: int) -> None:
    oid = blobs(work, "side")[which]
    loose_path(work, oid).unlink()
    line = gc_refuses(work, oid)
    assert "missing" in line and "reachable from" in line


def test_gc_refuses_corrupt_object_inside_pack(work: Path) -> None:
    mint(work, "gc")
    packs = list((work / ".mint" / "objects" / "pack").glob("*.pack"))
    assert len(packs) == 1
    oid = blobs(work)[0]
    # `git verify-pack -v` rows: id, type, size, size in pack, offset.
    rows = git(work / ".mint", "verify-pack", "-v", str(packs[0].with_suffix(".idx"))).stdout
    entry = next(line.split() for line in rows.splitlines() if line.startswith(oid))
    in_pack, offset = int(entry[3]), int(entry[4])
    data = bytearray(packs[0].read_bytes())
    data[offset + in_pack // 2] ^= 0x01
    rewrite(packs[0], bytes(data))
    line = gc_refuses(work, oid)
    assert "corrupt packed object" in line


def test_gc_skips_reflog_entry_whose_commit_is_gone(work: Path) -> None:
    # As git: a reflog that names a pruned commit is no reason to refuse.
    dropped = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    mint(work, "reset", "--hard", "HEAD~1")
    loose_path(work, dropped).unlink()
    checks = damage_checks(work)
    assert checks[1][0] != 0 and "invalid reflog entry" in checks[1][1]
    assert "packed " in mint(work, "gc").stdout
    assert damage_checks(work) == checks  # the same damage, nothing new


def test_gc_of_a_store_with_no_objects_says_it_wrote_nothing(tmp_path: Path) -> None:
    # It compared no packs with the one a last gc wrote (none): "rewritten": true every time,
    # though nothing was written, as git's gc writes nothing there.
    mint(tmp_path, "init", "empty", "--no-hooks")
    work = tmp_path / "empty"
    for _ in range(2):
        report = json.loads(mint(work, "gc", "--json").stdout)
        assert report["rewritten"] is False and report["packed"] == 0, report
    assert list((work / ".mint" / "objects" / "pack").iterdir()) == []
    assert mint(work, "gc").stdout.startswith("nothing to do: ")


def test_gc_on_healthy_repository_packs_and_cleans_up(work: Path) -> None:
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    loose = sum(1 for p in (work / ".mint" / "objects").glob("??/*"))
    first = json.loads(mint(work, "gc", "--json").stdout)
    # Disk space, as du counts it: the loose files' blocks are freed, not just their lengths.
    du = subprocess.run(
        ["du", "-s", "-B1", str(work / ".mint" / "objects")], capture_output=True, text=True
    )
    assert loose > 0 and first["bytes_after"] == int(du.stdout.split()[0]) - _dirs_bytes(work)
    assert first["bytes_after"] < first["bytes_before"], first
    git_dir = work / ".mint"
    assert not (git_dir / "gc.pid").exists()
    assert not [p for p in (git_dir / "objects").iterdir() if len(p.name) == 2]
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    git_fsck(work)
    assert git(git_dir, "rev-parse", "HEAD").stdout.strip() == head
    (pack,) = (git_dir / "objects" / "pack").glob("*.pack")
    written = pack.stat()
    again = json.loads(mint(work, "gc", "--json").stdout)  # and again, on a packed store
    assert again["pruned"] == 0 and again["packed"] == first["packed"] > 0
    assert first["rewritten"] and not again["rewritten"]
    assert first["refs_packed"] >= 1 and again["refs_packed"] == 0
    assert mint(work, "gc").stdout.startswith("nothing to do: ")
    # A branch made since: its loose ref is packed, and said so, not "nothing to do".
    mint(work, "branch", "since")
    said = mint(work, "gc").stdout
    assert said.startswith("packed 1 ref; ") and "already packed" in said, said
    assert not (git_dir / "refs" / "heads" / "since").exists()
    assert "refs/heads/since" in (git_dir / "packed-refs").read_text()
    # Nothing new since: the pack gc wrote is left as it is, not written again.
    assert (pack.stat().st_ino, pack.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    # A new commit's loose objects: the next gc packs everything into a new pack, the only one.
    mutate(work, seed=31)
    mint(work, "commit", "-m", "after gc", "--no-verify")
    third = json.loads(mint(work, "gc", "--json").stdout)
    assert third["packed"] > first["packed"]
    assert [p.name for p in (git_dir / "objects" / "pack").glob("*.pack")] != [pack.name]
    assert len(list((git_dir / "objects" / "pack").glob("*.pack"))) == 1
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    git_fsck(work)


def test_gc_refuses_while_another_gc_holds_the_lock(work: Path) -> None:
    lock = work / ".mint" / "gc.pid"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}")  # this test process: alive
    before = snapshot(work / ".mint")
    line = mint_fails(work, "gc")
    assert "another gc is running" in line and f"pid {os.getpid()}" in line
    assert snapshot(work / ".mint") == before


def test_gc_takes_over_the_lock_of_a_dead_gc(work: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    lock = work / ".mint" / "gc.pid"
    lock.write_text(f"{dead.stdout.strip()} {socket.gethostname()}")
    assert mint(work, "gc").stdout.startswith("packed ")
    assert not lock.exists()


def test_a_gc_pid_older_than_12_hours_no_longer_blocks_gc_as_in_git(work: Path) -> None:
    """A gc.pid left 13 hours ago is ignored even if its pid is alive now (reused), as git does."""
    lock = work / ".mint" / "gc.pid"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}")  # this test process: alive
    thirteen_hours_ago = time.time() - 13 * 3600
    os.utime(lock, (thirteen_hours_ago, thirteen_hours_ago))
    assert mint(work, "gc").stdout.startswith("packed ")
    assert not lock.exists()


def test_gc_leaves_a_gc_pid_another_gc_took_over(work: Path) -> None:
    """A gc whose lock another gc took over (past the 12 hours) does not remove that one's."""
    from mintvcs import maintenance
    from mintvcs.store import Repository

    lock = work / ".mint" / "gc.pid"
    other = f"{os.getpid()} another-host"
    taken: list[str] = []

    def take_over(phase: str, n: int) -> None:
        if not taken and lock.exists():
            lock.unlink()
            lock.write_text(other)
            taken.append(phase)

    with Repository.open(work) as repo:
        maintenance.gc(repo, progress=take_over)
    assert taken and lock.read_text() == other


def test_gc_prunes_old_unreachable_objects_and_keeps_young_ones(work: Path) -> None:
    git_dir = work / ".mint"
    ids = []
    for name in ("old", "young"):
        source = work.parent / f"{name}.txt"
        source.write_text(f"unreachable and {name}\n")
        ids.append(git(git_dir, "hash-object", "-w", str(source)).stdout.strip())
    old, young = ids
    two_hours_ago = time.time() - 7200
    os.utime(loose_path(work, old), (two_hours_ago, two_hours_ago))
    assert ", pruned 1;" in mint(work, "gc").stdout
    assert git(git_dir, "cat-file", "-e", old, ok=False).returncode != 0
    assert git(git_dir, "cat-file", "-t", young).stdout.strip() == "blob"
    git_fsck(work)


def test_gc_with_a_commit_landing_while_it_scans(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A training loop commits while gc runs: the refs gc walks must be the ones it read before
    # scanning the store, or the new commit's objects look missing and gc refuses a sound store.
    from mintvcs import maintenance, porcelain
    from mintvcs.store import Repository

    scan_store = maintenance._scan_store
    landed: list[str] = []

    def scan_then_commit(repo: Repository, *rest: object) -> object:
        scan = scan_store(repo, *rest)
        mutate(work, seed=21)
        other = Repository.open(work)
        landed.append(
            porcelain.commit(other, "lands mid-gc", verify=False, show_progress=False).commit
        )
        other.close()
        return scan

    monkeypatch.setattr(maintenance, "_scan_store", scan_then_commit)
    repo = Repository.open(work)
    maintenance.gc(repo)
    repo.close()
    assert git(work / ".mint", "rev-parse", "main").stdout.strip() == landed[0]
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]


def test_gc_removes_pack_temporaries_a_killed_gc_left(work: Path) -> None:
    pack_dir = work / ".mint" / "objects" / "pack"
    pack_dir.mkdir(exist_ok=True)
    old, young = pack_dir / "tmpk2j3h4.pack", pack_dir / "tmp_pack_young"
    for path in (old, young):
        path.write_bytes(b"\0" * 4096)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    mint(work, "gc")
    assert not old.exists() and young.exists()
    git_fsck(work)


def test_a_repository_left_open_exits_quietly(work: Path) -> None:
    # A script that never calls close() used to print dulwich's "Exception ignored" tracebacks
    # at exit once packs existed; `with Repository.open(...)` closes it explicitly.
    mint(work, "gc")
    script = (
        "import torch  # its teardown is what met dulwich's pack finalizers\n"
        "from mintvcs.store import Repository\n"
        "repo = Repository.open('.')\n"
        "repo.read_revision(repo.resolve(repo.resolve('main')[:8])).tensors()\n"
        "with Repository.open('.') as other:\n"
        "    other.read_revision(other.resolve('side')).tensors()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_gc_keeps_young_unreachable_objects_even_inside_packs(work: Path) -> None:
    # A commit of many tensors writes its blobs into a pack before its ref moves; gc used to
    # prune every unreachable packed object at once, whatever its age (a concurrent commit's
    # tensors went missing), and a young loose one at the second gc, once the first packed it.
    git_dir = work / ".mint"
    ids = []
    for i in range(3):
        source = work.parent / f"in-flight-{i}.bin"
        source.write_bytes(os.urandom(1000))
        ids.append(git(git_dir, "hash-object", "-w", str(source)).stdout.strip())
    pack_objects(git_dir, ids[:2])
    git(git_dir, "prune-packed")
    assert not loose_path(work, ids[0]).exists() and loose_path(work, ids[2]).exists()
    for _ in range(2):
        assert json.loads(mint(work, "gc", "--json").stdout)["pruned"] == 0
        for oid in ids:
            assert git(git_dir, "cat-file", "-t", oid).stdout.strip() == "blob"
    # An hour after gc first found them unreachable, they go.
    record = git_dir / "mint-unreachable.json"
    seen = json.loads(record.read_text())
    assert set(ids) <= set(seen)
    record.write_text(json.dumps({oid: t - 7200 for oid, t in seen.items()}))
    assert json.loads(mint(work, "gc", "--json").stdout)["pruned"] >= 3
    assert git(git_dir, "cat-file", "-e", ids[0], ok=False).returncode != 0
    assert not record.exists()
    git_fsck(work)


def test_gc_counts_a_first_seen_time_in_the_future_as_now(work: Path) -> None:
    """An unreachable object's first-seen time ahead of the clock is rewritten as now, not kept."""
    git_dir = work / ".mint"
    source = work.parent / "unreachable.txt"
    source.write_text("unreachable\n")
    oid = git(git_dir, "hash-object", "-w", str(source)).stdout.strip()
    git(git_dir, "pack-objects", "-q", str(git_dir / "objects/pack/pack"), input_text=oid + "\n")
    git(git_dir, "prune-packed")
    record = git_dir / "mint-unreachable.json"
    record.write_text(json.dumps({oid: time.time() + 10 * 365 * 86400}))  # a wrong clock's
    mint(work, "gc")
    assert json.loads(record.read_text())[oid] <= time.time()


def test_fsck_names_every_missing_tensor_and_checks_older_revisions(work: Path) -> None:
    # It used to stop at the first missing object of a revision, and skip its history.
    only_tip = [b for b in blobs(work, "main:tensors") if b not in set(blobs(work, "main~1"))]
    assert len(only_tip) >= 2
    for oid in only_tip[:2]:
        loose_path(work, oid).unlink()
    report = json.loads(mint(work, "fsck", "--json", ok=False).stdout)
    assert report["revisions"] == 3
    for oid in only_tip[:2]:
        assert any(oid in p for p in report["problems"]), report["problems"]


def test_fsck_warns_about_a_ref_lock_a_killed_writer_left(work: Path) -> None:
    # An unattended training loop killed mid-update leaves refs/heads/main.lock: every later
    # commit waits and fails until someone removes it. fsck says so (and still passes).
    lock = work / ".mint" / "refs" / "heads" / "main.lock"
    lock.write_text("0" * 40 + "\n")
    report = json.loads(mint(work, "fsck", "--json").stdout)
    assert report["ok"] and report["warnings"] == []  # a fresh lock may be a live writer
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    result = mint(work, "fsck")
    assert result.returncode == 0
    assert "warning: refs/heads/main.lock is 60 minutes old" in result.stderr
    assert "remove it if no mintvcs or git process is running" in result.stderr


def test_fsck_warns_about_a_ref_lock_from_ten_minutes_on(work: Path) -> None:
    """A ref lock 11 minutes old is warned about, one 9 minutes old is not (a live writer's)."""
    lock = work / ".mint" / "refs" / "heads" / "main.lock"
    lock.write_text("0" * 40 + "\n")
    for minutes, warned in ((9, False), (11, True)):
        then = time.time() - minutes * 60
        os.utime(lock, (then, then))
        result = mint(work, "fsck")
        assert ("refs/heads/main.lock is" in result.stderr) == warned, result.stderr


def _abandoned_long_ago(work: Path, tmp_path: Path, seed: int) -> Path:
    """Commit a revision on a branch, delete the branch and its reflog, and date every object
    two hours back: its tree and blobs are unreachable and past gc's grace. Returns a copy
    of that adapter, to commit again."""
    git_dir = work / ".mint"
    mint(work, "checkout", "-b", "exp")
    mutate(work, seed=seed)
    mint(work, "commit", "-m", "abandoned", "--no-verify")
    adapter = copy_adapter(work, tmp_path / "same-again")
    mint(work, "checkout", "main")
    mint(work, "branch", "-D", "exp")
    shutil.rmtree(git_dir / "logs")
    two_hours_ago = time.time() - 7200
    for path in (git_dir / "objects").rglob("*"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    return adapter


def _commit_again(work: Path, adapter: Path) -> str:
    """Commit `adapter` to main from another Repository, as a concurrent process would."""
    from mintvcs import porcelain
    from mintvcs.store import Repository

    with Repository.open(work) as other:
        return porcelain.commit(
            other, "again", source=adapter, verify=False, show_progress=False
        ).commit


def _landed_whole(work: Path, landed: list[str]) -> None:
    """The concurrent commit is main, and the store holds every object of it (fsck, git fsck)."""
    assert landed and git(work / ".mint", "rev-parse", "main").stdout.strip() == landed[0]
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    git_fsck(work)


def test_gc_keeps_old_objects_a_commit_reuses_while_it_runs(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An abandoned revision's tree and blobs are over an hour old and unreachable; a commit of
    # the same adapter reuses them (writing nothing) while gc runs. gc used to delete them
    # from under the new commit.
    from mintvcs import maintenance
    from mintvcs.store import Repository

    adapter = _abandoned_long_ago(work, tmp_path, seed=31)
    write_first_seen = maintenance._write_first_seen
    landed: list[str] = []

    def decide_then_commit(repo: Repository, seen: dict[str, float]) -> None:
        write_first_seen(repo, seen)  # gc has chosen what to prune (first), or pruned (second)
        if not landed:
            landed.append(_commit_again(work, adapter))

    monkeypatch.setattr(maintenance, "_write_first_seen", decide_then_commit)
    with Repository.open(work) as repo:
        maintenance.gc(repo)
    _landed_whole(work, landed)


def test_gc_keeps_old_objects_a_commit_reuses_while_it_writes_its_pack(
    work: Path, tmp_path: Path
) -> None:
    # As above, but the commit lands while gc writes its new pack, after its last look at
    # refs and ages before packing: gc must look again before it deletes.
    from mintvcs import maintenance
    from mintvcs.store import Repository

    git_dir = work / ".mint"
    adapter = _abandoned_long_ago(work, tmp_path, seed=32)
    landed: list[str] = []

    def commit_while_packing(phase: str, count: int) -> None:
        if phase == "packing" and not landed:
            landed.append(_commit_again(work, adapter))

    with Repository.open(work) as repo:
        result = maintenance.gc(repo, progress=commit_while_packing)
    _landed_whole(work, landed)
    # Only the abandoned commit itself was pruned (the new one reuses its tree and blobs), and
    # the old packs went (nothing of them was needed): the store holds one pack.
    assert result.pruned == 1
    assert len(list((git_dir / "objects" / "pack").glob("*.pack"))) == 1


def test_gc_keeps_old_objects_a_commit_reuses_after_its_last_look(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As above, but the commit reuses them after gc's last look at refs and ages, while gc
    # deletes: gc deleted every loose object that look had not kept, and the commit that
    # exited 0 named missing objects (6 of 10 runs with 30,000 loose objects to delete).
    from mintvcs import maintenance
    from mintvcs.store import Repository

    adapter = _abandoned_long_ago(work, tmp_path, seed=33)
    landed = _commit_after_gcs_last_look(work, adapter, monkeypatch)
    with Repository.open(work) as repo:
        maintenance.gc(repo)
    _landed_whole(work, landed)


def _commit_after_gcs_last_look(
    work: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """Make the next gc's second look at what is needed (the one before it deletes) commit
    `adapter` right after it; the list the commit's id lands in."""
    from mintvcs import maintenance

    needed_now = maintenance._needed_now
    looks: list[int] = []
    landed: list[str] = []

    def look_then_commit(*args: Any) -> Any:
        needed = needed_now(*args)
        looks.append(1)
        if len(looks) == 2:
            landed.append(_commit_again(work, adapter))
        return needed

    monkeypatch.setattr(maintenance, "_needed_now", look_then_commit)
    return landed


def test_gc_keeps_packed_old_objects_a_commit_reuses_after_its_last_look(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As above, with the abandoned objects packed by an earlier gc and listed in its record of
    # unreachable ones an hour back. A commit finds a packed object stored and writes nothing,
    # unless gc's record lists it: then it writes a loose copy, which gc spares (it deletes
    # only the loose files it listed, and drops the pack).
    from mintvcs import maintenance
    from mintvcs.store import Repository

    git_dir = work / ".mint"
    mint(work, "checkout", "-b", "exp")
    mutate(work, seed=34)
    mint(work, "commit", "-m", "abandoned", "--no-verify")
    adapter = copy_adapter(work, tmp_path / "same-again")
    mint(work, "checkout", "main")
    mint(work, "branch", "-D", "exp")
    shutil.rmtree(git_dir / "logs")
    mint(work, "gc")  # young yet: packed, and listed with the time gc found them unreachable
    assert not list(git_dir.glob("objects/??/*"))
    record = git_dir / "mint-unreachable.json"
    seen = json.loads(record.read_text())
    record.write_text(json.dumps({oid: t - 7200 for oid, t in seen.items()}))
    landed = _commit_after_gcs_last_look(work, adapter, monkeypatch)
    with Repository.open(work) as repo:
        result = maintenance.gc(repo)
    assert result.pruned == len(seen)
    _landed_whole(work, landed)


def test_gc_clears_what_a_gc_killed_mid_index_left(work: Path) -> None:
    # A pack without its index and the index's lock file: the next gc built the same pack name,
    # hit the lock and died with a traceback, every time.
    pack_dir = work / ".mint" / "objects" / "pack"
    pack_dir.mkdir(exist_ok=True)
    orphan, lock = (
        pack_dir / ("pack-" + "ab" * 20 + ".pack"),
        pack_dir / ("pack-" + "ab" * 20 + ".idx.lock"),
    )
    orphan.write_bytes(b"PACK" + b"\0" * 100)
    lock.write_bytes(b"")
    two_hours_ago = time.time() - 7200
    for path in (orphan, lock):
        os.utime(path, (two_hours_ago, two_hours_ago))
    mint(work, "gc")
    assert not orphan.exists() and not lock.exists()
    git_fsck(work)


def _dirs_bytes(work: Path) -> int:
    """Blocks du counts for the directories under objects/ themselves (gc counts files only)."""
    root = work / ".mint" / "objects"
    return sum(d.stat().st_blocks * 512 for d in [root, *root.rglob("*")] if d.is_dir())
