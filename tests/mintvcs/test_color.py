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
