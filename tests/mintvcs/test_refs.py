"""Refs against real git: names, loose and packed refs, reflogs, CAS, locks, concurrency."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mintvcs.refs as mintvcs_refs
from mintvcs.refs import (
    ANY,
    ZERO,
    InvalidIdentityError,
    InvalidRefNameError,
    InvalidRefValueError,
    RefConflictError,
    RefNameConflictError,
    RefNotFoundError,
    RefStore,
    check_branch_name,
    check_ref_name,
)

ME = "Ada Lovelace <ada@example.com>"
GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Tester",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "Tester",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_AUTHOR_DATE": "1700000000 +0000",
    "GIT_COMMITTER_DATE": "1700000000 +0000",
}


def git(d: Path, *args: str, check: bool = True) -> str:
    """Run git on git dir d and return stdout."""
    r = subprocess.run(
        ["git", "--git-dir", str(d), *args],
        env=GIT_ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"git {args} failed: {r.stderr}")
    return r.stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An empty bare git dir with HEAD -> refs/heads/main."""
    d = tmp_path / "store.git"
    subprocess.run(["git", "init", "-q", "--bare", str(d)], env=GIT_ENV, check=True)
    git(d, "symbolic-ref", "HEAD", "refs/heads/main")
    return d


def make_commits(d: Path, n: int) -> list[str]:
    """n real commits in a chain, so that git fsck accepts refs to them."""
    tree = _empty_tree(d)
    out: list[str] = []
    parent: list[str] = []
    for i in range(n):
        c = git(d, "commit-tree", "-m", f"c{i}", *parent, tree).strip()
        out.append(c)
        parent = ["-p", c]
    return out


def _empty_tree(d: Path) -> str:
    r = subprocess.run(
        ["git", "--git-dir", str(d), "mktree"],
        input="",
        env=GIT_ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.strip()


def for_each_ref(d: Path, *patterns: str) -> list[tuple[str, str]]:
    """git's view of the refs: (name, object id), sorted by name."""
    out = git(d, "for-each-ref", "--format=%(refname) %(objectname)", *patterns)
    return [tuple(line.split(" ")) for line in out.splitlines()]  # type: ignore[misc]


# --- names ----------------------------------------------------------------------------

GOOD = [
    "refs/heads/main",
    "refs/heads/user/42",
    "refs/heads/a.b",
    "refs/heads/a./b",
    "refs/heads/a@b",
    "refs/heads/@",
    "refs/heads/ü-ñ",
    "refs/tags/v1.0",
    "refs/heads/a.lock.b",
    "refs/heads/-x",
    "refs/heads/a_b-c.d/e",
    "refs/heads/-",
    "x/y",
]
BAD = [
    "refs/heads/a..b",
    "refs/heads/x~1",
    "refs/heads/has space",
    "refs/heads/end.lock",
    "refs/heads/a.lock/b",
    "refs/heads/a/b.lock/c",
    "refs/heads/a..",
    "refs/heads/a/.",
    "refs/heads/a/.b",
    "refs/heads/.a",
    "refs/heads/@{x}",
    "refs/heads/a^",
    "refs/heads/a:b",
    "refs/heads/a?",
    "refs/heads/a*",
    "refs/heads/a[b",
    "refs/heads/a\\b",
    "refs/heads/tab\there",
    "refs/heads/ctl\x01",
    "refs/heads/del\x7f",
    "refs/heads//x",
    "refs/heads/x/",
    "/refs/heads/x",
    "refs/heads/x.",
    "@",
    "main",
    "",
]


def _ours_accepts(check: object, name: str) -> bool:
    try:
        check(name)  # type: ignore[operator]
    except InvalidRefNameError:
        return False
    return True


@pytest.mark.parametrize("name", GOOD + BAD)
def test_ref_names_match_git(name: str) -> None:
    r = subprocess.run(["git", "check-ref-format", name], env=GIT_ENV, capture_output=True)
    assert _ours_accepts(check_ref_name, name) == (r.returncode == 0), name
    assert (name in GOOD) == (r.returncode == 0)  # the table itself is right


def test_random_names_match_git() -> None:
    # Names built from the characters the rules are about, so every rule gets hit.
    rng = random.Random(11)
    alphabet = "ab./-@{_~ lock"
    for _ in range(200):
        name = "refs/" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 9)))
        r = subprocess.run(["git", "check-ref-format", name], env=GIT_ENV, capture_output=True)
        assert _ours_accepts(check_ref_name, name) == (r.returncode == 0), name


@pytest.mark.parametrize(
    "name",
    ["main", "user/42", "a..b", "x~1", "has space", "end.lock", "a/.b", "@{x}", "feat/x.y"],
)
def test_branch_names_match_git(name: str, tmp_path: Path) -> None:
    r = subprocess.run(
        ["git", "check-ref-format", "--branch", name],
        env=GIT_ENV,
        capture_output=True,
        cwd=tmp_path,
    )
    assert _ours_accepts(check_branch_name, name) == (r.returncode == 0), name


@pytest.mark.parametrize("name", ["-lead", "HEAD", "a\x00b", "nul\x00", "", "@"])
def test_branch_names_refused_beyond_git(name: str) -> None:
    with pytest.raises(InvalidRefNameError) as e:
        check_branch_name(name)
    assert repr(name) in str(e.value)


