"""Commands whose disk fills up while they run (tests.mintvcs.fullkit: the first N writes succeed,
then every write that needs new space fails with ENOSPC). Whatever N, a failed command leaves a
repository that real git and mintvcs fsck pass, and nothing a plain next command turns into a
wrong result."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mintvcs.refs import RefStore
from tests.mintvcs import fullkit
from tests.mintvcs.storekit import (
    CONFIG,
    ENV,
    git,
    git_fsck,
    handmade_adapter,
    mint,
    mint_fsck_ok,
    mutate,
    random_f32,
)


def _adapter(path: Path, seed: int) -> Path:
    """A small fp32 adapter of four tensors (the same names and shapes whatever `seed`)."""
    rng = np.random.default_rng(seed)
    shapes = {"A": [4, 64], "B": [64, 4]}
    tensors = {
        f"base_model.model.layers.{i}.q_proj.lora_{ab}.weight": (
            "F32",
            shapes[ab],
            random_f32(rng, shapes[ab]),
        )
        for i in range(2)
        for ab in "AB"
    }
    return handmade_adapter(path, tensors)


@pytest.fixture(scope="module")
def two_branches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose main and `two` hold weights of the same size, work tree on main (its
    record written by status, so checkout may overwrite the weights in place)."""
    work = tmp_path_factory.mktemp("full") / "work"
    mint(work.parent, "init", str(work), "--no-hooks")
    _adapter(work, 1)
    mint(work, "commit", "-m", "one")
    mint(work, "checkout", "-b", "two")
    mutate(work, seed=2)
    mint(work, "commit", "-m", "two")
    mint(work, "checkout", "main")
    mint(work, "status")
    return work


def _copy(pristine: Path, tmp_path: Path, n: int) -> Path:
    work = tmp_path / f"w{n}"
    shutil.copytree(pristine, work, symlinks=True)
    return work


@pytest.mark.parametrize("command", [["checkout", "two"], ["reset", "--hard", "two"]])
def test_a_failed_checkout_never_leaves_a_mix_a_plain_commit_takes(
    two_branches: Path, tmp_path: Path, command: list[str]
) -> None:
    main = (two_branches / ".mint" / "refs" / "heads" / "main").read_text()
    failed = 0
    for n in range(9):
        work = _copy(two_branches, tmp_path, n)
        result = fullkit.run(work, n, *command)
        assert "Traceback" not in result.stderr, result.stderr
        if result.returncode == 0:
            continue
        failed += 1
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "No space left on device" in result.stderr, result.stderr
        assert (work / ".mint" / "HEAD").read_text() == "ref: refs/heads/main\n"
        assert (work / ".mint" / "refs" / "heads" / "main").read_text() == main
        # Either the work tree is main's, or the commit is refused as the failed checkout's
        # (not as main having moved: it never did), never a commit of two's weights on main.
        commit = mint(work, "commit", "-m", "my edit", ok=False)
        assert commit.returncode != 0, (n, commit.stdout)
        assert "nothing to commit" in commit.stderr or "stopped part-way" in commit.stderr, (
            n,
            commit.stderr,
        )
        git_fsck(work)
        mint_fsck_ok(work)
    assert failed >= 5  # the disk filled at each step of the checkout, not only before it


def _heads(work: Path) -> dict[str, str]:
    """Every branch and its value, as real git lists them."""
    out = git(work / ".mint", "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads")
    return dict(line.split() for line in out.stdout.splitlines())


def _until_it_succeeds(pristine: Path, tmp_path: Path, *args: str) -> list[Path]:
    """Run `mintvcs ARGS` on a copy of `pristine` with the disk filling after 0, 1, 2... writes,
    until it succeeds; the copies it failed on."""
    failed = []
    for n in range(60):
        work = _copy(pristine, tmp_path, n)
        result = fullkit.run(work, n, *args)
        assert "Traceback" not in result.stderr, result.stderr
        if result.returncode == 0:
            return failed
        assert result.returncode == 1, result.stderr
        failed.append(work)
    raise AssertionError(f"mintvcs {args} never succeeded")


@pytest.mark.parametrize("command", [["branch", "feat"], ["checkout", "-b", "feat"]])
def test_a_branch_not_logged_is_not_created(
    two_branches: Path, tmp_path: Path, command: list[str]
) -> None:
    before = _heads(two_branches)
    failed = _until_it_succeeds(two_branches, tmp_path, *command)
    assert len(failed) >= 2  # its reflog's line, and for checkout -b HEAD's move, failed
    for work in failed:
        # As git: no branch whose reflog could not be written, so the retry is not refused.
        assert _heads(work) == before, work
        assert not (work / ".mint" / "logs" / "refs" / "heads" / "feat").exists()
        assert (work / ".mint" / "HEAD").read_text() == "ref: refs/heads/main\n"
        git_fsck(work)
        mint(work, *command)


