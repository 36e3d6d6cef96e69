"""The history walks' own commit reader (commits.parse_plain): it reads every commit as the
full parse (dulwich's) did, loose and packed, odd-but-valid commits included, and log, ranges,
`~N`/`^N` and merge bases over it give what git gives; a walk parses no commit whole."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mintvcs import porcelain, revwalk, store
from mintvcs.commits import parse_plain
from mintvcs.store import Repository
from tests.mintvcs.storekit import ENV, git, mint, whole_commit_reads

T0 = 1_700_000_000


def _write(git_dir: Path, text: bytes) -> str:
    """A commit object of exactly `text`, written by git (loose); its id."""
    command = ["git", "--git-dir", str(git_dir), "hash-object", "-t", "commit", "-w"]
    done = subprocess.run(
        [*command, "--literally", "--stdin"], env=ENV, input=text, capture_output=True, check=True
    )
    return done.stdout.decode().strip()


@pytest.fixture
def git_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty repository's `.mint`, with the empty tree written."""
    porcelain.init(tmp_path / "repo", install_hooks=False).close()
    found = tmp_path / "repo" / ".mint"
    git(found, "hash-object", "-t", "tree", "-w", "--stdin", input_text="")
    yield found


EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
WHO = b"A U Thor <a@example.com>"
SIG = (
    b"gpgsig -----BEGIN PGP SIGNATURE-----\n \n iQEzBAABCAAdFiEE\n =abcd\n"
    b" -----END PGP SIGNATURE-----\n"
)


def _odd_commits(parent: str) -> dict[str, tuple[bytes, bool]]:
    """Commit texts by name, each with whether the walks' reader reads it itself (True) or
    leaves it to the full parse (False)."""
    tree, p = f"tree {EMPTY_TREE}\n".encode(), f"parent {parent}\n".encode()
    a, c = b"author %s %d +0000\n" % (WHO, T0), b"committer %s %d +0000\n" % (WHO, T0 + 1)
    return {
        "plain": (tree + p + a + c + b"\nplain\n", True),
        "root": (tree + a + c + b"\nroot\n", True),
        "three parents": (tree + p + p + p + a + c + b"\noctopus\n", True),
        "signed": (tree + p + a + c + SIG + b"\nsigned\n", True),
        "latin-1": (
            tree
            + p
            + b"author J\xf6rg <j@example.com> 1700000000 +0100\n"
            + c
            + b"encoding ISO-8859-1\n\nK\xe4se\n",
            True,
        ),
        "unknown encoding": (tree + p + a + c + b"encoding x-nope\n\nbytes \xff\n", True),
        "two encodings": (
            tree + p + a + c + b"encoding ISO-8859-1\nencoding UTF-8\n\n\xe9\n",
            True,
        ),
        "extra headers": (
            tree + p + a + c + b"x-tool run 7\n continued\nx-empty \n\nextra\n",
            True,
        ),
        "parent after author": (tree + p + a + p + c + b"\nlate parent\n", False),
        "second author": (
            tree + p + a + c + b"author B <b@example.com> 1 +0000\n\nsecond author\n",
            True,
        ),
        "zones and zeros": (
            tree
            + p
            + b"author %s 0001700000000 -0130\n" % WHO
            + b"committer %s 18446744073709551620 +0060\n" % WHO
            + b"\nzones\n",
            True,
        ),
        "author past 2^64": (
            tree + p + b"author %s 18446744073709551616 +0000\n" % WHO + c + b"\nlate\n",
            True,
        ),
        "empty message": (tree + p + a + c + b"\n", True),
        "blank lines and CR": (tree + p + a + c + b"\n\n\n  subject\r\nbody\r\n", True),
        "mergetag": (
            tree
            + p
            + a
            + c
            + b"mergetag object "
            + parent.encode()
            + b"\n type commit\n tag v1\n tagger T <t@example.com> 1 +0000\n \n tag\n"
            + b"\nmerged a tag\n",
            False,
        ),
        "encoding on two lines": (
            tree + p + a + c + b"encoding ISO-8859-1\n more\n\n\xe9\n",
            False,
        ),
        "three-digit zone": (
            tree + p + b"author %s %d +100\n" % (WHO, T0) + c + b"\nshort zone\n",
            False,
        ),
        "no zone": (tree + p + a + b"committer %s %d\n" % (WHO, T0) + b"\nno zone\n", False),
        "date -1": (tree + p + a + b"committer %s -1 +0000\n" % WHO + b"\nminus one\n", False),
        "two spaces": (tree + p + a + b"committer %s  5 +0000\n" % WHO + b"\nspaces\n", False),
        "bracket in name": (
            tree + p + b"author A > B <a@example.com> 1 +0000\n" + c + b"\nbracket\n",
            False,
        ),
        "upper-case parent": (
            tree + f"parent {parent.upper()}\n".encode() + a + c + b"\nupper\n",
            False,
        ),
        "continued committer": (tree + p + a + c + b" more\n\ncontinued\n", False),
        "header with no value": (tree + p + a + c + b"x-flag\n\nflag\n", False),
        "no message": (tree + p + a + c, False),
        "no blank line": (tree + p + a + c + b"loose words\n", False),
    }


