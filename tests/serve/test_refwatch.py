"""The server's ref watcher on a real repository: moves reported once, whoever sees them first."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mintvcs import porcelain
from mintvcs.ids import shared_hex_digits
from mintvcs.serve.refwatch import (
    InvalidRefSpec,
    RefMove,
    RefWatcher,
    Resolution,
    check_spec,
    metric_label,
)
from tests.mintvcs.storekit import commit_starting_with, copy_adapter, count_reads, mutate


def _repo_with_two_revisions(tmp_path: Path, adapter: Path) -> tuple[object, str, Path]:
    work = copy_adapter(adapter, tmp_path / "work")
    repo = porcelain.init(work, None, install_hooks=False)
    first = porcelain.commit(repo, "first", verify=False, show_progress=False).commit
    mutate(work, seed=1)
    return repo, first, work


def test_a_move_seen_by_a_request_is_reported(tmp_path: Path, peft_adapter: Path) -> None:
    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    moves: list[RefMove] = []
    watcher = RefWatcher(repo, on_move=moves.append)
    assert watcher.resolve("main").commit == first
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    # The request revalidates its cached entry by stat and sees the move before any poll.
    assert watcher.resolve("main").commit == second
    assert moves == [RefMove("main", "refs/heads/main", first, second)]
    assert watcher.poll(reread=True) == []  # nothing left for the poller to report


def test_the_poller_reports_a_move_no_request_has_seen(tmp_path: Path, peft_adapter: Path) -> None:
    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    watcher = RefWatcher(repo)
    watcher.resolve("main")
    watcher.resolve("main~0")
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    moves = watcher.poll()
    assert {(m.spec, m.old, m.new) for m in moves} == {
        ("main", first, second),
        ("main~0", first, second),
    }
    assert {metric_label(m.ref) for m in moves} == {"main"}


def test_a_name_no_file_system_can_hold_is_unknown(tmp_path: Path, peft_adapter: Path) -> None:
    from mintvcs.store import UnknownRevisionError

    repo, _first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    watcher = RefWatcher(repo)
    with pytest.raises(UnknownRevisionError):
        watcher.resolve("x" * 300)


def test_only_recently_requested_specs_are_polled(tmp_path: Path, peft_adapter: Path) -> None:
    import time

    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    moves: list[RefMove] = []
    watcher = RefWatcher(repo, active_s=0.1, on_move=moves.append)
    watcher.resolve("main")
    time.sleep(0.2)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    # Idle for longer than active_s: the poller skips it (its cost follows the traffic)...
    assert watcher.poll(reread=True) == []
    # ...and its next request still revalidates by stat and gets the new revision.
    assert watcher.resolve("main").commit == second
    assert [(m.old, m.new) for m in moves] == [(first, second)]


def test_a_reflog_spec_follows_its_ref(tmp_path: Path, peft_adapter: Path) -> None:
    # `main@{1}` (main's previous value) must move when main does: its cache entry depends on
    # main's ref file, as `main~1`'s does.
    repo, first, work = _repo_with_two_revisions(tmp_path, peft_adapter)
    watcher = RefWatcher(repo)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    assert watcher.resolve("main@{1}").commit == first
    mutate(work, seed=2)
    porcelain.commit(repo, "third", verify=False, show_progress=False)
    assert watcher.resolve("main@{1}").commit == second


def test_a_reflog_spec_follows_a_rewrite_of_its_reflog(tmp_path: Path, peft_adapter: Path) -> None:
    # git reflog delete/expire (git gc runs expire) change what `main@{1}` names without
    # moving main: the entry watches the reflog too.
    import subprocess

    from mintvcs.store import UnknownRevisionError
    from tests.mintvcs.storekit import ENV

    repo, first, work = _repo_with_two_revisions(tmp_path, peft_adapter)
    porcelain.commit(repo, "second", verify=False, show_progress=False)
    mutate(work, seed=2)
    porcelain.commit(repo, "third", verify=False, show_progress=False)
    watcher = RefWatcher(repo)
    git_dir = str(work / ".mint")

    def git_says(spec: str) -> str:
        done = subprocess.run(
            ["git", "--git-dir", git_dir, "rev-parse", "--verify", "-q", spec],
            env=ENV, capture_output=True, text=True, check=False,
        )  # fmt: skip
        return done.stdout.strip()

    assert watcher.resolve("main@{1}").commit == git_says("main@{1}")
    subprocess.run(
        ["git", "--git-dir", git_dir, "reflog", "delete", "--rewrite", "refs/heads/main@{1}"],
        env=ENV, check=True,
    )  # fmt: skip
    assert watcher.resolve("main@{1}").commit == git_says("main@{1}") == first
    subprocess.run(
        ["git", "--git-dir", git_dir, "reflog", "expire", "--expire=now", "refs/heads/main"],
        env=ENV, check=True,
    )  # fmt: skip
    assert git_says("main@{1}") == ""
    with pytest.raises(UnknownRevisionError):
        watcher.resolve("main@{1}")


def test_at_minus_n_follows_the_branch_it_names(tmp_path: Path, peft_adapter: Path) -> None:
    # @{-1} names the previously checked-out branch; a commit onto it (commit --branch) does
    # not touch HEAD, and the cache used to keep serving the old commit.
    repo, _first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    porcelain.branch_create(repo, "side")
    porcelain.checkout(repo, "side")
    porcelain.checkout(repo, "main")
    watcher = RefWatcher(repo)
    before = watcher.resolve("@{-1}").commit
    new = porcelain.commit(repo, "on side", branch="side", verify=False, show_progress=False).commit
    assert new != before and watcher.resolve("@{-1}").commit == new


def test_a_poll_costs_the_specs_in_use_not_every_cached_one(
    tmp_path: Path, peft_adapter: Path
) -> None:
    import time

    repo, _first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    watcher = RefWatcher(repo, active_s=0.5)

    def fastest_poll() -> float:
        watcher.resolve("main")  # the one spec in use
        best = float("inf")
        for _ in range(15):
            started = time.perf_counter()
            watcher.poll(reread=True)
            best = min(best, time.perf_counter() - started)
        return best

    alone = fastest_poll()
    # A burst of distinct spellings, idle now: each poll walked all of them (a core's 15-35 %
    # for the 10 minutes until they were forgotten).
    for tildes in range(80):
        for carets in range(80):
            watcher.resolve("main" + "~0" * tildes + "^0" * carets)
    time.sleep(0.6)
    assert len(watcher.tracked()) == 80 * 80
    with_idle = fastest_poll()
    assert with_idle < 3 * alone + 0.0003, (alone, with_idle)
    assert [r.spec for r in watcher.live()] == ["main"]
    assert len(watcher.tracked()) == 80 * 80  # cached still, for their next request


def test_the_specs_in_use_are_polled_whatever_order_they_were_resolved_in(
    tmp_path: Path, peft_adapter: Path
) -> None:
    import time

    repo, _first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    watcher = RefWatcher(repo, active_s=0.3)
    watcher.resolve("main~0")
    time.sleep(0.4)
    for spec in ("main", "main^0", "main~0"):  # main~0 again, after the others
        watcher.resolve(spec)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    moves = watcher.poll()
    assert sorted((m.spec, m.new) for m in moves) == [
        ("main", second),
        ("main^0", second),
        ("main~0", second),
    ]


def test_the_cache_keeps_to_its_characters_of_specs_as_well_as_its_count(
    tmp_path: Path, peft_adapter: Path
) -> None:
    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    watcher = RefWatcher(repo, max_entries=1000, max_spec_chars=2000)
    long_specs = ["main" + "~0" * 50 + "^0" * n for n in range(60)]  # 104 to 222 characters
    for spec in long_specs:
        assert watcher.resolve(spec).commit == first
    cached = [r.spec for r in watcher.tracked()]
    # The most recently used ones, as many as fit.
    assert sum(map(len, cached)) <= 2000 < sum(map(len, cached)) + len(long_specs[-len(cached) - 1])
    assert cached == long_specs[-len(cached) :]
    # A spec dropped for room is resolved (and cached) again when asked again.
    assert watcher.resolve(long_specs[0]).commit == first
    assert watcher.tracked()[-1].spec == long_specs[0]
    assert sum(len(r.spec) for r in watcher.tracked()) <= 2000


def test_idle_entries_are_forgotten_full_commit_ids_too(tmp_path: Path, peft_adapter: Path) -> None:
    import time

    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    watcher = RefWatcher(repo, idle_forget_s=0.1)
    for spec in ("main", first, first[:10]):
        assert watcher.resolve(spec).commit == first
    time.sleep(0.2)
    watcher.poll()
    # An eval naming each commit of a long run by id would otherwise keep one entry per commit.
    assert watcher.tracked() == []
    assert watcher.resolve(first).commit == first  # resolved again when asked again
    assert len(watcher.tracked()) == 1


def test_live_gives_each_ref_in_use_at_its_value_now(tmp_path: Path, peft_adapter: Path) -> None:
    import time

    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    porcelain.branch_create(repo, "gone", "main")
    watcher = RefWatcher(repo, active_s=0.2)
    for spec in ("main", "refs/heads/main", "main~0", "gone"):
        watcher.resolve(spec)
    assert {(r.ref, r.commit) for r in watcher.live()} == {
        ("refs/heads/main", first),
        ("refs/heads/gone", first),
    }
    time.sleep(0.3)  # idle past active_s: the poller no longer keeps these current
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    porcelain.branch_delete(repo, "gone")
    assert watcher.live() == []
    watcher.resolve("refs/heads/main")
    # One series for main at its new value, though `main` still caches the old one.
    assert [(r.ref, r.commit) for r in watcher.live()] == [("refs/heads/main", second)]


def test_a_ref_named_like_a_server_label_keeps_its_full_name() -> None:
    assert metric_label("refs/heads/main") == "main"
    assert metric_label("refs/tags/prod") == "prod"
    assert metric_label("refs/heads/(base)") == "refs/heads/(base)"
    assert metric_label(None) == "(commit)"


def test_a_symbolic_chain_follows_its_last_target(tmp_path: Path, peft_adapter: Path) -> None:
    import subprocess

    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    git = ["git", "--git-dir", str(repo.git_dir)]
    subprocess.run([*git, "symbolic-ref", "refs/heads/al", "refs/heads/main"], check=True)
    subprocess.run([*git, "symbolic-ref", "refs/heads/al2", "refs/heads/al"], check=True)
    watcher = RefWatcher(repo)
    assert watcher.resolve("al2").commit == first
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    # main's file is among al2's: the next request sees the move, as git rev-parse does.
    assert watcher.resolve("al2").commit == second


def test_an_unreadable_ref_file_is_an_error_of_its_ref_alone(
    tmp_path: Path, peft_adapter: Path
) -> None:
    import os

    from mintvcs.errors import MintError

    repo, _first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    porcelain.branch_create(repo, "x", "main")
    watcher = RefWatcher(repo)
    watcher.resolve("x")
    watcher.resolve("main")
    loop = repo.git_dir / "refs" / "heads" / "x"
    loop.unlink()
    os.symlink(loop.name, loop)  # a link to itself: stat fails with ELOOP
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    # The poll goes on past x (it used to end in OSError, every poll) and sees main move.
    assert [(m.spec, m.new) for m in watcher.poll()] == [("main", second)]
    with pytest.raises(MintError, match="cannot be read"):
        watcher.resolve("x")


def test_a_long_walk_does_not_hold_up_cached_specs(tmp_path: Path, peft_adapter: Path) -> None:
    import subprocess
    import threading
    import time

    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    # A history of 10,000 commits on one tree, made by git in one go.
    git = ["git", "--git-dir", str(repo.git_dir)]
    tree = subprocess.run(
        [*git, "rev-parse", "main^{tree}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    n = 10_000
    stream = [f"reset refs/heads/deep\nfrom {first}\n"]
    for i in range(n):
        stream.append(
            f"commit refs/heads/deep\ncommitter a <a@a> {1700000000 + i} +0000\n"
            f"data 2\n{i % 10}\nM 040000 {tree} \n"
        )
    subprocess.run([*git, "fast-import", "--quiet"], input="".join(stream), text=True, check=True)
    watcher = RefWatcher(repo)
    watcher.resolve("main")
    walk = threading.Thread(target=watcher.resolve, args=(f"deep~{n - 1}",))
    started = time.perf_counter()
    walk.start()
    time.sleep(0.02)
    assert watcher.cached("main") is not None
    # Answered while the walk goes on: it used to wait for the whole walk on the watcher's lock.
    assert walk.is_alive(), time.perf_counter() - started
    walk.join()
    assert watcher.resolve(f"deep~{n - 1}").commit != first


def test_refresh_reports_the_moves_of_every_cached_spec(tmp_path: Path, peft_adapter: Path) -> None:
    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    moves: list[RefMove] = []
    watcher = RefWatcher(repo, on_move=moves.append)
    watcher.resolve("main")
    watcher.resolve("main~0")
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    # A notify without a ref re-resolves all: its moves are reported (they were lost).
    fresh = watcher.refresh()
    assert {(r.spec, r.commit) for r in fresh} == {("main", second), ("main~0", second)}
    assert {(m.spec, m.old, m.new) for m in moves} == {
        ("main", first, second),
        ("main~0", first, second),
    }
    assert watcher.poll(reread=True) == []


def test_a_move_rereads_no_commit_behind_it(
    tmp_path: Path, peft_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `main~1` ... `main~K` in use: when main moves, each is resolved again. Commits never
    # change, so the walks read only the new commit, not ~K²/2 commits (seconds at K = 300).
    from tests.mintvcs.storekit import git

    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    tree = repo.commit_info(first).tree
    who = "T <t@example.com> 1700000000 +0000"
    tip = first
    for n in range(25):
        tip = repo.write_commit(tree, [tip], f"step {n}", who, who)
    git(repo.git_dir, "update-ref", "refs/heads/main", tip)
    watcher = RefWatcher(repo)
    specs = [f"main~{k}" for k in range(1, 21)]
    before = {spec: watcher.resolve(spec).commit for spec in specs}
    moved = repo.write_commit(tree, [tip], "moved", who, who)
    git(repo.git_dir, "update-ref", "refs/heads/main", moved)
    reads = count_reads(repo, monkeypatch)
    moves = watcher.poll()
    assert {m.spec: m.new for m in moves} == {
        f"main~{k}": before.get(f"main~{k - 1}", tip) for k in range(1, 21)
    }
    # The new tip, read to peel it and to walk it; every other commit was remembered.
    assert reads == [moved, moved]


def test_refresh_of_one_ref_re_resolves_only_its_specs_and_keeps_the_index_exact(
    tmp_path: Path, peft_adapter: Path
) -> None:
    # A notify names one branch among many cached ones (per-user policies): found by index, not
    # by scanning the cache under its lock; the index follows every way an entry comes and goes.
    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    for i in range(40):
        porcelain.branch_create(repo, f"user{i}", first)
    porcelain.tag_create(repo, "user3-prod", first)
    watcher = RefWatcher(repo, max_entries=30)
    for i in range(40):  # the first ten are evicted
        watcher.resolve(f"user{i}")
    for spec in ("user33~0", "refs/heads/user33", "user3-prod", first, "main"):
        watcher.resolve(spec)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    porcelain.branch_create(repo, "user33", second, force=True)
    fresh = watcher.refresh("user33")
    assert sorted(r.spec for r in fresh) == ["refs/heads/user33", "user33", "user33~0"]
    assert {r.commit for r in fresh} == {second}
    assert [r.spec for r in watcher.refresh("refs/tags/user3-prod")] == ["user3-prod"]
    porcelain.branch_delete(repo, "user34", force=True)
    assert watcher.refresh("user34") == []  # dropped: it names nothing now

    def index() -> dict[tuple[str, str], set[str]]:
        built: dict[tuple[str, str], set[str]] = {}
        for spec, entry in watcher._entries.items():
            for key in watcher._keys(entry):
                built.setdefault(key, set()).add(spec)
        return built

    assert watcher._by_key == index()
    assert ("name", "user0") not in watcher._by_key  # evicted
    watcher.idle_forget_s = 0.0
    watcher.poll()
    assert watcher._entries == {} and watcher._by_key == {}


def test_a_full_commit_id_is_not_redirected_by_a_branch_of_that_name(
    tmp_path: Path, peft_adapter: Path
) -> None:
    # A client pinning a revision by its id must get that revision whatever branches anyone
    # pushes: 40 hex digits name an object before any ref, as in git.
    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    watcher = RefWatcher(repo)
    assert watcher.resolve(second) == Resolution(second, second, None)
    porcelain.branch_create(repo, second, first)
    assert watcher.resolve(second) == Resolution(second, second, None)
    assert watcher.resolve(f"{second}~1").commit == first
    # Afresh too, not only from the entry cached before the branch was made.
    assert RefWatcher(repo).resolve(second) == Resolution(second, second, None)
    assert RefWatcher(repo).resolve(f"refs/heads/{second}").commit == first


def test_an_abbreviated_id_is_refused_once_another_commit_shares_it(
    tmp_path: Path, peft_adapter: Path
) -> None:
    from mintvcs.store import UnknownRevisionError

    repo, _first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    watcher = RefWatcher(repo)
    short = second[:5]
    assert watcher.resolve(short) == Resolution(short, second, None)
    twin = commit_starting_with(repo.git_dir, second, short)
    # As the CLI (and a restarted server) answer: the spec names two commits now.
    with pytest.raises(UnknownRevisionError, match="ambiguous"):
        watcher.resolve(short)
    # One digit past what the two share (6 digits did not always tell them apart: 1 in 16).
    unique = twin[: shared_hex_digits(bytes.fromhex(twin), bytes.fromhex(second)) + 1]
    assert watcher.resolve(unique).commit == twin


def _moved_back_in_place(repo: object, first: str) -> None:
    """Rewrite main's ref file in place to `first` with its stat kept: inode, size and mtime, as
    a rename reusing an inode within one timestamp tick leaves them; stat cannot see it."""
    import os

    path = Path(repo.git_dir) / "refs" / "heads" / "main"  # type: ignore[attr-defined]
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.write(first.encode() + b"\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def test_the_periodic_reread_sees_a_move_stat_cannot(tmp_path: Path, peft_adapter: Path) -> None:
    """poll(reread=True) compares ref values: it reports a move that leaves the file's stat as it was."""
    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    watcher = RefWatcher(repo)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    assert watcher.resolve("main").commit == second
    _moved_back_in_place(repo, first)
    assert watcher.poll() == []  # by stat, nothing changed
    moves = watcher.poll(reread=True)
    assert [(m.spec, m.old, m.new) for m in moves] == [("main", second, first)]


