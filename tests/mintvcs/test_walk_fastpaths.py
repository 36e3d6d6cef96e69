"""The fast paths of long history walks give what the general readers give: the pack index's
table of offsets, a whole commit read straight from its pack entry (a deltified one, or one
whose pack a gc replaced midway, through the general reader), the subject and escape of each
line `log --oneline` prints, and `log`'s output a page at a time."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import pytest

from mintvcs import messages, packs, porcelain
from mintvcs.packs import PackFile, release_pack_maps
from mintvcs.store import CommitInfo, Repository
from tests.mintvcs.storekit import git, mint

T0 = 1_700_000_000
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


def _fast_import(git_dir: Path, count: int, pad: str = "", branch: str = "main") -> None:
    """`count` commits on `branch`, one after another, each message `step N` then `pad`."""
    stream = []
    for mark in range(1, count + 1):
        stamp = f"A <a@example.com> {T0 + mark} +0000"
        message = f"step {mark}\n\n{pad}\n" if pad else f"step {mark}\n"
        stream.append(
            f"commit refs/heads/{branch}\nmark :{mark}\nauthor {stamp}\ncommitter {stamp}\n"
            f"data {len(message.encode())}\n{message}" + (f"from :{mark - 1}\n" if mark > 1 else "")
        )
    git(git_dir, "fast-import", "--quiet", input_text="".join(stream))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """An empty repository's work tree."""
    porcelain.init(tmp_path / "repo", install_hooks=False).close()
    return tmp_path / "repo"


def _index(tmp_path: Path, entries: dict[bytes, int]) -> PackFile:
    """A pack index of `entries` (name -> offset) beside a pack of no objects."""
    base = tmp_path / "pack-test"
    index = packs._pack_index({k: (v, 0) for k, v in entries.items()}, bytes(20))
    base.with_suffix(".idx").write_bytes(index)
    base.with_suffix(".pack").write_bytes(b"PACK" + bytes(28))
    return PackFile(base)


def test_find_answers_from_its_table_as_from_its_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After _TABLE_AFTER lookups of a quarter of its objects, find() answers from a table of
    # them all: the same offsets (those past 2 GiB from the 64-bit table), None for the others.
    rng = random.Random(5)
    entries = {rng.randbytes(20): rng.randrange(12, 1 << 31) for _ in range(6000)}
    for name in list(entries)[:50]:
        entries[name] = rng.randrange(1 << 31, 1 << 40)
    names = [*entries, *(rng.randbytes(20) for _ in range(500))]
    rng.shuffle(names)
    pack = _index(tmp_path, entries)
    assert [pack.find(name) for name in names] == [entries.get(name) for name in names]
    assert pack._table is not None  # the later lookups went to the table
    assert [pack.find(name) for name in names] == [entries.get(name) for name in names]
    # An index of more than _TABLE_MAX objects is searched each time.
    monkeypatch.setattr(packs, "_TABLE_MAX", 5000)
    large = _index(tmp_path, entries)
    assert [large.find(name) for name in names] == [entries.get(name) for name in names]
    assert large._table is None


def _walked(repo: Repository, tip: str) -> list[CommitInfo]:
    return list(repo.walk(tip))


