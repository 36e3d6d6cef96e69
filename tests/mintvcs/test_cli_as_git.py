"""CLI details where a git user expects git's behaviour: messages, options out of place, JSON
that strict parsers read, hooks that cannot run. Real `mintvcs` processes, real git."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mintvcs import porcelain
from mintvcs.safetensors_file import parse_layout
from tests.mintvcs.storekit import (
    ENV,
    WEIGHTS,
    copy_adapter,
    git,
    git_fsck,
    mint,
    mint_fails,
    mutate,
    set_value,
    tensor_names,
)


@pytest.fixture
def work(tmp_path: Path, tiny_base: Path, peft_adapter: Path) -> Path:
    """A repository of tiny_base with the fp32 PEFT adapter committed once."""
    work = tmp_path / "work"
    mint(tmp_path, "init", str(work), "--base-model", str(tiny_base))
    copy_adapter(peft_adapter, work)
    mint(work, "commit", "-m", "first")
    return work


def _strict_json(text: str) -> Any:
    """Parse as JSON parsers outside Python do: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _zero_first_tensor(adapter: Path) -> str:
    path = adapter / WEIGHTS
    data = bytearray(path.read_bytes())
    layout = parse_layout(bytes(data), str(path))
    first = layout.tensors[0]
    offset = len(layout.header)
    data[offset + first.start : offset + first.end] = bytes(first.end - first.start)
    path.write_bytes(bytes(data))
    return first.name


def test_diff_json_is_strict_json_when_the_old_tensor_is_all_zero(work: Path) -> None:
    # PEFT saves B as zeros at step 0: the first diff of a run divides by a zero norm.
    name = _zero_first_tensor(work)
    mint(work, "commit", "-m", "zeros")
    mutate(work, seed=1, names=[name], scale=1.0)
    mint(work, "commit", "-m", "trained")
    out = _strict_json(mint(work, "diff", "HEAD~1", "HEAD", "--json").stdout)
    (row,) = [t for t in out["tensors"] if t["name"] == name]
    # A cosine with a zero vector has no value (it read 0.0, "orthogonal").
    assert row["status"] == "modified" and row["rel_l2"] is None and row["cosine"] is None
    text = mint(work, "diff", "HEAD~1", "HEAD").stdout
    assert "rel_l2=inf  cos=n/a" in text  # the text says so


def test_diff_of_a_tensor_holding_nan_has_no_cosine_and_no_warnings(work: Path) -> None:
    # max(-1.0, nan) is -1.0: an undefined cosine read as perfectly opposed; and numpy's
    # RuntimeWarnings (two source lines each) went to stderr.
    name = tensor_names(work)[0]
    set_value(work, name, 0, float("nan"))

    def check(*revs: str) -> None:
        done = mint(work, "diff", *revs, "--json")
        (row,) = [t for t in _strict_json(done.stdout)["tensors"] if t["name"] == name]
        assert (row["status"], row["rel_l2"], row["cosine"]) == ("modified", None, None), row
        text = mint(work, "diff", *revs)
        (line,) = [line for line in text.stdout.splitlines() if f" {name} " in line]
        assert line.endswith("rel_l2=nan  cos=n/a"), line  # n/a: no value, as for a zero norm
        assert done.stderr == text.stderr == "", done.stderr + text.stderr

    check("HEAD")
    mint(work, "commit", "--no-verify", "-m", "nan")
    check("HEAD~1", "HEAD")
    # An infinity on both sides: inf - inf is numpy's "invalid value encountered in subtract".
    set_value(work, name, 0, float("inf"))
    mint(work, "commit", "--no-verify", "-m", "inf")
    set_value(work, name, 1, 0.5)
    check("HEAD")


def test_diff_shows_what_status_and_git_show(work: Path) -> None:
    from safetensors.numpy import load_file, save_file

    (work / "run.sh").write_text("#!/bin/sh\n")
    mint(work, "commit", "-m", "script")
    (work / "run.sh").chmod(0o755)
    # A mode change alone is a change, as status says (diff said nothing).
    assert "file run.sh modified" in mint(work, "diff", "HEAD").stdout
    mint(work, "commit", "-m", "executable")
    out = json.loads(mint(work, "diff", "HEAD~1", "HEAD", "--json").stdout)
    assert out["files"] == [{"path": "run.sh", "status": "modified"}]
    # The header's __metadata__ alone: checkout writes other bytes, so diff says so.
    weights = load_file(str(work / WEIGHTS))
    save_file(weights, str(work / WEIGHTS), metadata={"format": "pt", "step": "5"})
    assert "header changed" in mint(work, "diff", "HEAD").stdout
    mint(work, "commit", "-m", "metadata")
    assert json.loads(mint(work, "diff", "HEAD~1", "HEAD", "--json").stdout)["header_changed"]
    # +0 -> -0 changes the bytes, not the values: no change, not an infinite one.
    name = next(iter(weights))
    save_file(
        {**weights, name: weights[name] * 0.0},
        str(work / WEIGHTS),
        metadata={"format": "pt", "step": "5"},
    )
    mint(work, "commit", "-m", "plus zero")
    save_file(
        {**weights, name: weights[name] * -0.0},
        str(work / WEIGHTS),
        metadata={"format": "pt", "step": "5"},
    )
    (row,) = [
        t
        for t in json.loads(mint(work, "diff", "HEAD", "--json").stdout)["tensors"]
        if t["name"] == name
    ]
    assert (row["status"], row["rel_l2"], row["cosine"]) == ("modified", 0.0, None)


