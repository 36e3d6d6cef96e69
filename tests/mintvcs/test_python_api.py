"""The Python API as a training loop uses it: clear errors for misuse, revisions by spec as git
reads them, and gc's counters safe to call while another gc tidies the store."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mintvcs import maintenance, porcelain, refs
from mintvcs.errors import MintError
from mintvcs.store import Repository, UnknownRevisionError
from tests.mintvcs.storekit import git, mint_fsck_ok, mutate


@pytest.fixture
def repo(tmp_path: Path, peft_adapter: Path) -> Repository:
    repository = porcelain.init(tmp_path / "run", install_hooks=False)
    porcelain.commit(repository, "step 0", source=peft_adapter, show_progress=False)
    return repository


def test_read_revision_says_a_name_is_not_an_id(repo: Repository) -> None:
    commit = repo.resolve("main")
    for spec in ("main", commit[:10]):
        with pytest.raises(UnknownRevisionError, match="is not a commit id"):
            repo.read_revision(spec)
    assert repo.read_revision(commit).commit == commit


def test_verbs_take_a_path_and_close_what_they_open(repo: Repository, peft_adapter: Path) -> None:
    path = repo.work_tree
    assert path is not None
    result = porcelain.commit(
        str(path), "by path", source=peft_adapter, allow_empty=True, show_progress=False
    )
    assert [c.id for c in porcelain.log(path, limit=1)] == [result.commit]
    assert porcelain.tag_create(path / ".mint", "v1") == result.commit
    assert maintenance.fsck(path).ok
    assert maintenance.auto_gc_due(path) is False  # the call a training loop makes after a commit
    assert repo.resolve("v1") == result.commit  # the caller's Repository sees what was written
    renamed = porcelain.branch_rename(path, None, "trunk")
    assert renamed == porcelain.RenameResult("trunk", result.commit, "main")
    assert repo.current_branch() == "trunk"


def test_init_takes_the_base_model_directory_as_a_path(tmp_path: Path, tiny_base: Path) -> None:
    by_path = porcelain.init(tmp_path / "by-path", tiny_base, install_hooks=False)
    by_str = porcelain.init(tmp_path / "by-str", str(tiny_base), install_hooks=False)
    base = by_path.base
    assert base is not None and base.fingerprint is not None
    assert base == by_str.base
    by_path.close()
    by_str.close()


def test_init_refuses_a_base_model_path_that_does_not_exist(tmp_path: Path) -> None:
    # A relative Path that names nothing was recorded as a hub id, which turns the base-model
    # shape check off; a str that looks like org/name is still an id, as the CLI reads it.
    for missing in (Path("missing-model"), Path("org/missing")):
        with pytest.raises(MintError, match=f"--base-model {missing}: no such directory"):
            porcelain.init(tmp_path / "r", missing, install_hooks=False)
        assert not (tmp_path / "r").exists()
    by_id = porcelain.init(tmp_path / "r", "org/missing", install_hooks=False)
    assert by_id.base is not None and by_id.base.model_id == "org/missing"
    assert by_id.base.fingerprint is None
    by_id.close()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: porcelain.log(42), "takes a Repository or a repository's path, not int"),
        (lambda r: maintenance.gc(None), "takes a Repository or a repository's path, not NoneType"),
        (lambda r: porcelain.commit(r, None), "a commit message is a str, not NoneType"),
        (lambda r: porcelain.log(r, 5), "a revision is named by a str, not int"),
        (lambda r: porcelain.diff(r, None), "a revision is named by a str, not NoneType"),
        (lambda r: r.resolve(b"main"), "a revision is named by a str, not bytes"),
        (lambda r: porcelain.branch_create(r, 1), "a branch or tag name is a str, not int"),
        (lambda r: porcelain.tag_create(r, 1), "a branch or tag name is a str, not int"),
        (lambda r: porcelain.branch_rename(r, None, 1), "a branch or tag name is a str, not int"),
        (
            lambda r: porcelain.branch_rename(r, b"main", "x"),
            "a branch or tag name is a str, not bytes",
        ),
    ],
)
def test_wrong_argument_types_are_type_errors_naming_what_was_given(
    repo: Repository, call: Callable[[Repository], object], message: str
) -> None:
    with pytest.raises(TypeError, match=re.escape(message)):
        call(repo)


def test_metadata_must_be_strings_and_nothing_is_written_otherwise(
    repo: Repository, peft_adapter: Path
) -> None:
    before = {p.name for p in (repo.git_dir / "objects").rglob("*")}
    for meta in ({"step": 100}, {"reward": None}, {"": "x"}, {3: "x"}):
        with pytest.raises(MintError, match="convert values with str"):
            porcelain.commit(
                repo,
                "bad meta",
                source=peft_adapter,
                meta=meta,  # type: ignore[arg-type]
                allow_empty=True,
                show_progress=False,
            )
    # What `--meta KEY=VALUE` could not give: read back, it would not be what was meant.
    for meta in ({"a=b": "c"}, {" step ": "1"}, {"step\x00": "1"}, {"step": "1\x00"}):
        with pytest.raises(MintError, match="what `--meta KEY=VALUE` can give"):
            porcelain.commit(
                repo,
                "bad meta",
                source=peft_adapter,
                meta=meta,
                allow_empty=True,
                show_progress=False,
            )
    assert {p.name for p in (repo.git_dir / "objects").rglob("*")} == before


def test_a_spec_at_n_reads_the_branchs_reflog_when_a_tag_has_its_name(
    repo: Repository, peft_adapter: Path
) -> None:
    first = repo.resolve("main")
    second = porcelain.commit(
        repo, "step 1", source=peft_adapter, allow_empty=True, show_progress=False
    ).commit
    porcelain.tag_create(repo, "main", first)  # a tag of the branch's name: it has no reflog
    assert repo.resolve("main@{0}") == second and repo.resolve("main@{1}") == first


def test_loose_objects_are_counted_while_gc_removes_fan_out_directories(
    repo: Repository,
) -> None:
    files = maintenance._loose_files(repo)
    first_id, _ = next(files)
    # A gc elsewhere packs the rest and removes their emptied fan-out directories meanwhile.
    for fan in (repo.git_dir / "objects").iterdir():
        if len(fan.name) == 2 and fan.name != first_id[:2]:
            shutil.rmtree(fan)
    assert all(oid[:2] == first_id[:2] for oid, _ in files)
    assert maintenance.auto_gc_due(repo) in (True, False)


# Where a Ctrl-C can land with the most at stake: between a hold's start and its try, between a
# ref's rename and the line that records it, in the undo of a failed move.
_INTERRUPTIBLE = {
    "holding_writes",
    "_holding_writes",
    "write_commit",
    "release",
    "update",
    "undo",
    "_release_hold",
}


def _interrupt_at(
    n: int, event_kind: str, where: frozenset[str] | set[str] = _INTERRUPTIBLE
) -> Callable[..., object]:
    """A trace function raising KeyboardInterrupt at the n-th `event_kind` ("line" or
    "opcode": between any two bytecodes, as a signal can) run in the functions named `where`."""
    seen = 0

    def trace(frame: Any, event: str, arg: object) -> object:
        nonlocal seen
        if frame.f_code.co_name not in where:
            return None
        frame.f_trace_opcodes = event_kind == "opcode"
        if event == event_kind:
            seen += 1
            if seen == n:
                raise KeyboardInterrupt
        return trace

    return trace


def test_a_ctrl_c_anywhere_in_a_commit_leaves_the_store_whole_and_usable(
    repo: Repository, peft_adapter: Path, tmp_path: Path
) -> None:
    # A trainer interrupted in a notebook goes on with the same Repository. A hold left on by
    # an interrupt made every later object a temporary never stored, while the branch still
    # moved to the missing commit; a move interrupted after its rename lost its reflog lines.
    source = tmp_path / "adapter"
    shutil.copytree(peft_adapter, source)
    assert repo.work_tree is not None
    left = 0
    for n, kind in [
        *((n, "line") for n in range(1, 120, 3)),
        *((n, "opcode") for n in [*range(1, 60), *range(60, 700, 9)]),
    ]:
        mutate(source, seed=n)
        before = repo.refs.read("refs/heads/main")
        lines = len(git(repo.git_dir, "reflog", "main").stdout.splitlines())
        sys.settrace(_interrupt_at(n, kind))
        try:
            porcelain.commit(repo, f"step {n}", source=source, show_progress=False)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        after = repo.refs.read("refs/heads/main")
        reflog = git(repo.git_dir, "reflog", "main").stdout.splitlines()
        assert len(reflog) == lines + (after != before), (n, reflog)
        # A lock an interrupt left behind is refused by name, and removed as the error says
        # (git cleans its locks up in a signal handler; mintvcs's Ctrl-C handler does in the CLI).
        for lock in repo.git_dir.rglob("*.lock"):
            with pytest.raises(MintError, match="exists: locked by another process"):
                porcelain.commit(repo, f"locked {n}", source=peft_adapter, allow_empty=True)
            lock.unlink()
        result = porcelain.commit(repo, f"after {n}", source=peft_adapter, allow_empty=True)
        assert repo.refs.read("refs/heads/main") == result.commit
        assert repo.held_writes() is None, (n, kind)
        left += len(list(repo.git_dir.rglob("tmp_obj_*")))
    git(repo.git_dir, "fsck", "--strict")
    mint_fsck_ok(repo.work_tree)
    assert left == 0  # temporaries of interrupted commits are removed, not left to gc


def test_a_ctrl_c_while_a_hold_is_taken_off_leaves_no_writer_holding(
    repo: Repository, peft_adapter: Path, tmp_path: Path
) -> None:
    # The code that takes a commit's hold off can itself be interrupted, at its first bytecode
    # too. A hold left on sent a later annotated tag's object, and gc's new pack, to temporaries
    # never stored, while the tag ref was written and gc deleted the loose objects: every ref
    # of the store named a missing object.
    source = tmp_path / "adapter"
    shutil.copytree(peft_adapter, source)
    for n in range(1, 25):
        mutate(source, seed=n)
        sys.settrace(_interrupt_at(n, "opcode", {"_release_hold"}))
        try:
            porcelain.commit(repo, f"step {n}", source=source, show_progress=False)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        assert repo.held_writes() is None, n
        tag = porcelain.tag_create(repo, f"t{n}", "HEAD", message=f"tag {n}")
        assert git(repo.git_dir, "cat-file", "-t", tag).stdout.strip() == "tag", n
        if n == 1:
            maintenance.gc(repo)
            git(repo.git_dir, "fsck", "--strict")
    maintenance.gc(repo)
    git(repo.git_dir, "fsck", "--strict")
    assert repo.work_tree is not None
    mint_fsck_ok(repo.work_tree)


def _at_lock_line(
    line_text: str, ref: str, action: Callable[[refs._Lock], None]
) -> Callable[..., object]:
    """A trace function running `action(lock)` in `_Lock.write_commit` of `ref`'s lock, as the
    first line containing `line_text` is about to run (a Ctrl-C, or another process, there)."""
    lines, first = inspect.getsourcelines(refs._Lock.write_commit)
    target = first + next(i for i, text in enumerate(lines) if line_text in text)

    def trace(frame: Any, event: str, arg: object) -> object:
        if frame.f_code is not refs._Lock.write_commit.__code__:
            return None
        lock = frame.f_locals["self"]
        if event == "line" and frame.f_lineno == target and lock.path.endswith(ref):
            action(lock)
        return trace

    return trace


def _interrupt(lock: refs._Lock) -> None:
    raise KeyboardInterrupt


def _traced(trace: Callable[..., object], call: Callable[[], object]) -> None:
    """call() under `trace`, a KeyboardInterrupt it raises swallowed (a Ctrl-C)."""
    sys.settrace(trace)
    try:
        call()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)


def _changed_copy(peft_adapter: Path, tmp_path: Path, seed: int) -> Path:
    """A copy of the adapter with changed weights: something for a commit to store."""
    source = tmp_path / "adapter"
    shutil.copytree(peft_adapter, source)
    mutate(source, seed=seed)
    return source


def _reflog(repo: Repository, ref: str) -> list[str]:
    return git(repo.git_dir, "reflog", "--format=%H %gs", ref).stdout.splitlines()


def test_a_ctrl_c_just_after_a_branch_moves_keeps_its_line_and_the_next_lock(
    repo: Repository, peft_adapter: Path, tmp_path: Path
) -> None:
    # Between the rename that moves the branch and the line that records it: the move
    # happened, so its reflog lines stay (they were taken back: `main@{1}` then named the
    # value before the last move); and the lock path is no longer ours, so another process's
    # lock taken there meanwhile is not deleted.
    source = _changed_copy(peft_adapter, tmp_path, seed=3)
    before = repo.refs.read("refs/heads/main")
    lines, head_lines = _reflog(repo, "main"), _reflog(repo, "HEAD")

    def another_locks_then_ctrl_c(lock: refs._Lock) -> None:
        Path(lock.lock_path).write_text("another process's lock\n")
        raise KeyboardInterrupt

    _traced(
        _at_lock_line("self.held = False", "refs/heads/main", another_locks_then_ctrl_c),
        lambda: porcelain.commit(repo, "moved", source=source, show_progress=False),
    )
    after = repo.refs.read("refs/heads/main")
    assert after is not None and after != before
    assert _reflog(repo, "main") == [f"{after} commit: moved", *lines]
    assert _reflog(repo, "HEAD") == [f"{after} commit: moved", *head_lines]
    lock = repo.git_dir / "refs" / "heads" / "main.lock"
    assert lock.read_text() == "another process's lock\n"
    lock.unlink()
    git(repo.git_dir, "fsck", "--strict")


def test_a_ctrl_c_just_after_a_new_branch_is_renamed_into_place_leaves_no_branch_without_its_line(
    repo: Repository,
) -> None:
    # A new ref gets its line after the rename: a Ctrl-C between the two left `side` with no
    # reflog (`side@{0}` unknown), and no take-back as a failed line gets.
    _traced(
        _at_lock_line("self.held = False", "refs/heads/side", _interrupt),
        lambda: porcelain.branch_create(repo, "side", "main"),
    )
    assert repo.refs.read("refs/heads/side") is None
    assert not (repo.git_dir / "refs" / "heads" / "side.lock").exists()
    porcelain.branch_create(repo, "side", "main")  # its retry is not refused
    assert len(_reflog(repo, "side")) == 1
    git(repo.git_dir, "fsck", "--strict")


def test_a_lock_removed_before_its_rename_leaves_no_line_for_a_move_not_made(
    repo: Repository, peft_adapter: Path, tmp_path: Path
) -> None:
    # The leftover-lock message advises removing the file: done while a commit holds it, the
    # rename fails and the branch stays. Its reflog must not keep a line for that move.
    source = _changed_copy(peft_adapter, tmp_path, seed=4)
    before = repo.refs.read("refs/heads/main")
    lines, head_lines = _reflog(repo, "main"), _reflog(repo, "HEAD")
    with pytest.raises(
        refs.LockRemovedError, match=r"main\.lock was removed while this process held"
    ):
        _traced(
            _at_lock_line("os.rename(", "refs/heads/main", lambda lock: os.unlink(lock.lock_path)),
            lambda: porcelain.commit(repo, "not moved", source=source, show_progress=False),
        )
    assert repo.refs.read("refs/heads/main") == before
    assert _reflog(repo, "main") == lines
    assert _reflog(repo, "HEAD") == head_lines


def _two_branches(repo: Repository, peft_adapter: Path, tmp_path: Path) -> tuple[str, str]:
    """Branch `side` one commit past `main`, main checked out (`@{-1}` is side), the work tree
    clean; returns main's and side's commits."""
    source = tmp_path / "adapter"
    shutil.copytree(peft_adapter, source)
    porcelain.checkout(repo, "main", new_branch="side")
    mutate(source, seed=7)
    side = porcelain.commit(repo, "side", source=source, show_progress=False).commit
    porcelain.checkout(repo, "side", force=True)
    porcelain.checkout(repo, "main")
    main = repo.refs.read("refs/heads/main")
    assert main is not None and main != side and porcelain.status(repo).changes == []
    return main, side


def test_a_ctrl_c_just_after_checkout_moves_head_keeps_the_switch(
    repo: Repository, peft_adapter: Path, tmp_path: Path
) -> None:
    # HEAD moved to side: its reflog line stays (`checkout -` went to side itself, not back to
    # main), and the work tree keeps side's revision (main's was written back under it).
    _, side = _two_branches(repo, peft_adapter, tmp_path)
    head_lines = _reflog(repo, "HEAD")
    _traced(
        _at_lock_line("self.held = False", "HEAD", _interrupt),
        lambda: porcelain.checkout(repo, "side"),
    )
    assert repo.refs.read_symbolic("HEAD") == "refs/heads/side"
    assert _reflog(repo, "HEAD") == [f"{side} checkout: moving from main to side", *head_lines]
    assert repo.expand_previous("@{-1}") == "main"
    state = porcelain.status(repo)
    assert (state.head, state.changes, state.base, state.mixed) == (side, [], None, None)
    assert not list(repo.git_dir.rglob("*.lock"))


def test_a_ctrl_c_just_after_checkout_b_moves_head_keeps_the_new_branch(
    repo: Repository, peft_adapter: Path, tmp_path: Path
) -> None:
    # HEAD names the new branch: the branch stays (HEAD names it), and the work tree holds it.
    _, side = _two_branches(repo, peft_adapter, tmp_path)
    _traced(
        _at_lock_line("self.held = False", "HEAD", _interrupt),
        lambda: porcelain.checkout(repo, "side", new_branch="fresh"),
    )
    assert repo.refs.read_symbolic("HEAD") == "refs/heads/fresh"
    assert repo.refs.read("refs/heads/fresh") == side
    state = porcelain.status(repo)
    assert (state.head, state.changes, state.base, state.mixed) == (side, [], None, None)


def test_a_ctrl_c_just_after_reset_hard_moves_the_branch_keeps_the_work_tree(
    repo: Repository, peft_adapter: Path, tmp_path: Path
) -> None:
    # The branch moved: the work tree keeps the revision it was reset to (the old one was
    # written back, status then saying the branch moved under the work tree).
    main, _ = _two_branches(repo, peft_adapter, tmp_path)
    porcelain.checkout(repo, "side")
    lines = _reflog(repo, "side")
    _traced(
        _at_lock_line("self.held = False", "refs/heads/side", _interrupt),
        lambda: porcelain.reset(repo, "main", hard=True),
    )
    assert repo.refs.read("refs/heads/side") == main
    assert _reflog(repo, "side") == [f"{main} reset: moving to main", *lines]
    state = porcelain.status(repo)
    assert (state.head, state.changes, state.base, state.mixed) == (main, [], None, None)


def test_a_ctrl_c_just_after_branch_m_moves_head_takes_the_whole_rename_back(
    repo: Repository,
) -> None:
    # The rename is undone on failure: HEAD too, though its rename went through just before
    # the interrupt (it was left naming the new name, whose ref the undo then deleted).
    main = repo.refs.read("refs/heads/main")
    head_lines, lines = _reflog(repo, "HEAD"), _reflog(repo, "main")
    _traced(
        _at_lock_line("self.held = False", "HEAD", _interrupt),
        lambda: porcelain.branch_rename(repo, None, "trunk"),
    )
    assert repo.refs.read_symbolic("HEAD") == "refs/heads/main"
    assert repo.refs.read("refs/heads/main") == main
    assert repo.refs.read("refs/heads/trunk") is None
    assert (_reflog(repo, "HEAD"), _reflog(repo, "main")) == (head_lines, lines)
    git(repo.git_dir, "fsck", "--strict")
    assert porcelain.branch_rename(repo, None, "trunk").name == "trunk"  # and it can be retried