def _read_both(repo: Repository, oid: str) -> tuple[object, object]:
    """(what the walks' reader gives, what the full parse gives) for `oid`: a CommitInfo or
    the error raised, by type and text."""
    results: list[object] = []
    for read in (repo._read_commit, repo._read_whole_commit):
        try:
            results.append(read(oid))
        except Exception as err:  # compared below: the same error, or the same commit
            results.append((type(err), str(err)))
    return results[0], results[1]


def test_the_walks_reader_reads_every_commit_as_the_full_parse_loose_and_packed(
    git_dir: Path,
) -> None:
    root = _write(git_dir, _odd_commits("0" * 40)["root"][0])
    commits = {
        name: (_write(git_dir, text), fast) for name, (text, fast) in _odd_commits(root).items()
    }
    for n, (oid, _fast) in enumerate(commits.values()):  # kept by a ref each, for the repack
        git(git_dir, "update-ref", f"refs/heads/c{n}", oid)
    for packed in (False, True):
        if packed:
            git(git_dir, "repack", "-a", "-d", "-q")
            assert not list(git_dir.glob("objects/??/*"))
        with Repository.open(git_dir.parent) as repo:
            for name, (oid, fast) in commits.items():
                body = repo._commit_body(oid)
                assert body is not None, name
                assert (parse_plain(body) is not None) == fast, name
                ours, whole = _read_both(repo, oid)
                assert ours == whole, (name, packed)
                # What `~N` reads of it: the parents alone, or the same error.
                try:
                    parents: object = repo._commit_parents(oid)
                except Exception as err:
                    parents = (type(err), str(err))
                expected = whole.parents if isinstance(whole, store.CommitInfo) else whole
                assert parents == expected, (name, packed)
    # What the full parse shows for some of them, as git log shows it.
    with Repository.open(git_dir.parent) as repo:
        latin = repo.commit_info(commits["latin-1"][0])
        assert (latin.author, latin.message) == ("Jörg <j@example.com>", "Käse\n")
        assert repo.commit_info(commits["parent after author"][0]).parents == (root,)
        zones = repo.commit_info(commits["zones and zeros"][0])
        assert (zones.author_zone, zones.author_timezone, zones.timezone) == ("-0130", -5400, 3600)
        assert zones.time == zones.date == 2**64 - 1
        for name in ("no message", "no blank line"):  # git reads no message: none shown
            assert repo.commit_info(commits[name][0]).message == "", name


def test_log_and_show_read_a_commit_with_no_blank_line_after_its_headers_as_git(
    git_dir: Path,
) -> None:
    # dulwich leaves such a commit's message None: log, show, status and fsck ended in an
    # AttributeError traceback; git shows the commit with no message.
    texts = _odd_commits("0" * 40)
    root = _write(git_dir, texts["no message"][0].replace(b"parent " + b"0" * 40 + b"\n", b""))
    tip = _write(git_dir, _odd_commits(root)["no blank line"][0])
    git(git_dir, "update-ref", "refs/heads/main", tip)
    work = git_dir.parent
    oneline = git(git_dir, "log", "--oneline", "--decorate").stdout
    assert mint(work, "log", "--oneline").stdout == oneline
    shown = mint(work, "log").stdout
    assert shown.replace(" (HEAD -> main)", "") == git(git_dir, "log").stdout
    # Not adapter revisions (an empty tree): named as such, not a traceback.
    for args in (["show"], ["fsck"], ["status"]):
        assert "not an adapter revision" in mint(work, *args, ok=False).stderr, args


def _history(git_dir: Path) -> dict[str, str]:
    """main, side and topic with merges, skewed clocks and odd commits (signed, latin-1, a late
    parent line, a mergetag) on the way; ids by name, refs set."""
    ids: dict[str, str] = {}

    def commit(name: str, parents: list[str], when: int, extra: bytes = b"") -> str:
        text = f"tree {EMPTY_TREE}\n".encode()
        text += b"".join(f"parent {ids[p]}\n".encode() for p in parents)
        text += b"author %s %d +0200\ncommitter %s %d -0700\n" % (WHO, when - 7, WHO, when)
        ids[name] = _write(git_dir, text + extra + f"\n{name}\n\nbody of {name}\n".encode())
        return ids[name]

    commit("m0", [], T0)
    for n in range(1, 30):
        commit(f"m{n}", [f"m{n - 1}"], T0 + 60 * n, SIG if n % 7 == 0 else b"")
    commit("s1", ["m5"], T0 + 400)
    commit("s2", ["s1"], T0 + 100)  # skewed: older than its parent
    commit("s3", ["s2"], T0 + 60 * 12, b"encoding ISO-8859-1\n")
    commit("m30", ["m29", "s3"], T0 + 60 * 30)
    commit("t1", ["m12"], T0 + 60 * 13)
    commit("t2", ["t1", "s2"], T0 + 60 * 31, b"mergetag object x\n type commit\n")
    commit("t3", ["t2"], T0 + 60 * 31)  # same second as t2
    commit("m31", ["m30", "t3", "s1"], T0 + 60 * 32)
    for n in range(32, 40):
        commit(f"m{n}", [f"m{n - 1}"], T0 + 60 * n)
    for ref, name in (("main", "m39"), ("side", "s3"), ("topic", "t3"), ("old", "m20")):
        git(git_dir, "update-ref", f"refs/heads/{ref}", ids[name])
    git(git_dir, "symbolic-ref", "HEAD", "refs/heads/main")
    return ids