def test_commit_json_runs_auto_gc_too(work: Path) -> None:
    git_dir = work / ".mint"
    git(git_dir, "config", "gc.auto", "1")
    git(git_dir, "config", "gc.autoDetach", "false")
    mutate(work, seed=2)
    result = mint(work, "commit", "-m", "scripted", "--json")
    json.loads(result.stdout)  # stdout stays one JSON document; the notice went to stderr
    assert "Auto packing" in result.stderr
    counts = dict(
        line.split(": ") for line in git(git_dir, "count-objects", "-v").stdout.splitlines()
    )
    assert counts["count"] == "0" and int(counts["packs"]) >= 1


def test_messages_are_cleaned_as_git_cleans_them(work: Path) -> None:
    mutate(work, seed=3)
    result = mint(work, "commit", "-m", "\n\n  subject line  \n\n\n\nbody  \n\n")
    # As git: blank lines at the ends and trailing spaces go; leading spaces stay.
    assert result.stdout.startswith("[main ") and "]   subject line\n" in result.stdout
    commit = git(work / ".mint", "cat-file", "-p", "HEAD").stdout
    assert commit.endswith("\n\n  subject line\n\nbody\n")
    assert mint(work, "log", "--oneline", "-n", "1").stdout.rstrip().endswith("  subject line")
    mint(work, "tag", "-m", "\n release 1 \n\n", "v1")
    assert git(work / ".mint", "cat-file", "-p", "v1").stdout.endswith("\n\n release 1\n")


def test_tag_and_branch_options_out_of_place_are_usage_errors(work: Path) -> None:
    for args in (("tag", "-m", "release"), ("tag", "-f"), ("branch", "-f")):
        result = mint(work, *args, ok=False)
        assert result.returncode == 2 and "name required" in result.stderr, args
    mint(work, "tag", "v1")
    result = mint(work, "tag", "-d", "-m", "x", "v1", ok=False)
    assert result.returncode == 2
    assert mint(work, "tag").stdout.split() == ["v1"]  # nothing was deleted
    # Deleting says it once, and --json answers in JSON.
    assert re.fullmatch(
        r"Deleted tag 'v1' \(was [0-9a-f]{7}\)\n", mint(work, "tag", "-d", "v1").stdout
    )
    mint(work, "tag", "v2")
    mint(work, "branch", "side")
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    for kind, name in (("tag", "v2"), ("branch", "side")):
        out = _strict_json(mint(work, kind, "-d", name, "--json").stdout)
        assert out == [{"name": name, "was": head}]


def test_branch_list_takes_patterns(work: Path) -> None:
    for name in ("feat/a", "feat/b", "fix/c"):
        mint(work, "branch", name)
    listed = [
        line.split()[-2] for line in mint(work, "branch", "--list", "feat/*").stdout.splitlines()
    ]
    assert listed == ["feat/a", "feat/b"]
    names = [
        b["name"]
        for b in json.loads(mint(work, "branch", "--list", "fix*", "main", "--json").stdout)
    ]
    assert names == ["fix/c", "main"]


def test_an_emptied_work_tree_lists_every_committed_file_removed(work: Path) -> None:
    (work / "README.md").write_text("notes\n")
    mutate(work, seed=4)
    mint(work, "commit", "-m", "with notes")
    for path in work.iterdir():
        if path.name != ".mint":
            path.unlink()
    changes = json.loads(mint(work, "status", "--json").stdout)["changes"]
    assert sorted(c["path"] for c in changes if c["status"] == "removed") == [
        "README.md",
        "adapter_config.json",
        WEIGHTS,
    ]


@pytest.mark.parametrize("name", ["post-commit", "commit-msg"])
def test_a_hook_that_is_not_executable_is_named(work: Path, name: str) -> None:
    # commit-msg's was skipped without a word.
    hook = work / ".mint" / "hooks" / name
    hook.write_text("#!/bin/sh\necho ran\n")
    os.chmod(hook, 0o644)
    mutate(work, seed=5)
    result = mint(work, "commit", "-m", "hooked")
    assert f"{name}' hook was ignored because it is not set as executable" in result.stderr
    assert "ran" not in result.stderr


def test_base_model_paths_that_are_no_checkpoint_directory_are_refused(
    tmp_path: Path, tiny_base: Path
) -> None:
    error = mint_fails(tmp_path, "init", "r1", "--base-model", str(tiny_base / "config.json"))
    assert "a file, not a directory" in error
    error = mint_fails(tmp_path, "init", "r2", "--base-model", "~no-such-user-here/base")
    assert "no such directory" in error
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_a_new_repository_takes_its_first_commit_on_the_branch_head_names(
    tmp_path: Path, peft_adapter: Path
) -> None:
    # A training loop commits with branch="main" from the start, as docs/python.md shows.
    repo = porcelain.init(tmp_path / "run", install_hooks=False)
    first = porcelain.commit(
        repo, "step 0", source=peft_adapter, branch="main", show_progress=False
    )
    assert first.parent is None and first.branch == "main" and first.summary == "step 0"
    assert repo.refs.read("refs/heads/main") == first.commit
    with pytest.raises(porcelain.UnknownRevisionError, match="does not exist"):
        porcelain.commit(repo, "x", source=peft_adapter, branch="other", show_progress=False)