def test_the_poll_loop_rereads_on_its_period(tmp_path: Path, peft_adapter: Path) -> None:
    """run() asks for a re-read every reread_every seconds, so such a move is reported unasked."""
    import asyncio
    import time

    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    moves: list[RefMove] = []
    watcher = RefWatcher(repo, on_move=moves.append)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    assert watcher.resolve("main").commit == second
    _moved_back_in_place(repo, first)

    async def poll_until_a_move() -> None:
        task = asyncio.create_task(watcher.run(interval=0.01, reread_every=0.05))
        deadline = time.monotonic() + 30  # a bound for a loaded machine, not a timing margin
        while not moves and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(poll_until_a_move())
    assert [(m.old, m.new) for m in moves] == [(second, first)]


@pytest.mark.parametrize(
    "spec", ["ma\x7fin", "ma\x1fin", "main\x00", "x" * 1025], ids=["DEL", "US", "NUL", "long"]
)
def test_specs_git_could_never_name_are_refused(spec: str) -> None:
    """Control characters (DEL and 0x1f included, as git check-ref-format) and 1,025 characters."""
    with pytest.raises(InvalidRefSpec):
        check_spec(spec)


def test_a_spec_of_the_length_limit_is_taken() -> None:
    """The limit is 1,024 characters: a spec of exactly that many is passed on."""
    assert check_spec("x" * 1024) == "x" * 1024