LOGS = [
    ["main"], ["topic"], ["side..main"], ["main..topic"], ["topic...side"], ["side...main"],
    ["^old", "main", "topic"], ["--all"], ["main~5..main"], ["topic~1^2..main~3"],
]  # fmt: skip
SPECS = ["main~8", "main~8^2", "main~8^3~2", "main~9^2^", "topic~2", "topic~1^2~1", "side~2"]


def _walk_everything(repo: Repository) -> list[object]:
    """What log, resolve and merge-base give over the history, as comparable values."""
    out: list[object] = []
    for args in LOGS:
        all_refs = args == ["--all"]
        out.append(porcelain.log(repo, [] if all_refs else args, all_refs=all_refs))
        out.append(porcelain.log(repo, [] if all_refs else args, 3, all_refs=all_refs))
    out += [repo.resolve(spec) for spec in SPECS]
    for a, b in (("main", "topic"), ("side", "topic"), ("old", "side"), ("main", "main~3")):
        revisions = revwalk.Revisions(repo)
        out.append(revwalk.merge_bases(revisions, repo.resolve(a), repo.resolve(b)))
    return out


def test_log_ranges_steps_and_merge_bases_read_as_before_and_as_git(
    git_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _history(git_dir)
    for packed in (False, True):
        if packed:
            git(git_dir, "repack", "-a", "-d", "-q")
        with Repository.open(git_dir.parent) as repo:
            whole = whole_commit_reads(repo, monkeypatch)
            ours = _walk_everything(repo)
            # Only the mergetag commit is left to the full parse (and read once per walk).
            assert set(whole) == {ids["t2"]}, sorted(whole)
        with monkeypatch.context() as patched, Repository.open(git_dir.parent) as repo:
            patched.setattr(store, "parse_plain", lambda body: None)  # as before: all whole
            assert _walk_everything(repo) == ours
    for n, args in enumerate(LOGS):
        listed = [info.id for info in ours[2 * n]]  # type: ignore[attr-defined]
        assert listed == git(git_dir, "log", "--first-parent", "--format=%H", *args).stdout.split()
    at = 2 * len(LOGS)
    assert ours[at : at + len(SPECS)] == [
        git(git_dir, "rev-parse", s).stdout.strip() for s in SPECS
    ]
    for got, (a, b) in zip(
        ours[at + len(SPECS) :],
        (("main", "topic"), ("side", "topic"), ("old", "side"), ("main", "main~3")),
        strict=True,
    ):
        assert got == git(git_dir, "merge-base", "--all", a, b).stdout.split(), (a, b)


def test_a_log_of_a_long_history_parses_no_commit_whole(
    git_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each commit a walk read went through dulwich's parse and every field decoded (~130 us a
    # commit, 30x git on a 50,000-commit chain); now only the commits the reader leaves to it.
    from dulwich.objects import Commit

    stream = []
    for mark in range(1, 301):
        stamp = f"A <a@example.com> {T0 + mark} +0000"
        stream.append(
            f"commit refs/heads/main\nmark :{mark}\nauthor {stamp}\ncommitter {stamp}\n"
            f"data 3\nc{mark % 10}\n" + (f"from :{mark - 1}\n" if mark > 1 else "")
        )
    git(git_dir, "fast-import", "--quiet", input_text="".join(stream))
    parsed: list[bytes] = []
    deserialize = Commit._deserialize

    def counting(self: Commit, chunks: list[bytes]) -> None:
        parsed.append(b"".join(chunks))
        deserialize(self, chunks)

    monkeypatch.setattr(Commit, "_deserialize", counting)
    with Repository.open(git_dir.parent) as repo:
        assert len(porcelain.log(repo, "main")) == 300
        assert len(porcelain.log(repo, ["main~250..main", "^main~280"])) == 250
        assert repo.resolve("main~299") == git(git_dir, "rev-parse", "main~299").stdout.strip()
        tip = repo.get_object(repo.resolve("main")).as_raw_string()
    assert parsed and set(parsed) == {tip}  # only the tip, peeled where it is named
