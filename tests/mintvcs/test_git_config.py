"""git config as mintvcs reads it, checked against real git: values in git's own forms, the
global config, hooks, includes and the parser's corner cases."""

from __future__ import annotations

import subprocess
import sys
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


def _loose(work: Path) -> list[Path]:
    return sorted((work / ".mint" / "objects").glob("??/*"))


def _wait_for_gc(work: Path) -> None:
    """Until a detached gc is done: no gc.pid lock and no loose object."""
    import time

    deadline = time.monotonic() + 120
    while _loose(work) or (work / ".mint" / "gc.pid").exists():
        assert time.monotonic() < deadline, _loose(work)
        time.sleep(0.1)


def test_gc_auto_detach_is_read_as_a_git_boolean(work: Path) -> None:
    _set(work, "gc.auto", "1")
    # Only true and false were read: the others raised inside the commit's gc, which was
    # silently skipped, so the store never merged again.
    for seed, (value, detach) in enumerate(
        [("no", False), ("Off", False), ("0", False), ("yes", True), ("ON", True), ("1", True)]
    ):
        _set(work, "gc.autoDetach", value)
        by_git = git(work / ".mint", "config", "--bool", "gc.autoDetach").stdout.strip()
        assert by_git == str(detach).lower()
        mutate(work, seed=10 + seed)
        committed = mint(work, "commit", "-m", value, "--no-verify")
        assert "Auto packing the repository" in committed.stderr, committed.stderr
        assert ("in the background" in committed.stderr) == detach
        if not detach:
            assert not _loose(work)  # packed by the commit itself
        _wait_for_gc(work)
    assert len(git(work / ".mint", "log", "--oneline").stdout.splitlines()) == 9


@pytest.mark.parametrize(
    ("key", "value", "git_says"),
    [
        ("gc.autoDetach", "maybe", "bad boolean config value 'maybe' for 'gc.autodetach'"),
        ("gc.auto", "lots", "bad numeric config value 'lots' for 'gc.auto'"),
    ],
)
def test_a_gc_setting_git_refuses_is_named_after_each_commit(
    work: Path, key: str, value: str, git_says: str
) -> None:
    _set(work, key, value)
    assert (
        git_says
        in git(
            work / ".mint", "config", "--type=bool" if "Detach" in key else "--int", key, ok=False
        ).stderr
    )
    mutate(work, seed=5)
    committed = mint(work, "commit", "-m", "four", "--no-verify")
    warnings = [line for line in committed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no automatic gc" in warnings[0], committed.stderr
    assert f"{key} = {value!r}" in warnings[0], warnings


@pytest.mark.parametrize(
    ("value", "limit"), [("010", 8), ("0x10", 16), ("1k", 1024), ("-1", None), ("0", None)]
)
def test_gc_limits_are_read_as_git_reads_integers(
    work: Path, value: str, limit: int | None
) -> None:
    _set(work, "gc.autoPackLimit", value)
    assert int(git(work / ".mint", "config", "--int", "gc.autoPackLimit").stdout) == (
        limit or int(value)
    )
    from mintvcs.maintenance import auto_limits
    from mintvcs.store import Repository

    with Repository.open(work) as repo:
        assert auto_limits(repo)[0] == limit


def test_a_gc_limit_with_a_blank_git_refuses_is_refused(work: Path) -> None:
    (work / ".mint" / "config").write_text(
        (work / ".mint" / "config").read_text() + '[gc]\n\tautoPackLimit = "5 "\n'
    )
    assert (
        "bad numeric config value"
        in git(work / ".mint", "config", "--int", "gc.autoPackLimit", ok=False).stderr
    )
    line = mint(work, "gc", "--auto", ok=False).stderr
    assert "gc.autoPackLimit = '5 ' is not an integer" in line, line


@pytest.mark.parametrize("header", ['[mint "notify"]', '[Mint "notify"]', '[MINT "notify"]'])
def test_the_ref_update_sample_reads_its_section_in_any_case_as_git_does(
    work: Path, header: str
) -> None:
    config = work / ".mint" / "config"
    config.write_text(config.read_text() + f"{header}\n\turl = http://127.0.0.1:9\n")
    assert git(work / ".mint", "config", "--get", "mint.notify.url").stdout.strip()
    sample = Path(__file__).resolve().parents[2] / "hooks" / "ref-update"
    env = {**ENV, "MINT_DIR": str(work / ".mint"), "MINT_PYTHON": sys.executable}
    env.pop("MINT_NOTIFY_URL", None)
    ran = subprocess.run(
        ["sh", str(sample), "refs/heads/main", "0" * 40, "1" * 40],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0
    # Nothing at all was said for the capitalised sections: no server was told, silently.
    assert "cannot notify http://127.0.0.1:9" in ran.stderr, ran.stderr
