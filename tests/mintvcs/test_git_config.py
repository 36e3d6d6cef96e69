"""git config as mintvcs reads it, checked against real git: values in git's own forms, the
global config, hooks, includes and the parser's corner cases."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.mintvcs.storekit import ENV, git, mint, mutate


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment whose global git config is `HOME/.gitconfig` in a fresh HOME (no system
    config), for both git and mintvcs."""
    place = tmp_path / "home"
    place.mkdir()
    env = {**ENV, "HOME": str(place), "XDG_CONFIG_HOME": str(place / ".config")}
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env.pop("GIT_CONFIG_GLOBAL")
    return env


def _git(git_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Real git on `git_dir` under `env`; its exit status is the caller's to check."""
    return subprocess.run(
        ["git", "--git-dir", str(git_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def _set(work: Path, key: str, value: str) -> None:
    """Set `key` in `.mint/config` with git itself."""
    git(work / ".mint", "config", key, value)


# Every key dulwich's object store used to read with int() or its true/false-only boolean, each
# set to a value in a form git documents and reads.
GIT_FORM_VALUES = [
    ("core.packedGitLimit", "512m"),
    ("core.packedGitWindowSize", "1m"),
    ("core.deltaBaseCacheLimit", "96m"),
    ("core.bigFileThreshold", "512m"),
    ("core.compression", "0x0"),
    ("core.looseCompression", "0x0"),
    ("pack.windowMemory", "100m"),
    ("pack.deltaCacheSize", "256m"),
    ("pack.bigFileThreshold", "512m"),
    ("pack.threads", "0x2"),
    ("pack.depth", "0x32"),
    ("pack.indexVersion", "0x2"),
    ("core.commitGraph", "yes"),
    ("core.multiPackIndex", "on"),
]


def test_git_size_and_boolean_forms_in_pack_and_core_keys_leave_the_store_readable(
    work: Path,
) -> None:
    mint(work, "gc")  # every revision now in a pack
    assert not [p for p in (work / ".mint" / "objects").glob("??") if any(p.iterdir())]
    for key, value in GIT_FORM_VALUES:
        _set(work, key, value)
    assert len(git(work / ".mint", "log", "--oneline").stdout.splitlines()) == 3
    # Each read as a corrupt object ("invalid literal for int()"), fsck and gc as a traceback.
    assert len(mint(work, "log", "--oneline").stdout.splitlines()) == 3
    mint(work, "show", "HEAD~1")
    mint(work, "checkout", "side")
    mint(work, "checkout", "main")
    mutate(work, seed=7)
    mint(work, "commit", "-m", "four", "--no-verify")
    mint(work, "fsck")
    mint(work, "gc")
    assert len(git(work / ".mint", "log", "--oneline").stdout.splitlines()) == 4