def test_the_cache_holds_max_entries(tmp_path: Path, peft_adapter: Path) -> None:
    """A watcher of max_entries 2 keeps two specs, not one fewer."""
    repo, _first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    porcelain.commit(repo, "second", verify=False, show_progress=False)
    watcher = RefWatcher(repo, max_entries=2)
    watcher.resolve("main")
    watcher.resolve("main~1")
    assert len(watcher.tracked()) == 2
    watcher.resolve("main~0")
    assert len(watcher.tracked()) == 2


def test_a_notify_by_short_tag_name_refreshes_specs_naming_it_as_tags(
    tmp_path: Path, peft_adapter: Path
) -> None:
    """refresh("prod") re-resolves a cached "tags/prod" too, as a notify names it."""
    repo, _first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    porcelain.tag_create(repo, "prod")
    watcher = RefWatcher(repo)
    watcher.resolve("tags/prod")
    assert [r.spec for r in watcher.refresh("prod")] == ["tags/prod"]


def test_a_deleted_branch_leaves_the_cache_on_notify(tmp_path: Path, peft_adapter: Path) -> None:
    """A notify for a branch that is gone drops its specs, so /v1/adapters no longer lists it."""
    repo, _first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    porcelain.branch_create(repo, "gone")
    watcher = RefWatcher(repo)
    watcher.resolve("gone")
    porcelain.branch_delete(repo, "gone", force=True)
    assert watcher.refresh("refs/heads/gone") == []
    assert watcher.tracked() == []