def test_name_error_names_the_rule() -> None:
    with pytest.raises(InvalidRefNameError, match=r"'refs/heads/a\.\.b'.*'\.\.'"):
        check_ref_name("refs/heads/a..b")
    with pytest.raises(InvalidRefNameError, match="control character"):
        check_ref_name("refs/heads/a\x00b")
    with pytest.raises(InvalidRefNameError, match=r"\.lock"):
        check_ref_name("refs/heads/end.lock")
    # A component is a file name: 255 bytes at most, less room for the lock file's '.lock'.
    check_ref_name("refs/heads/" + "a" * 250)
    with pytest.raises(InvalidRefNameError, match="251 bytes"):
        check_ref_name("refs/heads/" + "a" * 251)
    with pytest.raises(InvalidRefNameError, match="252 bytes"):
        check_ref_name("refs/heads/user/" + "é" * 126)


def test_a_name_too_long_for_the_file_system_reads_as_absent(repo: Path) -> None:
    store = RefStore(repo)
    assert store.read("refs/heads/" + "a" * 250) is None
    assert store._read_loose("refs/heads/" + "a" * 300) is None  # the server's specs come this way


def test_store_refuses_bad_names_and_values(repo: Path) -> None:
    s = RefStore(repo)
    (c,) = make_commits(repo, 1)
    for bad in ["refs/heads/a..b", "main", "refs/heads/../../config", "../HEAD"]:
        with pytest.raises(InvalidRefNameError):
            s.update(bad, c, message="m", identity=ME)
        with pytest.raises(InvalidRefNameError):
            s.read(bad)
    for value in ["abc", c.upper(), c + "0", ZERO]:
        with pytest.raises(InvalidRefValueError):
            s.update("refs/heads/x", value, message="m", identity=ME)
    with pytest.raises(InvalidIdentityError):
        s.update("refs/heads/x", c, message="m", identity="no email")
    with pytest.raises(InvalidIdentityError):
        s.update("refs/heads/x", c, message="m", identity="a <b>\n")
    assert list(s.iter_refs()) == []


# --- interop with git -----------------------------------------------------------------