def _hook(work: Path, name: str, content: bytes) -> None:
    path = work / ".mint" / "hooks" / name
    path.write_bytes(content)
    path.chmod(0o755)


def test_hooks_run_as_git_runs_them(work: Path) -> None:
    # No #! line (the shell runs it), undecodable output, a job left running, and stdin:
    # none of them fails, blocks or eats what the command's own stdin holds.
    _hook(
        work,
        "post-commit",
        b"printf 'caf\\351 done\\n'\n"  # a Latin-1 byte: not UTF-8
        b"sleep 30 >/dev/null 2>&1 &\n"
        b"cat > /dev/null\n"  # reads stdin: /dev/null, so at once
        b"echo posted\n",
    )
    mutate(work, seed=6)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", "commit", "-m", "hooked"],
        cwd=work,
        env=ENV,
        input="stdin the hook must not read\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - started < 10  # not the 30 s of the job it started
    assert result.stderr.splitlines()[:2] == ["caf\ufffd done", "posted"]


def test_a_refusing_hook_is_streamed_and_its_last_line_quoted_once(work: Path) -> None:
    _hook(work, "pre-commit", b"#!/bin/sh\necho first\necho 'too big' >&2\nexit 1\n")
    mutate(work, seed=7)
    result = mint(work, "commit", "-m", "refused", ok=False)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert lines[0] == "first" and len([x for x in lines if "too big" in x]) == 1
    assert lines[-1].startswith("error: pre-commit hook refused the commit: too big")


def _commit_msg_hook(work: Path, script: str) -> None:
    """A commit-msg hook: it runs after the encoding and before the branch moves, where another
    process's change lands when two race."""
    hook = work / ".mint" / "hooks" / "commit-msg"
    hook.write_text("#!/bin/sh\n" + script)
    hook.chmod(0o755)


def test_a_branch_deleted_while_committing_is_not_brought_back_as_a_root(work: Path) -> None:
    mint(work, "branch", "exp")
    _commit_msg_hook(work, 'git --git-dir "$MINT_DIR" update-ref -d refs/heads/exp\n')
    mutate(work, seed=7)
    error = mint_fails(work, "commit", "-m", "step", "--branch", "exp")
    # It recreated exp as a root commit sharing nothing with the history deleted.
    assert "branch 'exp' was deleted while this commit was being made" in error
    assert (
        git(work / ".mint", "rev-parse", "--verify", "-q", "refs/heads/exp", ok=False).stdout == ""
    )


def test_a_commit_racing_a_rename_of_its_branch_lands_on_the_new_name(work: Path) -> None:
    before = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    _commit_msg_hook(work, 'git --git-dir "$MINT_DIR" branch -m main trunk\n')
    mutate(work, seed=7)
    mint(work, "commit", "-m", "step")
    # As git's commit, which updates HEAD through its symref: HEAD names trunk now.
    assert git(work / ".mint", "symbolic-ref", "HEAD").stdout.strip() == "refs/heads/trunk"
    assert git(work / ".mint", "rev-parse", "trunk~1").stdout.strip() == before
    assert git(work / ".mint", "log", "-1", "--format=%s", "trunk").stdout.strip() == "step"
    assert "main" not in git(work / ".mint", "branch", "--format=%(refname:short)").stdout
    assert json.loads(mint(work, "status", "--json").stdout)["changes"] == []


def test_a_commit_racing_a_rename_and_a_move_of_its_branch_is_refused(work: Path) -> None:
    git(work / ".mint", "branch", "other")
    mint(work, "commit", "--allow-empty", "--no-verify", "-m", "elsewhere", "--branch", "other")
    _commit_msg_hook(
        work,
        'git --git-dir "$MINT_DIR" branch -m main trunk && '
        'git --git-dir "$MINT_DIR" update-ref refs/heads/trunk refs/heads/other\n',
    )
    mutate(work, seed=7)
    error = mint_fails(work, "commit", "-m", "step")
    assert "branch 'main' was deleted while this commit was being made" in error
    assert git(work / ".mint", "log", "-1", "--format=%s", "trunk").stdout.strip() == "elsewhere"


def test_an_adapter_committed_meanwhile_by_another_process_is_nothing_to_commit(
    work: Path, tmp_path: Path
) -> None:
    twin = copy_adapter(work, tmp_path / "twin")
    mutate(twin, seed=8)
    copy_adapter(twin, work)
    other = f'"$MINT_PYTHON" -m mintvcs.cli commit --no-verify -m other --from "{twin}"'
    _commit_msg_hook(work, f'cd "{work}" && {other} >/dev/null\n')
    error = mint_fails(work, "commit", "-m", "same")
    # It was recorded as an empty commit on top of the other process's.
    assert "nothing to commit" in error and "committed meanwhile" in error
    log = git(work / ".mint", "log", "--format=%s").stdout.split()
    assert log[:2] == ["other", "first"]