@pytest.mark.parametrize("seen_by", ["poller", "request"])
def test_a_branch_deleted_then_made_again_elsewhere_is_reported_as_both(
    tmp_path: Path, peft_adapter: Path, seen_by: str
) -> None:
    # `branch -D x; branch x other`: the deletion dropped the cached spec without a word, and
    # the branch made again was cached as new, so its move to another revision was never
    # logged, counted or prefetched.
    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    porcelain.branch_create(repo, "x", first)
    moves: list[RefMove] = []
    watcher = RefWatcher(repo, on_move=moves.append)
    assert watcher.resolve("x").commit == first
    porcelain.branch_delete(repo, "x", force=True)
    assert watcher.poll() == [RefMove("x", "refs/heads/x", first, None)]
    assert watcher.poll() == []  # said once
    porcelain.branch_create(repo, "x", second)
    if seen_by == "poller":
        assert watcher.poll() == [RefMove("x", "refs/heads/x", first, second)]
    else:
        assert watcher.resolve("x").commit == second
        assert moves == [RefMove("x", "refs/heads/x", first, second)]
    assert watcher.poll(reread=True) == []
    assert watcher.resolve("x").commit == second


def test_a_spec_whose_suffix_names_nothing_now_is_not_a_deleted_ref(
    tmp_path: Path, peft_adapter: Path
) -> None:
    # `main~1` after main is reset to its root commit names nothing, but main is there: it
    # was reported (and logged by the server) as main deleted.
    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    watcher = RefWatcher(repo)
    assert watcher.resolve("main~1").commit == first
    porcelain.reset(repo, first)
    assert [m for m in watcher.poll() if m.new is None] == []
    assert watcher.resolve("main").commit == first != second