def test_refs_we_write_git_reads(repo: Path) -> None:
    c = make_commits(repo, 3)
    s = RefStore(repo)
    s.update("HEAD", c[0], old=None, message="commit (initial): c0", identity=ME)
    s.update("refs/heads/main", c[1], old=c[0], message="commit: c1", identity=ME)
    s.update("refs/heads/user/7", c[2], old=None, message="branch: user 7", identity=ME)
    s.update("refs/tags/prod", c[1], old=None, message="tag", identity=ME)

    assert git(repo, "rev-parse", "HEAD").strip() == c[1]
    assert git(repo, "rev-parse", "user/7").strip() == c[2]
    assert git(repo, "rev-parse", "prod").strip() == c[1]
    assert for_each_ref(repo) == list(s.iter_refs())
    assert list(s.iter_refs()) == [
        ("refs/heads/main", c[1]),
        ("refs/heads/user/7", c[2]),
        ("refs/tags/prod", c[1]),
    ]
    # git reads our reflog: newest first, new values and messages.
    log = git(repo, "log", "-g", "--format=%H %gs", "refs/heads/main").splitlines()
    assert log == [f"{c[1]} commit: c1", f"{c[0]} commit (initial): c0"]
    head_log = git(repo, "log", "-g", "--format=%H %gs", "HEAD").splitlines()
    assert head_log == log
    r = subprocess.run(
        ["git", "--git-dir", str(repo), "fsck", "--strict", "--no-dangling"],
        env=GIT_ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip() == ""


def test_packed_refs_we_write_git_reads(repo: Path) -> None:
    c = make_commits(repo, 2)
    s = RefStore(repo)
    names = [f"refs/heads/user/{i:04d}" for i in range(500)]
    assert s.bulk_create((n, c[i % 2]) for i, n in enumerate(names)) == 500
    s.update("refs/heads/user/0007", c[0], old=c[1], message="move", identity=ME)
    s.update("refs/tags/v1", c[1], old=None, message="tag", identity=ME)
    s.pack()
    assert not (repo / "refs/heads/user/0007").exists()
    assert (repo / "packed-refs").read_bytes().startswith(b"# pack-refs with: sorted \n")
    ours = list(s.iter_refs())
    assert ours == for_each_ref(repo)
    assert len(ours) == 501
    assert git(repo, "rev-parse", "user/0007").strip() == c[0]
    assert git(repo, "rev-parse", "user/0499").strip() == c[1]
    r = subprocess.run(
        ["git", "--git-dir", str(repo), "fsck", "--strict"], env=GIT_ENV, capture_output=True
    )
    assert r.returncode == 0, r.stderr


def test_refs_git_writes_we_read(repo: Path) -> None:
    c = make_commits(repo, 3)
    git(repo, "config", "core.logAllRefUpdates", "always")
    git(repo, "update-ref", "-m", "first", "refs/heads/main", c[0])
    git(repo, "update-ref", "-m", "second", "refs/heads/main", c[1])
    git(repo, "update-ref", "refs/heads/feature/x", c[2])
    git(repo, "tag", "light", c[0])
    git(repo, "tag", "-a", "-m", "annotated", "v1", c[1])
    # A symbolic ref inside refs/: listed with its target's value, by git and by us.
    git(repo, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/heads/main")
    tag_obj = git(repo, "rev-parse", "refs/tags/v1").strip()
    assert tag_obj != c[1]

    s = RefStore(repo)
    assert s.read_symbolic("HEAD") == "refs/heads/main"
    assert s.read("HEAD") == c[1]
    assert s.read("refs/tags/v1") == tag_obj
    assert s.read("refs/heads/nope") is None
    assert list(s.iter_refs()) == for_each_ref(repo)
    log = s.reflog("refs/heads/main")
    assert [(e.old, e.new, e.message) for e in log] == [
        (ZERO, c[0], "first"),
        (c[0], c[1], "second"),
    ]
    assert log[0].identity == "Tester <t@example.com>"
    assert log[0].timestamp == 1700000000 and log[0].tz == "+0000"

    git(repo, "pack-refs", "--all")
    assert not (repo / "refs/heads/main").exists()
    s2 = RefStore(repo)
    assert s2.read("HEAD") == c[1]
    assert s2.read("refs/heads/feature/x") == c[2]
    assert s2.read("refs/tags/v1") == tag_obj
    assert s2.peeled("refs/tags/v1") == c[1] == git(repo, "rev-parse", "v1^{}").strip()
    assert s2.peeled("refs/tags/light") is None
    assert list(s2.iter_refs()) == for_each_ref(repo)
    assert list(s2.iter_refs("refs/heads/feature/")) == [("refs/heads/feature/x", c[2])]

    # A CAS update over a packed ref writes a loose ref that overrides it, for git too.
    s2.update("refs/heads/feature/x", c[0], old=c[2], message="reset", identity=ME)
    assert git(repo, "rev-parse", "feature/x").strip() == c[0]
    assert s2.peeled("refs/tags/v1") == c[1]
    # Deleting a packed ref removes its line (and the peeled line after it).
    s2.delete("refs/tags/v1", old=tag_obj)
    assert s2.read("refs/tags/v1") is None
    assert "v1" not in (repo / "packed-refs").read_text()
    assert git(repo, "rev-parse", "--verify", "-q", "refs/tags/v1", check=False) == ""
    assert list(s2.iter_refs()) == for_each_ref(repo)


def test_pack_with_peel_then_git_reads(repo: Path) -> None:
    c = make_commits(repo, 1)
    git(repo, "tag", "-a", "-m", "annotated", "v2", c[0])
    tag_obj = git(repo, "rev-parse", "refs/tags/v2").strip()
    s = RefStore(repo)
    s.update("refs/heads/main", c[0], old=None, message="m", identity=ME)
    peels = {tag_obj: c[0]}
    s.pack(peel=peels.get)
    text = (repo / "packed-refs").read_text()
    assert text.startswith("# pack-refs with: peeled fully-peeled sorted \n")
    assert f"{tag_obj} refs/tags/v2\n^{c[0]}\n" in text
    assert RefStore(repo).peeled("refs/tags/v2") == c[0]
    assert git(repo, "rev-parse", "v2^{}").strip() == c[0]
    assert git(repo, "show-ref", "-d", "v2").split() == [
        tag_obj,
        "refs/tags/v2",
        c[0],
        "refs/tags/v2^{}",
    ]


# --- packed-refs search -----------------------------------------------------------------


def _write_packed(d: Path, entries: list[tuple[str, str, str | None]], header: str) -> None:
    lines = [header]
    for name, value, peeled in entries:
        lines.append(f"{value} {name}\n")
        if peeled:
            lines.append(f"^{peeled}\n")
    (d / "packed-refs").write_text("".join(lines))


@pytest.mark.parametrize("sorted_trait", [True, False])
def test_packed_lookup_every_name_and_gap(repo: Path, sorted_trait: bool) -> None:
    rng = random.Random(5)
    names = sorted({f"refs/{rng.choice('abc')}/{rng.randrange(10**6):x}" for _ in range(400)})
    entries = [
        (n, f"{i:040x}", f"{i + 7:040x}" if i % 3 == 0 else None) for i, n in enumerate(names)
    ]
    if sorted_trait:
        header = "# pack-refs with: peeled fully-peeled sorted \n"
    else:
        # What dulwich and old git write: no sorted trait, so order is not promised.
        header = "# pack-refs with: peeled \n"
        entries = entries[::-1]
    _write_packed(repo, entries, header)
    s = RefStore(repo)
    for n, value, peeled in entries:
        assert s.read(n) == value
        assert s.peeled(n) == peeled
        assert s.read(n + "0") is None
        assert s.read(n[:-1] + "g") is None  # names are hex: 'g' sorts after, never present
    for missing in ["refs/a/0", "refs/0/0", "refs/zzz/1", "refs/b/" + "f" * 9]:
        assert s.read(missing) is None
    assert list(s.iter_refs()) == [(n, v) for n, v, _ in sorted(entries)]
    assert list(s.iter_refs("refs/b/")) == [
        (n, v) for n, v, _ in sorted(entries) if n.startswith("refs/b/")
    ]
    if sorted_trait:
        assert list(s.iter_refs()) == for_each_ref(repo)


def test_loose_overrides_packed_in_listing(repo: Path) -> None:
    c = make_commits(repo, 3)
    s = RefStore(repo)
    s.bulk_create([("refs/heads/a", c[0]), ("refs/heads/b", c[0]), ("refs/heads/d", c[0])])
    s.update("refs/heads/b", c[1], old=c[0], message="m", identity=ME)
    s.update("refs/heads/c", c[2], old=None, message="m", identity=ME)
    s.update("refs/heads/e", c[2], old=None, message="m", identity=ME)
    want = [
        ("refs/heads/a", c[0]),
        ("refs/heads/b", c[1]),
        ("refs/heads/c", c[2]),
        ("refs/heads/d", c[0]),
        ("refs/heads/e", c[2]),
    ]
    assert list(s.iter_refs()) == want == for_each_ref(repo)
    assert list(s.iter_refs("refs/heads/c")) == [want[2]]
    assert list(s.iter_refs("refs/tags/")) == []


# --- CAS, locks, conflicts ----------------------------------------------------------------


def test_compare_and_swap(repo: Path) -> None:
    c = make_commits(repo, 3)
    s = RefStore(repo)
    name = "refs/heads/main"
    s.update(name, c[0], old=None, message="create", identity=ME)
    with pytest.raises(RefConflictError) as e:
        s.update(name, c[1], old=None, message="recreate", identity=ME)
    assert e.value.actual == c[0] and c[0] in str(e.value) and name in str(e.value)
    with pytest.raises(RefConflictError):
        s.update(name, c[1], old=ZERO, message="recreate", identity=ME)
    with pytest.raises(RefConflictError) as e:
        s.update(name, c[1], old=c[2], message="stale", identity=ME)
    assert (e.value.expected, e.value.actual) == (c[2], c[0])
    assert c[2] in str(e.value)
    with pytest.raises(RefConflictError) as e:
        s.update("refs/heads/other", c[1], old=c[0], message="missing", identity=ME)
    assert e.value.actual is None
    assert s.read(name) == c[0]
    s.update(name, c[1], old=c[0], message="ok", identity=ME)
    s.update(name, c[2], old=ANY, message="any", identity=ME)
    assert s.read(name) == c[2]
    assert [e.message for e in s.reflog(name)] == ["create", "ok", "any"]
    assert not list(repo.rglob("*.lock"))


def test_lock_present_means_conflict(repo: Path) -> None:
    c = make_commits(repo, 2)
    s = RefStore(repo)
    s.update("refs/heads/main", c[0], old=None, message="m", identity=ME)
    lock = repo / "refs/heads/main.lock"
    lock.write_text("held by someone else\n")
    with pytest.raises(RefConflictError, match="locked by another process"):
        s.update("refs/heads/main", c[1], old=c[0], message="m", identity=ME)
    with pytest.raises(RefConflictError, match="locked by another process"):
        s.delete("refs/heads/main")
    # Through HEAD: the branch lock is the one held.
    with pytest.raises(RefConflictError, match=r"main\.lock"):
        s.update("HEAD", c[1], message="m", identity=ME)
    assert lock.read_text() == "held by someone else\n"  # never ours to remove
    assert not (repo / "HEAD.lock").exists()
    assert s.read("refs/heads/main") == c[0]
    # git refuses too, for the same reason.
    r = subprocess.run(
        ["git", "--git-dir", str(repo), "update-ref", "refs/heads/main", c[1]],
        env=GIT_ENV,
        capture_output=True,
    )
    assert r.returncode != 0
    lock.unlink()
    s.update("refs/heads/main", c[1], old=c[0], message="m", identity=ME)
    assert s.read("refs/heads/main") == c[1]


def test_directory_file_conflicts(repo: Path) -> None:
    c = make_commits(repo, 1)[0]
    s = RefStore(repo)
    s.update("refs/heads/a", c, message="m", identity=ME)
    with pytest.raises(RefNameConflictError, match="refs/heads/a"):
        s.update("refs/heads/a/b", c, message="m", identity=ME)
    s.bulk_create([("refs/heads/p/q", c)])
    with pytest.raises(RefNameConflictError, match="refs/heads/p/q"):
        s.update("refs/heads/p", c, message="m", identity=ME)
    with pytest.raises(RefNameConflictError):
        s.bulk_create([("refs/heads/a/c", c)])
    with pytest.raises(RefNameConflictError):
        s.bulk_create([("refs/heads/p", c)])
    with pytest.raises(RefConflictError):
        s.bulk_create([("refs/heads/a", c)])
    # After deleting the packed child, its name is free again.
    s.delete("refs/heads/p/q")
    s.update("refs/heads/p", c, old=None, message="m", identity=ME)
    assert list(s.iter_refs()) == for_each_ref(repo) == [("refs/heads/a", c), ("refs/heads/p", c)]


def test_delete(repo: Path) -> None:
    c = make_commits(repo, 2)
    s = RefStore(repo)
    s.update("refs/heads/main", c[0], old=None, message="m", identity=ME)
    s.update("refs/heads/topic/x", c[1], old=None, message="m", identity=ME)
    with pytest.raises(RefConflictError):
        s.delete("refs/heads/topic/x", old=c[0])
    s.delete("refs/heads/topic/x", old=c[1])
    assert s.read("refs/heads/topic/x") is None
    assert not (repo / "refs/heads/topic").exists()
    assert not (repo / "logs/refs/heads/topic").exists()
    with pytest.raises(RefNotFoundError):
        s.delete("refs/heads/topic/x")
    # Deleting the checked-out branch is logged in HEAD's reflog, as git does.
    s.delete("refs/heads/main", message="branch: deleted", identity=ME)
    last = s.reflog("HEAD")[-1]
    assert (last.old, last.new, last.message) == (c[0], ZERO, "branch: deleted")
    assert s.reflog("refs/heads/main") == []
    assert for_each_ref(repo) == []


# --- HEAD and reflogs ---------------------------------------------------------------------


def _log_lines(d: Path) -> dict[str, list[str]]:
    """Each reflog's lines without identity and time (`old new<TAB>message`), by ref name."""
    found = {}
    for path in sorted(p for p in (d / "logs").rglob("*") if p.is_file()):
        rows = []
        for line in path.read_text().splitlines():
            head, _, message = line.partition("\t")
            old, new = head.split(" ")[:2]
            rows.append(f"{old} {new}\t{message}")
        found[path.relative_to(d / "logs").as_posix()] = rows
    return found


def test_an_update_that_leaves_a_ref_unchanged_logs_what_git_logs(
    repo: Path, tmp_path: Path
) -> None:
    # As git's files backend: no line for a ref whose value stays, but HEAD, through which
    # (or to whose branch) the update went, gets its line (git's LOG_ONLY updates).
    c = make_commits(repo, 2)
    s = RefStore(repo)
    s.update("HEAD", c[0], old=None, message="c0", identity=ME)
    s.update("refs/heads/side", c[1], old=None, message="side", identity=ME)
    twin = tmp_path / "twin.git"
    shutil.copytree(repo, twin)
    git(twin, "config", "core.logAllRefUpdates", "true")
    steps = [
        ("HEAD", c[0], True),
        ("refs/heads/main", c[0], True),
        ("refs/heads/side", c[1], True),
        ("refs/heads/side", c[0], True),
        ("HEAD", c[0], False),  # detaching: HEAD was symbolic, so it is logged
        ("HEAD", c[0], False),  # detached and unchanged: nothing
        ("HEAD", c[1], True),
    ]
    for name, value, deref in steps:
        s.update(name, value, message=f"to {value[:7]}", identity=ME, deref=deref)
        no_deref = [] if deref else ["--no-deref"]
        git(twin, "update-ref", *no_deref, "-m", f"to {value[:7]}", name, value)
        assert _log_lines(repo) == _log_lines(twin), (name, value, deref)


def test_tag_reflogs_and_a_switch_to_an_unborn_branch_log_what_git_logs(
    repo: Path, tmp_path: Path
) -> None:
    # git's core.logAllRefUpdates=true: a tag's move is logged only when its reflog already
    # exists; a symbolic ref switched to an unborn branch gets no line (there is no new value).
    c = make_commits(repo, 2)
    s = RefStore(repo)
    s.update("HEAD", c[0], old=None, message="c0", identity=ME)
    twin = tmp_path / "twin.git"
    shutil.copytree(repo, twin)
    for d in (repo, twin):
        git(d, "config", "core.logAllRefUpdates", "true")
        git(d, "update-ref", "--create-reflog", "-m", "made", "refs/tags/logged", c[0])
        git(d, "update-ref", "refs/tags/plain", c[0])
    for name in ("refs/tags/logged", "refs/tags/plain"):
        s.update(name, c[1], message="moved", identity=ME)
        git(twin, "update-ref", "-m", "moved", name, c[1])
    assert _log_lines(repo)["refs/tags/logged"] == [f"{ZERO} {c[0]}\tmade", f"{c[0]} {c[1]}\tmoved"]
    assert _log_lines(repo) == _log_lines(twin)
    message = "checkout: moving from main to unborn"
    s.set_symbolic("HEAD", "refs/heads/unborn", message=message, identity=ME)
    git(twin, "symbolic-ref", "-m", message, "HEAD", "refs/heads/unborn")
    assert s.read("HEAD") is None
    assert _log_lines(repo) == _log_lines(twin)


def test_symbolic_head_update_logs_both(repo: Path) -> None:
    c = make_commits(repo, 3)
    s = RefStore(repo)
    assert s.read("HEAD") is None  # unborn branch
    s.update(
        "HEAD",
        c[0],
        old=None,
        message="commit (initial): c0",
        identity=ME,
        timestamp=1700000001,
        tz="+0200",
    )
    assert s.read_symbolic("HEAD") == "refs/heads/main"
    assert (repo / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (repo / "refs/heads/main").read_text() == c[0] + "\n"
    line = f"{ZERO} {c[0]} {ME} 1700000001 +0200\tcommit (initial): c0\n"
    assert (repo / "logs/HEAD").read_text() == line
    assert (repo / "logs/refs/heads/main").read_text() == line
    # Moving the branch directly also lands in HEAD's log, as git does.
    s.update("refs/heads/main", c[1], old=c[0], message="a\nmulti-line   message\n", identity=ME)
    assert [e.message for e in s.reflog("HEAD")] == ["commit (initial): c0", "a multi-line message"]
    # Another branch moving does not.
    s.update("refs/heads/other", c[2], old=None, message="other", identity=ME)
    assert len(s.reflog("HEAD")) == 2
    # Switching HEAD logs the move on HEAD only.
    s.set_symbolic(
        "HEAD", "refs/heads/other", message="checkout: moving from main to other", identity=ME
    )
    assert s.read("HEAD") == c[2]
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/other"
    assert git(repo, "log", "-g", "--format=%H %gs", "HEAD").splitlines() == [
        f"{c[2]} checkout: moving from main to other",
        f"{c[1]} a multi-line message",
        f"{c[0]} commit (initial): c0",
    ]
    assert [(e.old, e.new) for e in s.reflog("refs/heads/main")] == [(ZERO, c[0]), (c[0], c[1])]
    assert s.reflog("refs/heads/other")[0].message == "other"
    r = subprocess.run(
        ["git", "--git-dir", str(repo), "fsck", "--strict"], env=GIT_ENV, capture_output=True
    )
    assert r.returncode == 0, r.stderr


def test_detached_head(repo: Path) -> None:
    c = make_commits(repo, 2)
    git(repo, "update-ref", "--no-deref", "HEAD", c[0])
    s = RefStore(repo)
    assert s.read_symbolic("HEAD") is None
    assert s.read("HEAD") == c[0]
    s.update("HEAD", c[1], old=c[0], message="detached move", identity=ME)
    assert git(repo, "rev-parse", "HEAD").strip() == c[1]
    assert s.read("refs/heads/main") is None


# --- processes ------------------------------------------------------------------------------

_COUNTER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mintvcs.refs import RefConflictError, RefStore

    store = RefStore(Path(sys.argv[1]))
    name = "refs/heads/counter"
    done = 0
    while done < int(sys.argv[2]):
        cur = store.read(name)
        nxt = f"{int(cur, 16) + 1:040x}"
        try:
            store.update(name, nxt, old=cur, message=f"inc by {sys.argv[3]}", identity="w <w@x>")
        except RefConflictError:
            continue
        done += 1
    """
)


def test_concurrent_cas_loses_no_update(repo: Path) -> None:
    s = RefStore(repo)
    s.update("refs/heads/counter", f"{1:040x}", old=None, message="start", identity=ME)
    procs = [
        subprocess.Popen([sys.executable, "-c", _COUNTER, str(repo), "50", str(i)])
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert s.read("refs/heads/counter") == f"{101:040x}"
    log = s.reflog("refs/heads/counter")
    assert len(log) == 101
    # Each entry continues the previous one: a chain with no gap and no fork.
    for prev, cur in itertools.pairwise(log):
        assert cur.old == prev.new
        assert int(cur.new, 16) == int(cur.old, 16) + 1
    assert {e.message for e in log[1:]} == {"inc by 0", "inc by 1"}
    assert not list(repo.rglob("*.lock"))


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mintvcs.refs import RefStore

    store = RefStore(Path(sys.argv[1]))
    ids = sys.argv[2:]
    print("ready", flush=True)
    i = 0
    while True:
        store.update("refs/heads/main", ids[i % len(ids)], message="spin", identity="w <w@x>")
        i += 1
    """
)


def test_kill_during_updates_leaves_old_or_new(repo: Path) -> None:
    c = make_commits(repo, 3)
    rng = random.Random(1)
    for _ in range(3):
        p = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(repo), *c], stdout=subprocess.PIPE, text=True
        )
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.01, 0.1))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert p.stdout.close() is None
        # A kill inside the window leaves a stale lock, as with git; the ref itself is whole.
        (repo / "refs/heads/main.lock").unlink(missing_ok=True)
        assert RefStore(repo).read("refs/heads/main") in c
        assert git(repo, "rev-parse", "main").strip() in c
        for e in RefStore(repo).reflog("refs/heads/main"):
            assert e.new in c