# --- the same commands through mintvcs and through git, on two copies of one repository ---


def _git_twin(work: Path, tmp_path: Path) -> Path:
    """A copy of `work` for real git to run the same commands on; returns its .mint."""
    twin = tmp_path / "twin"
    shutil.copytree(work, twin, symlinks=True)
    tree = tmp_path / "twin-tree"  # git needs a work tree and an index of its own
    tree.mkdir()
    git(twin / ".mint", "--work-tree", str(tree), "read-tree", "--reset", "-u", "HEAD")
    return twin / ".mint"


def _git_in_twin(twin: Path, *args: str) -> None:
    """Run a git command in the twin made by _git_twin, with its own work tree."""
    tree = twin.parent.parent / "twin-tree"
    git(twin, "-c", "advice.detachedHead=false", "--work-tree", str(tree), *args)


def _reflogs(git_dir: Path) -> dict[str, list[tuple[str, str, str]]]:
    """Every reflog: (old, new, message) of each line, by ref name."""
    logs = git_dir / "logs"
    found = {}
    for path in sorted(p for p in logs.rglob("*") if p.is_file()):
        rows = []
        for line in path.read_text().splitlines():
            head, _, message = line.partition("\t")
            old, new = head.split()[:2]
            rows.append((old, new, message))
        found[path.relative_to(logs).as_posix()] = rows
    return found


def _same_refs(work: Path, twin: Path) -> None:
    """HEAD, every ref and every reflog are what git wrote in the twin."""
    ours = work / ".mint"
    assert (ours / "HEAD").read_text() == (twin / "HEAD").read_text()
    listing = ("for-each-ref", "--format=%(refname) %(objectname)")
    assert git(ours, *listing).stdout == git(twin, *listing).stdout
    assert _reflogs(ours) == _reflogs(twin)


def _two_commits_and_a_tag(work: Path) -> None:
    mutate(work, seed=30)
    mint(work, "commit", "-m", "second")
    mint(work, "tag", "v1", "HEAD~1")


def test_checkout_of_the_previous_branch_switches_to_it_as_git_does(
    work: Path, tmp_path: Path
) -> None:
    # `checkout @{-1}` detached HEAD at the branch's commit, so the next commit left it behind.
    _two_commits_and_a_tag(work)
    twin = _git_twin(work, tmp_path)
    for args in (("v1",), ("@{-1}",), ("v1",), ("-",), ("-",), ("-b", "nb", "@{-1}")):
        mint(work, "checkout", *args)
        _git_in_twin(twin, "checkout", "-q", *args)
        _same_refs(work, twin)
    mint(work, "checkout", "main")
    _git_in_twin(twin, "checkout", "-q", "main")
    assert mint(work, "checkout", "-").stderr == "Switched to branch 'nb'\n"
    _git_in_twin(twin, "checkout", "-q", "-")
    _same_refs(work, twin)


def test_a_ref_left_where_it_was_gets_no_reflog_line_as_in_git(work: Path, tmp_path: Path) -> None:
    # `reset --hard HEAD` logged "main -> main" in main's reflog, so main@{1} stopped naming
    # where main was before its last move; git logs only HEAD, which the update went through.
    _two_commits_and_a_tag(work)
    mint(work, "branch", "side", "HEAD~1")
    twin = _git_twin(work, tmp_path)
    steps: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
        (("reset", "--hard", "HEAD"), ("reset", "-q", "--hard", "HEAD")),
        (("reset", "main"), ("reset", "-q", "--soft", "main")),
        (("branch", "-f", "side", "side"), ("branch", "-f", "side", "side")),
        (("checkout", "HEAD"), ("checkout", "-q", "HEAD")),
        (("checkout", "main"), ("checkout", "-q", "main")),  # git logs "main to main" here
        (("checkout", "v1"), ("checkout", "-q", "v1")),
        (("checkout", "v1"), ("checkout", "-q", "v1")),  # detached, and already there
        (("reset", "HEAD"), ("reset", "-q", "--soft", "HEAD")),
        (("checkout", "HEAD"), ("checkout", "-q", "HEAD")),
    ]
    for ours, theirs in steps:
        mint(work, *ours)
        _git_in_twin(twin, *theirs)
        _same_refs(work, twin)


def test_a_commit_through_a_symbolic_branch_is_logged_on_head_too(work: Path) -> None:
    # HEAD -> alias -> main: the commit was logged on alias and main only, so HEAD@{0} was
    # the commit before; git logs every ref of the chain.
    git_dir = work / ".mint"
    git(git_dir, "symbolic-ref", "refs/heads/alias", "refs/heads/main")
    mint(work, "checkout", "alias")
    mutate(work, seed=31)
    mint(work, "commit", "-m", "on alias")
    head = git(git_dir, "rev-parse", "HEAD").stdout
    assert git(git_dir, "rev-parse", "HEAD@{0}").stdout == head
    for ref in ("HEAD", "refs/heads/alias", "refs/heads/main"):
        assert (git_dir / "logs" / ref).read_text().splitlines()[-1].endswith("\tcommit: on alias")