def test_a_deleted_ref_is_reported_with_its_own_value_by_each_of_its_specs(
    tmp_path: Path, peft_adapter: Path
) -> None:
    # `x~1`'s deletion carried what x~1 named: the server logged x deleted twice, the second
    # line naming x's parent as what x named.
    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    second = porcelain.commit(repo, "second", verify=False, show_progress=False).commit
    porcelain.branch_create(repo, "x", second)
    watcher = RefWatcher(repo)
    assert watcher.resolve("x~1").commit == first
    watcher.resolve("x")
    porcelain.branch_delete(repo, "x", force=True)
    gone = watcher.poll()
    assert {(m.spec, m.old, m.new) for m in gone} == {("x", second, None), ("x~1", second, None)}


def _packed_unreferenced_commit(
    tmp_path: Path, adapter: Path
) -> tuple[Any, str, str, Callable[..., subprocess.CompletedProcess[str]]]:
    """A repository whose `doomed` branch names a commit (returned with the first one and a git
    runner) that only it holds, all its objects packed."""
    repo, first, _work = _repo_with_two_revisions(tmp_path, adapter)
    doomed = porcelain.commit(repo, "doomed", verify=False, show_progress=False).commit
    git_dir = str(repo.git_dir)

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "--git-dir", git_dir, *args], capture_output=True, text=True)

    porcelain.branch_create(repo, "doomed", doomed)
    assert git("update-ref", "refs/heads/main", first).returncode == 0
    assert git("gc", "--quiet").returncode == 0  # doomed's objects go into a pack
    assert not (Path(git_dir) / "objects" / doomed[:2] / doomed[2:]).exists()
    return repo, first, doomed, git


