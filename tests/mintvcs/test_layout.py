"""mintvcs under git's layout features: repositories inside a work tree, gitfiles, worktrees."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.mintvcs.storekit import ENV, copy_adapter, git, mint, mint_fails, mutate


def _stored_paths(work: Path, rev: str = "HEAD") -> list[str]:
    """The paths of `rev`'s git tree, as real git lists them."""
    return git(work / ".mint", "ls-tree", "-r", "--name-only", rev).stdout.split()


def _files(folder: Path) -> dict[str, bytes]:
    """The regular files directly in `folder`, by name."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_nested_repository_is_neither_committed_nor_removed(
    work: Path, peft_adapter: Path
) -> None:
    # `mintvcs init sub` inside a work tree: sub's files are sub's, as git leaves an embedded
    # repository's; the outer commit took them, and the outer checkout then deleted them.
    sub = work / "sub"
    mint(work, "init", "sub")
    copy_adapter(peft_adapter, sub)
    mutate(sub, seed=7)  # sub's uncommitted work
    before = _files(sub)
    assert "sub/" not in mint(work, "status").stdout
    mutate(work, seed=5)
    mint(work, "commit", "-m", "outer", "--no-verify")
    assert not [p for p in _stored_paths(work) if "sub/" in p]
    mint(work, "checkout", "HEAD~1")
    assert _files(sub) == before


def test_checkout_keeps_files_of_a_repository_an_earlier_commit_took(
    work: Path, peft_adapter: Path
) -> None:
    # A commit made before `sub` became a repository holds its files: leaving that commit does
    # not remove them once they are another repository's, and going back (even with --force,
    # or reset --hard) writes everything else but them, where it refused the whole checkout.
    sub = work / "sub"
    copy_adapter(peft_adapter, sub)
    mint(work, "commit", "-m", "took sub", "--no-verify")
    took = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    assert [p for p in _stored_paths(work) if "sub/" in p]
    mint(work, "init", "sub")
    mutate(sub, seed=7)
    before = _files(sub)
    mint(work, "checkout", "HEAD~1")
    assert _files(sub) == before
    mint(work, "checkout", took)
    assert _files(sub) == before
    assert git(work / ".mint", "rev-parse", "HEAD").stdout.strip() == took
    mint(work, "reset", "--hard", "HEAD")
    mint(work, "checkout", "--force", "HEAD~1")
    assert _files(sub) == before


def test_a_git_worktree_inside_the_work_tree_is_not_taken(work: Path) -> None:
    # `git --git-dir=.mint worktree add wt` from the work tree: wt/ holds the store's layout
    # and a `.git` file; status listed its files as added, and commit took them.
    git(work / ".mint", "worktree", "add", "-q", "--detach", str(work / "wt"), "main")
    assert "wt/" not in mint(work, "status").stdout
    mutate(work, seed=5)
    mint(work, "commit", "-m", "outer", "--no-verify")
    assert not [p for p in _stored_paths(work) if "wt/" in p]
    mint(work, "checkout", "HEAD~1")
    listed = subprocess.run(
        ["git", "status", "--porcelain"], cwd=work / "wt", env=ENV, capture_output=True, text=True
    )
    assert listed.returncode == 0 and listed.stdout == "", listed.stdout + listed.stderr


def test_a_mint_gitfile_is_followed_and_never_falls_back_to_a_parent(
    work: Path, tmp_path: Path, peft_adapter: Path
) -> None:
    # `.mint` as a gitfile (`gitdir: PATH`), as git's `.git` file: it was not followed, and
    # inside another work tree every command ran on the outer repository instead.
    store = tmp_path / "inner-store"
    shutil.copytree(work / ".mint", store)
    inner = work / "inner"
    copy_adapter(peft_adapter, inner)
    mutate(inner, seed=5)
    (inner / ".mint").write_text(f"gitdir: {os.path.relpath(store, inner)}\n")
    outer_head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    mint(inner, "commit", "-m", "inner commit", "--no-verify")
    assert git(store, "log", "-1", "--format=%s").stdout.strip() == "inner commit"
    assert git(work / ".mint", "rev-parse", "HEAD").stdout.strip() == outer_head
    assert mint(inner, "status").stdout.splitlines()[-1] == "nothing to commit, work tree clean"
    (inner / ".mint").write_text("gitdir: ../nowhere\n")
    result = mint(inner, "status", ok=False)
    assert result.returncode == 128
    assert f"not a mintvcs repository: {inner}/../nowhere" in result.stderr
    # A path as git reads it, up to a NUL (it ended in a ValueError traceback).
    (inner / ".mint").write_bytes(b"gitdir: a\0b\n")
    result = mint(inner, "status", ok=False)
    assert result.returncode == 128 and "Traceback" not in result.stderr
    assert f"not a mintvcs repository: {inner}/a " in result.stderr
    (inner / ".mint").write_text("not a gitfile\n")
    assert "invalid gitfile format" in mint_fails(inner, "commit", "-m", "x", "--no-verify")
    assert git(work / ".mint", "rev-parse", "HEAD").stdout.strip() == outer_head


def test_a_branch_a_git_worktree_holds_is_neither_checked_out_nor_force_moved(
    work: Path, tmp_path: Path
) -> None:
    # git refuses both (128), even in a bare repository: the worktree's index and files would
    # be left behind its branch, so that its next commit reverts ours.
    git_dir = work / ".mint"
    wt = tmp_path / "wt"
    git(git_dir, "worktree", "add", "-q", str(wt), "side")
    side = git(git_dir, "rev-parse", "side").stdout.strip()
    result = mint(work, "checkout", "side", ok=False)
    assert result.returncode == 128
    assert f"'side' is already checked out at '{wt}'" in result.stderr
    assert git(git_dir, "symbolic-ref", "HEAD").stdout.strip() == "refs/heads/main"
    result = mint(work, "branch", "-f", "side", "main", ok=False)
    assert result.returncode == 128
    assert f"cannot force update the branch 'side' checked out at '{wt}'" in result.stderr
    assert git(git_dir, "rev-parse", "side").stdout.strip() == side
    # Detached at its commit, and a branch no worktree holds, as git allows.
    mint(work, "checkout", side)
    mint(work, "branch", "-f", "main", side)
    assert "checked out in the git worktree" in mint_fails(work, "branch", "-D", "side")


def test_hooks_get_this_store_as_git_dir_and_not_the_shells_repository(
    work: Path, tmp_path: Path
) -> None:
    # mintvcs ignores GIT_DIR, GIT_OBJECT_DIRECTORY, ... but handed them on to hooks, so a
    # hook's `git --git-dir "$MINT_DIR"` read (or wrote) the shell's repository's objects.
    other = tmp_path / "ci"
    subprocess.run(["git", "init", "-q", str(other)], env=ENV, check=True)
    hook = work / ".mint" / "hooks" / "post-commit"
    record = tmp_path / "seen"
    names = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY")
    shown = "".join(f'echo "{n}=${{{n}-unset}}"\n' for n in names)
    hook.write_text(f"#!/bin/sh\n{{\n{shown}git log -1 --format=%s\n}} > {record}\n")
    hook.chmod(0o755)
    mutate(work, seed=5)
    shell = {
        "GIT_DIR": str(other / ".git"),
        "GIT_WORK_TREE": str(other),
        "GIT_INDEX_FILE": str(other / ".git" / "index"),
        "GIT_OBJECT_DIRECTORY": str(other / ".git" / "objects"),
        "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(other / ".git" / "objects"),
    }
    mint(work, "commit", "-m", "with the shell's repository set", "--no-verify", env=shell)
    git_dir = os.path.realpath(work / ".mint")
    assert record.read_text().splitlines() == [
        f"GIT_DIR={git_dir}",
        "GIT_WORK_TREE=unset",
        "GIT_INDEX_FILE=unset",
        "GIT_OBJECT_DIRECTORY=unset",
        "with the shell's repository set",
    ]


def test_checkout_from_a_directory_the_revision_lacks_keeps_it(work: Path) -> None:
    # As git 2.36+: the current directory stays (empty); it was removed, and every later
    # command in that shell failed ("unable to read current working directory").
    deep = work / "docs" / "deep"
    deep.mkdir(parents=True)
    (deep / "R.md").write_text("r\n")
    mint(work, "commit", "-m", "docs", "--no-verify")
    mint(deep, "checkout", "HEAD~1")
    assert deep.is_dir() and not (deep / "R.md").exists()
    assert mint(deep, "status").stdout.splitlines()[-1] == "nothing to commit, work tree clean"
    mint(deep, "checkout", "main")
    assert (deep / "R.md").read_text() == "r\n"
    mint(work, "checkout", "HEAD~1")  # from the top, the emptied directories go, as in git
    assert not (work / "docs").exists()


def test_a_revision_without_its_config_is_named_as_such(work: Path, tmp_path: Path) -> None:
    # A `git rm adapter_config.json` in a worktree of the store (manifest.json kept): the error
    # said manifest.json was missing.
    git_dir = work / ".mint"
    wt = tmp_path / "wt"
    git(git_dir, "worktree", "add", "-q", "--detach", str(wt), "main")
    for args in (["rm", "-q", "--cached", "adapter_config.json"], ["commit", "-q", "--no-verify"]):
        extra = ["-m", "rm config"] if args[0] == "commit" else []
        subprocess.run(["git", *args, *extra], cwd=wt, env=ENV, check=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=wt, env=ENV, capture_output=True, text=True, check=True
    ).stdout.strip()
    line = mint_fails(work, "show", commit)
    assert line.endswith("is not an adapter revision: adapter_config.json is missing"), line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_a_repository_another_user_owns_is_refused_as_git_refuses_it(work: Path) -> None:
    # git's safe.directory check: root (or anyone) working in another user's repository left
    # root-owned object directories there, which broke the owner's gc.
    for path in [work, *work.rglob("*")]:
        os.chown(path, 43101, 43101, follow_symlinks=False)
    mutate(work, seed=31)
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    result = mint(work, "commit", "-m", "root in alice's repo", "--no-verify", ok=False)
    assert result.returncode == 128
    assert f"detected dubious ownership in repository at '{work}'" in result.stderr
    assert f"git config --global --add safe.directory {work}" in result.stderr
    assert git(work / ".mint", "rev-parse", "HEAD").stdout.strip() == head
    assert not [p for p in (work / ".mint").rglob("*") if p.lstat().st_uid != 43101]
    # As git: a sudo session may work in the repository of the user it came from, and
    # safe.directory (global, system or `git -c`, never the repository's own) lifts it.
    mint(work, "status", env={"SUDO_UID": "43101"})
    listed = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory"}
    mint(work, "status", env={**listed, "GIT_CONFIG_VALUE_0": str(work)})
    mint(work, "status", env={**listed, "GIT_CONFIG_VALUE_0": "*"})
    git(work / ".mint", "config", "safe.directory", "*")
    assert mint(work, "status", ok=False).returncode == 128


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
@pytest.mark.parametrize("linked", [False, True], ids=["gitfile", "symlink to a gitfile"])
def test_a_gitfile_another_user_owns_is_refused_as_git_refuses_it(
    work: Path, tmp_path: Path, linked: bool
) -> None:
    # The gitfile chooses the store the commands run hooks from: git checks its owner too, and
    # lstats a `.git` symlink to one (a symlink was followed without its owner being checked).
    def make_gitfile(dot: Path, store: Path) -> None:
        gitfile = tmp_path / f"{dot.parent.name}-gitfile" if linked else dot
        gitfile.write_text(f"gitdir: {store}\n")
        if linked:
            dot.symlink_to(gitfile)
        os.chown(dot, 43101, 43101, follow_symlinks=False)

    store = tmp_path / "store"
    shutil.move(work / ".mint", store)
    make_gitfile(work / ".mint", store)
    result = mint(work, "status", ok=False)
    assert result.returncode == 128
    assert f"detected dubious ownership in repository at '{work}'" in result.stderr
    os.chown(work / ".mint", os.geteuid(), os.getegid(), follow_symlinks=False)
    mint(work, "status")
    peer = tmp_path / "peer"
    separate = ["git", "init", "-q", "--separate-git-dir", str(tmp_path / "ps"), str(peer)]
    subprocess.run(separate, env=ENV, check=True)
    (peer / ".git").unlink()
    make_gitfile(peer / ".git", tmp_path / "ps")
    status = subprocess.run(["git", "-C", str(peer), "status"], env=ENV, capture_output=True)
    assert status.returncode == 128 and b"dubious ownership" in status.stderr


def test_hooks_run_in_the_work_tree_a_gitfile_names_its_store_from(
    work: Path, tmp_path: Path, peft_adapter: Path
) -> None:
    # As git runs hooks at the top of the work tree: they ran in the store's parent, which for
    # a `.mint` gitfile is another directory.
    store = tmp_path / "stores" / "adapter"
    store.parent.mkdir()
    shutil.copytree(work / ".mint", store)
    inner = tmp_path / "inner"
    copy_adapter(peft_adapter, inner)
    mutate(inner, seed=5)
    (inner / ".mint").write_text(f"gitdir: {store}\n")
    record = tmp_path / "where"
    hook = store / "hooks" / "post-commit"
    hook.write_text(f"#!/bin/sh\npwd -P > {record}\n")
    hook.chmod(0o755)
    mint(inner, "commit", "-m", "inner", "--no-verify")
    assert record.read_text().strip() == os.path.realpath(inner)


def test_a_store_without_work_tree_refuses_checkout_as_git_refuses_it(
    work: Path, tmp_path: Path
) -> None:
    # A git clone's `.git` is a store without work tree: checkout of the branch HEAD names said
    # "Already on" and exited 0, where git says the operation needs a work tree (128). `diff
    # REV` exited 1, and `checkout -` (no previous branch) named the reflog first: git names
    # the work tree, each with 128.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(work / ".mint"), str(clone)], check=True, env=ENV)
    store = clone / ".git"
    head = git(store, "symbolic-ref", "HEAD").stdout
    commands = [
        ["checkout", "main"],
        ["checkout", "-b", "x"],
        ["checkout", "-"],
        ["status"],
        ["reset", "--hard"],
        ["diff", "HEAD"],
        ["commit", "-m", "x", "--no-verify"],
    ]
    for args in commands:
        result = mint(store, *args, ok=False)
        assert result.returncode == 128, (args, result.stderr)
        assert "error: this repository has no work tree" in result.stderr, (args, result.stderr)
        peer = subprocess.run(["git", "-C", str(store), *args], env=ENV, capture_output=True)
        assert peer.returncode == 128 and b"must be run in a work tree" in peer.stderr, args
    assert git(store, "symbolic-ref", "HEAD").stdout == head
    assert git(store, "branch", "--list", "x").stdout == ""
