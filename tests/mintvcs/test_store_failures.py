"""The store when the system or its files fail it: a file-size limit mid-commit, damaged pack
indexes, ref values and gc's own records. One line of error, nothing installed half-written,
and real git agreeing that the repository is sound."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mintvcs.store import PACK_THRESHOLD
from tests.mintvcs.storekit import (
    ENV,
    git,
    git_fsck,
    handmade_adapter,
    loose_path,
    mint,
    mint_fails,
    mint_unprivileged,
    random_f32,
)


def _many_tensors(path: Path, seed: int) -> Path:
    """An adapter of more than PACK_THRESHOLD tensors: its commit writes a pack."""
    rng = np.random.default_rng(seed)
    shapes = {"A": [4, 64], "B": [64, 4]}  # rank 4 on a 64-wide linear
    tensors = {
        f"base_model.model.layers.{i}.q_proj.lora_{ab}.weight": (
            "F32",
            shapes[ab],
            random_f32(rng, shapes[ab]),
        )
        for i in range(PACK_THRESHOLD // 2 + 1)
        for ab in "AB"
    }
    return handmade_adapter(path, tensors)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    mint(tmp_path, "init", str(work), "--no-hooks")
    mint(work, "commit", "-m", "first", "--from", str(_many_tensors(tmp_path / "a", 1)))
    return work


def _limited(cwd: Path, limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`mintvcs ARGS` with files capped at `limit` bytes (a full disk, as far as a writer sees)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=cap,
        check=False,
        timeout=120,
    )


def _packs(work: Path) -> list[str]:
    return sorted(p.name for p in (work / ".mint" / "objects" / "pack").iterdir())


def test_a_commit_that_cannot_write_its_pack_installs_nothing(work: Path, tmp_path: Path) -> None:
    before = _packs(work)
    source = _many_tensors(tmp_path / "b", 2)
    result = _limited(work, 20_000, "commit", "-m", "second", "--from", str(source))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # The pack named by its directory, as a loose object's write names its own (it named none).
    pack = work / ".mint" / "objects" / "pack"
    assert result.stderr == f"error: unable to write pack file: File too large: {pack}\n"
    assert _packs(work) == before  # no pack, no temporary
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    git_fsck(work)
    # With room again, the same commit goes through.
    mint(work, "commit", "-m", "second", "--from", str(source))
    git_fsck(work)


def test_a_commit_keeps_the_pack_it_wrote_under_its_write_hold(tmp_path: Path) -> None:
    # In process, as a server or a training loop commits: the commit's write hold places the
    # pack's temporaries when it ends, so the writer must leave them in place, not remove them
    # as the temporaries of a pack given up.
    from mintvcs import porcelain

    work = _many_tensors(tmp_path / "work", 1)
    repo = porcelain.init(work, None, install_hooks=False)
    porcelain.commit(repo, "first", verify=False, show_progress=False)
    assert [p for p in _packs(work) if p.endswith(".pack")]
    assert not [p for p in _packs(work) if p.startswith("tmp_")]
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    git_fsck(work)


def test_writes_refused_by_the_system_are_one_line_and_change_nothing(work: Path) -> None:
    head = git(work / ".mint", "rev-parse", "HEAD").stdout
    for args in (
        ("branch", "side"),
        ("tag", "-m", "release", "v1"),
        ("checkout", "--force", "main"),
    ):
        result = _limited(work, 0, *args)
        assert result.returncode == 1, (args, result.stderr)
        # One line naming what was being written and the file (its lock, the work-tree file).
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: unable to write"), (args, line)
        assert f": File too large: {work}/" in line, (args, line)
    assert git(work / ".mint", "rev-parse", "HEAD").stdout == head
    assert mint(work, "branch").stdout.split() == ["*", "main", head[:7]]
    assert mint(work, "tag").stdout == ""


def test_a_truncated_pack_index_is_named_in_one_line(work: Path, tmp_path: Path) -> None:
    # Two packs of one size, so that gc --auto merges both, the damaged one included; the
    # damaged one holds HEAD's tensors.
    before = set(_packs(work))
    mint(work, "commit", "-m", "second", "--from", str(_many_tensors(tmp_path / "b", 2)))
    (name,) = [n for n in _packs(work) if n not in before and n.endswith(".idx")]
    index = work / ".mint" / "objects" / "pack" / name
    index.chmod(0o644)
    index.write_bytes(index.read_bytes()[:500])
    mint(work, "log")  # commits are loose: the history still reads
    mint_fails(work, "checkout", "--force", "main")  # one error line, no traceback
    git(work / ".mint", "config", "gc.autoPackLimit", "1")  # so that it merges the pack
    git(work / ".mint", "config", "gc.auto", "1")
    assert "corrupt pack index" in mint_fails(work, "gc", "--auto")
    assert "corrupt pack index" in mint_fails(work, "gc")
    report = json.loads(mint(work, "fsck", "--json", ok=False).stdout)
    assert not report["ok"] and report["problems"]


def test_gc_names_a_packed_ref_that_holds_no_object_id(work: Path) -> None:
    mint(work, "gc")  # refs packed
    packed = work / ".mint" / "packed-refs"
    packed.write_text(packed.read_text() + "zz" + "0" * 38 + " refs/heads/zz\n")
    assert "refs/heads/zz holds 'zz000" in mint_fails(work, "gc")


def test_an_unreadable_record_of_gcs_last_pack_is_ignored(work: Path) -> None:
    mint(work, "gc")  # one pack, nothing loose: the next gc reads the record
    (work / ".mint" / "mint-gc-pack").write_bytes(b"\xff\x00../../etc\n")
    mint(work, "gc")
    git_fsck(work)


def test_a_fan_out_directory_pruned_under_the_writer_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `git prune` (git gc) removes empty objects/xx directories: one removed between the
    # writer's mkdir and its temporary file failed the commit ("No such file or directory").
    import mintvcs.store as store
    from mintvcs import porcelain

    repo = porcelain.init(tmp_path / "repo", None, install_hooks=False)
    real = store.place_file
    pruned: list[Path] = []

    def pruned_first(directory: Path, path: Path, pieces: list[object], shared: object) -> None:
        if not pruned:
            directory.rmdir()  # as git prune does, at the worst moment
            pruned.append(directory)
        real(directory, path, pieces, shared)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "place_file", pruned_first)
    oid = repo.add_blob(b"written once the directory is back\n")
    assert pruned
    assert git(repo.git_dir, "cat-file", "-p", oid).stdout == "written once the directory is back\n"


def test_files_this_user_may_not_read_are_named_as_such_not_as_damage(work: Path) -> None:
    # A service account reading a repository another user committed to with umask 077: the
    # ref was called corrupt ("restore it", which would replace a sound ref), and an object
    # was a bare PermissionError (a traceback per request in the server).
    main = work / ".mint" / "refs" / "heads" / "main"
    commit = main.read_text().strip()
    main.chmod(0o000)
    try:
        failed = mint_unprivileged(work, "log")
    finally:
        main.chmod(0o644)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr == (
        f"error: ref file {main} cannot be read: permission denied (check its owner and mode)\n"
    )
    obj = loose_path(work, commit)
    obj.chmod(0o000)
    try:
        for args in (("log",), ("show", commit[:10])):
            failed = mint_unprivileged(work, *args)
            assert failed.returncode == 1, failed.stderr
            assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("error: "), (
                failed.stderr
            )
            assert f"{obj} cannot be read: permission denied" in failed.stderr
            assert "corrupt" not in failed.stderr and "unknown revision" not in failed.stderr
    finally:
        obj.chmod(0o444)
    assert mint(work, "log").stdout.startswith(f"commit {commit}")


def test_a_repository_gone_since_it_was_opened_is_not_an_unknown_ref(
    work: Path, tmp_path: Path
) -> None:
    from mintvcs.store import Repository, RepositoryGoneError

    repo = Repository.open(work)
    commit = repo.resolve("main")
    work.rename(tmp_path / "moved")  # moved, deleted or unmounted under a long-lived reader
    try:
        for spec in ("main", "HEAD", commit[:10], commit, "no-such-branch"):
            with pytest.raises(RepositoryGoneError, match="is gone or unreadable"):
                repo.resolve(spec)
    finally:
        (tmp_path / "moved").rename(work)
    assert repo.resolve("main") == commit  # back: read again