def test_a_head_that_is_a_symbolic_link_to_a_branch_is_that_branch_as_git_reads_it(
    work: Path, tmp_path: Path, peft_adapter: Path
) -> None:
    # git's files backend reads a ref that is a link to a name under refs/ as a symbolic ref
    # (core.preferSymlinkRefs writes HEAD so): the commit advances main, not a detached HEAD.
    git_dir = work / ".mint"
    (git_dir / "HEAD").unlink()
    (git_dir / "HEAD").symlink_to("refs/heads/main")
    assert git(git_dir, "symbolic-ref", "HEAD").stdout == "refs/heads/main\n"
    assert mint(work, "status").stdout.startswith("On branch main\n")
    mutate(work, seed=41)
    mint(work, "commit", "-m", "through the link")
    assert git(git_dir, "log", "-1", "--format=%s", "main").stdout == "through the link\n"
    assert (git_dir / "HEAD").is_symlink()  # git's commit leaves the link too
    assert mint(work, "branch").stdout.startswith("* main ")
    # Before the first commit too: a link to a branch not born yet is a repository's HEAD
    # for git (validate_headref), and the first commit makes that branch.
    fresh = tmp_path / "fresh"
    mint(tmp_path, "init", str(fresh))
    (fresh / ".mint" / "HEAD").unlink()
    (fresh / ".mint" / "HEAD").symlink_to("refs/heads/trunk")
    assert git(fresh / ".mint", "symbolic-ref", "HEAD").stdout == "refs/heads/trunk\n"
    assert mint(fresh, "status").stdout.startswith("On branch trunk\n")
    copy_adapter(peft_adapter, fresh)
    mint(fresh, "commit", "-m", "first")
    assert git(fresh / ".mint", "log", "--format=%s", "trunk").stdout == "first\n"


def test_git_spellings_of_reset_log_tag_and_ids_are_taken(work: Path, tmp_path: Path) -> None:
    # Each was refused: `reset --hard` without REV, --soft/--mixed, `log -2`, `tag -l`, an
    # upper-case id; and `tag -f` over a tag said nothing where git says what it replaced.
    _two_commits_and_a_tag(work)
    twin = _git_twin(work, tmp_path)
    mutate(work, seed=32)
    mint(work, "reset", "--hard")
    assert json.loads(mint(work, "status", "--json").stdout)["clean"]
    _git_in_twin(twin, "reset", "-q", "--hard")
    for args in (("--soft", "HEAD~1"), ("--mixed", "main@{1}"), ()):
        mint(work, "reset", *args)
        _git_in_twin(twin, "reset", "-q", *(args or ("--mixed",)))
    _same_refs(work, twin)
    assert mint(work, "reset", "--soft", "--hard", ok=False).returncode == 2

    two = mint(work, "log", "--oneline", "-n", "2").stdout
    assert two.count("\n") == 2
    assert mint(work, "log", "-2", "--oneline").stdout == two
    assert mint(work, "log", "--oneline", "-2", "HEAD").stdout == two
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    assert mint(work, "log", "--oneline", "-1", head[:7].upper()).stdout == two.splitlines(True)[0]
    assert mint(work, "log", "--oneline", "-1", head.upper()).stdout == two.splitlines(True)[0]

    mint(work, "tag", "v2")
    assert mint(work, "tag", "-l").stdout == "v1\nv2\n"
    assert mint(work, "tag", "--list", "*2").stdout == "v2\n"
    assert mint(work, "tag", "-l", "-d", "v2", ok=False).returncode == 2
    for _ in range(2):  # replacing, then setting the value it already has (git says nothing)
        ours = mint(work, "tag", "-f", "v1", "HEAD").stdout
        assert ours == git(twin, "tag", "-f", "v1", "HEAD").stdout
    assert ours == "" and mint(work, "tag", "-f", "v1", "HEAD~1").stdout.startswith(
        "Updated tag 'v1' (was "
    )


def test_checkout_b_before_the_first_commit_names_the_unborn_branch_as_git_does(
    tmp_path: Path, peft_adapter: Path
) -> None:
    # It failed with "HEAD does not point to a commit yet"; git's way to start on another name.
    mint(tmp_path, "init", "new")
    work = tmp_path / "new"
    twin = _git_twin_unborn(work, tmp_path)
    for name in ("other", "other", "third"):
        assert mint(work, "checkout", "-b", name).stderr == f"Switched to a new branch '{name}'\n"
        _git_in_twin(twin, "checkout", "-q", "-b", name)
        assert (work / ".mint" / "HEAD").read_text() == (twin / "HEAD").read_text()
        assert not (work / ".mint" / "logs").exists() and not (twin / "logs").exists()
    copy_adapter(peft_adapter, work)
    assert mint(work, "commit", "-m", "first").stdout.startswith("[third (root-commit) ")
    assert git(work / ".mint", "for-each-ref", "--format=%(refname)").stdout == "refs/heads/third\n"


