"""`gc --auto`: a training run's packs (one per commit) merged geometrically, checked by git."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from mintvcs import porcelain
from mintvcs.maintenance import (
    GcCorruptObjectError,
    GcRefusedError,
    auto_gc,
    auto_gc_detached,
    geometric_split,
)
from mintvcs.store import Repository
from tests.fixtures import ALL_LINEAR, build_base, make_peft_adapter
from tests.mintvcs.storekit import WEIGHTS, git, git_fsck, mint, mutate


@pytest.mark.parametrize(
    ("sizes", "loose", "merged"),
    [
        ([10, 10, 10, 10, 100, 1000], 0, 4),  # the four small ones become 40; 100 >= 2 x 40
        ([1, 2, 4, 8], 0, 0),  # already geometric: nothing to merge
        ([5, 5], 0, 2),
        ([100, 300, 1000], 60, 2),  # loose objects count as the bottom of the merged pack
        ([10] * 40, 0, 40),
        ([], 5, 0),  # loose objects only: packed on their own
    ],
)
def test_geometric_split(sizes: list[int], loose: int, merged: int) -> None:
    assert geometric_split(sizes, loose) == merged


def _pack_files(work: Path) -> list[Path]:
    return sorted((work / ".mint" / "objects" / "pack").glob("*.pack"))


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A repository with 9 commits of a 112-tensor adapter: a pack each, as a training run leaves them."""
    base = build_base(tmp_path / "base", num_hidden_layers=8)
    adapter = make_peft_adapter(
        base, tmp_path / "adapter", r=4, alpha=8, seed=1, target_modules=ALL_LINEAR
    )
    repo = porcelain.init(tmp_path / "repo", str(base))
    weights: dict[str, str] = {}
    for step in range(9):
        mutate(adapter, seed=step)
        result = porcelain.commit(
            repo, f"step {step}", source=adapter, verify=False, show_progress=False
        )
        weights[result.commit] = hashlib.sha256((adapter / WEIGHTS).read_bytes()).hexdigest()
    repo.close()
    work = tmp_path / "repo"
    assert len(_pack_files(work)) == 9
    return work, adapter, weights


def test_auto_merges_the_small_packs_and_every_revision_reads_back(
    run: tuple[Path, Path, dict[str, str]],
) -> None:
    work, adapter, weights = run
    # Below the limit (32 packs): nothing, and the CLI says so.
    out = json.loads(mint(work, "gc", "--auto", "--json").stdout)
    assert out["rewritten"] is False and out["packs_after"] == 9
    assert out["bytes_before"] == out["bytes_after"] > 0  # the store's size, measured
    git(work / ".mint", "config", "gc.autoPackLimit", "4")  # git's own key sets the limit
    with Repository.open(work) as repo:  # as a training loop holds it: used on afterwards
        result = auto_gc(repo)
        assert result.rewritten and result.packs_merged == 9 and result.loose_packed > 0
        assert len(_pack_files(work)) == result.packs_after == 1
        assert not list((work / ".mint" / "objects").glob("??/*"))  # the loose ones are packed
        git_fsck(work)
        for commit, digest in weights.items():
            porcelain.checkout(repo, commit, force=True)
            assert hashlib.sha256((work / WEIGHTS).read_bytes()).hexdigest() == digest
        mutate(adapter, seed=100)
        porcelain.commit(repo, "after", source=adapter, verify=False, show_progress=False)
    with Repository.open(work) as repo:  # one pack: nothing more to merge
        assert not auto_gc(repo).rewritten