def test_a_commit_id_pruned_from_a_pack_is_unknown_though_the_pack_was_listed(
    tmp_path: Path, peft_adapter: Path
) -> None:
    """docs/http.md: a revision pruned since it was last requested answers 404. Its objects in a
    pack the store still has listed (and mapped), a look-up after `branch -D` (which rewrites
    packed-refs) found it there, and the entry kept it after gc deleted the pack."""
    from mintvcs.store import UnknownRevisionError

    repo, first, doomed, git = _packed_unreferenced_commit(tmp_path, peft_adapter)
    watcher = RefWatcher(repo)
    assert watcher.resolve(doomed) == Resolution(doomed, doomed, None)
    repo.release_removed_packs()  # the server's timer, with no pack gone
    assert watcher.cached(doomed) is not None  # requests by id stay cached lookups
    porcelain.branch_delete(repo, "doomed", force=True)
    assert watcher.resolve(doomed).commit == doomed  # still there: the window before the gc
    assert git("reflog", "expire", "--expire=now", "--all").returncode == 0
    assert git("gc", "--quiet", "--prune=now").returncode == 0
    assert git("cat-file", "-e", doomed).returncode != 0  # gone from disk
    with pytest.raises(UnknownRevisionError):
        watcher.resolve(doomed)
    assert watcher.resolve(first).commit == first  # what gc kept is still found