def test_a_first_commit_not_logged_leaves_no_branch(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    mint(tmp_path, "init", str(pristine), "--no-hooks")
    _adapter(pristine, 1)
    failed = _until_it_succeeds(pristine, tmp_path / "runs", "commit", "-m", "one")
    for work in failed:
        # A trainer told the commit failed must find nothing committed, and its retry commits.
        assert _heads(work) == {}, work
        assert not (work / ".mint" / "logs" / "HEAD").exists()
        mint(work, "commit", "-m", "one")
        assert len(git(work / ".mint", "rev-list", "--all").stdout.split()) == 1
        git_fsck(work)


def test_a_failed_init_leaves_nothing_and_init_runs_again(tmp_path: Path) -> None:
    ran = 0
    for n in range(40):
        work = tmp_path / f"w{n}"
        work.mkdir()
        result = fullkit.run(work, n, "init")
        if result.returncode == 0:
            break
        ran += 1
        # One line: not dulwich's lock files' finalizers failing again at exit.
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        # The system's words and the file, as the system named it or as mintvcs's own writes
        # name theirs (`unable to write: ...: .mint/config`).
        said = re.match(r"error: (unable to write: )?No space left on device: \S", result.stderr)
        assert said is not None, result.stderr
        # The file named is the repository's (a hook's destination), never mintvcs's own sample.
        assert ".mint" in result.stderr and "hook_samples" not in result.stderr, result.stderr
        # The half-made .mint (locks, no HEAD) is gone, so that init completes the repository.
        assert sorted(p.name for p in work.iterdir()) == []
        mint(work, "init")
        assert (work / ".mint" / "hooks" / "update").is_file()
        git_fsck(work)
    assert ran >= 10  # dulwich's files, ours, and each hook's copy failed in turn


@pytest.mark.parametrize("packed", [False, True])
def test_a_failed_branch_rename_leaves_the_old_name_alone(
    two_branches: Path, tmp_path: Path, packed: bool
) -> None:
    pristine = _copy(two_branches, tmp_path, -1)
    if packed:
        git(pristine / ".mint", "pack-refs", "--all")
    before = _heads(pristine)
    head_log = (pristine / ".mint" / "logs" / "HEAD").read_bytes()
    failed = _until_it_succeeds(pristine, tmp_path / "runs", "branch", "-m", "main", "newmain")
    assert failed
    for work in failed:
        # Nothing of the rename: HEAD on main, no newmain, HEAD's log without its two lines.
        assert (work / ".mint" / "HEAD").read_text() == "ref: refs/heads/main\n", work
        assert _heads(work) == before, work
        assert (work / ".mint" / "logs" / "HEAD").read_bytes() == head_log, work
        assert not (work / ".mint" / "logs" / "refs" / "heads" / "newmain").exists()
        assert not list((work / ".mint" / "logs" / "refs").glob(".tmp-renamed-log.*")), work
        git_fsck(work)
        mint(work, "branch", "-m", "main", "newmain")


def test_a_failed_switch_of_head_keeps_no_reflog_line(two_branches: Path, tmp_path: Path) -> None:
    head_log = (two_branches / ".mint" / "logs" / "HEAD").read_bytes()
    failed = _until_it_succeeds(two_branches, tmp_path, "checkout", "two")
    for work in failed:
        assert (work / ".mint" / "HEAD").read_text() == "ref: refs/heads/main\n", work
        # No "checkout: moving from main to two": `checkout -` goes back to two, HEAD's
        # previous branch, not to main, where HEAD never left.
        assert (work / ".mint" / "logs" / "HEAD").read_bytes() == head_log, work


def _leftovers(work: Path) -> list[str]:
    """Temporaries and locks of mintvcs's under .mint."""
    patterns = ("*.tmp", "*.lock", "tmp_*", ".tmp-*")
    return sorted(str(p) for pattern in patterns for p in (work / ".mint").rglob(pattern))


def test_a_failed_gc_leaves_no_temporary(two_branches: Path, tmp_path: Path) -> None:
    failed = _until_it_succeeds(two_branches, tmp_path, "gc")
    assert len(failed) >= 2  # its lock's content, and the new pack's header, did not fit
    for work in failed:
        # gc.pid's temporary and the pack's are removed at once, not left for an hour.
        assert _leftovers(work) == [], work
        git_fsck(work)
        mint_fsck_ok(work)


def test_gc_sweeps_a_stale_reflog_written_aside(two_branches: Path, tmp_path: Path) -> None:
    work = _copy(two_branches, tmp_path, 0)
    aside = work / ".mint" / "logs" / "refs" / ".tmp-renamed-log.4242.0badf00d"
    aside.write_bytes(b"")
    young = aside.with_name(".tmp-renamed-log.4243.0badf00d")
    young.write_bytes(b"")
    three_days = time.time() - 3 * 86400
    os.utime(aside, (three_days, three_days))
    mint(work, "gc")
    # A killed or failed branch -m's temporary goes once stale; a young one may be in use.
    assert not aside.exists() and young.exists()


def test_full_disk_errors_say_what_was_being_written_and_where(
    two_branches: Path, tmp_path: Path
) -> None:
    def error(n: int, *args: str) -> str:
        work = _copy(two_branches, tmp_path, len(list(tmp_path.iterdir())))
        if args[0] == "commit":
            mutate(work, seed=9)
        result = fullkit.run(work, n, *args)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        return result.stderr.strip().replace(str(work), "W")

    # As git's "unable to write loose object file", "unable to append to '<log>'": the
    # operation, the reason, and the file (docs/cli.md), never a bare "No space left on device".
    assert error(0, "commit", "-m", "x").startswith(
        "error: unable to write loose object file: No space left on device: W/.mint/objects/"
    )
    assert error(0, "branch", "feat") == (
        "error: unable to write: No space left on device: W/.mint/refs/heads/feat.lock"
    )
    assert error(1, "branch", "feat") == (
        "error: unable to append to the reflog: No space left on device: "
        "W/.mint/logs/refs/heads/feat"
    )
    assert error(0, "checkout", "two") == (
        f"error: unable to write: No space left on device: W/{CONFIG}"
    )
    # gc's: the system's words, not Python's "[Errno 28]", and no fsck advice (nothing is
    # damaged by a full disk); the pack named by its directory, as a loose object is.
    packing = error(1, "gc")
    assert packing.startswith(
        "error: gc failed while packing: unable to write pack file: No space left on device: "
        "W/.mint/objects/pack; "
    ), packing
    assert "Errno" not in packing and "fsck" not in packing, packing
    assert error(0, "gc") == "error: unable to write: No space left on device: W/.mint/gc.pid"


def test_every_full_disk_failure_of_a_pack_write_names_its_file(
    two_branches: Path, tmp_path: Path
) -> None:
    # A pack's writes, and gc's own files, failed naming no file (`gc failed while packing: No
    # space left on device`; gc.pid's `error: No space left on device`), where a loose object's
    # failure names its directory. At every point gc can fail, the line names the file.
    seen = set()
    for n in range(60):
        work = _copy(two_branches, tmp_path, n)
        result = fullkit.run(work, n, "gc")
        if result.returncode == 0:
            break
        line = result.stderr.strip().replace(str(work), "W")
        assert result.returncode == 1 and "\n" not in line, result.stderr
        named = re.search(r"No space left on device: (W/\.mint/[^;\s]+)", line)
        assert named is not None, line
        seen.add(named.group(1))
    else:
        raise AssertionError("gc never succeeded")
    assert {"W/.mint/gc.pid", "W/.mint/objects/pack", "W/.mint/mint-gc-pack"} <= seen, seen
    # A commit of 100 tensors or more writes a pack too: its header, an entry, and the writes
    # that seal it (its checksum, its index) fail the same way.
    work = tmp_path / "packed"
    mint(tmp_path, "init", str(work), "--no-hooks")
    rng = np.random.default_rng(0)
    names = [
        f"base_model.model.layers.{i}.q_proj.lora_{ab}.weight" for i in range(50) for ab in "AB"
    ]
    handmade_adapter(work, {name: ("F32", [2, 2], random_f32(rng, [2, 2])) for name in names})
    mint(work, "commit", "-m", "one")
    handmade_adapter(work, {name: ("F32", [2, 2], random_f32(rng, [2, 2])) for name in names})
    for n in (0, 50, 101, 102):
        result = fullkit.run(work, n, "commit", "-m", "two")
        assert result.returncode == 1, result.stderr
        assert result.stderr == (
            f"error: unable to write pack file: No space left on device: {work}/.mint/objects/pack\n"
        ), (n, result.stderr)


# --- a failed command's undo, with another process's command run meanwhile --------------------


def _race(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    work: Path,
    hook: tuple[object, str, Callable[..., bool]],
    meanwhile: list[str],
    *args: str,
) -> tuple[int | str | None, str]:
    """Run `mintvcs ARGS` in this process in `work` (process A); at the first call of `hook`
    (owner, method, a test of its arguments) that the test passes, run `mintvcs MEANWHILE` to
    its end as a real process (B), then let the disk fill (fullkit) for A's writes from there
    on: what a slow scheduler and a full disk do. Returns A's exit status and its stderr."""
    from mintvcs import cli

    owner, method, when = hook
    real = getattr(owner, method)
    ran: list[str] = []

    def hooked(*a: object, **k: object) -> object:
        if not ran and when(*a, **k):
            ran.append(mint(work, *meanwhile).stdout)
            fullkit.install(0)
        return real(*a, **k)

    monkeypatch.setattr(owner, method, hooked)
    monkeypatch.chdir(work)
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, ENV[key])
    capsys.readouterr()
    try:
        cli.main(list(args), standalone_mode=True)
        status: int | str | None = 0
    except SystemExit as done:
        status = done.code
    finally:
        fullkit.uninstall()
    assert ran, "the other process never ran"
    return status, capsys.readouterr().err