def _git_twin_unborn(work: Path, tmp_path: Path) -> Path:
    """A copy of a repository that has no commit yet, for git; returns its .mint."""
    twin = tmp_path / "twin"
    shutil.copytree(work, twin, symlinks=True)
    (tmp_path / "twin-tree").mkdir()
    return twin / ".mint"


def test_a_branch_made_without_a_start_is_logged_as_git_logs_it(work: Path, tmp_path: Path) -> None:
    # "branch: Created from HEAD" where git names the current branch (HEAD only when detached).
    _two_commits_and_a_tag(work)
    twin = _git_twin(work, tmp_path)
    for args in (("nb",), ("nb2", "HEAD"), ("-f", "nb"), ("nb3", "v1")):
        mint(work, "branch", *args)
        git(twin, "branch", *args)
    mint(work, "checkout", "v1")
    _git_in_twin(twin, "checkout", "-q", "v1")
    mint(work, "branch", "nb4")
    git(twin, "branch", "nb4")
    _same_refs(work, twin)


def test_branch_m_renames_as_git_does(work: Path, tmp_path: Path) -> None:
    # There was no way to rename a branch but create and delete, which lost its reflog. As git's
    # `branch -m/-M`: the reflog moves along, HEAD follows, packed (after gc) or loose.
    _two_commits_and_a_tag(work)
    mint(work, "branch", "side", "HEAD~1")
    mint(work, "branch", "other")
    mint(work, "gc")  # packs the refs
    mint(work, "branch", "loose", "HEAD~1")
    git(work / ".mint", "update-ref", "refs/heads/-dash", "HEAD")  # no name for git branch now
    twin = _git_twin(work, tmp_path)
    for args in (
        ("-m", "side", "s2"),  # packed
        ("-m", "cur"),  # the current branch: HEAD follows, and logs it as git does
        ("-m", "loose", "loose/v1"),  # into the directory its own name makes
        ("-M", "s2", "other"),  # over another branch, whose reflog it replaces
        ("-m", "cur", "cur"),
        ("-m", "-f", "loose/v1", "s2"),
        ("-m", "--", "-dash", "dash"),  # renamed away, with git's warning
    ):
        done = mint(work, "branch", *args)
        assert done.stdout == ""  # git says nothing either, but warns as git does:
        warned = "warning: Renamed a misnamed branch '-dash' away\n" if "-dash" in args else ""
        assert done.stderr == warned
        _git_in_twin(twin, "branch", *args)
        _same_refs(work, twin)
    for args in (
        ("-m", "nope", "x"),
        ("-m", "other", "cur"),  # exists
        ("-M", "other", "cur"),  # the checked-out branch (which git replaces in a bare store)
        ("-m", "other", "bad..name"),
        ("-m", "other", "cur/x"),  # cur is a branch
        ("-m", "a", "b", "c"),
    ):
        mint(work, "branch", *args, ok=False)
        # As git where the store has a work tree (`.mint` says core.bare for git's own use).
        tree = ("-c", "core.bare=false", "--work-tree", str(tmp_path / "twin-tree"))
        assert git(twin, *tree, "branch", *args, ok=False).returncode != 0
        _same_refs(work, twin)
    assert "'cur' already exists (use -M" in mint_fails(work, "branch", "-m", "other", "cur")
    assert "begins with '-'" in mint_fails(work, "branch", "-m", "dash", "--", "-dash2")
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    out = json.loads(mint(work, "branch", "-m", "cur", "main", "--json").stdout)
    assert out == {"name": "main", "commit": head, "renamed_from": "cur"}
    mint(work, "checkout", "v1")
    assert "HEAD is detached" in mint_fails(work, "branch", "-m", "x")
    git_fsck(work)


def test_branch_m_before_the_first_commit_renames_the_unborn_branch_as_git_does(
    tmp_path: Path, peft_adapter: Path
) -> None:
    mint(tmp_path, "init", "new")
    work = tmp_path / "new"
    twin = _git_twin_unborn(work, tmp_path)
    out = json.loads(mint(work, "branch", "-m", "fresh", "--json").stdout)
    assert out == {"name": "fresh", "commit": None, "renamed_from": "main"}
    _git_in_twin(twin, "branch", "-m", "fresh")
    assert (work / ".mint" / "HEAD").read_text() == (twin / "HEAD").read_text()
    assert not (work / ".mint" / "logs").exists() and not (twin / "logs").exists()
    assert "branch 'main' not found" in mint_fails(work, "branch", "-m", "main", "x")
    copy_adapter(peft_adapter, work)
    assert mint(work, "commit", "-m", "first").stdout.startswith("[fresh (root-commit) ")