def test_auto_refuses_a_damaged_pack_and_deletes_nothing(
    run: tuple[Path, Path, dict[str, str]],
) -> None:
    work, _, _ = run
    git(work / ".mint", "config", "gc.autoPackLimit", "4")
    packs = _pack_files(work)
    data = bytearray(packs[3].read_bytes())
    data[len(data) // 2] ^= 0x40  # inside some tensor blob
    packs[3].write_bytes(bytes(data))
    loose = sorted((work / ".mint" / "objects").glob("??/*"))
    with Repository.open(work) as repo, pytest.raises(GcCorruptObjectError, match="gc refused"):
        auto_gc(repo)
    assert _pack_files(work) == packs
    assert sorted((work / ".mint" / "objects").glob("??/*")) == loose
    assert not list((work / ".mint" / "objects" / "pack").glob("tmp_*"))


def test_a_limit_that_is_not_a_number_is_named(run: tuple[Path, Path, dict[str, str]]) -> None:
    work, _, _ = run
    git(work / ".mint", "config", "gc.autoPackLimit", "4")
    git(work / ".mint", "config", "gc.auto", "lots")
    with (
        Repository.open(work) as repo,
        pytest.raises(GcRefusedError, match=r"gc\.auto .* not an integer"),
    ):
        auto_gc(repo)


def test_a_pack_written_while_gc_scans_is_left_alone(
    run: tuple[Path, Path, dict[str, str]],
) -> None:
    # A commit landing during gc writes a pack of its own; gc rewrites and deletes only the
    # packs it scanned (it used to delete the new one, and the commit's tensors with it).
    work, adapter, _ = run
    landed: list[str] = []
    checked = [0]

    def commit_meanwhile(phase: str, n: int) -> None:
        checked[0] += n
        # Past the loose objects (36) and into the packs: the scan has listed them already.
        if phase == "checking objects" and checked[0] == 200:
            mutate(adapter, seed=77)
            with Repository.open(work) as other:
                landed.append(
                    porcelain.commit(
                        other, "meanwhile", source=adapter, verify=False, show_progress=False
                    ).commit
                )

    with Repository.open(work) as repo:
        from mintvcs.maintenance import gc

        gc(repo, prune=False, progress=commit_meanwhile)
    assert landed
    git_fsck(work)
    with Repository.open(work) as repo:
        porcelain.checkout(repo, landed[0], force=True)
    assert (
        hashlib.sha256((work / WEIGHTS).read_bytes()).hexdigest()
        == hashlib.sha256((adapter / WEIGHTS).read_bytes()).hexdigest()
    )


def test_limits_read_as_git_reads_them(run: tuple[Path, Path, dict[str, str]]) -> None:
    work, _, _ = run
    git(work / ".mint", "config", "gc.autoPackLimit", "0")  # 0 turns the trigger off
    git(work / ".mint", "config", "gc.auto", "1k")
    with Repository.open(work) as repo:
        from mintvcs.maintenance import auto_limits

        assert auto_limits(repo) == (None, 1024)
        assert not auto_gc(repo).rewritten
    assert "gc.autoPackLimit off" in mint(work, "gc", "--auto").stdout


def test_auto_says_nothing_to_do_while_another_gc_runs(
    run: tuple[Path, Path, dict[str, str]],
) -> None:
    import os
    import socket

    work, _, _ = run
    git(work / ".mint", "config", "gc.autoPackLimit", "4")
    (work / ".mint" / "gc.pid").write_text(f"{os.getpid()} {socket.gethostname()}")
    result = mint(work, "gc", "--auto")
    assert "another gc is running" in result.stdout
    assert len(_pack_files(work)) == 9


@pytest.mark.parametrize("detach", [True, False])
def test_a_cli_commit_past_the_limit_packs_as_git_does(
    run: tuple[Path, Path, dict[str, str]], detach: bool
) -> None:
    import time

    work, adapter, weights = run
    git(work / ".mint", "config", "gc.autoPackLimit", "4")
    git(work / ".mint", "config", "gc.autoDetach", str(detach).lower())
    mutate(adapter, seed=99)
    committed = mint(work, "commit", "-m", "step 9", "--from", str(adapter), "--no-verify")
    assert "Auto packing the repository" in committed.stderr
    assert ("in the background" in committed.stderr) == detach
    deadline = time.monotonic() + 60  # detached: a process of its own packs meanwhile
    while len(_pack_files(work)) > 1 or (work / ".mint" / "gc.pid").exists():
        assert time.monotonic() < deadline, _pack_files(work)
        time.sleep(0.1)
    git_fsck(work)
    with Repository.open(work) as repo:
        for commit, digest in weights.items():
            porcelain.checkout(repo, commit, force=True)
            assert hashlib.sha256((work / WEIGHTS).read_bytes()).hexdigest() == digest


def _wait_for_gc(work: Path, packs: int, *, loose: bool) -> None:
    """Until a detached gc is done: at most `packs` packs, no gc.pid lock and (unless `loose`
    objects may be written meanwhile) no loose object."""
    import time

    deadline = time.monotonic() + 120
    while (
        len(_pack_files(work)) > packs
        or (not loose and list((work / ".mint" / "objects").glob("??/*")))
        or (work / ".mint" / "gc.pid").exists()
    ):
        assert time.monotonic() < deadline, _pack_files(work)
        time.sleep(0.1)


def test_a_training_loop_hands_the_merge_to_a_process_of_its_own(
    run: tuple[Path, Path, dict[str, str]],
) -> None:
    import os

    work, adapter, weights = run
    with Repository.open(work) as repo:
        assert auto_gc_detached(repo) is None  # 9 packs, under the default limit of 32
    git(work / ".mint", "config", "gc.autoPackLimit", "4")
    with Repository.open(work) as repo:
        pid = auto_gc_detached(repo)
        assert isinstance(pid, int) and pid != os.getpid()
        # The loop goes on committing while the merge runs; the gc is no child of the loop's.
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        mutate(adapter, seed=50)
        after = porcelain.commit(repo, "step 9", source=adapter, verify=False, show_progress=False)
        weights[after.commit] = hashlib.sha256((adapter / WEIGHTS).read_bytes()).hexdigest()
        _wait_for_gc(work, 2, loose=True)  # the merged pack, and the one written meanwhile
        git_fsck(work)
        for commit, digest in weights.items():
            porcelain.checkout(repo, commit, force=True)
            assert hashlib.sha256((work / WEIGHTS).read_bytes()).hexdigest() == digest


def test_small_adapters_loose_objects_are_packed_too(tmp_path: Path) -> None:
    # Under 100 tensors a commit writes loose objects, not a pack: gc.auto counts those.
    base = build_base(tmp_path / "base")
    adapter = make_peft_adapter(base, tmp_path / "adapter", r=4, alpha=8, seed=1)
    repo = porcelain.init(tmp_path / "repo", str(base))
    for step in range(3):
        mutate(adapter, seed=step)
        porcelain.commit(repo, f"step {step}", source=adapter, verify=False, show_progress=False)
    repo.close()
    work = tmp_path / "repo"
    assert not _pack_files(work)
    git(work / ".mint", "config", "gc.auto", "10")
    with Repository.open(work) as repo:
        assert auto_gc_detached(repo) is not None
    _wait_for_gc(work, 1, loose=False)
    assert len(_pack_files(work)) == 1
    git_fsck(work)


def test_a_long_lived_reader_resolves_short_ids_after_another_process_repacks(work: Path) -> None:
    # A server holds one Repository for hours while a training run commits and gcs in its own
    # processes: dulwich's cached pack list then names a pack that is gone.
    mint(work, "gc")
    with Repository.open(work) as reader:
        head = reader.resolve("main")
        assert reader.resolve(head[:10]) == head
        mutate(work, seed=7)
        mint(work, "commit", "-m", "next", "--no-verify")
        mint(work, "gc")
        assert reader.resolve(head[:10]) == head
        newest = reader.resolve("main")
        assert newest != head and reader.resolve(newest[:12]) == newest


def test_many_loose_objects_are_counted_in_one_fan_out_directory(tmp_path: Path) -> None:
    # Each commit asks whether gc is due: counting every loose object (45 ms at ~6,000, more
    # than the commit) is now, past a few thousand, git's estimate from objects/17.
    from mintvcs.maintenance import auto_gc_due

    repo = porcelain.init(tmp_path / "repo", install_hooks=False)
    objects = repo.git_dir / "objects"
    git(repo.git_dir, "config", "gc.autoPackLimit", "0")  # the loose trigger alone

    def plant(fan: str, count: int) -> None:
        (objects / fan).mkdir(exist_ok=True)
        for i in range(count):
            (objects / fan / f"{i:038x}").write_bytes(b"")

    plant("17", 27)  # 27 x 256 = 6,912: at git's line for gc.auto 6,700, ceil(6,700 / 256) = 27
    assert not auto_gc_due(repo)
    plant("18", 5000)  # elsewhere: not looked at
    assert not auto_gc_due(repo)
    plant("17", 28)
    assert auto_gc_due(repo)  # 28 in one of 256: about 7,168, past the limit
    repo.close()
    git(objects.parent, "config", "gc.auto", "100")  # few: counted exactly
    (objects / "17" / f"{0:038x}").unlink()
    with Repository.open(objects.parent) as repo:
        assert auto_gc_due(repo)  # 5,027 > 100


def test_a_commit_after_gc_stores_no_packed_object_again(work: Path) -> None:
    # A commit looked for an object it was about to write among the loose ones only: after a
    # gc it wrote every unchanged extra file, the config, the safetensors header and the
    # unchanged trees again, as loose objects. With 20,000 extra files that was 20,000 loose
    # objects a commit, enough to start gc --auto, whose pack the next commit copied out again.
    git_dir = work / ".mint"
    (work / "tokenizer.json").write_bytes(b"".join(b"token %d\n" % i for i in range(20_000)))
    (work / "data").mkdir()
    for i in range(20):
        (work / "data" / f"shard{i}.txt").write_text(f"shard {i}\n")
    mint(work, "commit", "-m", "with files", "--no-verify")
    mint(work, "gc")
    assert not list(git_dir.glob("objects/??/*"))
    mutate(work, seed=40)
    out = json.loads(mint(work, "commit", "-m", "after gc", "--no-verify", "--json").stdout)
    loose = {p.parent.name + p.name for p in git_dir.glob("objects/??/*")}
    tokenizer = git(git_dir, "hash-object", str(work / "tokenizer.json")).stdout.strip()
    assert tokenizer not in loose
    # What is loose is what the commit made: none of it in the pack, and counted as new.
    counts = dict(
        line.split(": ") for line in git(git_dir, "count-objects", "-v").stdout.splitlines()
    )
    assert counts["prune-packable"] == "0"
    assert out["new_objects"] == len(loose) == int(counts["count"])
    git_fsck(work)


def _blob_pack(git_dir: Path, i: int) -> Path:
    """Pack a new blob on its own, as git pack-objects writes it (its loose copy pruned)."""
    source = git_dir.parent.parent / f"blob{i}"
    source.write_text(f"blob {i}\n")
    oid = git(git_dir, "hash-object", "-w", str(source)).stdout.strip()
    name = git(
        git_dir, "pack-objects", "-q", str(git_dir / "objects/pack/pack"), input_text=oid + "\n"
    ).stdout.strip()
    git(git_dir, "prune-packed")
    return git_dir / "objects" / "pack" / f"pack-{name}.pack"


def _four_packs_past_a_limit_of_two(tmp_path: Path) -> Path:
    """A new repository's store holding four packs, with gc.autoPackLimit 2."""
    with porcelain.init(tmp_path / "repo", install_hooks=False) as repo:
        git_dir = repo.git_dir
    for i in range(4):
        _blob_pack(git_dir, i)
    git(git_dir, "config", "gc.autoPackLimit", "2")
    return git_dir


def test_exactly_auto_pack_limit_packs_is_not_past_it_as_in_git(tmp_path: Path) -> None:
    """gc --auto is due past gc.autoPackLimit packs, not at it: git's too_many_packs."""
    from mintvcs.maintenance import auto_gc_due

    with porcelain.init(tmp_path / "repo", install_hooks=False) as repo:
        git_dir = repo.git_dir
    git(git_dir, "config", "gc.autoPackLimit", "3")
    git(git_dir, "config", "gc.autoDetach", "false")
    packs: list[Path] = []
    for count, due in ((3, False), (4, True)):
        packs += [_blob_pack(git_dir, i) for i in range(len(packs), count)]
        with Repository.open(git_dir.parent) as repo:
            assert auto_gc_due(repo) == due
        oracle = tmp_path / f"copy{count}.git"
        shutil.copytree(git_dir, oracle)
        git(oracle, "gc", "--auto")
        assert (len(list((oracle / "objects/pack").glob("*.pack"))) < count) == due


def test_gc_auto_leaves_a_kept_pack_alone_as_git_does(tmp_path: Path) -> None:
    """A pack marked .keep is neither merged nor deleted by gc --auto (git's repack skips it)."""
    with porcelain.init(tmp_path / "repo", install_hooks=False) as repo:
        git_dir = repo.git_dir
    packs = [_blob_pack(git_dir, i) for i in range(4)]
    git(git_dir, "config", "gc.autoPackLimit", "2")
    kept = packs[0]
    kept.with_suffix(".keep").touch()
    with Repository.open(git_dir.parent) as repo:
        result = auto_gc(repo)
    assert result.rewritten and result.packs_after == 2
    assert kept.exists() and kept.with_suffix(".idx").exists()
    git_fsck(git_dir.parent)


def test_gc_auto_0_turns_gc_auto_off_as_in_git(tmp_path: Path) -> None:
    """gc.auto 0 turns gc --auto off altogether, past gc.autoPackLimit packs too, as git's does."""
    from mintvcs.maintenance import auto_gc_due

    git_dir = _four_packs_past_a_limit_of_two(tmp_path)
    git(git_dir, "config", "gc.auto", "0")
    git(git_dir, "config", "gc.autoDetach", "false")
    oracle = tmp_path / "copy.git"
    shutil.copytree(git_dir, oracle)
    git(oracle, "gc", "--auto")
    assert len(list((oracle / "objects/pack").glob("*.pack"))) == 4
    with Repository.open(git_dir.parent) as repo:
        assert not auto_gc_due(repo)
        assert not auto_gc(repo).rewritten
    assert len(list((git_dir / "objects/pack").glob("*.pack"))) == 4
    out = mint(git_dir.parent, "gc", "--auto").stdout
    assert out == "nothing to do: gc.auto is 0, which turns gc --auto off, as in git\n"


def test_gc_auto_once_due_removes_a_killed_writers_old_temporaries_as_git_does(
    tmp_path: Path,
) -> None:
    """Once due, gc --auto removes the tmp_obj_*/tmp_pack_* a killed writer left, past the
    grace period, as git's gc --auto prunes them (and as the full gc did; --auto kept them)."""
    git_dir = _four_packs_past_a_limit_of_two(tmp_path)
    git(git_dir, "config", "gc.autoDetach", "false")
    names = ["pack/tmp_pack_old", "ab/tmp_obj_old", "pack/tmp_pack_young", "ab/tmp_obj_young"]
    three_weeks_ago = time.time() - 21 * 86400  # past git's prune expiry and our grace period
    for name in names:
        path = git_dir / "objects" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"\0" * 4096)
        if name.endswith("old"):
            os.utime(path, (three_weeks_ago, three_weeks_ago))
    oracle = tmp_path / "copy.git"
    shutil.copytree(git_dir, oracle)
    git(oracle, "gc", "--auto")
    left = [name for name in names if (oracle / "objects" / name).exists()]
    assert left == ["pack/tmp_pack_young", "ab/tmp_obj_young"]
    assert json.loads(mint(git_dir.parent, "gc", "--auto", "--json").stdout)["rewritten"]
    assert [name for name in names if (git_dir / "objects" / name).exists()] == left
    git_fsck(git_dir.parent)
