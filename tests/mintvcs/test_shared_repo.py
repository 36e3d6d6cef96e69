"""One repository, several Unix users: the modes of what mintvcs writes follow the umask and
core.sharedRepository as git's do (real git, in the same setup, is the reference), so a group can
commit, branch, tag and gc in turns; and what refuses a user says which directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mintvcs.repoformat import parse_shared, shared_setting
from tests.mintvcs.storekit import ENV, handmade_adapter, random_f32
from tests.mintvcs.userkit import (
    ALICE,
    BOB,
    CAROL,
    User,
    Users,
    assert_modes_as_git,
    other_users,
)


def _adapters(place: Path) -> tuple[Path, Path, Path]:
    """Three tiny adapters with the same config and README (so they share those blobs)."""
    made = []
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        prefix = "base_model.model.model.layers.0.self_attn.q_proj"
        adapter = handmade_adapter(
            place / f"a{seed}",
            {
                f"{prefix}.lora_A.weight": ("F32", [4, 16], random_f32(rng, [4, 16])),
                f"{prefix}.lora_B.weight": ("F32", [16, 4], random_f32(rng, [16, 4])),
            },
        )
        (adapter / "README.md").write_text("a tiny adapter\n")
        run = adapter / "run.sh"
        run.write_text("#!/bin/sh\necho run\n")
        run.chmod(0o755)
        made.append(adapter)
    return made[0], made[1], made[2]


@pytest.fixture
def users() -> Iterator[Users]:
    """ALICE, BOB and CAROL, and a temporary directory each may write."""
    with other_users() as found:
        yield found


def _git_commit(
    users: Users, who: User, umask: int, git_dir: Path, adapter: Path, msg: str
) -> None:
    """Commit `adapter`'s files to git's repository as `who`, as mintvcs's commit --from does.

    By plumbing: `git commit` writes COMMIT_EDITMSG without core.sharedRepository's mode, and
    so cannot commit after another user in a group-shared repository.
    """
    git = [f"--git-dir={git_dir}", f"--work-tree={adapter}"]
    users.git(who, umask, adapter, *git, "add", "-A")
    tree = users.git(who, umask, adapter, *git, "write-tree").stdout.strip()
    head = users.git(who, umask, adapter, *git, "rev-parse", "-q", "--verify", "HEAD", ok=False)
    parent = ["-p", head.stdout.strip()] if head.returncode == 0 else []
    made = users.git(who, umask, adapter, *git, "commit-tree", tree, *parent, "-m", msg)
    users.git(who, umask, adapter, *git, "update-ref", "-m", msg, "HEAD", made.stdout.strip())


def test_two_users_of_one_group_commit_in_turns(users: Users) -> None:
    # Both with umask 002, the classic shared setup. bob's commit stores blobs alice stored
    # already (the config, the README): their files are alice's and read-only, so bob may not
    # date them (utime) and writes them again, renamed over hers, as git does.
    a1, a2, a3 = _adapters(users.place)
    place = users.place
    users.mint(ALICE, 0o002, place, "init", "r")
    r = place / "r"
    users.mint(ALICE, 0o002, r, "commit", "-m", "a1", "--from", str(a1), "--no-verify")
    users.mint(BOB, 0o002, r, "commit", "-m", "b1", "--from", str(a2), "--no-verify")
    users.mint(BOB, 0o002, r, "branch", "bx")
    users.mint(
        BOB, 0o002, r, "commit", "-m", "b2", "--from", str(a3), "--no-verify", "--branch", "bx"
    )
    # And back: alice stores what bob's commit left as bob's files.
    users.mint(
        ALICE, 0o002, r, "commit", "-m", "a2", "--from", str(a2), "--no-verify", "--branch", "bx"
    )
    # alice's checked-out files are hers, group-writable: bob's checkout replaces them.
    users.mint(ALICE, 0o002, r, "checkout", "--force", "main")
    users.mint(BOB, 0o002, r, "checkout", "--force", "bx")
    users.git(BOB, 0o002, r, "--git-dir=.mint", "fsck", "--strict")
    log = users.mint(ALICE, 0o002, r, "log", "--oneline", "bx").stdout
    assert [line.rsplit(" ", 1)[1] for line in log.splitlines()] == ["a2", "b2", "b1", "a1"]
    # git, the same steps by the same users: the same modes.
    users.git(ALICE, 0o002, place, "init", "-q", "g")
    g = place / "g" / ".git"
    users.git(ALICE, 0o002, place, f"--git-dir={g}", "config", "core.logAllRefUpdates", "true")
    _git_commit(users, ALICE, 0o002, g, a1, "a1")
    _git_commit(users, BOB, 0o002, g, a2, "b1")
    users.git(BOB, 0o002, place, f"--git-dir={g}", "branch", "bx")
    assert_modes_as_git(r / ".mint", g)


def test_a_user_who_may_not_write_the_store_is_told_which_directory(users: Users) -> None:
    # umask 022 and no core.sharedRepository: bob may write nothing of alice's repository, as
    # in git. The error names the directory he may not write, not a temporary that never was.
    a1, a2, _ = _adapters(users.place)
    users.mint(ALICE, 0o022, users.place, "init", "r")
    r = users.place / "r"
    users.mint(ALICE, 0o022, r, "commit", "-m", "a1", "--from", str(a1), "--no-verify")
    # Every fan-out directory alice's: bob's first object fails in one, not in objects/.
    fanouts = [f"{i:02x}" for i in range(256)]
    users.run(ALICE, 0o022, r / ".mint" / "objects", ["mkdir", "-p", *fanouts])
    failed = users.mint(
        BOB, 0o022, r, "commit", "-m", "b1", "--from", str(a2), "--no-verify", ok=False
    )
    assert failed.returncode == 1
    prefix = "error: insufficient permission for adding an object to repository database: "
    line = failed.stderr.strip()
    assert line.startswith(prefix), line
    named = Path(line.removeprefix(prefix))
    assert named.parent == r / ".mint" / "objects" and named.name in fanouts, line
    failed = users.mint(BOB, 0o022, r, "gc", ok=False)
    assert failed.stderr.strip() == (
        "error: insufficient permission for taking gc's lock (gc.pid) in the git directory: "
        f"{r / '.mint'}"
    )


def test_another_users_gc_takes_over_a_dead_gcs_lock(users: Users) -> None:
    # Taking over a dead gc's gc.pid holds a kernel lock on .mint/gc.pid.flock, a file that
    # stays: every user's gc must be able to open it after the first made it.
    a1, _, _ = _adapters(users.place)
    users.mint(ALICE, 0o002, users.place, "init", "r")
    r = users.place / "r"
    users.mint(ALICE, 0o002, r, "commit", "-m", "a1", "--from", str(a1), "--no-verify")
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = os.uname().nodename
    for who in (ALICE, BOB, ALICE):
        (r / ".mint" / "gc.pid").write_text(f"{dead.pid} {host}")  # left by a gc that died
        users.mint(who, 0o002, r, "gc")
        assert not (r / ".mint" / "gc.pid").exists()
    flock = r / ".mint" / "gc.pid.flock"
    assert stat.S_IMODE(flock.stat().st_mode) == 0o664  # 0666 less the umask, as git's files


def _run(argv: list[str], cwd: Path, umask: int) -> None:
    result = subprocess.run(
        argv,
        cwd=cwd,
        env=ENV,
        umask=umask,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stderr}"


def _tree_modes(work: Path) -> dict[str, int]:
    return {
        path.name: stat.S_IMODE(path.stat().st_mode) for path in work.iterdir() if path.is_file()
    }


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_modes_follow_the_umask_as_gits(tmp_path: Path, umask: int) -> None:
    # Checked-out files 0666 (0777 executable) less the umask, as git checks them out: with
    # umask 002 a group member may overwrite the weights, with 077 nobody else reads them.
    # And so for .mint/: objects and packs 0444 less the umask, hooks 0777, config 0666.
    a1, _, _ = _adapters(tmp_path)
    mint = [sys.executable, "-m", "mintvcs.cli"]
    work = tmp_path / "m"
    _run([*mint, "init", str(work)], tmp_path, umask)
    _run([*mint, "commit", "-m", "a1", "--from", str(a1), "--no-verify"], work, umask)
    _run([*mint, "checkout", "--force", "main"], work, umask)
    gwork = tmp_path / "g"
    _run(["git", "init", "-q", str(gwork)], tmp_path, umask)
    _run(["git", "config", "core.logAllRefUpdates", "true"], gwork, umask)
    _run(["git", f"--work-tree={a1}", "add", "-A"], gwork, umask)
    _run(["git", "commit", "-q", "-m", "a1"], gwork, umask)
    _run(["git", "checkout", "-q", "--force", "HEAD"], gwork, umask)
    expected = _tree_modes(gwork)
    assert expected["run.sh"] == 0o777 & ~umask and expected["README.md"] == 0o666 & ~umask
    assert _tree_modes(work) == expected
    assert_modes_as_git(work / ".mint", gwork / ".git")  # loose objects
    _run([*mint, "gc"], work, umask)
    _run(["git", "gc", "-q"], gwork, umask)
    assert_modes_as_git(work / ".mint", gwork / ".git")  # packs


@pytest.mark.parametrize("shared", ["group", "0660"])
def test_a_group_shares_a_repository_by_core_shared_repository(users: Users, shared: str) -> None:
    # umask 022, which alone would let bob write nothing of alice's: core.sharedRepository
    # makes every directory group-writable and setgid and every file group-readable (writable
    # where it is not read-only), as git's; 0660 also takes every bit from other users.
    a1, a2, a3 = _adapters(users.place)
    place = users.place
    users.mint(ALICE, 0o022, place, "init", f"--shared={shared}", "r")
    r = place / "r"
    users.mint(ALICE, 0o022, r, "commit", "-m", "a1", "--from", str(a1), "--no-verify")
    users.mint(BOB, 0o022, r, "commit", "-m", "b1", "--from", str(a2), "--no-verify")
    users.mint(BOB, 0o022, r, "branch", "bx")
    users.mint(BOB, 0o022, r, "tag", "-m", "annotated", "t2")
    users.mint(BOB, 0o022, r, "gc")
    # alice again, on what bob's gc packed: reused objects are found in his pack (freshened).
    users.mint(ALICE, 0o022, r, "commit", "-m", "a2", "--from", str(a1), "--no-verify")
    users.mint(ALICE, 0o022, r, "gc")
    users.mint(BOB, 0o022, r, "branch", "-D", "bx")
    users.git(BOB, 0o022, r, "--git-dir=.mint", "fsck", "--strict")
    # git, the same setting and steps.
    users.git(ALICE, 0o022, place, "init", "-q", f"--shared={shared}", "g")
    g = place / "g" / ".git"
    users.git(ALICE, 0o022, place, f"--git-dir={g}", "config", "core.logAllRefUpdates", "true")
    _git_commit(users, ALICE, 0o022, g, a1, "a1")
    _git_commit(users, BOB, 0o022, g, a2, "b1")
    users.git(BOB, 0o022, place, f"--git-dir={g}", "branch", "bx")
    users.git(BOB, 0o022, place, f"--git-dir={g}", "tag", "-m", "annotated", "t2")
    users.git(BOB, 0o022, place, f"--git-dir={g}", "gc", "-q")
    _git_commit(users, ALICE, 0o022, g, a3, "a2")
    assert_modes_as_git(r / ".mint", g)
    if shared == "0660":
        others = [p for p in (r / ".mint").rglob("*") if p.stat().st_mode & 0o007]
        assert not others, f"readable by other users: {others}"
        assert users.mint(CAROL, 0o022, r, "log", ok=False).returncode != 0
        assert users.git(CAROL, 0o022, place / "g", "log", ok=False).returncode != 0


@pytest.mark.parametrize(
    "value",
    [
        "group",
        "true",
        "yes",
        "all",
        "world",
        "everybody",
        "umask",
        "false",
        "off",
        "0",
        "1",
        "2",
        "0660",
        "660",
        "0640",
        "0770",
        "0600",
        "0400",
        "bogus",
        "Group",
        # git reads an octal value with strtol: blanks and a sign first.
        "+0660",
        "\t0640",
        " 0660",
        "-0660",
        "-0100",
        "+2",
    ],
)
def test_shared_values_read_as_gits(tmp_path: Path, value: str) -> None:
    # `git init --shared=VALUE` is the reference: what it writes, or that it refuses.
    done = subprocess.run(
        ["git", "init", "-q", f"--shared={value}", str(tmp_path / "g")],
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        with pytest.raises(ValueError):
            parse_shared(value)
        return
    written = subprocess.run(
        ["git", "--git-dir", str(tmp_path / "g" / ".git"), "config", "core.sharedRepository"],
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    assert shared_setting(parse_shared(value)) == (written or None)


def test_a_shared_value_git_refuses_stops_every_command(tmp_path: Path) -> None:
    # As a broken core.repositoryformatversion: refused when the repository is opened, naming
    # the key and value, before anything is written with modes nobody asked for.
    work = tmp_path / "r"
    _run([sys.executable, "-m", "mintvcs.cli", "init", str(work)], tmp_path, 0o022)
    _run(
        ["git", "--git-dir", str(work / ".mint"), "config", "core.sharedRepository", "0400"],
        work,
        0o022,
    )
    result = subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", "branch", "b"],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 128
    assert (
        "core.sharedRepository = '0400': the owner of files must always have read and write"
        in result.stderr
    )
    assert not (work / ".mint" / "refs" / "heads" / "b").exists()