def test_import_is_light() -> None:
    code = (
        "import sys, mintvcs.refs; print(sorted({'torch', 'numpy', 'dulwich'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_delete_waits_for_packed_refs_lock(repo: Path) -> None:
    c = make_commits(repo, 1)[0]
    s = RefStore(repo)
    s.bulk_create([("refs/heads/p", c)])
    (repo / "packed-refs.lock").write_text("")
    with pytest.raises(RefConflictError, match=r"packed-refs\.lock"):
        s.delete("refs/heads/p")
    assert s.read("refs/heads/p") == c
    assert not (repo / "refs/heads/p.lock").exists()
    (repo / "packed-refs.lock").unlink()
    s.delete("refs/heads/p")
    assert for_each_ref(repo) == []


_DF_RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mintvcs.refs import RefConflictError, RefNameConflictError, RefStore

    store = RefStore(Path(sys.argv[1]))
    kind, oid, start = sys.argv[2], sys.argv[3], float(sys.argv[4])
    other = 0
    for i in range(200):
        while time.time() < start + i * 0.01:  # both at once, round after round
            pass
        name = f"refs/heads/d{i}" + ("/x" if kind == "child" else "")
        try:
            store.update(name, oid, old=None, message="m", identity="w <w@x>")
        except (RefNameConflictError, RefConflictError):
            pass
    """
)


def test_a_ref_and_one_under_its_name_created_at_once_leave_one(repo: Path) -> None:
    # Both often failed with raw OS errors, and the loser's reflog file blocked `dN/...` for good.
    (oid,) = make_commits(repo, 1)
    start = f"{time.time() + 1.5:.3f}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DF_RACER, str(repo), kind, oid, start],
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in ("parent", "child")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err  # no error but the two conflicts
    for i in range(200):
        parent, child = repo / f"refs/heads/d{i}", repo / f"refs/heads/d{i}/x"
        assert parent.is_file() != child.is_file(), i  # exactly one of the two
        log = repo / f"logs/refs/heads/d{i}"
        # No reflog of a ref that is not there.
        assert log.is_file() == parent.is_file() and (log / "x").is_file() == child.is_file(), i
    assert not list(repo.rglob("*.lock"))


def test_a_move_is_logged_before_the_ref_moves(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Logged after the rename, a crash between the two left main moved with no line for the
    # move, and `main@{1}` then named the commit before the previous move.
    c1, c2, c3 = make_commits(repo, 3)
    s = RefStore(repo)
    s.update("refs/heads/main", c1, old=None, message="one", identity=ME)
    s.update("refs/heads/main", c2, message="two", identity=ME)
    seen: list[list[str]] = []
    commit = mintvcs_refs._Lock.write_commit

    def crash_point(lock: mintvcs_refs._Lock, data: bytes) -> None:
        seen.append(
            [e.new for e in s.reflog("refs/heads/main")] + [e.new for e in s.reflog("HEAD")]
        )
        commit(lock, data)

    monkeypatch.setattr(mintvcs_refs._Lock, "write_commit", crash_point)
    s.update("refs/heads/main", c3, message="three", identity=ME)
    assert seen == [[c1, c2, c3, c1, c2, c3]]  # both lines there before the rename


def test_a_move_that_fails_takes_its_line_back(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c1, c2 = make_commits(repo, 2)
    s = RefStore(repo)
    s.update("refs/heads/main", c1, old=None, message="one", identity=ME)
    before = (repo / "logs/HEAD").read_bytes(), (repo / "logs/refs/heads/main").read_bytes()

    def interrupted(lock: mintvcs_refs._Lock, data: bytes) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mintvcs_refs._Lock, "write_commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        s.update("refs/heads/main", c2, message="two", identity=ME)
    assert s.read("refs/heads/main") == c1
    after = (repo / "logs/HEAD").read_bytes(), (repo / "logs/refs/heads/main").read_bytes()
    assert after == before
    assert not (repo / "refs/heads/main.lock").exists()


def test_a_deleted_ref_loses_its_reflog_first(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ref first, a crash before the reflog's unlink left a reflog that the next branch of the
    # same name took for its own (`feat@{1}` named the deleted branch's commit).
    (c1,) = make_commits(repo, 1)
    s = RefStore(repo)
    s.update("refs/heads/feat", c1, old=None, message="create", identity=ME)
    unlink = os.unlink
    order: list[str] = []

    def recording(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        order.append(os.path.relpath(path, repo))
        unlink(path)

    monkeypatch.setattr(mintvcs_refs.os, "unlink", recording)
    s.delete("refs/heads/feat")
    assert order.index("logs/refs/heads/feat") < order.index("refs/heads/feat")


def test_a_failed_second_reflog_line_takes_the_first_back(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HEAD's line failing (a full disk) left the branch's line for a move that did not happen.
    c1, c2 = make_commits(repo, 2)
    s = RefStore(repo)
    s.update("refs/heads/main", c1, old=None, message="one", identity=ME)
    before = (repo / "logs/refs/heads/main").read_bytes()
    append = RefStore._append_log

    def full_for_head(self: RefStore, name: str, *args: object) -> object:
        if name == "HEAD":
            raise OSError(28, "No space left on device")
        return append(self, name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(RefStore, "_append_log", full_for_head)
    with pytest.raises(OSError):
        s.update("refs/heads/main", c2, message="two", identity=ME)
    assert s.read("refs/heads/main") == c1
    assert (repo / "logs/refs/heads/main").read_bytes() == before


# --- renaming (git branch -m) ----------------------------------------------------------------

GIT_ME = "Tester <t@example.com>"  # GIT_ENV's committer: both sides write the same reflog lines


def _renaming_store(tmp_path: Path) -> tuple[Path, str]:
    """A bare store logging every update (as .mint does), HEAD -> main: main and a/b loose at
    the commit returned, side loose at its parent, `packed` only in packed-refs; all with reflogs."""
    d = tmp_path / "ours.git"
    subprocess.run(["git", "init", "-q", "--bare", str(d)], env=GIT_ENV, check=True)
    git(d, "config", "core.logAllRefUpdates", "true")
    git(d, "symbolic-ref", "HEAD", "refs/heads/main")
    c1, c2 = make_commits(d, 2)
    for name in ("packed", "main"):
        git(d, "update-ref", "-m", "made", f"refs/heads/{name}", c1)
    git(d, "pack-refs", "--all")
    for name in ("main", "a/b"):
        git(d, "update-ref", "-m", "moved", f"refs/heads/{name}", c2)
    git(d, "update-ref", "-m", "made", "refs/heads/side", c1)
    return d, c2


def _git_rename(store: Path, old: str, new: str, *, force: bool = False, ok: bool = True) -> bool:
    """`git branch -m/-M OLD NEW` on a store; whether git did it."""
    r = subprocess.run(
        ["git", "--git-dir", str(store), "branch", "-M" if force else "-m", old, new],
        env=GIT_ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (r.returncode == 0) == ok, r.stderr
    return r.returncode == 0


def _our_rename(store: Path, old: str, new: str, *, force: bool = False) -> None:
    RefStore(store).rename(
        f"refs/heads/{old}",
        f"refs/heads/{new}",
        force=force,
        message=f"Branch: renamed refs/heads/{old} to refs/heads/{new}",
        identity=GIT_ME,
        timestamp=1700000000,
        tz="+0000",
    )


def _store_state(d: Path) -> tuple[str, str, dict[str, bytes]]:
    """HEAD, every ref, and every reflog, loose ref and packed-refs file, byte for byte."""
    files = {
        p.relative_to(d).as_posix(): p.read_bytes()
        for top in ("logs", "refs")
        for p in (d / top).rglob("*")
        if p.is_file()
    }
    if (d / "packed-refs").exists():
        files["packed-refs"] = (d / "packed-refs").read_bytes()
    return (d / "HEAD").read_text(), git(d, "for-each-ref"), files


def test_a_rename_writes_what_git_branch_m_writes(tmp_path: Path) -> None:
    # The current branch (HEAD follows, with git's two HEAD lines), a packed one, into and out
    # of a directory its own name makes (`a` -> `a/b`, which git allows), onto its own name,
    # and -M over an existing branch whose reflog it replaces.
    ours, _ = _renaming_store(tmp_path)
    theirs = tmp_path / "theirs.git"
    shutil.copytree(ours, theirs)
    steps = [
        ("main", "trunk", False),
        ("packed", "p/x", False),
        ("a/b", "a", False),
        ("a", "a/b/c", False),
        ("trunk", "trunk/v1", False),
        ("trunk/v1", "trunk/v1", False),
        ("side", "side", False),
        ("a/b/c", "side", True),
        ("p/x", "p", False),
        # Packed ones: -M over a packed branch leaves no stale record under the new loose one;
        # into and out of their own directory they end loose, as in git, and packed-refs keeps
        # its "peeled fully-peeled" header.
        ("pack", "", False),
        ("side", "p", True),
        ("trunk/v1", "trunk", False),
        ("pack", "", False),
        ("trunk", "trunk/v2", False),
        ("pack", "", False),
        ("trunk/v2", "trunk", False),
        ("tag", "", False),
        ("trunk", "trunk/v3", False),
    ]
    for old, new, force in steps:
        if old in ("pack", "tag"):
            for d in (ours, theirs):
                if old == "tag":  # an annotated tag: its record has a peeled line
                    git(d, "tag", "-a", "-m", "t", "v1", "trunk")
                git(d, "pack-refs", "--all")
            continue
        _git_rename(theirs, old, new, force=force)
        _our_rename(ours, old, new, force=force)
        assert _store_state(ours) == _store_state(theirs), (old, new)
    git(ours, "fsck", "--strict")


def test_a_rename_git_refuses_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    ours, _ = _renaming_store(tmp_path)
    git(ours, "symbolic-ref", "refs/heads/alias", "refs/heads/side")
    before = _store_state(ours)
    for old, new, error in [
        ("side", "main", RefConflictError),  # exists: -M only
        ("nope", "x", RefNotFoundError),
        ("side", "a/b/c", RefNameConflictError),  # a/b is a branch
        ("side", "a", RefNameConflictError),  # a/ holds a branch
        ("alias", "x", mintvcs_refs.SymbolicRefError),
    ]:
        _git_rename(ours, old, new, ok=False)
        with pytest.raises(error):
            _our_rename(ours, old, new)
        assert _store_state(ours) == before, (old, new)
    # Neither a lock left behind nor a temporary reflog.
    assert not [p for p in ours.rglob("*") if p.name.endswith(".lock") or p.name.startswith(".tmp")]


def test_an_unborn_branch_is_renamed_by_moving_head(repo: Path) -> None:
    # `git branch -m fresh` in a new repository: no ref yet, HEAD names the new name.
    s = RefStore(repo)
    assert s.rename("refs/heads/main", "refs/heads/fresh", message="m", identity=ME) == (None, None)
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/fresh"
    assert not (repo / "logs").exists() or not list((repo / "logs").rglob("*"))
    with pytest.raises(RefNotFoundError):  # unborn, but not what HEAD names
        s.rename("refs/heads/other", "refs/heads/x", message="m", identity=ME)


# A rename that dies (kill -9) before its Nth file-system change: rename, unlink, write, rmdir.
CRASHING_RENAME = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from mintvcs.refs import RefStore

    left = int(sys.argv[2])

    def gate(call):
        def run(*args, **kwargs):
            global left
            if left == 0:
                os._exit(9)
            left -= 1
            return call(*args, **kwargs)
        return run

    for name in ("rename", "unlink", "write", "rmdir"):
        setattr(os, name, gate(getattr(os, name)))
    RefStore(Path(sys.argv[1])).rename(
        sys.argv[3], sys.argv[4], force=True, message="renamed", identity="A <a@b>"
    )
    """
)