def test_a_commit_id_whose_loose_file_alone_is_pruned_is_unknown_at_its_next_request(
    tmp_path: Path, peft_adapter: Path
) -> None:
    # A commit-id entry depends on the commit's loose file too: a prune that deletes only that
    # file (no pack, no ref touched) makes the id unknown at its next request.
    from mintvcs.store import UnknownRevisionError

    repo, first, _work = _repo_with_two_revisions(tmp_path, peft_adapter)
    doomed = porcelain.commit(repo, "doomed", verify=False, show_progress=False).commit
    git_dir = str(repo.git_dir)

    def git(*args: str) -> int:
        return subprocess.run(["git", "--git-dir", git_dir, *args], capture_output=True).returncode

    loose = Path(git_dir) / "objects" / doomed[:2] / doomed[2:]
    assert loose.exists()
    assert git("update-ref", "refs/heads/main", first) == 0
    assert git("reflog", "expire", "--expire=now", "--all") == 0
    watcher = RefWatcher(repo)
    assert watcher.resolve(doomed).commit == doomed
    assert git("prune", "--expire=now") == 0  # deletes the loose commit; no pack, no ref touched
    assert not loose.exists()
    with pytest.raises(UnknownRevisionError):
        watcher.resolve(doomed)


def test_a_commit_id_is_looked_up_again_once_the_store_lets_go_of_a_pack(
    tmp_path: Path, peft_adapter: Path
) -> None:
    """Where the pack directory's stat does not tell a repack (a file system of coarse
    timestamps; its mtime put back here), the server's timer letting go of the deleted pack
    makes a commit id's entry stale all the same."""
    from mintvcs.store import UnknownRevisionError

    repo, _first, doomed, git = _packed_unreferenced_commit(tmp_path, peft_adapter)
    porcelain.branch_delete(repo, "doomed", force=True)
    assert git("reflog", "expire", "--expire=now", "--all").returncode == 0
    watcher = RefWatcher(repo)
    assert watcher.resolve(doomed).commit == doomed  # unreferenced, but its pack is still there
    pack_dir = Path(repo.git_dir) / "objects" / "pack"
    before = os.stat(pack_dir)
    # repack, not gc: packed-refs is left as it was, so only the object store tells.
    assert git("repack", "-a", "-d", "-q").returncode == 0
    assert git("prune", "--expire=now").returncode == 0
    assert git("cat-file", "-e", doomed).returncode != 0
    os.utime(pack_dir, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(pack_dir)
    if (after.st_ino, after.st_size) != (before.st_ino, before.st_size):
        pytest.skip("this file system's directory size tells the repack apart")
    assert watcher.cached(doomed) is not None  # nothing a stat sees has changed
    repo.release_removed_packs()  # the server's timer lets go of the deleted pack
    assert watcher.cached(doomed) is None
    with pytest.raises(UnknownRevisionError):
        watcher.resolve(doomed)
