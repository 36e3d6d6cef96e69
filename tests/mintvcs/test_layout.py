"""mintvcs under git's layout features: repositories inside a work tree, gitfiles, worktrees."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
    # not remove them once they are another repository's, and going back does not write them.
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
    assert "is another repository" in mint_fails(work, "checkout", took)
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