def test_a_failed_rename_leaves_a_head_another_process_moved_meanwhile(
    two_branches: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A's packed-refs rewrite fails after A moved HEAD to newmain; B checked out `two` between.
    # A's undo wrote `ref: refs/heads/main` over B's HEAD: HEAD on main, two's files in the
    # work tree, and B told it had switched.
    work = _copy(two_branches, tmp_path, 0)
    git(work / ".mint", "pack-refs", "--all")
    before = _heads(work)
    status, err = _race(
        monkeypatch,
        capsys,
        work,
        (RefStore, "_remove_packed", lambda *a, **k: True),
        ["checkout", "two"],
        "branch",
        "-m",
        "main",
        "newmain",
    )
    assert status == 1, err
    assert "No space left on device" in err and "HEAD was left as another process set it" in err
    assert (work / ".mint" / "HEAD").read_text() == "ref: refs/heads/two\n"
    assert _heads(work) == before  # no newmain, main where it was
    assert "nothing to commit" in mint(work, "status").stdout
    git_fsck(work)


def test_a_failed_rename_keeps_the_reflog_another_process_wrote_meanwhile(
    two_branches: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A's HEAD cannot follow to newmain; B reset newmain (which A had just made) to `two`
    # between. A kept B's newmain but removed its reflog, B's line with it: newmain@{1} gone.
    work = _copy(two_branches, tmp_path, 0)
    two = _heads(work)["refs/heads/two"]
    status, err = _race(
        monkeypatch,
        capsys,
        work,
        (RefStore, "_append_log", lambda self, name, *a, **k: name == "HEAD"),
        ["branch", "-f", "newmain", "two"],
        "branch",
        "-m",
        "main",
        "newmain",
    )
    assert status == 1, err
    assert "refs/heads/newmain was left as another process set it" in err, err
    assert (work / ".mint" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert _heads(work)["refs/heads/newmain"] == two
    log = git(work / ".mint", "reflog", "show", "--format=%H %gs", "newmain").stdout.splitlines()
    assert log[0] == f"{two} branch: Reset to two", log
    git_fsck(work)


@pytest.mark.parametrize(
    ("command", "hook"),
    [
        # The reflog line of the branch just made cannot be written.
        (["branch", "feat"], (RefStore, "_append_log", lambda s, name, *a: name.endswith("feat"))),
        # HEAD cannot follow the branch `-b` just made.
        (["checkout", "-b", "feat"], (RefStore, "set_symbolic", lambda *a, **k: True)),
    ],
)
def test_a_failed_branch_creation_leaves_a_branch_another_process_checked_out_meanwhile(
    two_branches: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    hook: tuple[object, str, Callable[..., bool]],
) -> None:
    # B checked out feat after A made it and before A's undo, which deleted it: B's HEAD on an
    # unborn feat, whose next commit would be a root commit on an orphan branch.
    work = _copy(two_branches, tmp_path, 0)
    main = _heads(work)["refs/heads/main"]
    status, err = _race(monkeypatch, capsys, work, hook, ["checkout", "feat"], *command)
    assert status == 1, err
    assert "No space left on device" in err, err
    assert "refs/heads/feat was left: another process has checked it out or set it" in err, err
    assert (work / ".mint" / "HEAD").read_text() == "ref: refs/heads/feat\n"
    assert _heads(work)["refs/heads/feat"] == main
    assert json.loads(mint(work, "log", "--json").stdout)[0]["commit"] == main
    git_fsck(work)