def test_a_walk_reads_whole_commits_from_the_pack_and_deltified_ones_as_before(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git_dir = work / ".mint"
    _fast_import(git_dir, 150, pad="the same long text in each message " * 60)
    # Half of the history deltified (git deltas commits of long, alike messages).
    git(git_dir, "repack", "-a", "-d", "-q")
    _fast_import(git_dir, 300, branch="other")
    git(git_dir, "repack", "-a", "-d", "-f", "-q", "--window=50", "--depth=50")
    listing = git(git_dir, "verify-pack", "-v", *map(str, git_dir.glob("objects/pack/*.idx")))
    rows = [row.split() for row in listing.stdout.splitlines()]
    # id, type, size, size in the pack, offset, then a delta's depth and base
    assert any(len(row) == 7 and row[1] == "commit" for row in rows), "no commit deltified"

    reads: list[bool] = []
    whole = PackFile.whole_object

    def counted(self: PackFile, offset: int, kind: int) -> bytes | None:
        found = whole(self, offset, kind)
        reads.append(found is not None)
        return found

    for branch in ("main", "other"):
        tip = git(git_dir, "rev-parse", branch).stdout.strip()
        with monkeypatch.context() as patched, Repository.open(work) as repo:
            patched.setattr(PackFile, "whole_object", counted)
            fast = _walked(repo, tip)
        with monkeypatch.context() as patched, Repository.open(work) as repo:
            patched.setattr(PackFile, "whole_object", lambda self, offset, kind: None)
            general = _walked(repo, tip)
        assert fast == general
        assert [c.id for c in fast] == git(git_dir, "log", "--format=%H", branch).stdout.split()
        for info in fast:  # built without CommitInfo's __init__: every field, as it sets them
            assert vars(info) == vars(CommitInfo(**vars(info)))
            assert list(vars(info)) == [f.name for f in dataclasses.fields(CommitInfo)]
    assert True in reads and False in reads  # both paths taken


def test_a_walk_goes_on_when_gc_replaces_its_pack_midway(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pack the walk reads (its table of offsets built) is replaced and its map let go:
    # the next commits come through the general reader, from the new pack.
    monkeypatch.setattr(packs, "_TABLE_AFTER", 16)
    git_dir = work / ".mint"
    _fast_import(git_dir, 300)
    git(git_dir, "repack", "-a", "-d", "-q")
    expected = git(git_dir, "log", "--format=%H", "main").stdout.split()
    with Repository.open(work) as repo:
        walk = repo.walk(expected[0])
        first = [next(walk).id for _ in range(200)]
        (old,) = git_dir.glob("objects/pack/*.pack")
        assert repo._packs()[0]._table is not None
        new = git(git_dir, "commit-tree", "-m", "new", EMPTY_TREE).stdout.strip()
        git(git_dir, "branch", "new", new)  # one more object: the pack gc writes has a new name
        git(git_dir, "repack", "-a", "-d", "-q")
        assert not old.exists()
        release_pack_maps()
        rest = [info.id for info in walk]
    assert first + rest == expected


def _subject_by_lines(message: str) -> str:
    """git's subject, the long way: lines split on "\\n", git's whitespace off each line's
    end, the first run of non-blank lines joined by a space."""
    first: list[str] = []
    for line in message.split("\n"):
        line = line.rstrip(" \t\n\r")
        if line:
            first.append(line)
        elif first:
            break
    return " ".join(first)


def test_the_subject_of_a_first_line_alone_is_the_subject_of_all_its_lines() -> None:
    rng = random.Random(7)
    pieces = ["a", "b c", " ", "\t", "\r", "\n", "\n", "\x0b", "\u00a0"]
    for _ in range(20000):
        message = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        assert messages.subject(message) == _subject_by_lines(message), repr(message)


def test_printable_text_is_left_as_the_escape_would_leave_it() -> None:
    # Text Python calls printable is returned at once: the escape would change none of it.
    for code in range(0x110000):
        char = chr(code)
        assert messages.printable(char) == messages._CONTROL.sub(messages._escaped, char)


def test_log_of_many_pages_is_git_s_byte_for_byte(work: Path) -> None:
    # Each page goes out in one write: over pages of 64, 128 and 256 commits, as git's.
    git_dir = work / ".mint"
    _fast_import(git_dir, 300, pad="body\n\n\tindented\nlast")
    git(git_dir, "branch", "side", "main~100")
    git(git_dir, "tag", "v1", "main~250")
    git(git_dir, "repack", "-a", "-d", "-q")
    for args in (["--oneline"], []):
        ours = mint(work, "log", *args).stdout
        theirs = git(git_dir, "log", "--decorate=short", *args).stdout
        assert ours == theirs
        assert len(re.findall(r"^(?:commit )?[0-9a-f]{7,}\b", ours, re.M)) == 300