def test_branch_m_moves_a_git_worktree_s_head_along_as_git_does(work: Path, tmp_path: Path) -> None:
    mint(work, "branch", "side")
    mint(work, "branch", "spare")
    twin = _git_twin(work, tmp_path)
    stores = {"ours": work / ".mint", "theirs": twin}
    for who, store in stores.items():
        git(store, "worktree", "add", "-q", str(tmp_path / who / "wt"), "side")
    mint(work, "branch", "-m", "side", "s2")
    _git_in_twin(twin, "branch", "-m", "side", "s2")
    _same_refs(work, twin)
    ours, theirs = (store / "worktrees" / "wt" for store in stores.values())
    assert (ours / "HEAD").read_text() == (theirs / "HEAD").read_text() == "ref: refs/heads/s2\n"
    assert _reflogs(ours) == _reflogs(theirs)
    # Another branch is not renamed over the one a worktree has checked out, by git either.
    line = mint_fails(work, "branch", "-M", "spare", "s2")
    assert "checked out in the git worktree" in line
    assert git(twin, "branch", "-M", "spare", "s2", ok=False).returncode != 0


def test_reflog_lines_take_their_time_from_git_committer_date(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Commits honoured GIT_COMMITTER_DATE, reflog lines took the clock: replays were not
    # reproducible. git dates a reflog line as its committer.
    _two_commits_and_a_tag(work)
    twin = _git_twin(work, tmp_path)
    monkeypatch.setitem(ENV, "GIT_COMMITTER_DATE", "1767225600 +0530")
    steps: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
        (("checkout", "v1"), ("checkout", "-q", "v1")),
        (("checkout", "main"), ("checkout", "-q", "main")),
        (("checkout", "-b", "nb", "HEAD~1"), ("checkout", "-q", "-b", "nb", "HEAD~1")),
        (("branch", "nb2"), ("branch", "nb2")),
        (("reset", "main"), ("reset", "-q", "--soft", "main")),
    ]
    for ours, theirs in steps:
        mint(work, *ours)
        _git_in_twin(twin, *theirs)
    logs = sorted(p.relative_to(twin) for p in (twin / "logs").rglob("*") if p.is_file())
    for path in logs:
        assert (work / ".mint" / path).read_text() == (twin / path).read_text(), path
    mutate(work, seed=33)
    mint(work, "commit", "-m", "dated")
    assert (
        (work / ".mint" / "logs" / "HEAD")
        .read_text()
        .endswith(" 1767225600 +0530\tcommit: dated\n")
    )