@pytest.mark.parametrize(
    ("old", "new"),
    [("main", "side"), ("packed", "packed/x"), ("a/b", "a")],
    ids=["current-over-existing", "packed-into-its-directory", "out-of-its-directory"],
)
def test_a_rename_killed_at_any_step_leaves_a_name_for_the_commit(
    tmp_path: Path, old: str, new: str
) -> None:
    # A crash must never leave the commit without a ref (git deletes the old name before it
    # writes the new one): at worst both names hold it, and its reflog is somewhere.
    base, _ = _renaming_store(tmp_path)
    old_ref, new_ref = f"refs/heads/{old}", f"refs/heads/{new}"
    value = git(base, "rev-parse", old_ref).strip()
    history = (base / "logs" / old_ref).read_text()
    env = {**GIT_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for step in itertools.count():
        d = tmp_path / f"run{step}"
        shutil.copytree(base, d)
        done = subprocess.run(
            [sys.executable, "-c", CRASHING_RENAME, str(d), str(step), old_ref, new_ref],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode in (0, 9), done.stderr
        names = {
            n
            for n in (old_ref, new_ref)
            if git(d, "rev-parse", "-q", "--verify", n, check=False).strip() == value
        }
        assert names, f"killed at step {step}: no ref holds {value}"
        assert git(d, "rev-parse", "--verify", "HEAD").strip()  # HEAD names a branch that is
        git(d, "fsck")
        logs = [p.read_text() for p in (d / "logs").rglob("*") if p.is_file()]
        assert any(text.startswith(history) for text in logs), f"killed at step {step}"
        if done.returncode == 0:
            assert names == {new_ref} and step > 5
            break
