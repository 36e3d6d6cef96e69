"""Colour as git decides it (color.ui, color.status/diff/branch, TERM, a terminal or not), with
git 2.39 on the same settings as the oracle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mintvcs.storekit import ENV, run_on_terminal

MINT = [sys.executable, "-m", "mintvcs.cli"]


def _output(command: list[str], cwd: Path, env: dict[str, str], terminal: bool) -> bytes:
    """What `command` writes to stdout: a pseudo-terminal's bytes, or a pipe's."""
    if not terminal:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
        return done.stdout
    program = shutil.which(command[0])
    assert program is not None, command
    out = run_on_terminal(program, command, env, cwd)
    assert b"Traceback" not in out, out
    return out


@pytest.fixture(scope="module")
def plain_git(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git work tree with a modified file: what git's status colours."""
    top = tmp_path_factory.mktemp("plain-git")
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "one"]):
        subprocess.run(["git", *args], cwd=top, env=ENV, check=True)
    (top / "new.txt").write_text("new\n")
    return top


@pytest.mark.parametrize(
    ("settings", "term", "terminal"),
    [
        ({}, "xterm", True),
        ({}, "xterm", False),
        ({}, "dumb", True),
        ({}, None, True),
        ({"ui": "never"}, "xterm", True),
        ({"ui": "false"}, "xterm", True),
        ({"ui": "always"}, "xterm", False),
        ({"ui": "true"}, "xterm", False),
        ({"ui": "auto"}, "xterm", True),
        ({"ui": "never", "status": "always", "diff": "always", "branch": "always"}, "dumb", False),
        ({"ui": "always", "status": "false", "diff": "no", "branch": "never"}, "xterm", True),
        ({"ui": "always", "status": "auto", "diff": "auto", "branch": "auto"}, "xterm", False),
    ],
)
def test_log_status_and_branch_colour_as_git_does(
    work: Path, plain_git: Path, settings: dict[str, str], term: str | None, terminal: bool
) -> None:
    # click's one rule (colour a terminal) ignored git's settings: color.ui=never and TERM=dumb
    # still coloured, and always did not colour a pipe (for less -R).
    git_dir = work / ".mint"
    for name, value in settings.items():
        for where in (["--git-dir", str(git_dir)], ["-C", str(plain_git)]):
            subprocess.run(["git", *where, "config", f"color.{name}", value], env=ENV, check=True)
    env = {k: v for k, v in ENV.items() if k != "TERM"} | ({"TERM": term} if term else {})
    (work / "notes.txt").write_text("a new file for status\n")
    in_store = ["git", "--no-pager", "--git-dir", str(git_dir)]
    pairs = [
        (["log", "-n1", "--oneline"], [*in_store, "log", "-n1", "--oneline"]),
        (["show"], [*in_store, "show", "-s"]),
        (["branch"], [*in_store, "branch"]),
        (["status"], ["git", "--no-pager", "-C", str(plain_git), "status"]),
    ]
    for args, git_command in pairs:
        ours = _output([*MINT, *args], work, env, terminal)
        theirs = _output(git_command, work, env, terminal)
        assert (b"\x1b[" in ours) == (b"\x1b[" in theirs), (args, ours, theirs)


def test_a_colour_setting_git_refuses_stops_the_commands_git_stops(
    work: Path, plain_git: Path, tmp_path: Path
) -> None:
    # It counted as unset, where git dies naming it (exit 128) in each command that reads the
    # key, whatever the output (--json, a pipe), before doing anything; even one a later file
    # sets again. Each key against each command, git's exit and words the oracle.
    git_dir = work / ".mint"
    in_store = ["git", "--no-pager", "--git-dir", str(git_dir)]
    in_tree = ["git", "--no-pager", "-C", str(plain_git)]
    pairs = [
        (["log", "-n1", "--json"], [*in_store, "log", "-n1", "--format=%H"]),
        (["show", "--json"], [*in_store, "show", "-s", "--format=%H"]),
        (["diff", "HEAD~1", "HEAD"], [*in_store, "diff", "--stat", "HEAD~1", "HEAD"]),
        (["status", "--json"], [*in_tree, "status", "--porcelain"]),
        (["branch"], [*in_store, "branch"]),
        (["branch", "made"], [*in_store, "branch", "made"]),
        (["commit", "-m", "c", "--allow-empty", "--no-verify"], [*in_tree, "commit", "-qm", "c", "--allow-empty"]),
        (["tag", "-l"], [*in_store, "tag", "-l"]),
        (["checkout", "HEAD"], [*in_tree, "checkout", "-q", "HEAD"]),
        (["reset", "HEAD"], [*in_tree, "reset", "-q", "--soft", "HEAD"]),
    ]  # fmt: skip

    def state() -> bytes:
        """HEAD's commit and the branches, which a refused command leaves as they were."""
        listing = [*in_store, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads"]
        return subprocess.run(listing, env=ENV, capture_output=True, check=True).stdout

    stopped = 0
    for key in ("ui", "status", "diff", "branch"):
        # Bad in the global file, valid in the repository's, which wins: git still refuses it.
        (tmp_path / "global").write_text(f"[color]\n\t{key} = Bogus\n")
        env = ENV | {"GIT_CONFIG_GLOBAL": str(tmp_path / "global")}
        for where in (in_store, in_tree):
            subprocess.run([*where, "config", f"color.{key}", "always"], env=ENV, check=True)
        for args, git_command in pairs:
            before = state()
            ours = subprocess.run([*MINT, *args], cwd=work, env=env, capture_output=True, text=True)
            after = state()
            subprocess.run([*in_store, "branch", "-D", "made"], env=ENV, capture_output=True)
            theirs = subprocess.run(git_command, env=env, capture_output=True, text=True)
            subprocess.run([*in_store, "branch", "-D", "made"], env=ENV, capture_output=True)
            assert "Traceback" not in ours.stderr, ours.stderr
            if theirs.returncode == 128:
                stopped += 1
                said = f"bad boolean config value 'Bogus' for 'color.{key}'"
                assert theirs.stderr == f"fatal: {said}\n", theirs.stderr
                assert (ours.returncode, ours.stderr, ours.stdout) == (128, f"error: {said}\n", "")
                assert after == before, args  # nothing made: no branch, no commit
            else:
                assert theirs.returncode == 0, (git_command, theirs.stderr)
                assert ours.returncode == 0, (key, args, ours.stderr)
        for where in (in_store, in_tree):
            subprocess.run([*where, "config", "--unset", f"color.{key}"], env=ENV, check=True)
    assert stopped == 17  # ui: all 8 but checkout and reset; status 2, diff 5, branch 2 (git's)