def test_log_decorates_and_dates_as_git_log_does(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Remote-tracking refs printed as refs/remotes/origin/main, refs git hides by default
    # (notes, a tool's own namespace) showed, the order was not git's, and the day was padded.
    monkeypatch.setitem(ENV, "GIT_AUTHOR_DATE", "1767225600 +0000")  # Thu Jan 1 2026
    # git's Date is the author's; it read the committer's.
    monkeypatch.setitem(ENV, "GIT_COMMITTER_DATE", "1767312000 +0100")
    mutate(work, seed=34)
    mint(work, "commit", "-m", "dated")
    mint(work, "branch", "side")
    mint(work, "branch", "x1")
    mint(work, "tag", "zz")
    mint(work, "tag", "ann", "-m", "annotated")
    mint(work, "tag", "aa", "HEAD~1")
    git_dir = work / ".mint"
    head = git(git_dir, "rev-parse", "HEAD").stdout.strip()
    for ref in (
        "refs/remotes/origin/main",
        "refs/remotes/upstream/b",
        "refs/stash",
        "refs/custom/x",
        "refs/notes/commits",
    ):
        git(git_dir, "update-ref", ref, head)
    git(git_dir, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/main")
    for detached in (False, True):
        if detached:
            mint(work, "checkout", head)
        for args in (("--oneline",), ()):
            ours = mint(work, "log", *args).stdout
            assert ours == git(git_dir, "log", "--decorate", *args).stdout, (detached, args)
    assert "Date:   Thu Jan 1 00:00:00 2026 +0000\n" in ours
    shown = mint(work, "show", "HEAD").stdout
    assert git(git_dir, "show", "-s", "--format=Date:   %ad", "HEAD").stdout in shown
    labels = json.loads(mint(work, "log", "--json", "-n", "1").stdout)[0]["refs"]
    tags, remotes = ["tag: zz", "tag: ann"], ["upstream/b", "origin/main", "origin/HEAD"]
    assert labels == ["HEAD", *tags, "refs/stash", *remotes, "x1", "side", "main"]


def test_tags_of_an_annotated_tag_are_the_objects_git_writes(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `tag v2 v1` of an annotated v1 tagged v1's commit, and `tag -a v3 v1` a new tag of that
    # commit; git tags the tag object (a nested tag for -a). `-a` itself was an unknown option.
    twin = _git_twin(work, tmp_path)
    monkeypatch.setitem(ENV, "GIT_COMMITTER_DATE", "1767225600 +0100")  # the tagger's date
    steps = [
        ("-a", "v1", "-m", "one"),
        ("v2", "v1"),
        ("-a", "v3", "v1", "-m", "nested"),
        ("v4", "-m", "of a lightweight tag of a tag", "v2"),
        ("v5", "v3"),
        ("v6", "v1^{}"),
        ("-a", "v7", "-m", "peeled", "v3^{}"),
        ("-f", "-a", "v1", "v1", "-m", "over itself"),
    ]
    for args in steps:
        ours = mint(work, "tag", *args)
        theirs = git(twin, "tag", *args)
        assert ours.stdout == theirs.stdout, args
        nested = "hint: You have created a nested tag." in theirs.stderr
        assert ("hint: You have created a nested tag." in ours.stderr) == nested, args
    listing = ("for-each-ref", "--format=%(refname) %(objectname) %(*objecttype)", "refs/tags")
    assert git(work / ".mint", *listing).stdout == git(twin, *listing).stdout
    assert "tag" in git(work / ".mint", "cat-file", "-p", "v3").stdout.splitlines()[1]
    git_fsck(work)
    describe = ("describe", "--tags", "--exact-match", "v5")
    assert git(work / ".mint", *describe).stdout == git(twin, *describe).stdout
    head = git(twin, "rev-parse", "HEAD").stdout.strip()
    tags = json.loads(mint(work, "tag", "--json").stdout)
    assert {t["commit"] for t in tags} == {head} and len(tags) == 7
    assert "tag: v5" in mint(work, "log", "--oneline", "-1").stdout
    for name in ("v3", "v4", "v5"):
        assert mint(work, "show", "--json", name).stdout == mint(work, "show", "--json").stdout
    assert mint(work, "tag", "-a", "v8", ok=False).returncode == 2  # no message: no editor opens
    mint(work, "gc")
    git_fsck(work)
    assert git(work / ".mint", *listing).stdout == git(twin, *listing).stdout


def test_a_step_with_no_name_before_it_is_refused_not_read_from_head(work: Path) -> None:
    # `show ~1` read HEAD~1 (only log refused it); git reads no HEAD into `~1`, `^` or `^{}`.
    mutate(work, seed=36)
    mint(work, "commit", "-m", "second")
    before = git(work / ".mint", "for-each-ref").stdout
    for spec in ("~1", "~", "^", "^1", "^{}", "^{commit}"):
        assert git(work / ".mint", "rev-parse", spec, ok=False).returncode == 128, spec
        for args in (("show", spec), ("tag", "t", spec), ("checkout", spec), ("diff", spec)):
            result = mint(work, *args, ok=False)
            assert result.returncode == 128, (args, result.stderr)
            assert f"invalid revision {spec!r}: no branch, tag or commit id before" in (
                result.stderr
            ), args
    assert git(work / ".mint", "for-each-ref").stdout == before
    assert mint(work, "show", "--json", "@~1").returncode == 0


def test_an_empty_revision_is_refused_not_read_as_head(work: Path) -> None:
    # `tag prod "$REV"` with REV unset tagged HEAD (so did branch, checkout and checkout -b);
    # git refuses an empty revision. `@` alone still means HEAD, as in git 2.45 on.
    mutate(work, seed=35)
    mint(work, "commit", "-m", "second")
    before = git(work / ".mint", "for-each-ref").stdout
    for args in (
        ("tag", "t", ""),
        ("tag", "-m", "x", "t", ""),
        ("branch", "b", ""),
        ("checkout", ""),
        ("checkout", "-b", "b", ""),
    ):
        result = mint(work, *args, ok=False)
        assert result.returncode == 128 and "invalid revision ''" in result.stderr, args
    assert git(work / ".mint", "for-each-ref").stdout == before
    assert (work / ".mint" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert mint(work, "checkout", "@").stderr == "Already on 'main'\n"
    assert (work / ".mint" / "HEAD").read_text() == "ref: refs/heads/main\n"
    head, first = (git(work / ".mint", "rev-parse", r).stdout.strip() for r in ("@", "@~1"))
    mint(work, "tag", "t", "@^")
    mint(work, "branch", "b", "@~1")
    assert git(work / ".mint", "rev-parse", "t", "b").stdout.split() == [first, first]
    assert json.loads(mint(work, "checkout", "@~", "--json").stdout)["commit"] == first
    assert mint(work, "log", "--oneline", "@").stdout.count("\n") == 1
    mint(work, "checkout", "main")
    assert json.loads(mint(work, "reset", "@^", "--json").stdout)["commit"] == first
    assert json.loads(mint(work, "reset", "@{1}", "--json").stdout)["commit"] == head


def test_error_lines_name_arguments_as_given_not_in_python_repr(work: Path) -> None:
    # `unknown revision 'nope\udcff'` (a Python surrogate for a byte), 'a\\b' (a doubled
    # backslash) and "it's" (switched quotes): git names the argument as it is, in single
    # quotes, its bytes as given (`'nope<FF>'`).
    cases = {
        "nope\udcff": "unknown revision 'nope\udcff'",  # the byte 0xff, raw, as git writes it
        "a\\b": "unknown revision 'a\\b'",
        "it's": "unknown revision 'it's'",
        "main~1x": "unknown revision 'main~1x'",
        "nope\x1b[31m": "revision 'nope\\x1b[31m'",  # what would drive the terminal is escaped
    }
    for spec, said in cases.items():
        for command in ("log", "show"):
            line = mint_fails(work, command, spec)
            assert said in line and "\\udc" not in line and "\\\\" not in line, line
    assert "'k' is not KEY=VALUE" in mint(work, "commit", "-m", "x", "--meta", "k", ok=False).stderr
