"""`log` of ranges and of several revisions, checked against real git's `log` of the same
arguments, on histories built with the CLI."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.mintvcs.storekit import ENV, copy_adapter, count_reads, git, mint, mutate

T0 = 1_700_000_000  # commit times are set (GIT_COMMITTER_DATE): ties and a skew on purpose


def _commit(work: Path, message: str, when: int, *extra: str) -> str:
    """`mintvcs commit` of the work tree, changed first, made at `when`; returns its id."""
    mutate(work, seed=when + len(message))
    out = mint(
        work,
        "commit",
        "-m",
        message,
        "--no-verify",
        "--json",
        *extra,
        env={"GIT_COMMITTER_DATE": f"@{when} +0000", "GIT_AUTHOR_DATE": f"@{when} +0000"},
    )
    return str(json.loads(out.stdout)["commit"])


@pytest.fixture(scope="module")
def forked(tmp_path_factory: pytest.TempPathFactory, peft_adapter: Path) -> dict[str, Any]:
    """main: m0 m1 m2 m3 m4; product-b forks at m2 with b1 b2 b3, exp with e1; tag prod at m1.
    m0 and m1 are made in one second, and so are m3, m4, b1 and e1; b2's clock is skewed (older
    than its parent and than m2)."""
    work = tmp_path_factory.mktemp("forked") / "work"
    mint(work.parent, "init", str(work), "--no-hooks")
    copy_adapter(peft_adapter, work)
    ids = {"m0": _commit(work, "m0", T0), "m1": _commit(work, "m1", T0)}
    ids["m2"] = _commit(work, "m2", T0 + 10)
    mint(work, "branch", "product-b")
    mint(work, "branch", "exp")
    ids["m3"] = _commit(work, "m3", T0 + 20)
    ids["b1"] = _commit(work, "b1", T0 + 20, "--branch", "product-b")
    ids["e1"] = _commit(work, "e1", T0 + 20, "--branch", "exp")
    ids["b2"] = _commit(work, "b2", T0 + 5, "--branch", "product-b")
    ids["m4"] = _commit(work, "m4", T0 + 20)
    ids["b3"] = _commit(work, "b3", T0 + 30, "--branch", "product-b")
    mint(work, "tag", "prod", ids["m1"])
    times = git(work / ".mint", "log", "--format=%ct %s", "--all").stdout.splitlines()
    assert f"{T0 + 5} b2" in times and f"{T0 + 20} e1" in times  # the dates were taken
    return {"work": work, **ids}


# (arguments, what they list) on `forked`; what git lists, in git's order, is checked too.
CASES = [
    (["main..product-b"], "b3 b2 b1"),
    (["product-b", "^main"], "b3 b2 b1"),
    (["^main", "product-b"], "b3 b2 b1"),
    (["product-b..main"], "m4 m3"),
    (["main...product-b"], "b3 m4 m3 b2 b1"),
    (["main", "product-b"], "b3 m4 m3 m2 b2 b1 m1 m0"),
    (["main", "exp"], "m4 e1 m3 m2 m1 m0"),  # tips of one second: in the order given
    (["exp", "main"], "e1 m4 m3 m2 m1 m0"),
    (["exp", "product-b", "^main"], "b3 e1 b2 b1"),
    (["exp...main"], "e1 m4 m3"),
    (["--all"], "b3 e1 m4 m3 m2 b2 b1 m1 m0"),
    (["--all", "^prod"], "b3 e1 m4 m3 m2 b2 b1"),
    (["-n", "2", "main..product-b"], "b3 b2"),
    (["-1", "product-b", "main"], "b3"),
    (["-n", "-1", "main"], "m4 m3 m2 m1 m0"),  # a negative count: no limit (scripts pass -1)
    (["--max-count=-3", "-n", "2", "main"], "m4 m3"),  # the last count given
    (["-n", "2", "--max-count=-1", "main"], "m4 m3 m2 m1 m0"),
    (["main~3..main"], "m4 m3 m2"),
    (["..product-b"], "b3 b2 b1"),  # HEAD..product-b
    (["product-b.."], "m4 m3"),
    (["prod..product-b"], "b3 b2 b1 m2"),
    (["main..main"], ""),
    (["^main"], ""),
    (["main...main"], ""),
    (["main", "^main~2", "product-b"], "b3 m4 m3 b2 b1"),
    (["HEAD~1"], "m3 m2 m1 m0"),
    ([], "m4 m3 m2 m1 m0"),
]


def _ids(forked: dict[str, Any], names: str) -> list[str]:
    return [forked[name] for name in names.split()]


@pytest.mark.parametrize(("args", "names"), CASES, ids=[" ".join(a) or "none" for a, _ in CASES])
def test_log_lists_what_git_log_lists(forked: dict[str, Any], args: list[str], names: str) -> None:
    work = forked["work"]
    expected = git(work / ".mint", "log", "--format=%H", *args).stdout.split()
    got = [c["commit"] for c in json.loads(mint(work, "log", "--json", *args).stdout)]
    assert got == expected
    oneline = mint(work, "log", "--oneline", *args).stdout.splitlines()
    assert [line.split()[0] for line in oneline] == [oid[:7] for oid in expected]
    assert got == _ids(forked, names)


def test_ranges_print_as_log_prints_and_fail_as_an_unknown_ref_fails(
    forked: dict[str, Any],
) -> None:
    work = forked["work"]
    # An empty range prints nothing and succeeds, as git's.
    for args in (["main..main"], ["--oneline", "main..prod"], ["^main"]):
        result = mint(work, "log", *args)
        assert (result.stdout, result.stderr) == ("", "")
    assert mint(work, "log", "--json", "main..main").stdout == "[]\n"
    # Decorated, as log decorates any commit; --json with meta and refs.
    lines = mint(work, "log", "--oneline", "prod..product-b").stdout.splitlines()
    assert lines[0] == f"{forked['b3'][:7]} (product-b) b3"
    assert lines[-1] == f"{forked['m2'][:7]} m2"
    rows = json.loads(mint(work, "log", "--json", "exp", "product-b", "^main").stdout)
    assert [(r["refs"], r["message"].strip()) for r in rows] == [
        (["product-b"], "b3"),
        (["exp"], "e1"),
        ([], "b2"),
        ([], "b1"),
    ]
    assert all(r["meta"] == {} for r in rows)
    full = mint(work, "log", "main~1..main").stdout
    assert full.startswith(f"commit {forked['m4']} (HEAD -> main)\nAuthor: Tester")
    assert full.count("\ncommit ") == 0 and "    m4" in full
    # Abbreviated ids on either side.
    abbreviated = mint(work, "log", "--json", f"{forked['m1'][:7]}..{forked['b3'][:10]}").stdout
    assert [r["commit"] for r in json.loads(abbreviated)] == _ids(forked, "b3 b2 b1 m2")
    # An unknown revision anywhere in the arguments: one error line, git's status.
    for args in (["main..nope"], ["nope..main"], ["nope...main"], ["^nope"], ["main", "nope"]):
        result = mint(work, "log", *args, ok=False)
        assert result.returncode == 128 and result.stdout == ""
        assert result.stderr == "error: unknown revision 'nope': not a branch, tag or commit id\n"
    assert "A..B" in mint(work, "log", "--help").stdout


def test_a_range_with_no_name_before_a_step_or_too_many_dots_is_refused_as_git_refuses_it(
    forked: dict[str, Any],
) -> None:
    work = forked["work"]
    # git: `fatal: bad revision 'ARG'`. An empty name before ~ or ^ is not HEAD (it was:
    # `^..main` listed HEAD^..main), and an error names the whole argument, not what is left
    # of it after the first `..` (`'product-b..main'`, `'.product-b'`).
    for args, why in (
        (["^..main"], "no branch, tag or commit id before '^'"),
        (["~..main"], "no branch, tag or commit id before '~'"),
        (["main..^"], "no branch, tag or commit id before '^'"),
        (["main", "^^"], "no branch, tag or commit id before '^'"),
        (["~1"], "no branch, tag or commit id before '~'"),
        (["^main..main"], "no branch, tag or commit id before '^'"),
        (["^"], "it names no revision"),
        (["main..product-b..main"], "a range is A..B or A...B, of two revisions"),
        (["main....product-b"], "a range is A..B or A...B, of two revisions"),
        (["main...."], "a range is A..B or A...B, of two revisions"),
    ):
        refused = git(work / ".mint", "log", *args, "--", ok=False)
        assert (refused.returncode, refused.stderr) == (128, f"fatal: bad revision '{args[-1]}'\n")
        result = mint(work, "log", "--oneline", *args, ok=False)
        assert (result.returncode, result.stdout) == (128, "")
        assert result.stderr == f"error: invalid revision '{args[-1]}': {why}\n"
    # `..` is HEAD..HEAD and `...` HEAD...HEAD: nothing, as in git.
    for args in ([".."], ["..."]):
        assert git(work / ".mint", "log", *args, "--").stdout == ""
        assert mint(work, "log", "--json", *args).stdout == "[]\n"
        result = mint(work, "log", *args)
        assert (result.stdout, result.stderr) == ("", "")
    listed = git(work / ".mint", "log", "--format=%H", "exp", "..", "--").stdout.split()
    assert listed == _ids(forked, "e1")
    assert [
        c["commit"] for c in json.loads(mint(work, "log", "--json", "exp", "..").stdout)
    ] == listed


def test_a_range_warns_of_an_ambiguous_name_and_takes_the_tag(
    forked: dict[str, Any], tmp_path: Path
) -> None:
    work = shutil.copytree(forked["work"], tmp_path / "work")
    mint(work, "tag", "exp", forked["m2"])  # a tag named as the branch: the tag wins, as in git
    result = mint(work, "log", "--json", "exp..main")
    assert [r["commit"] for r in json.loads(result.stdout)] == _ids(forked, "m4 m3")
    assert result.stderr == (
        "warning: refname 'exp' is ambiguous (refs/tags/exp and refs/heads/exp); "
        "using refs/tags/exp\n"
    )
    assert git(work / ".mint", "log", "--format=%H", "exp..main").stdout.split() == _ids(
        forked, "m4 m3"
    )


def test_after_a_git_merge_ranges_follow_first_parents_and_exclude_through_every_parent(
    forked: dict[str, Any], tmp_path: Path
) -> None:
    work = shutil.copytree(forked["work"], tmp_path / "work")
    git_dir, scratch = work / ".mint", tmp_path / "scratch"
    scratch.mkdir()
    # git merges in a work tree of its own (the index of main's tree); -s ours keeps main's
    # adapter, so the merge is a revision mintvcs reads.
    git(git_dir, "--work-tree", str(scratch), "read-tree", "main")
    git(
        git_dir,
        "--work-tree",
        str(scratch),
        "merge",
        "--no-ff",
        "-s",
        "ours",
        "-m",
        "merge b",
        "product-b",
    )
    (git_dir / "index").unlink()
    merge = git(git_dir, "rev-parse", "main").stdout.strip()
    assert git(git_dir, "rev-parse", "main^2").stdout.strip() == forked["b3"]
    # log follows first parents; git log without --first-parent lists product-b's too.
    assert [c["commit"] for c in json.loads(mint(work, "log", "--json").stdout)] == [
        merge,
        *_ids(forked, "m4 m3 m2 m1 m0"),
    ]
    assert len(git(git_dir, "log", "--format=%H", "main").stdout.split()) == 9
    for args in (
        ["main..product-b"],  # main has merged product-b: nothing left
        ["main..product-b~1"],  # reached through the merge's second parent only
        ["exp", "product-b~2", "^main"],
        ["product-b..main"],
        ["main~1..main"],
        ["exp..main"],
        ["main...exp"],
        ["main", "exp", "^prod"],
        ["product-b", "main"],
        ["--all"],
        ["-n", "3", "--all", "^prod"],
    ):
        expected = git(git_dir, "log", "--first-parent", "--format=%H", *args).stdout.split()
        got = [c["commit"] for c in json.loads(mint(work, "log", "--json", *args).stdout)]
        assert got == expected, args
    assert mint(work, "log", "main..product-b").stdout == ""
    assert mint(work, "log", "--oneline", "product-b..main").stdout.splitlines() == [
        f"{merge[:7]} (HEAD -> main) merge b",
        f"{forked['m4'][:7]} m4",
        f"{forked['m3'][:7]} m3",
    ]


def _linear_history(repo: Any, count: int, start: int, parent: str | None = None) -> list[str]:
    """`count` commits of an empty tree on `parent`, a minute apart from `start`; their ids."""
    tree = repo.write_tree([])
    ids: list[str] = []
    for i in range(count):
        who = f"Tester <tester@example.com> {start + 60 * i} +0000"
        parents = [ids[-1]] if ids else ([parent] if parent else [])
        ids.append(repo.write_commit(tree, parents, f"c{i}\n", who, who))
    return ids


def test_a_range_reads_only_the_recent_history_of_a_long_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mintvcs import porcelain
    from mintvcs.store import Repository

    work = tmp_path / "work"
    porcelain.init(work, None, install_hooks=False).close()
    with Repository.open(work) as repo:
        main = _linear_history(repo, 10_000, T0)
        # feature forked 5 commits ago, its 3 commits made among main's last ones.
        feature = _linear_history(repo, 3, T0 + 60 * 9_996 + 30, parent=main[-6])
    git_dir = work / ".mint"

    def git_log(*args: str) -> list[str]:
        return git(git_dir, "log", "--format=%H", *args).stdout.split()

    git(git_dir, "update-ref", "refs/heads/main", main[-1])
    git(git_dir, "update-ref", "refs/heads/feature", feature[-1])
    with Repository.open(work) as repo:
        reads = count_reads(repo, monkeypatch)
        listed = [c.id for c in porcelain.log(repo, "main..feature", 10)]
        assert listed == feature[::-1] == git_log("-n", "10", "main..feature")
        assert len(reads) < 20, len(reads)  # main's tip back past the fork, and SLOP more
        reads.clear()
        assert [c.id for c in porcelain.log(repo, "feature...main", 10)] == git_log(
            "feature...main"
        )
        assert len(reads) < 40, len(reads)  # the merge base's painting, then the walk
        reads.clear()
        assert [c.id for c in porcelain.log(repo, ["main", "feature"], 4)] == [
            main[-1],
            feature[-1],
            main[-2],
            feature[-2],
        ]
        assert len(reads) < 10, len(reads)
    # Two pages of a range (LOG_FIRST_PAGE is 64), as git lists them.
    lines = mint(work, "log", "--oneline", "main~100..main").stdout.splitlines()
    assert [line.split()[0] for line in lines] == [oid[:7] for oid in git_log("main~100..main")]
    assert len(lines) == 100 and lines[0].endswith("(HEAD -> main) c9999")


def _random_history(git_dir: Path, rng: random.Random, count: int) -> list[str]:
    """`count` commits written by git on random branches, some merges among them; times
    often equal and now and then skewed back. Returns their ids."""
    tree = git(git_dir, "mktree", input_text="").stdout.strip()
    commits: list[str] = []
    tips: dict[str, str] = {}
    when = T0
    for i in range(count):
        when += rng.choice([0, 0, 1, 60]) if rng.random() > 0.15 else -rng.randint(1, 5_000)
        if not commits:
            branch, parents = "main", []
        elif rng.random() < 0.7:
            branch = rng.choice(sorted(tips))
            parents = [tips[branch]]
        else:
            branch, parents = f"b{i}", [rng.choice(commits)]
        other = rng.choice(commits) if commits else None
        if other is not None and other not in parents and rng.random() < 0.15:
            parents.append(other)
        stamp = {"GIT_COMMITTER_DATE": f"@{when} +0000", "GIT_AUTHOR_DATE": f"@{when} +0000"}
        made = subprocess.run(
            ["git", "--git-dir", str(git_dir), "commit-tree", tree, "-m", f"c{i}"]
            + [arg for parent in parents for arg in ("-p", parent)],
            env={**ENV, **stamp},
            capture_output=True,
            text=True,
            check=True,
        )
        commits.append(made.stdout.strip())
        tips[branch] = commits[-1]
        git(git_dir, "update-ref", f"refs/heads/{branch}", commits[-1])
    git(git_dir, "tag", "t", rng.choice(commits))
    git(git_dir, "symbolic-ref", "HEAD", f"refs/heads/{rng.choice(sorted(tips))}")
    return commits


def _same_as_git_log(
    repo: Any, git_dir: Path, args: list[str], limit: int | None, every: bool, *label: object
) -> bool:
    """Assert that porcelain.log lists what `git log --first-parent` lists for `args` (with
    `-n limit`, `--all` where `every`); False, nothing compared, where git refuses them (`~N`
    past a root commit)."""
    from mintvcs import porcelain

    options = ["--all"] * every + ["-n", str(limit)] * (limit is not None)
    expected = git(git_dir, "log", "--first-parent", "--format=%H", *options, *args, ok=False)
    if expected.returncode:
        return False
    got = porcelain.log(repo, args, limit, all_refs=every)
    assert [c.id for c in got] == expected.stdout.split(), (*label, options, args)
    return True


@pytest.mark.parametrize("seed", range(4))
def test_random_histories_list_as_git_log_first_parent_lists_them(
    tmp_path: Path, seed: int
) -> None:
    from mintvcs import porcelain
    from mintvcs.store import Repository

    rng = random.Random(seed)
    work = tmp_path / "work"
    porcelain.init(work, None, install_hooks=False).close()
    git_dir = work / ".mint"
    commits = _random_history(git_dir, rng, 60)
    names = [*git(git_dir, "for-each-ref", "--format=%(refname:short)").stdout.split(), "HEAD"]

    def rev() -> str:
        pick = rng.random()
        if pick < 0.6:
            return rng.choice(names)
        if pick < 0.8:
            return rng.choice(commits)[: rng.choice([7, 40])]
        return f"{rng.choice(names)}~{rng.randint(0, 2)}"

    forms = [
        lambda: [f"{rev()}..{rev()}"],
        lambda: [rev(), f"^{rev()}"],
        lambda: [f"{rev()}...{rev()}"],
        lambda: [rev(), rev(), rev()],
        lambda: [f"^{rev()}", rev(), rev()],
    ]
    compared = 0
    with Repository.open(work) as repo:
        for _ in range(50):
            args, limit = rng.choice(forms)(), rng.choice([None, None, 1, 3])
            every = rng.random() < 0.1
            compared += _same_as_git_log(repo, git_dir, args, limit, every)
    assert compared > 30


def _dated_commit(git_dir: Path, when: int, message: str, *parents: str) -> str:
    """A commit of the empty tree made by git at `when` on `parents`; its id."""
    tree = git(git_dir, "mktree", input_text="").stdout.strip()
    stamp = {"GIT_COMMITTER_DATE": f"@{when} +0000", "GIT_AUTHOR_DATE": f"@{when} +0000"}
    made = subprocess.run(
        ["git", "--git-dir", str(git_dir), "commit-tree", tree, "-m", message]
        + [arg for parent in parents for arg in ("-p", parent)],
        env={**ENV, **stamp},
        capture_output=True,
        text=True,
        check=True,
    )
    return made.stdout.strip()


def test_an_exclusion_passes_through_the_commits_read_for_merge_bases(tmp_path: Path) -> None:
    from mintvcs import porcelain

    work = tmp_path / "work"
    porcelain.init(work, None, install_hooks=False).close()
    git_dir = work / ".mint"
    # M is dated after its descendants (a skewed clock); X reaches it through p1..p7, more
    # commits than SLOP; Y is an unrelated root. Finding X...Y's merge bases reads X down to
    # M, and git's ^X excludes M at once through those commits; a walk that read them again
    # listed M, then ran out of SLOP among excluded commits before reaching it.
    tip = m = _dated_commit(git_dir, T0 + 5000, "M")
    for i in range(1, 8):
        tip = _dated_commit(git_dir, T0 + 100 + i, f"p{i}", tip)
    x = _dated_commit(git_dir, T0 + 200, "X", tip)
    y = _dated_commit(git_dir, T0 + 150, "Y")
    for name, oid in (("M", m), ("X", x), ("Y", y)):
        git(git_dir, "update-ref", f"refs/heads/{name}", oid)
    args = ["M", "^X", "X...Y"]
    expected = git(git_dir, "log", "--first-parent", "--format=%H", *args).stdout.split()
    assert expected == [y]
    assert [c["commit"] for c in json.loads(mint(work, "log", "--json", *args).stdout)] == [y]
    assert mint(work, "log", "--oneline", *args).stdout == f"{y[:7]} (Y) Y\n"


def test_excluded_commits_of_the_last_listed_ones_time_keep_the_walk_going_as_in_git(
    tmp_path: Path,
) -> None:
    from mintvcs import porcelain

    work = tmp_path / "work"
    porcelain.init(work, None, install_hooks=False).close()
    git_dir = work / ".mint"
    # Commits made within one second: L is listed (I's parent), then only excluded commits
    # of L's time are queued, more of them than SLOP, the last of which reaches L. git keeps
    # walking while a queued commit is as new as the last one listed (not only newer), so
    # finds L excluded and lists I alone.
    low = _dated_commit(git_dir, T0, "L")
    tip = low
    for i in range(1, 9):
        tip = _dated_commit(git_dir, T0, f"e{i}", tip)
    e = _dated_commit(git_dir, T0 + 20, "E", tip)
    i_ = _dated_commit(git_dir, T0 + 10, "I", low)
    for name, oid in (("E", e), ("I", i_)):
        git(git_dir, "update-ref", f"refs/heads/{name}", oid)
    expected = git(git_dir, "log", "--first-parent", "--format=%H", "E..I").stdout.split()
    assert expected == [i_]
    assert [c["commit"] for c in json.loads(mint(work, "log", "--json", "E..I").stdout)] == [i_]


@pytest.mark.parametrize("depth", [3, 4, 5, 6])
def test_a_queued_commit_found_interesting_then_excluded_no_longer_keeps_the_walk_going(
    tmp_path: Path, depth: int
) -> None:
    from mintvcs import porcelain

    work = tmp_path / "work"
    porcelain.init(work, None, install_hooks=False).close()
    git_dir = work / ".mint"
    # C (old: a skewed clock) is queued from L, found the one interesting commit in the queue,
    # then excluded through X while still queued. git's cache of it counts no longer (its
    # flag is checked), so the walk ends SLOP commits on: K, which c<depth> reaches, is listed
    # at depths 4 and more although excluded, as git lists it. A walk that trusted the cache
    # went further and left K out.
    tip = k = _dated_commit(git_dir, T0 + 700, "K")
    for n in range(depth, 0, -1):
        tip = _dated_commit(git_dir, T0 + 30 - n, f"c{n}", tip)
    c = _dated_commit(git_dir, T0 + 30, "C", tip)
    i = _dated_commit(git_dir, T0 + 1000, "I", _dated_commit(git_dir, T0 + 900, "L", c))
    j = _dated_commit(git_dir, T0 + 800, "J", k)
    e = _dated_commit(git_dir, T0 + 40, "X", c)
    for n, name in enumerate(("Y", "Z")):
        e = _dated_commit(git_dir, T0 + 50 + 10 * n, name, e)
    e = _dated_commit(git_dir, T0 + 2000, "E", e)
    for name, oid in (("E", e), ("I", i), ("J", j)):
        git(git_dir, "update-ref", f"refs/heads/{name}", oid)
    args = ["I", "J", "^E"]
    expected = git(git_dir, "log", "--first-parent", "--format=%H", *args).stdout.split()
    assert (k in expected) == (depth >= 4)
    listed = json.loads(mint(work, "log", "--json", *args).stdout)
    assert [m["commit"] for m in listed] == expected


def test_merge_bases_are_listed_as_git_merge_base_lists_them(tmp_path: Path) -> None:
    from mintvcs import porcelain, revwalk
    from mintvcs.store import Repository

    work = tmp_path / "work"
    porcelain.init(work, None, install_hooks=False).close()
    git_dir = work / ".mint"
    # Two unrelated roots, both common to A and B: old, found first, and new (a skewed
    # clock), found once the painting has gone round through CA and CB. git lists the
    # newest first.
    old, new = _dated_commit(git_dir, T0 + 50, "old"), _dated_commit(git_dir, T0 + 200, "new")
    ca, cb = (_dated_commit(git_dir, T0 + 40, name, new) for name in ("CA", "CB"))
    a = _dated_commit(git_dir, T0 + 100, "A", old, ca)
    b = _dated_commit(git_dir, T0 + 100, "B", old, cb)
    bases = git(git_dir, "merge-base", "--all", a, b).stdout.split()
    assert bases == [new, old]
    with Repository.open(work) as repo:
        assert revwalk.merge_bases(revwalk.Revisions(repo), a, b) == bases
        assert revwalk.merge_bases(revwalk.Revisions(repo), b, a) == bases


def _skewed_history(git_dir: Path, rng: random.Random) -> list[str]:
    """Runs of 3 to 12 commits, each forking from an earlier commit (or a new root), some
    starting with a merge; one commit in eight dated far before or after its parent; six
    branches r0..r5 at random commits, often skewed ones, and HEAD at one of them. Written
    by one `git fast-import`; returns the branch names."""
    stream: list[str] = []
    marks: list[int] = []
    skewed: list[int] = []
    when = T0
    while len(marks) < 40:
        parents = [rng.choice(marks)] if marks and rng.random() < 0.85 else []
        if marks and rng.random() < 0.3 and (other := rng.choice(marks)) not in parents:
            parents.append(other)
        for _ in range(rng.randint(3, 12)):
            mark = len(marks) + 1
            when += rng.choice([1, 1, 10, 60])
            stamp = when
            if rng.random() < 0.12:
                stamp += rng.choice([1, -1]) * rng.randint(500, 5000)
                skewed.append(mark)
            stream.append(
                f"commit refs/heads/tmp\nmark :{mark}\n"
                f"committer Tester <tester@example.com> {stamp} +0000\ndata 3\nc{mark}\n"
            )
            # A run with no parent starts a new root (fast-import would go on from tmp's tip).
            stream += [f"from :{parents[0]}\n"] if parents else ["from " + "0" * 40 + "\n"]
            stream += [f"merge :{parent}\n" for parent in parents[1:]]
            marks.append(mark)
            parents = [mark]
    names = [f"r{i}" for i in range(6)]
    for name in names:
        target = rng.choice(skewed if skewed and rng.random() < 0.4 else marks)
        stream.append(f"reset refs/heads/{name}\nfrom :{target}\n\n")
    git(git_dir, "fast-import", "--quiet", input_text="".join(stream))
    git(git_dir, "update-ref", "-d", "refs/heads/tmp")
    git(git_dir, "symbolic-ref", "HEAD", f"refs/heads/{rng.choice(names)}")
    return names


@pytest.mark.parametrize("seed", [44])
def test_skewed_histories_list_as_git_log_first_parent_lists_them(
    tmp_path: Path, seed: int
) -> None:
    from mintvcs import porcelain, revwalk
    from mintvcs.store import Repository

    # Exclusions next to A...B and ~N, on histories whose clocks are skewed by more than the
    # walk's SLOP covers: what git lists then depends on which commits it read to find the
    # tips (merge bases, ~N), as its exclusions pass through all of them at once. Seed 44
    # finds each of: a walk that read again what the merge bases read, or what ~N read, and
    # merge bases that kept one another reaches.
    rng = random.Random(seed)
    forms = ["{a}", "^{a}", "{a}..{b}", "{a}...{b}", "{a}~1..{b}", "^{a}~3", "{a}~2...{b}"]
    compared = 0
    for round_ in range(12):
        work = tmp_path / f"work{round_}"
        porcelain.init(work, None, install_hooks=False).close()
        git_dir = work / ".mint"
        names = [*_skewed_history(git_dir, rng), "HEAD"]
        with Repository.open(work) as repo:
            for _ in range(25):
                if rng.random() < 0.5:
                    args = [rng.choice(names), "^" + rng.choice(names)]
                    args.append(f"{rng.choice(names)}...{rng.choice(names)}")
                    rng.shuffle(args)
                else:
                    args = [
                        rng.choice(forms).format(a=rng.choice(names), b=rng.choice(names))
                        for _ in range(rng.randint(1, 3))
                    ]
                every = rng.random() < 0.1
                limit = rng.choice([None, None, 1, 3])
                compared += _same_as_git_log(repo, git_dir, args, limit, every, round_)
    assert compared > 200
    # The merge bases themselves, in git's order: a skewed clock finds some that another
    # reaches, which git drops.
    for round_ in range(12):
        work = tmp_path / f"work{round_}"
        names = git(work / ".mint", "for-each-ref", "--format=%(refname:short)").stdout.split()
        with Repository.open(work) as repo:
            for a, b in itertools.combinations(names, 2):
                bases = git(work / ".mint", "merge-base", "--all", a, b, ok=False).stdout
                found = revwalk.merge_bases(revwalk.Revisions(repo), *map(repo.resolve, (a, b)))
                assert found == bases.split(), (round_, a, b)


def test_all_stops_at_a_broken_ref_as_git_log_all_does_and_log_lists_on(
    forked: dict[str, Any], tmp_path: Path
) -> None:
    work = shutil.copytree(forked["work"], tmp_path / "work")
    git_dir = work / ".mint"
    everything = git(git_dir, "log", "--format=%H", "--all").stdout.split()
    # A ref to a tree, a blob or a tag of a tree names no commit: --all adds nothing for it.
    tree = git(git_dir, "rev-parse", "main^{tree}").stdout.strip()
    blob = git(git_dir, "hash-object", "-w", "--stdin", input_text="x").stdout.strip()
    git(git_dir, "tag", "-a", "-m", "t", "tree-tag", tree)
    git(git_dir, "update-ref", "refs/tags/tree", tree)
    git(git_dir, "update-ref", "refs/tags/blob", blob)
    (git_dir / "refs" / "heads" / "dangling").write_text("ref: refs/heads/nowhere\n")
    assert git(git_dir, "log", "--format=%H", "--all").stdout.split() == everything
    result = mint(work, "log", "--json", "--all")
    assert [c["commit"] for c in json.loads(result.stdout)] == everything
    assert result.stderr == ""
    # A commit, then damaged: its loose file overwritten.
    lone = git(git_dir, "commit-tree", tree, "-p", "main", "-m", "lone").stdout.strip()
    loose = git_dir / "objects" / lone[:2] / lone[2:]
    loose.chmod(0o644)
    loose.write_bytes(b"junk")
    missing = "1234567890" * 4
    tag_of_missing = git(
        git_dir,
        "hash-object",
        "-t",
        "tag",
        "-w",
        "--stdin",
        "--literally",
        input_text=f"object {missing}\ntype commit\ntag t\ntagger T <t@e> 0 +0000\n\nm\n",
    ).stdout.strip()
    for ref, content, error in (
        ("refs/heads/garbled", "garbage", "error: corrupt ref file "),
        ("refs/heads/missing", missing, f"error: bad object refs/heads/missing: object {missing} "),
        ("refs/heads/corrupt", lone, f"error: bad object refs/heads/corrupt: object {lone} is "),
        ("refs/tags/gone", tag_of_missing, f"error: bad object refs/tags/gone: object {missing} "),
    ):
        (git_dir / ref).write_text(content + "\n")
        # git 2.39: `fatal: bad object REF` (or its loose object "is corrupt"), status 128.
        assert git(git_dir, "log", "--all", ok=False).returncode == 128
        result = mint(work, "log", "--all", ok=False)
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr.startswith(error) and result.stderr.count("\n") == 1, result.stderr
        # A plain log lists its history all the same, as git's, that ref undecorated.
        listed = git(git_dir, "log", "--format=%H").stdout.split()
        plain = mint(work, "log", "--json")
        assert [c["commit"] for c in json.loads(plain.stdout)] == listed
        assert plain.stderr == ""
        (git_dir / ref).unlink()


def test_all_starts_from_a_linked_worktrees_detached_head_too(
    forked: dict[str, Any], tmp_path: Path
) -> None:
    work = shutil.copytree(forked["work"], tmp_path / "work")
    git_dir = work / ".mint"
    # A commit only a `git worktree`'s detached HEAD names.
    tree = git(git_dir, "rev-parse", f"{forked['m2']}^{{tree}}").stdout.strip()
    lone = git(git_dir, "commit-tree", tree, "-p", forked["m2"], "-m", "lone").stdout.strip()
    git(git_dir, "worktree", "add", "--detach", str(tmp_path / "linked"), lone)
    listed = [c["commit"] for c in json.loads(mint(work, "log", "--json", "--all").stdout)]
    assert lone in listed
    assert listed == git(git_dir, "log", "--format=%H", "--all").stdout.split()
