"""A store of many packs under a low descriptor limit (RLIMIT_NOFILE): git works at any limit,
as it keeps few packs open at once, and so must every command."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.mintvcs.storekit import ENV, git, git_fsck, mint, mutate, pack_each_object

# Fewer descriptors than the store has packs (each pack is two files), and enough for a
# command whose packs are all closed (Python, numpy and zstandard start with ~10).
LIMIT = 24


def _limited(limit: int) -> Callable[[], None]:
    def limit_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return limit_descriptors


def _mint(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mintvcs ARGS` as a process under LIMIT descriptors (soft and hard), which must succeed."""
    return mint(cwd, *args, preexec_fn=_limited(LIMIT))


@pytest.fixture
def packed(work: Path) -> Path:
    """The built repository with every object in a pack of its own, none loose."""
    assert pack_each_object(work / ".mint") > LIMIT
    return work


def test_every_command_reads_a_store_of_more_packs_than_descriptors(packed: Path) -> None:
    # Each pack held two descriptors for the whole command (our reader's maps and dulwich's
    # open index and pack files), so a store of 32 packs (what gc --auto's default leaves)
    # failed every command under `ulimit -n 64`, and 500 packs under the usual 1024.
    work = packed
    assert "nothing to commit" in _mint(work, "status").stdout
    assert len(_mint(work, "log", "--oneline").stdout.splitlines()) == 3
    assert _mint(work, "show", "HEAD~1").stdout.startswith("commit ")
    assert _mint(work, "diff", "HEAD~2", "HEAD").stdout
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    _mint(work, "checkout", "-b", "older", "HEAD~2")
    _mint(work, "checkout", "main")
    assert _mint(work, "log", "-n1", "--oneline", head[:7]).stdout.startswith(head[:7])
    mutate(work, seed=50)
    _mint(work, "commit", "-m", "under the limit", "--no-verify")
    report = json.loads(_mint(work, "fsck", "--json").stdout)
    assert report["ok"] and report["revisions"] == 4, report


def test_gc_packs_a_store_of_more_packs_than_descriptors(packed: Path, tmp_path: Path) -> None:
    # gc --auto, the remedy for many packs, failed under the limit as every command did; gc
    # called the packs it could not open corrupt (see test_gc_says_it_ran_out_of_descriptors).
    other = tmp_path / "other"
    shutil.copytree(packed, other, symlinks=True)
    merged = json.loads(_mint(packed, "gc", "--auto", "--json").stdout)
    assert merged["rewritten"] and merged["packs_after"] == 1, merged
    git_fsck(packed)
    result = json.loads(_mint(other, "gc", "--json").stdout)
    assert result["pruned"] == 0 and len(list(other.glob(".mint/objects/pack/*.pack"))) == 1
    git_fsck(other)


# Runs gc or fsck (argv[1]) on the repository argv[2], taking every descriptor left at the first
# object it checks, as whatever else a process holds open can; prints how it ended, as JSON.
_OUT_OF_DESCRIPTORS = """
import json, os, sys
from mintvcs import maintenance
from mintvcs.errors import MintError
from mintvcs.store import Repository

held = []

def take_the_rest(_phase, _count):
    if held:
        return
    held.append(-1)
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass

with Repository.open(sys.argv[2]) as repo:
    try:
        report = getattr(maintenance, sys.argv[1])(repo, progress=take_the_rest)
        out = {"problems": getattr(report, "problems", [])}
    except MintError as err:
        out = {"error": type(err).__name__, "exit": err.exit_code, "message": str(err)}
    for fd in held[1:]:
        os.close(fd)
print(json.dumps(out))
"""


@pytest.mark.parametrize("command", ["gc", "fsck"])
def test_gc_and_fsck_say_they_ran_out_of_descriptors(packed: Path, command: str) -> None:
    # gc called every object it could not open damage and told the user to restore from a
    # backup (exit 128: "corrupt packed object ...: [Errno 24] Too many open files (and 347
    # more damaged objects)"); fsck listed them as damaged and exited 1, which it does only for
    # a damaged store. Both now say what happened, as for running out of memory.
    packs = sorted(packed.glob(".mint/objects/pack/*"))
    result = subprocess.run(
        [sys.executable, "-c", _OUT_OF_DESCRIPTORS, command, str(packed)],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        preexec_fn=_limited(64),
    )
    out = json.loads(result.stdout)
    assert out.get("error") == "OutOfDescriptorsError" and out["exit"] == 1, out
    assert out["message"].startswith("too many open files reading pack-"), out
    assert "nothing was changed" in out["message"] and "corrupt" not in out["message"]
    assert sorted(packed.glob(".mint/objects/pack/*")) == packs
    git_fsck(packed)
