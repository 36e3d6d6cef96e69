"""Every CLI verb, run as a real `mintvcs` process, with real git reading what we wrote."""

from __future__ import annotations

import fcntl
import filecmp
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mintvcs.base import fingerprint
from mintvcs.safetensors_file import parse_layout
from tests.mintvcs.storekit import (
    CONFIG,
    ENV,
    WEIGHTS,
    copy_adapter,
    git,
    git_fsck,
    git_log,
    mint,
    mint_fails,
    mutate,
    tensor_names,
    write_safetensors,
)


@pytest.fixture
def work(tmp_path: Path, tiny_base: Path, peft_adapter: Path) -> Path:
    """A repository of tiny_base whose work tree holds the fp32 PEFT adapter, nothing committed."""
    work = tmp_path / "work"
    mint(tmp_path, "init", str(work), "--base-model", str(tiny_base))
    copy_adapter(peft_adapter, work)
    return work


def head(work: Path) -> str:
    """HEAD's commit id, as real git reads it."""
    return git(work / ".mint", "rev-parse", "HEAD").stdout.strip()


def commit(work: Path, message: str, *extra: str) -> str:
    """`mintvcs commit --json`; returns the new id."""
    out = mint(work, "commit", "-m", message, "--json", *extra)
    return str(json.loads(out.stdout)["commit"])


def show_json(work: Path, rev: str = "HEAD") -> dict:
    """`mintvcs show --json REV`."""
    return json.loads(mint(work, "show", "--json", rev).stdout)


def new_objects(work: Path, before: set[str]) -> dict[str, str]:
    """Objects (id -> type) that appeared since `before`, as real git lists them."""
    out = git(
        work / ".mint",
        "cat-file",
        "--batch-all-objects",
        "--batch-check=%(objectname) %(objecttype)",
    )
    return {
        oid: kind
        for oid, kind in (line.split() for line in out.stdout.splitlines())
        if oid not in before
    }


def all_objects(work: Path) -> set[str]:
    """Every object id in the store."""
    return set(new_objects(work, set()))


def subset_adapter(src: Path, dst: Path, drop: str) -> Path:
    """A copy of `src` whose safetensors file lacks tensor `drop` (header rewritten by hand)."""
    copy_adapter(src, dst)
    data = (src / WEIGHTS).read_bytes()
    layout = parse_layout(data, "src")
    offset = len(layout.header)
    tensors = {
        t.name: (t.dtype, list(t.shape), data[offset + t.start : offset + t.end])
        for t in layout.tensors
        if t.name != drop
    }
    write_safetensors(dst / WEIGHTS, tensors, layout.metadata)
    return dst


# ------------------------------------------------------------------- init
def test_init_records_base_default_branch_and_hook(tmp_path: Path, tiny_base: Path) -> None:
    out = mint(tmp_path, "init", "repo", "--base-model", str(tiny_base))
    git_dir = tmp_path / "repo" / ".mint"
    assert "Initialized empty mintvcs repository" in out.stdout
    recorded = json.loads((git_dir / "mint-base.json").read_text())
    assert recorded["fingerprint"] == fingerprint(tiny_base)
    assert recorded["fingerprint"][7:19] in out.stdout
    assert git(git_dir, "symbolic-ref", "HEAD").stdout.strip() == "refs/heads/main"
    hook = git_dir / "hooks" / "pre-commit"
    assert hook.is_file() and os.access(hook, os.X_OK)
    git_fsck(tmp_path / "repo")
    # A second init refuses and names the directory.
    line = mint_fails(tmp_path, "init", "repo")
    assert ".mint" in line and "already" in line
    # Without --base-model nothing is recorded; --no-hooks installs no active hook.
    mint(tmp_path, "init", "bare-repo", "--no-hooks")
    assert not (tmp_path / "bare-repo" / ".mint" / "mint-base.json").exists()
    assert not (tmp_path / "bare-repo" / ".mint" / "hooks" / "pre-commit").exists()


# ----------------------------------------------------------------- commit
def test_commit_prints_id_and_git_agrees(work: Path) -> None:
    out = mint(work, "commit", "-m", "first adapter", "--meta", "step=3", "--meta", "run=abc")
    first = head(work)
    assert f"[main (root-commit) {first[:7]}] first adapter" in out.stdout
    assert git(work / ".mint", "log", "-1", "--format=%s").stdout.strip() == "first adapter"
    shown = show_json(work)
    assert shown["commit"] == first
    assert shown["meta"] == {"step": "3", "run": "abc"}
    assert shown["base"]["fingerprint"].startswith("sha256:")
    assert [t["name"] for t in shown["tensors"]] == tensor_names(work)
    assert shown["files"] == ["README.md"]
    text = mint(work, "show", first[:9]).stdout
    assert "meta step: 3" in text and f"commit {first}" in text and "lora: r=8" in text
    # Malformed --meta is a usage error, not a traceback.
    result = mint(work, "commit", "-m", "x", "--meta", "novalue", ok=False)
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr
    # One `error:` line naming the help to read, as for every other refusal (not click's
    # four-line usage block).
    for args in (
        ("commit", "-m", "x", "--meta", "novalue"),
        ("gc", "--bogus"),
        ("nonsense",),
        ("--bogus",),
    ):
        result = mint(work, *args, ok=False)
        lines = result.stderr.splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and "--help" in lines[0]
    git_fsck(work)


def test_show_lists_each_extra_file_with_its_size_loose_or_packed(work: Path) -> None:
    # A trainer's optimizer state can be larger than the adapter: show said only its name.
    (work / "optimizer.pt").write_bytes(os.urandom(3 << 20))  # a loose object, stored blocks
    (work / "notes.txt").write_text("one\n")
    commit(work, "r0", "--no-verify")
    (work / "notes.txt").write_text("one\ntwo\n")
    commit(work, "r1", "--no-verify")
    sizes = {
        name: (work / name).stat().st_size for name in ("README.md", "notes.txt", "optimizer.pt")
    }
    for when in ("loose", "packed"):
        assert show_json(work)["file_bytes"] == sizes, when
        assert show_json(work, "HEAD~1")["file_bytes"]["notes.txt"] == 4, when
        assert f"  file optimizer.pt  {3 << 20:,} bytes" in mint(work, "show").stdout, when
        mint(work, "gc")


def test_unchanged_tensor_adds_no_blob_and_changed_one_is_xor(work: Path) -> None:
    first = commit(work, "first", "--no-verify")
    names = tensor_names(work)
    before = all_objects(work)
    # Same content again is nothing to commit, as in git (exit 1, nothing written)...
    line = mint_fails(work, "commit", "-m", "again", "--no-verify")
    assert "nothing to commit" in line and "--allow-empty" in line
    assert head(work) == first
    # ...unless asked for: then only a commit object is new.
    commit(work, "again", "--no-verify", "--allow-empty")
    assert sorted(new_objects(work, before).values()) == ["commit"]
    # One tensor changes: one new tensor blob and a new manifest, nothing else of blob type.
    before = all_objects(work)
    mutate(work, seed=1, names=[names[0]])
    third = commit(work, "one tensor", "--no-verify")
    added = new_objects(work, before)
    assert sorted(added.values()).count("blob") == 2, added
    a, c = show_json(work, first), show_json(work, third)
    assert [t["blob"] for t in a["tensors"][1:]] == [t["blob"] for t in c["tensors"][1:]]
    assert c["tensors"][0]["blob"] != a["tensors"][0]["blob"]
    assert c["tensors"][0]["blob"] in added
    assert c["tensors"][0]["encoding"] == "xor" and c["tensors"][0]["depth"] == 1
    assert a["tensors"][0]["encoding"] != "xor" and a["tensors"][0]["depth"] == 0
    git_fsck(work)


def test_commit_from_directory_leaves_work_tree_alone(work: Path, tmp_path: Path) -> None:
    commit(work, "first", "--no-verify")
    other = copy_adapter(work, tmp_path / "elsewhere")
    mutate(other, seed=5)
    before = (work / WEIGHTS).read_bytes()
    second = commit(work, "from elsewhere", "--from", str(other))
    assert (work / WEIGHTS).read_bytes() == before
    # The work tree now differs from HEAD; a checkout of HEAD~0 into a fresh place gives `other`.
    state = json.loads(mint(work, "status", "--json").stdout)
    assert not state["clean"] and state["head"] == second
    mint(work, "checkout", "--force", second)
    assert filecmp.cmp(work / WEIGHTS, other / WEIGHTS, shallow=False)


def test_commit_branch_feeds_a_branch_whatever_head_is(work: Path, tmp_path: Path) -> None:
    # A trainer commits with --from onto main; someone checks out a tag meanwhile (detached
    # HEAD). Without --branch the trainer's commits went to the detached HEAD and main stopped.
    first = commit(work, "first", "--no-verify")
    mint(work, "tag", "prod")
    mint(work, "checkout", "prod")
    trainer = copy_adapter(work, tmp_path / "trainer")
    mutate(trainer, seed=9)
    out = json.loads(
        mint(
            work, "commit", "-m", "step 2", "--from", str(trainer), "--branch", "main", "--json"
        ).stdout
    )
    assert out["branch"] == "main" and out["parent"] == first
    assert git(work / ".mint", "rev-parse", "main").stdout.strip() == out["commit"]
    assert head(work) == first  # HEAD stays detached at prod
    assert json.loads(mint(work, "status", "--json").stdout)["clean"]
    assert "does not exist" in mint_fails(
        work, "commit", "-m", "x", "--from", str(trainer), "--branch", "nope"
    )
    again = mint_fails(work, "commit", "-m", "x", "--from", str(trainer), "--branch", "main")
    assert "identical to main" in again


# -------------------------------------------------------------------- log
def test_log_oneline_limit_ref_and_json(work: Path) -> None:
    ids = [commit(work, "rev 0", "--no-verify")]
    for i in range(1, 3):
        mutate(work, seed=i)
        ids.append(commit(work, f"rev {i}", "--no-verify"))
    mint(work, "branch", "old", ids[0])
    lines = mint(work, "log", "--oneline").stdout.splitlines()
    assert [line.split()[0] for line in lines] == [i[:7] for i in reversed(ids)]
    assert "(HEAD -> main)" in lines[0] and lines[0].endswith("rev 2")
    assert "old" in lines[-1]
    assert len(mint(work, "log", "--oneline", "-n", "2").stdout.splitlines()) == 2
    assert mint(work, "log", "--oneline", "old").stdout.split()[0] == ids[0][:7]
    full = mint(work, "log", "-n", "1").stdout
    assert (
        f"commit {ids[2]}" in full
        and "Author: Tester <tester@example.com>" in full
        and "    rev 2" in full
    )
    parsed = json.loads(mint(work, "log", "--json").stdout)
    assert [c["commit"] for c in parsed] == list(reversed(ids))
    assert parsed[0]["parents"] == [ids[1]]
    # Real git sees the same history.
    assert git_log(work) == list(reversed(ids))
    git_fsck(work)


def test_log_prints_page_by_page_and_stops_quietly_when_the_reader_goes(
    tmp_path: Path, peft_adapter: Path
) -> None:
    from mintvcs import porcelain
    from mintvcs.cli import LOG_FIRST_PAGE

    work = copy_adapter(peft_adapter, tmp_path / "work")
    repo = porcelain.init(work, None, install_hooks=False)
    ids = [
        porcelain.commit(
            repo, f"rev {i}", verify=False, show_progress=False, allow_empty=True
        ).commit
        for i in range(LOG_FIRST_PAGE + 40)
    ]
    ids.reverse()  # newest first, as log prints them
    # Labels in the first page and in the second (each page looks its commits' labels up).
    porcelain.tag_create(repo, "early", ids[LOG_FIRST_PAGE + 5])
    porcelain.branch_create(repo, "mid", ids[3])
    repo.close()
    lines = mint(work, "log", "--oneline").stdout.splitlines()
    assert [line.split()[0] for line in lines] == [i[:7] for i in ids]
    assert lines[0].startswith(f"{ids[0][:7]} (HEAD -> main) rev")
    assert f"{ids[3][:7]} (mid) " in lines[3]
    assert f"{ids[LOG_FIRST_PAGE + 5][:7]} (tag: early) " in lines[LOG_FIRST_PAGE + 5]
    full = mint(work, "log").stdout
    assert full.count("\ncommit ") == len(ids) - 1 and "\n\n\n" not in full
    # --json is written page by page too: one array, as json.dumps would write it whole.
    text = mint(work, "log", "--json").stdout
    parsed = json.loads(text)
    assert text == json.dumps(parsed, indent=2, sort_keys=True) + "\n"
    assert [c["commit"] for c in parsed] == ids
    assert parsed[3]["refs"] == ["mid"] and parsed[LOG_FIRST_PAGE + 5]["refs"] == ["tag: early"]
    assert mint(work, "log", "--json", "-n", "0").stdout == "[]\n"
    # `mintvcs log | head -1`: the reader goes after one line; log dies of SIGPIPE as git does
    # (it exited 141, which only a shell reads as the signal), quietly. A pipe of one page: the
    # log's 19 kB cannot all be written before the reader goes, however late the reader is woken
    # (a 64 kB pipe took it all, and a reader 50 ms late found log exited 0).
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mintvcs.cli", "log"],
        cwd=work,
        env=ENV,
        stdout=write_end,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    with open(read_end, "rb") as reader:
        assert reader.readline().startswith(b"commit ")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGPIPE and err == b"", err.decode()


# ------------------------------------------------------------------- diff
def _floats(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    layout = parse_layout(data, str(path))
    off = len(layout.header)
    return {
        t.name: np.frombuffer(data[off + t.start : off + t.end], "<f4").astype(np.float64)
        for t in layout.tensors
    }


def test_diff_revisions_json_matches_numpy(work: Path, tmp_path: Path) -> None:
    first = commit(work, "first", "--no-verify")
    a = _floats(work / WEIGHTS)
    name = tensor_names(work)[1]
    mutate(work, seed=3, names=[name], scale=1e-2)
    b = _floats(work / WEIGHTS)
    second = commit(work, "second", "--no-verify")
    result = json.loads(mint(work, "diff", first, second, "--json").stdout)
    assert (result["a"], result["b"]) == (first, second)
    assert not result["config_changed"] and result["files_changed"] == []
    by_name = {t["name"]: t for t in result["tensors"]}
    assert set(by_name) == set(a)
    changed = by_name[name]
    assert changed["status"] == "modified" and changed["shape_a"] == changed["shape_b"]
    expected_rel = np.linalg.norm(b[name] - a[name]) / np.linalg.norm(a[name])
    expected_cos = a[name] @ b[name] / (np.linalg.norm(a[name]) * np.linalg.norm(b[name]))
    assert changed["rel_l2"] == pytest.approx(expected_rel, rel=1e-9) and changed["rel_l2"] > 0
    assert changed["cosine"] == pytest.approx(expected_cos, rel=1e-12) and changed["cosine"] < 1
    assert all(t["status"] == "unchanged" for n, t in by_name.items() if n != name)
    text = mint(work, "diff", first, second).stdout
    assert f"modified  {name}" in text and "1 of 8 tensors changed" in text
    dropped = tensor_names(work)[0]
    smaller = subset_adapter(work, tmp_path / "smaller", dropped)
    # Against the work tree (B omitted).
    mutate(work, seed=4, names=[name])
    wt = json.loads(mint(work, "diff", "HEAD", "--json").stdout)
    assert wt["b"] == "work tree"
    assert [t["name"] for t in wt["tensors"] if t["status"] != "unchanged"] == [name]
    # Added and removed tensors.
    third = commit(work, "drop one", "--from", str(smaller), "--no-verify")
    removed = json.loads(mint(work, "diff", second, third, "--json").stdout)["tensors"]
    assert [
        (t["name"], t["status"], t["shape_b"]) for t in removed if t["status"] != "unchanged"
    ] == [(dropped, "removed", None)]
    added = json.loads(mint(work, "diff", third, second, "--json").stdout)["tensors"]
    assert [(t["name"], t["status"]) for t in added if t["status"] != "unchanged"] == [
        (dropped, "added")
    ]
    assert f"removed   {dropped}" in mint(work, "diff", second, third).stdout
    # A dtype change of the same shape compares the values: F32 -> BF16 shows its rounding.
    as_bf16 = tmp_path / "bf16"
    copy_adapter(work, as_bf16)
    shapes = {
        t.name: list(t.shape) for t in parse_layout((work / WEIGHTS).read_bytes(), "w").tensors
    }
    write_safetensors(
        as_bf16 / WEIGHTS,
        {
            n: ("BF16", shapes[n], (v.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes())
            for n, v in _floats(work / WEIGHTS).items()
        },
    )
    fourth = commit(work, "bf16", "--from", str(as_bf16), "--no-verify")
    retyped = json.loads(mint(work, "diff", third, fourth, "--json").stdout)["tensors"]
    assert {t["status"] for t in retyped} == {"retyped", "added"}
    row = next(t for t in retyped if t["status"] == "retyped")
    assert (row["dtype_a"], row["dtype_b"]) == ("F32", "BF16")
    assert 0 < row["rel_l2"] < 0.05 and row["cosine"] > 0.999  # bf16 keeps ~3 digits
    # Extra files: added, removed and modified are told apart.
    (as_bf16 / "notes.md").write_text("v1\n")
    fifth = commit(work, "notes", "--from", str(as_bf16), "--no-verify")
    files = json.loads(mint(work, "diff", fourth, fifth, "--json").stdout)["files"]
    assert files == [{"path": "notes.md", "status": "added"}]
    assert "file notes.md removed" in mint(work, "diff", fifth, fourth).stdout
    (as_bf16 / "notes.md").write_text("v2\n")
    sixth = commit(work, "notes v2", "--from", str(as_bf16), "--no-verify")
    files = json.loads(mint(work, "diff", fifth, sixth, "--json").stdout)["files"]
    assert files == [{"path": "notes.md", "status": "modified"}]
    # Against the work tree: by content, and a mode change is one (as in git).
    (work / "notes.md").write_text("v2\n")
    assert json.loads(mint(work, "diff", sixth, "--json").stdout)["files"] == []
    (work / "notes.md").chmod(0o755)
    files = json.loads(mint(work, "diff", sixth, "--json").stdout)["files"]
    assert files == [{"path": "notes.md", "status": "modified"}]


# ----------------------------------------------------------------- status
def test_a_work_tree_left_behind_by_commit_from_is_told_not_committed_back(
    work: Path, tmp_path: Path
) -> None:
    # A trainer's `commit --from CHECKPOINT` moves the branch the work tree has checked out and
    # leaves the work tree at the old revision. A plain commit of it used to record the old
    # weights on top, silently undoing the trainer's revisions (as git's index would).
    r0 = commit(work, "r0", "--no-verify")
    checkpoint = tmp_path / "checkpoint"
    copy_adapter(work, checkpoint)
    name = tensor_names(checkpoint)[1]
    mutate(checkpoint, seed=3, names=[name])
    r1 = commit(work, "trainer step", "--from", str(checkpoint), "--no-verify")
    state = json.loads(mint(work, "status", "--json").stdout)
    assert not state["clean"] and state["base"] == r0 and state["head"] == r1
    assert f"the work tree holds revision {r0[:7]}" in mint(work, "status").stdout
    (work / "notes.txt").write_text("an edit beside the old weights\n")
    line = mint_fails(work, "commit", "-m", "edit", "--no-verify")
    assert f"holds revision {r0[:7]}, but main has moved to {r1[:7]}" in line
    assert "nothing was committed" in line and head(work) == r1
    mint(work, "branch", "side")
    mutate(checkpoint, seed=5, names=[name])
    commit(work, "side step", "--from", str(checkpoint), "--branch", "side", "--no-verify")
    assert "reset --soft main" in mint_fails(work, "checkout", "side")
    # Taking main's revision: the edit is discarded, and the work tree follows main again.
    mint(work, "checkout", "--force", "main")
    (work / "notes.txt").unlink()  # untracked: --force leaves it, as git does
    assert json.loads(mint(work, "status", "--json").stdout) | {"changes": []} == {
        "branch": "main",
        "detached": False,
        "head": r1,
        "commit": r1,
        "clean": True,
        "changes": [],
        "error": None,
        "base": None,
        "mixed": None,
    }
    # Or keeping the work tree's files as changes to main (git's soft reset): then they commit.
    mutate(checkpoint, seed=4, names=[name])
    r3 = commit(work, "trainer step 3", "--from", str(checkpoint), "--no-verify")
    mint(work, "reset", "--soft", "main")
    assert json.loads(mint(work, "status", "--json").stdout)["base"] is None
    r4 = commit(work, "back to r1's weights", "--no-verify")
    assert git(work / ".mint", "rev-parse", "HEAD~1").stdout.strip() == r3 and head(work) == r4


def test_a_work_tree_switched_without_its_record_is_a_plain_work_tree(
    work: Path, tmp_path: Path
) -> None:
    # A mintvcs older than the work-tree record moves HEAD and rewrites the files without
    # touching it (plain git plumbing and a copy do the same here). The record then names a
    # revision the work tree no longer holds: an edit read as "the branch has moved", the
    # commit was refused, and the advised checkout --force would have dropped the edit.
    r0 = commit(work, "r0", "--no-verify")
    checkpoint = copy_adapter(work, tmp_path / "checkpoint")
    mutate(checkpoint, seed=3, names=[tensor_names(checkpoint)[1]])
    mint(work, "branch", "feature")
    r1 = commit(work, "step", "--from", str(checkpoint), "--branch", "feature", "--no-verify")
    git(work / ".mint", "symbolic-ref", "HEAD", "refs/heads/feature")
    copy_adapter(checkpoint, work)
    assert mint(work, "status").stdout.endswith("nothing to commit, work tree clean\n")
    (work / "README.md").write_text("edited after the switch\n")
    state = json.loads(mint(work, "status", "--json").stdout)
    assert state["base"] is None and state["head"] == r1
    assert [(c["status"], c["path"]) for c in state["changes"]] == [("modified", "README.md")]
    assert "has moved" not in mint(work, "status").stdout
    r2 = commit(work, "edit", "--no-verify")
    assert git(work / ".mint", "rev-parse", "HEAD~1").stdout.strip() == r1
    assert (
        git(work / ".mint", "show", f"{r2}:files/README.md").stdout == "edited after the switch\n"
    )
    # While the weights still hold the record's revision (or neither: retrained in place), the
    # record is believed: a `commit --from` onto the branch is still told, not committed back.
    mint(work, "checkout", "main")
    assert head(work) == r0
    r3 = commit(work, "main step", "--from", str(checkpoint), "--no-verify")
    mutate(work, seed=8, names=[tensor_names(work)[1]])
    assert json.loads(mint(work, "status", "--json").stdout)["base"] == r0
    line = mint_fails(work, "commit", "-m", "retrained", "--no-verify")
    assert f"holds revision {r0[:7]}, but main has moved to {r3[:7]}" in line


def test_status_clean_modified_added_removed(work: Path, tmp_path: Path) -> None:
    state = json.loads(mint(work, "status", "--json").stdout)
    assert state["head"] is None and not state["clean"]
    assert "No commits yet" in mint(work, "status").stdout
    commit(work, "first", "--no-verify")
    assert "nothing to commit, work tree clean" in mint(work, "status").stdout
    assert json.loads(mint(work, "status", "--json").stdout)["clean"] is True
    name = tensor_names(work)[2]
    mutate(work, seed=9, names=[name])
    (work / "notes.txt").write_text("eval notes\n")
    (work / "README.md").unlink()
    state = json.loads(mint(work, "status", "--json").stdout)
    assert state["branch"] == "main" and not state["clean"]
    assert sorted((c["status"], c["path"]) for c in state["changes"]) == [
        ("added", "notes.txt"),
        ("modified", f"{WEIGHTS}:{name}"),
        ("removed", "README.md"),
    ]
    text = mint(work, "status").stdout
    assert "On branch main" in text and f"modified:  {WEIGHTS}:{name}" in text
    # A tensor removed from the weights file.
    smaller = subset_adapter(work, tmp_path / "smaller", name)
    copy_adapter(smaller, work)
    changes = json.loads(mint(work, "status", "--json").stdout)["changes"]
    assert {"status": "removed", "path": f"{WEIGHTS}:{name}"} in changes
    # A config change.
    (work / CONFIG).write_bytes((work / CONFIG).read_bytes().replace(b'"r": 8', b'"r": 9'))
    changes = json.loads(mint(work, "status", "--json").stdout)["changes"]
    assert {"status": "modified", "path": CONFIG} in changes


def test_status_lists_a_deleted_weights_or_config_file_as_removed(work: Path) -> None:
    # Deleting only the weights file said "work tree is not a readable adapter"; git status
    # lists a deleted file, and so did ours when every file was gone.
    commit(work, "first", "--no-verify")
    weights = (work / WEIGHTS).read_bytes()
    (work / WEIGHTS).unlink()
    (work / "notes.txt").write_text("eval notes\n")
    state = json.loads(mint(work, "status", "--json").stdout)
    assert state["error"] is None and not state["clean"]
    assert state["changes"] == [
        {"status": "removed", "path": WEIGHTS},
        {"status": "added", "path": "notes.txt"},
    ]
    (work / WEIGHTS).write_bytes(weights)
    (work / CONFIG).unlink()
    assert "removed:   adapter_config.json" in mint(work, "status").stdout


# ----------------------------------------------------------------- branch
def test_branch_create_list_force_delete(work: Path) -> None:
    first = commit(work, "first", "--no-verify")
    mutate(work, seed=1)
    second = commit(work, "second", "--no-verify")
    mint(work, "branch", "dev")
    mint(work, "branch", "old", first)
    rows = {r["name"]: r for r in json.loads(mint(work, "branch", "--json").stdout)}
    assert {n: (r["commit"], r["current"]) for n, r in rows.items()} == {
        "dev": (second, False),
        "main": (second, True),
        "old": (first, False),
    }
    listing = mint(work, "branch", "--list").stdout.splitlines()
    assert f"* main  {second[:7]}" in listing and f"  old  {first[:7]}" in listing
    assert git(work / ".mint", "rev-parse", "refs/heads/old").stdout.strip() == first
    line = mint_fails(work, "branch", "dev", first)
    assert "'dev' already exists" in line
    mint(work, "branch", "-f", "dev", first)
    assert git(work / ".mint", "rev-parse", "dev").stdout.strip() == first
    line = mint_fails(work, "branch", "-d", "main")
    assert "main" in line and "checked out" in line
    out = mint(work, "branch", "-d", "dev").stdout
    assert f"Deleted branch dev (was {first[:7]})" in out
    assert "dev" not in mint(work, "branch").stdout
    assert "'dev' not found" in mint_fails(work, "branch", "-d", "dev")
    assert (
        git(work / ".mint", "rev-parse", "--verify", "-q", "refs/heads/dev", ok=False).returncode
        != 0
    )
    git_fsck(work)
    mint(work, "checkout", first)  # detached: git lists where HEAD is first
    assert mint(work, "branch").stdout.splitlines()[0] == f"* (HEAD detached at {first[:7]})"


def test_branch_d_keeps_unmerged_work_unless_capital_d(work: Path, tmp_path: Path) -> None:
    commit(work, "first", "--no-verify")
    mint(work, "checkout", "-b", "exp")
    mutate(work, seed=4)
    exp = commit(work, "experiment", "--no-verify")
    mint(work, "checkout", "main")
    line = mint_fails(work, "branch", "-d", "exp")
    assert "not fully merged" in line and exp[:7] in line and "-D" in line
    assert git(work / ".mint", "rev-parse", "exp").stdout.strip() == exp
    assert f"Deleted branch exp (was {exp[:7]})" in mint(work, "branch", "-D", "exp").stdout
    git_fsck(work)


def test_branch_m_tells_the_ref_update_hook_of_both_names(work: Path, tmp_path: Path) -> None:
    # Servers following refs learn of a rename as of a create and a delete: the new name
    # first, so that it serves before the old one is gone.
    first = commit(work, "first", "--no-verify")
    mint(work, "branch", "exp")
    calls = tmp_path / "calls"
    hook = work / ".mint" / "hooks" / "ref-update"
    hook.write_text(f"#!/bin/sh\necho \"$@\" >> '{calls}'\n")
    hook.chmod(0o755)
    mint(work, "branch", "-m", "exp", "exp2")
    zero = "0" * 40
    assert calls.read_text().splitlines() == [
        f"refs/heads/exp2 {zero} {first}",
        f"refs/heads/exp {first} {zero}",
    ]


def test_a_tag_and_a_branch_of_one_name_resolve_as_git_does(work: Path) -> None:
    first = commit(work, "first", "--no-verify")
    mutate(work, seed=5)
    second = commit(work, "second", "--no-verify")
    mint(work, "tag", "dup", first)
    mint(work, "branch", "dup", second)
    git_dir = work / ".mint"
    assert git(git_dir, "rev-parse", "dup").stdout.strip() == first  # git: the tag wins
    shown = mint(work, "show", "--json", "dup")
    assert json.loads(shown.stdout)["commit"] == first
    assert "warning: refname 'dup' is ambiguous" in shown.stderr
    # The name is quoted without its suffix, as git's `refname 'dup' is ambiguous.` for dup~0.
    assert "warning: refname 'dup' is ambiguous" in mint(work, "log", "-1", "dup~0").stderr
    # checkout of a branch name switches to the branch, as `git checkout dup` does, with the
    # warning git's checkout gives too.
    switched = mint(work, "checkout", "dup").stderr
    assert switched.startswith(
        "warning: refname 'dup' is ambiguous (refs/tags/dup and refs/heads/dup); using "
        "refs/heads/dup\n"
    )
    assert git(git_dir, "symbolic-ref", "HEAD").stdout.strip() == "refs/heads/dup"
    assert head(work) == second
    assert "Already on 'dup'" in mint(work, "checkout", "--force", "dup").stderr


def test_log_json_carries_meta_and_refs(work: Path) -> None:
    first = commit(work, "first", "--no-verify", "--meta", "step=100", "--meta", "reward=0.5")
    mutate(work, seed=6)
    second = commit(work, "second", "--no-verify", "--meta", "step=200")
    mint(work, "tag", "prod", first)
    rows = json.loads(mint(work, "log", "--json").stdout)
    assert [(r["commit"], r["meta"]) for r in rows] == [
        (second, {"step": "200"}),
        (first, {"reward": "0.5", "step": "100"}),
    ]
    assert rows[0]["refs"] == ["HEAD -> main"] and rows[1]["refs"] == ["tag: prod"]
    mutate(work, seed=7)
    result = mint(work, "commit", "-m", "x", "--meta", "step=1", "--meta", "step=2", ok=False)
    assert result.returncode != 0 and "'step' given twice" in result.stderr


def test_init_refuses_a_base_model_path_that_does_not_exist(tmp_path: Path) -> None:
    line = mint_fails(tmp_path, "init", str(tmp_path / "r"), "--base-model", "./no-such-base")
    assert "no such directory" in line and "./no-such-base" in line
    assert not (tmp_path / "r" / ".mint").exists()
    # A hub id (org/name) is still an id.
    mint(tmp_path, "init", str(tmp_path / "r2"), "--base-model", "meta-llama/Llama-3-8B")


def test_init_names_a_hub_cache_snapshot_by_its_hub_id_and_takes_base_model_id(
    tmp_path: Path, tiny_base: Path
) -> None:
    # A snapshot of the hub cache was recorded as its revision hash, and nothing could name it.
    from huggingface_hub.file_download import repo_folder_name

    for repo_id in ("meta-llama/Llama-3-8B", "gpt2"):
        folder = repo_folder_name(repo_id=repo_id, repo_type="model")
        snapshot = tmp_path / "hub" / folder / "snapshots" / ("0123abcd" * 5)
        shutil.copytree(tiny_base, snapshot)
        work = tmp_path / folder
        out = mint(tmp_path, "init", str(work), "--base-model", str(snapshot), "--json")
        assert json.loads(out.stdout)["base_model"] == repo_id
    # The id a user gives wins; ".", the current directory, is named as the directory.
    out = mint(
        tmp_path, "init", "named", "--base-model", str(snapshot), "--base-model-id", "mine/v2"
    )
    assert "base model: mine/v2 (" in out.stdout
    recorded = json.loads((tmp_path / "named" / ".mint" / "mint-base.json").read_text())
    assert recorded["id"] == "mine/v2" and recorded["fingerprint"] == fingerprint(tiny_base)
    out = mint(tiny_base, "init", str(tmp_path / "dot"), "--base-model", ".")
    assert f"base model: {tiny_base.name} (" in out.stdout
    # An id needs a directory to name, and must be a name: usage errors, as the empty one.
    for misuse in (["--base-model", "org/x", "--base-model-id", "y"], ["--base-model-id", "y"]):
        result = mint(tmp_path, "init", "r3", *misuse, ok=False)
        assert result.returncode == 2 and "error: --base-model-id" in result.stderr
        # One line naming the help, as every usage error's (docs/cli.md, exit 2).
        assert result.stderr.count("\n") == 1 and result.stderr.endswith(" init --help')\n"), (
            result.stderr
        )
        assert not (tmp_path / "r3" / ".mint").exists()
    result = mint(
        tmp_path, "init", "r4", "--base-model", str(snapshot), "--base-model-id", "", ok=False
    )
    assert result.returncode == 2 and "--base-model-id" in result.stderr


# -------------------------------------------------------------------- tag
def test_tags_lightweight_annotated_delete_force(work: Path) -> None:
    first = commit(work, "first", "--no-verify")
    mutate(work, seed=1)
    second = commit(work, "second", "--no-verify")
    mint(work, "tag", "v1", first)
    out = json.loads(mint(work, "tag", "prod", "-m", "release candidate", "--json").stdout)
    assert out["commit"] == second and out["value"] != second
    git_dir = work / ".mint"
    assert git(git_dir, "cat-file", "-t", "v1").stdout.strip() == "commit"
    assert git(git_dir, "cat-file", "-t", "prod").stdout.strip() == "tag"
    assert git(git_dir, "rev-parse", "prod^{commit}").stdout.strip() == second
    assert "release candidate" in git(git_dir, "tag", "-n1", "prod").stdout
    assert mint(work, "tag").stdout.split() == ["prod", "v1"]
    assert {t["name"]: t["commit"] for t in json.loads(mint(work, "tag", "--json").stdout)} == {
        "prod": second,
        "v1": first,
    }
    git_fsck(work)
    assert "tag 'v1' already exists" in mint_fails(work, "tag", "v1", second)
    mint(work, "tag", "-f", "v1", second)
    assert git(git_dir, "rev-parse", "v1").stdout.strip() == second
    mint(work, "tag", "-f", "prod", first, "-m", "moved back")
    assert git(git_dir, "rev-parse", "prod^{commit}").stdout.strip() == first
    assert "Deleted tag 'v1'" in mint(work, "tag", "-d", "v1").stdout
    assert mint(work, "tag").stdout.split() == ["prod"]
    assert "'v1' not found" in mint_fails(work, "tag", "-d", "v1")
    # The log decorates tagged commits.
    assert "tag: prod" in mint(work, "log", "--oneline").stdout.splitlines()[-1]
    git_fsck(work)


# --------------------------------------------------------------- checkout
def test_checkout_every_kind_of_ref(work: Path) -> None:
    ids = [commit(work, "rev 0", "--no-verify")]
    snapshots = [(work / WEIGHTS).read_bytes()]
    for i in range(1, 4):
        mutate(work, seed=i)
        ids.append(commit(work, f"rev {i}", "--no-verify"))
        snapshots.append((work / WEIGHTS).read_bytes())
    mint(work, "tag", "v1", ids[1], "-m", "annotated")
    mint(work, "branch", "two", ids[2])

    def at(i: int) -> None:
        assert (work / WEIGHTS).read_bytes() == snapshots[i]
        assert head(work) == ids[i]
        assert json.loads(mint(work, "status", "--json").stdout)["clean"]

    assert "Switched to branch 'two'" in mint(work, "checkout", "two").stderr
    at(2)
    assert git(work / ".mint", "symbolic-ref", "HEAD").stdout.strip() == "refs/heads/two"
    assert "detached" in mint(work, "checkout", "v1").stderr
    at(1)
    assert git(work / ".mint", "symbolic-ref", "-q", "HEAD", ok=False).returncode != 0
    mint(work, "checkout", ids[0])
    at(0)
    mint(work, "checkout", ids[3][:8])
    at(3)
    mint(work, "checkout", "main~2")
    at(1)
    mint(work, "checkout", "main")
    at(3)
    assert "Switched to a new branch 'fix'" in mint(work, "checkout", "-b", "fix", "main~3").stderr
    at(0)
    assert git(work / ".mint", "symbolic-ref", "HEAD").stdout.strip() == "refs/heads/fix"
    # A commit on the new branch moves it, not main.
    mutate(work, seed=77)
    fix = commit(work, "on fix", "--no-verify")
    assert git(work / ".mint", "rev-parse", "fix", "main").stdout.split() == [fix, ids[3]]
    # `checkout HEAD` stays on the branch, as in git.
    mint(work, "checkout", "HEAD")
    assert git(work / ".mint", "symbolic-ref", "HEAD").stdout.strip() == "refs/heads/fix"
    # HEAD's reflog is what git reads.
    assert (
        "checkout: moving from main to fix" in git(work / ".mint", "reflog", "show", "HEAD").stdout
    )
    git_fsck(work)


def test_checkout_warns_of_commits_left_behind(work: Path) -> None:
    """As git: leaving a detached HEAD names the commits no branch or tag holds, and how to keep them."""
    first = commit(work, "first", "--no-verify")
    mutate(work, seed=1)
    commit(work, "second", "--no-verify")
    mint(work, "checkout", first)
    # Nothing of its own on the detached HEAD: main holds it, nothing to say.
    left = mint(work, "checkout", "main")
    assert "behind" not in left.stderr
    mint(work, "checkout", first)
    lost = []
    for seed in range(2, 7):
        mutate(work, seed=seed)
        lost.insert(0, commit(work, f"lost {seed}", "--no-verify"))
    # Moving to a commit that holds the detached one leaves nothing behind either.
    mint(work, "checkout", lost[1])
    assert "behind" not in mint(work, "checkout", lost[0]).stderr
    moved = mint(work, "checkout", "main", "--json")
    assert json.loads(moved.stdout)["left_behind"] == lost
    mint(work, "checkout", lost[0])
    text = mint(work, "checkout", "main").stderr.splitlines()
    assert text[0] == (
        "warning: you are leaving 5 commits behind, not connected to any of your branches or tags:"
    )
    # git lists four, newest first, then a count.
    assert text[1:6] == [
        *(f"  {oid[:7]} lost {seed}" for oid, seed in zip(lost, range(6, 2, -1), strict=False)),
        " ... and 1 more.",
    ]
    assert text[-2] == f"  mintvcs branch <new-branch-name> {lost[0][:7]}"
    assert text[-1] == "Switched to branch 'main'"  # on stderr too, after the warning, as git's
    # A tag keeps them: nothing is left behind.
    mint(work, "tag", "keep", lost[0], "-m", "annotated")
    mint(work, "checkout", lost[0])
    assert json.loads(mint(work, "checkout", "main", "--json").stdout)["left_behind"] == []


def test_leaving_a_detached_head_behind_its_target_reads_no_branch_tip(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back from `main~1` to main: main holds the old HEAD, found by walking from main, so the
    commits of 10^5 per-user branches are not read to say that nothing is left behind."""
    from mintvcs import porcelain
    from mintvcs.store import Repository

    repo = Repository.open(work)
    for seed in range(3):
        mutate(work, seed=seed)
        porcelain.commit(repo, f"step {seed}", verify=False, show_progress=False)
    main = repo.resolve("main")
    tree = repo.commit_info(main).tree
    who = "T <t@example.com> 1700000000 +0000"
    users = [repo.write_commit(tree, [main], f"user {n}", who, who) for n in range(40)]
    updates = "".join(f"create refs/heads/u/p{n}\0{oid}\0" for n, oid in enumerate(users))
    git(work / ".mint", "update-ref", "-z", "--stdin", input_text=updates)
    porcelain.checkout(repo, "main~2")
    read: list[str] = []
    commit_info = repo.commit_info

    def counting(oid: str) -> object:
        read.append(oid)
        return commit_info(oid)

    monkeypatch.setattr(repo, "commit_info", counting)
    assert porcelain.checkout(repo, "main").left_behind == ()
    assert not set(read) & set(users), "a branch tip was read"
    assert len(read) < 10, read


def test_checkout_refuses_dirty_work_tree_unless_forced(work: Path) -> None:
    first = commit(work, "first", "--no-verify")
    mutate(work, seed=1)
    second = commit(work, "second", "--no-verify")
    mutate(work, seed=2)
    dirty = (work / WEIGHTS).read_bytes()
    line = mint_fails(work, "checkout", first)
    assert "local changes would be overwritten" in line and "--force" in line and WEIGHTS in line
    assert (work / WEIGHTS).read_bytes() == dirty and head(work) == second
    # Switching to a branch at the same commit keeps the changes, as in git.
    mint(work, "checkout", "-b", "same", "HEAD")
    assert (work / WEIGHTS).read_bytes() == dirty
    mint(work, "checkout", "--force", first)
    assert head(work) == first
    assert json.loads(mint(work, "status", "--json").stdout)["clean"]


def test_checkout_restores_and_removes_extra_files(work: Path) -> None:
    (work / "tokenizer_extra.json").write_text("{}\n")
    script = work / "scripts" / "run.sh"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    first = commit(work, "with readme", "--no-verify")
    readme = (work / "README.md").read_bytes()
    (work / "README.md").unlink()
    (work / "NOTES.md").write_text("new notes\n")
    second = commit(work, "notes instead", "--no-verify")
    assert show_json(work, second)["files"] == [
        "NOTES.md",
        "scripts/run.sh",
        "tokenizer_extra.json",
    ]
    mint(work, "checkout", first)
    assert (work / "README.md").read_bytes() == readme
    assert not (work / "NOTES.md").exists()
    assert script.stat().st_mode & stat.S_IXUSR
    mint(work, "checkout", second)
    assert not (work / "README.md").exists() and (work / "NOTES.md").read_text() == "new notes\n"
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(".") and p.name != ".mint"]
    assert leftovers == []


def test_checkout_with_head_locked_touches_nothing(work: Path) -> None:
    first = commit(work, "first", "--no-verify")
    mutate(work, seed=1)
    second = commit(work, "second", "--no-verify")
    before = (work / WEIGHTS).read_bytes()
    lock = work / ".mint" / "HEAD.lock"
    lock.write_text("")
    for args in (("checkout", first), ("checkout", "--force", first), ("reset", "--hard", first)):
        line = mint_fails(work, *args)
        assert "HEAD.lock exists" in line, line
        assert (work / WEIGHTS).read_bytes() == before and head(work) == second
    lock.unlink()
    (work / ".mint" / "refs" / "heads" / "main.lock").write_text("")
    assert "main.lock exists" in mint_fails(work, "reset", "--hard", first)
    assert (work / WEIGHTS).read_bytes() == before and head(work) == second
    (work / ".mint" / "refs" / "heads" / "main.lock").unlink()
    assert json.loads(mint(work, "status", "--json").stdout)["clean"]


def test_checkout_allows_what_loses_nothing(work: Path, tmp_path: Path) -> None:
    # The README's quickstart: commit --from leaves the work tree at the older revision, which is
    # exactly what the tag names: checking it out loses nothing, so no --force is needed.
    first = commit(work, "step 100", "--no-verify")
    other = copy_adapter(work, tmp_path / "other")
    mutate(other, seed=3)
    commit(work, "step 200", "--no-verify", "--from", str(other))
    mint(work, "tag", "prod", "HEAD~1")
    assert not json.loads(mint(work, "status", "--json").stdout)["clean"]
    mint(work, "checkout", "prod")
    assert head(work) == first
    assert json.loads(mint(work, "status", "--json").stdout)["clean"]
    # A file no revision has stays, as an untracked file does in git, and blocks nothing.
    (work / "notes.txt").write_text("mine\n")
    mint(work, "checkout", "main")
    assert (work / "notes.txt").read_text() == "mine\n"
    mint(work, "checkout", "prod")
    assert (work / "notes.txt").read_text() == "mine\n"
    # A file the target would overwrite with other content is a change that would be lost.
    (work / "notes.txt").unlink()
    (work / "sub").mkdir()
    (work / "sub" / "keep.txt").write_text("v1\n")
    with_file = commit(work, "with a file", "--no-verify")
    (work / "sub" / "keep.txt").write_text("edited\n")
    line = mint_fails(work, "checkout", "main")
    assert "sub/keep.txt" in line and "--force" in line
    assert (work / "sub" / "keep.txt").read_text() == "edited\n" and head(work) == with_file
    # A clean switch removes the file the target lacks, and the directory it leaves empty.
    mint(work, "checkout", "--force", with_file)
    mint(work, "checkout", "main")
    assert not (work / "sub").exists()
    # An emptied work tree holds nothing to lose: checkout brings the revision back.
    for path in work.iterdir():
        if path.is_file():
            path.unlink()
    mint(work, "checkout", "prod")
    assert json.loads(mint(work, "status", "--json").stdout)["clean"]
    git_fsck(work)


def test_checkout_refuses_to_overwrite_an_untracked_file_the_target_tracks(work: Path) -> None:
    # git: "untracked working tree files would be overwritten by checkout". The file is in no
    # revision of HEAD, but the target writes it: checking out would lose the user's bytes.
    first = commit(work, "first", "--no-verify")
    (work / "sub").mkdir()
    (work / "sub" / "keep.txt").write_text("v1\n")
    with_file = commit(work, "with a file", "--no-verify")
    mint(work, "checkout", first)
    assert not (work / "sub").exists()
    (work / "sub").mkdir()
    (work / "sub" / "keep.txt").write_text("mine, untracked\n")
    line = mint_fails(work, "checkout", with_file)
    assert "sub/keep.txt" in line and "--force" in line
    assert (work / "sub" / "keep.txt").read_text() == "mine, untracked\n" and head(work) == first
    mint(work, "checkout", "--force", with_file)
    assert (work / "sub" / "keep.txt").read_text() == "v1\n" and head(work) == with_file


def test_checkout_replaces_a_hard_linked_weights_file(work: Path, tmp_path: Path) -> None:
    # A trainer's output linked into the work tree (cp -l, ln): git replaces the file, so the
    # other name keeps its bytes; writing in place would change both.
    first = commit(work, "first", "--no-verify")
    first_bytes = (work / WEIGHTS).read_bytes()
    mutate(work, seed=7)
    commit(work, "second", "--no-verify")
    second_bytes = (work / WEIGHTS).read_bytes()
    assert len(second_bytes) == len(first_bytes) and second_bytes != first_bytes
    outside = tmp_path / "trainer-output.safetensors"
    os.link(work / WEIGHTS, outside)
    mint(work, "checkout", first)
    assert (work / WEIGHTS).read_bytes() == first_bytes
    assert outside.read_bytes() == second_bytes
    assert (work / WEIGHTS).stat().st_nlink == 1 and outside.stat().st_nlink == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_checkout_replaces_a_weights_file_of_another_owner(work: Path) -> None:
    # A file another user owns (here writable by all) is replaced, as git replaces it, and the
    # checked-out file is ours: writing into it in place would leave it theirs.
    first = commit(work, "first", "--no-verify")
    first_bytes = (work / WEIGHTS).read_bytes()
    mutate(work, seed=8)
    commit(work, "second", "--no-verify")
    os.chown(work / WEIGHTS, 65534, 65534)
    (work / WEIGHTS).chmod(0o666)
    mint(work, "checkout", first)
    assert (work / WEIGHTS).read_bytes() == first_bytes
    assert (work / WEIGHTS).stat().st_uid == os.geteuid()


def test_symlinked_files_are_stored_by_content(work: Path, tmp_path: Path) -> None:
    # A Hugging Face cache snapshot is a directory of links into blobs/: commit what they point at.
    outside = tmp_path / "blobs" / "readme"
    outside.parent.mkdir()
    outside.write_text("model card\n")
    (work / "README.md").unlink(missing_ok=True)  # PEFT wrote one; a link takes its place
    (work / "README.md").symlink_to(outside)
    first = commit(work, "linked", "--no-verify")
    assert "README.md" in show_json(work, first)["files"]
    assert json.loads(mint(work, "status", "--json").stdout)["clean"]
    (work / "README.md").unlink()
    mint(work, "checkout", "--force", first)
    readme = work / "README.md"
    assert readme.read_text() == "model card\n" and not readme.is_symlink()
    (work / "broken").symlink_to(tmp_path / "nowhere")
    line = mint_fails(work, "commit", "-m", "x", "--no-verify")
    assert "broken" in line and "symlink" in line and "not a file" in line


def test_a_link_into_a_repository_directory_is_refused_not_committed(
    work: Path, tmp_path: Path
) -> None:
    # Links are followed wherever they lead (a Hugging Face cache snapshot's do), but one into
    # a repository's .mint would commit its config (credentials), hooks or objects.
    first = commit(work, "first", "--no-verify")
    other = tmp_path / "other"
    mint(tmp_path, "init", str(other))
    aside = work / ".mint" / "aside.safetensors"
    aside.write_bytes((work / WEIGHTS).read_bytes())
    (work / "sub").mkdir()
    (work / "sub" / "repo").symlink_to("../.mint")  # a directory link on the way
    cases = [
        ("s", ".mint/config", work / ".mint"),
        ("h", "sub/repo/HEAD", work / ".mint"),
        ("c", str(other / ".mint" / "config"), other / ".mint"),
    ]
    for name, target, inside in cases:
        (work / name).symlink_to(target)
        line = mint_fails(work, "commit", "-m", "x", "--no-verify")
        assert f"{name} is a symlink to {target}" in line and str(inside) in line, line
        error = json.loads(mint(work, "status", "--json").stdout)["error"]
        assert f"{name} is a symlink to {target}" in error, error
        (work / name).unlink()
    # The weights themselves: a valid safetensors file, committed before.
    (work / WEIGHTS).unlink()
    (work / WEIGHTS).symlink_to(".mint/aside.safetensors")
    line = mint_fails(work, "commit", "-m", "x", "--no-verify")
    assert f"{WEIGHTS} is a symlink to .mint/aside.safetensors" in line, line
    (work / WEIGHTS).unlink()
    (work / WEIGHTS).write_bytes(aside.read_bytes())
    # A directory merely named .mint, no repository's (no HEAD), is followed as any other.
    plain = tmp_path / "notes" / ".mint" / "card.md"
    plain.parent.mkdir(parents=True)
    plain.write_text("card\n")
    (work / "card.md").symlink_to(plain)
    second = commit(work, "card", "--no-verify")
    assert "card.md" in show_json(work, second)["files"] and second != first


def test_a_symlink_loop_is_reported_as_a_dangling_link_is(work: Path) -> None:
    # ELOOP escaped as a bare OSError line: status exited 1 and --json printed nothing, where
    # docs/cli.md promises exit 0 and the reason in `error` (git lists such a link as untracked).
    commit(work, "first", "--no-verify")
    (work / "loop").symlink_to("loop")
    result = mint(work, "status", "--json")
    report = json.loads(result.stdout)
    assert report["clean"] is False, report
    assert "loop is a symlink to loop, which cannot be followed" in report["error"], report
    text = mint(work, "status").stdout
    assert "work tree is not a readable adapter" in text and "symbolic links" in text, text
    for verb in (("diff", "HEAD"), ("commit", "-m", "x", "--no-verify")):
        line = mint_fails(work, *verb)
        assert "loop is a symlink to loop, which cannot be followed" in line, line


# ------------------------------------------------------------------ reset
def test_reset_soft_and_hard(work: Path) -> None:
    first = commit(work, "first", "--no-verify")
    first_bytes = (work / WEIGHTS).read_bytes()
    mutate(work, seed=1)
    second = commit(work, "second", "--no-verify")
    second_bytes = (work / WEIGHTS).read_bytes()
    out = mint(work, "reset", "HEAD~1").stdout
    assert out.startswith(f"HEAD is now at {first[:7]} first")
    assert (
        head(work) == first
        and git(work / ".mint", "symbolic-ref", "HEAD").stdout.strip() == "refs/heads/main"
    )
    assert (work / WEIGHTS).read_bytes() == second_bytes
    assert not json.loads(mint(work, "status", "--json").stdout)["clean"]
    mint(work, "reset", "--hard", first)
    assert (work / WEIGHTS).read_bytes() == first_bytes
    assert json.loads(mint(work, "status", "--json").stdout)["clean"]
    # The reset commit stays reachable through the reflog (git agrees), so it can be recovered.
    assert second in git(work / ".mint", "reflog", "show", "--format=%H", "main").stdout
    mint(work, "reset", "--hard", second)
    assert (work / WEIGHTS).read_bytes() == second_bytes
    git_fsck(work)


# ------------------------------------------------------------- fsck and gc
def test_fsck_and_gc_keep_everything_readable(work: Path) -> None:
    ids = [commit(work, "rev 0")]
    snapshots = [(work / WEIGHTS).read_bytes()]
    for i in range(1, 4):
        mutate(work, seed=i)
        ids.append(commit(work, f"rev {i}", "--no-verify"))
        snapshots.append((work / WEIGHTS).read_bytes())
    mint(work, "branch", "side", ids[1])
    mint(work, "tag", "v2", ids[2], "-m", "two")
    report = json.loads(mint(work, "fsck", "--json").stdout)
    assert (
        report["ok"]
        and report["revisions"] == 4
        and report["tensors"] == 32
        and report["problems"] == []
    )
    out = mint(work, "gc").stdout
    assert out.startswith("packed ")
    git_dir = work / ".mint"
    loose = [p for p in (git_dir / "objects").iterdir() if len(p.name) == 2 and any(p.iterdir())]
    assert loose == [], "gc should leave no reachable object loose"
    assert list((git_dir / "objects" / "pack").glob("*.pack"))
    assert "checked" in mint(work, "fsck").stdout
    git_fsck(work)
    assert git_log(work) == list(reversed(ids))
    assert git_log(work, "side") == [ids[1], ids[0]]
    assert git(git_dir, "rev-parse", "v2^{commit}").stdout.strip() == ids[2]
    assert git(git_dir, "count-objects", "-v").stdout.splitlines()[0] == "count: 0"
    for i, oid in enumerate(ids):
        mint(work, "checkout", oid)
        assert (work / WEIGHTS).read_bytes() == snapshots[i]
    mint(work, "checkout", "main")
    # Commits after gc still work and read.
    mutate(work, seed=99)
    fifth = commit(work, "after gc", "--no-verify")
    assert git_log(work)[0] == fifth
    git_fsck(work)


def test_init_checkout_and_reset_speak_json(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    """A deploy script learns what it got without a second command."""
    work = tmp_path / "json"
    made = json.loads(
        mint(tmp_path, "init", str(work), "--base-model", str(tiny_base), "--json").stdout
    )
    assert made["git_dir"] == str((work / ".mint").resolve())
    assert made["base_model"] == tiny_base.name and made["base_fingerprint"] == fingerprint(
        tiny_base
    )
    copy_adapter(peft_adapter, work)
    first = commit(work, "first")
    mutate(work, seed=1)
    second = commit(work, "second")
    detached = json.loads(mint(work, "checkout", first, "--json").stdout)
    assert detached == {
        "commit": first,
        "branch": None,
        "detached": True,
        "created": False,
        "left_behind": [],
    }
    branched = json.loads(mint(work, "checkout", "-b", "exp", "--json").stdout)
    assert branched == {
        "commit": first,
        "branch": "exp",
        "detached": False,
        "created": True,
        "left_behind": [],
    }
    moved = json.loads(mint(work, "reset", "--hard", second, "--json").stdout)
    assert moved == {"commit": second, "branch": "exp", "detached": False, "hard": True}
    assert head(work) == second


# ------------------------------------------------------------------ hooks
def _install_hook(work: Path, name: str, body: str) -> None:
    path = work / ".mint" / "hooks" / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_hooks_pre_commit_commit_msg_post_commit(work: Path, tmp_path: Path) -> None:
    first = commit(work, "first")
    env_dump = tmp_path / "env.txt"
    _install_hook(
        work,
        "pre-commit",
        f'echo "$MINT_ADAPTER_DIR|$MINT_DIR" > {env_dump}\necho "no Fridays" >&2\nexit 3\n',
    )
    mutate(work, seed=1)
    line = mint_fails(work, "commit", "-m", "blocked")
    assert "pre-commit" in line and "no Fridays" in line and "--no-verify" in line
    adapter_dir, git_dir = env_dump.read_text().strip().split("|")
    assert (
        Path(adapter_dir).resolve() == work.resolve()
        and Path(git_dir).resolve() == (work / ".mint").resolve()
    )
    assert head(work) == first
    # --from sets MINT_ADAPTER_DIR to that directory.
    other = copy_adapter(work, tmp_path / "other")
    mint_fails(work, "commit", "-m", "blocked", "--from", str(other))
    assert Path(env_dump.read_text().split("|")[0]).resolve() == other.resolve()
    # --no-verify skips it.
    second = commit(work, "unverified", "--no-verify")
    _install_hook(work, "pre-commit", "exit 0\n")
    # commit-msg can refuse ...
    _install_hook(
        work,
        "commit-msg",
        'grep -q "JIRA-" "$1" || { echo "message needs a ticket" >&2; exit 1; }\n',
    )
    mutate(work, seed=2)
    assert "message needs a ticket" in mint_fails(work, "commit", "-m", "no ticket")
    assert head(work) == second
    # ... and can edit the message.
    _install_hook(
        work, "commit-msg", 'printf "%s\\n\\nSigned-off-by: hook\\n" "$(cat "$1")" > "$1"\n'
    )
    post = tmp_path / "post.txt"
    _install_hook(work, "post-commit", f'git --git-dir "$MINT_DIR" rev-parse HEAD > {post}\n')
    third = commit(work, "JIRA-1 edited")
    assert (
        git(work / ".mint", "log", "-1", "--format=%B").stdout.strip()
        == "JIRA-1 edited\n\nSigned-off-by: hook"
    )
    # post-commit ran after the ref moved: it saw the new HEAD.
    assert post.read_text().strip() == third
    # A failing post-commit does not undo the commit.
    _install_hook(work, "post-commit", "exit 1\n")
    mutate(work, seed=3)
    fourth = commit(work, "JIRA-2 post fails")
    assert head(work) == fourth
    git_fsck(work)


def test_concurrent_commits_keep_their_own_messages_through_commit_msg(
    work: Path, tmp_path: Path
) -> None:
    """Two trainers commit at once with a commit-msg hook: each revision keeps its own message
    (they shared .mint/COMMIT_EDITMSG, and took each other's)."""
    import threading

    from mintvcs import porcelain
    from mintvcs.store import Repository

    commit(work, "first")
    _install_hook(work, "commit-msg", 'sleep 0.05\nprintf "%s [hook]" "$(cat "$1")" > "$1"\n')
    failures: list[BaseException] = []

    def trainer(name: str) -> None:
        source = copy_adapter(work, tmp_path / name)
        try:
            with Repository.open(work) as repo:
                for step in range(4):
                    mutate(source, seed=hash((name, step)) % 1000)
                    porcelain.commit(
                        repo,
                        f"{name}-{step}",
                        source=source,
                        meta={"writer": name, "step": str(step)},
                        show_progress=False,
                    )
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=trainer, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    with Repository.open(work) as repo:
        revisions = porcelain.log(repo, "main", limit=8)
        assert len(revisions) == 8
        for info in revisions:
            meta = repo.read_revision(info.id).manifest.meta
            assert info.message.strip() == f"{meta['writer']}-{meta['step']} [hook]", info
    assert not list((work / ".mint").glob("COMMIT_EDITMSG*"))  # no temporary left behind


def test_a_commit_that_lost_the_race_is_dated_after_the_one_that_won(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit re-parented onto a branch another commit moved meanwhile kept the date it took
    before: a child dated before its parent, and the reflog going back in time."""
    from mintvcs import porcelain
    from mintvcs.store import Repository

    commit(work, "first")
    other = copy_adapter(work, tmp_path / "other")
    mutate(other, seed=5)
    real_move = porcelain._move_ref
    raced: list[str] = []

    def another_process_commits_first(repo: Repository, ref: str, *args: Any, **kw: Any) -> None:
        # Just before this commit moves main, a second later, another process commits to it.
        if ref == "refs/heads/main" and not raced:
            raced.append(ref)
            time.sleep(1.1)
            mint(work, "commit", "-m", "won", "--from", str(other))
        real_move(repo, ref, *args, **kw)

    monkeypatch.setattr(porcelain, "_move_ref", another_process_commits_first)
    mutate(work, seed=6)
    with Repository.open(work) as repo:
        lost = porcelain.commit(repo, "lost", show_progress=False)
        won = repo.commit_info(lost.parent or "")
        assert won.message.strip() == "won", "the other commit did not land first"
        assert repo.commit_info(lost.commit).time >= won.time
    times = [
        int(line.split("\t")[0].split()[-2])
        for line in (work / ".mint" / "logs" / "refs" / "heads" / "main").read_text().splitlines()
    ]
    assert times == sorted(times), times


def test_hook_refusal_shows_all_its_output_and_gets_absolute_paths(
    work: Path, tmp_path: Path
) -> None:
    # git shows everything a refusing hook printed; we kept only its last line. And hooks run
    # in the work tree, so a relative --from in MINT_ADAPTER_DIR pointed nowhere.
    commit(work, "first")
    _install_hook(
        work,
        "pre-commit",
        'echo "checking"\necho "reward too low" >&2\n'
        'ls "$MINT_ADAPTER_DIR/adapter_config.json" >/dev/null || exit 9\n'
        'echo "refused: see above"\nexit 1\n',
    )
    copy_adapter(work, tmp_path / "elsewhere")
    (work / "sub").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", "commit", "-m", "x", "--from", "../../elsewhere"],
        cwd=work / "sub",
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = result.stderr.splitlines()
    assert result.returncode != 0
    assert lines[:2] == ["checking", "reward too low"], result.stderr
    assert lines[-1].startswith("error: pre-commit hook refused the commit: refused: see above")


def test_sample_commit_msg_hook_refuses_empty_message(work: Path) -> None:
    hooks = work / ".mint" / "hooks"
    (hooks / "commit-msg.sample").rename(hooks / "commit-msg")
    line = mint_fails(work, "commit", "-m", "   ")
    assert "commit-msg" in line and "empty commit message" in line
    assert git(work / ".mint", "rev-parse", "-q", "--verify", "HEAD", ok=False).returncode != 0


def test_diff_cosine_stays_within_one() -> None:
    # A lossless F32 -> F64 retype read cosine 1.0000000000000002 in a quarter of tensors.
    import numpy as np

    from mintvcs.porcelain import _compare, _Side

    rng = np.random.default_rng(0)
    for _ in range(100):
        values = rng.standard_normal(4253).astype("<f4")
        wide = values.astype("<f8")
        row = _compare(
            "t",
            _Side("F32", (4253,), None, values.tobytes),
            _Side("F64", (4253,), None, wide.tobytes),
        )
        assert row.cosine is not None and -1.0 <= row.cosine <= 1.0 and row.rel_l2 == 0.0


def test_diff_decodes_only_the_tensors_that_differ(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both sides were decoded in full first (three copies of a revision in memory: 7.7 GB for
    # `diff HEAD HEAD` of a 2.7 GB adapter): an unchanged tensor's sha256 says so unread.
    from mintvcs import codec, porcelain
    from mintvcs.store import Repository

    first = commit(work, "first", "--no-verify")
    name = tensor_names(work)[1]
    mutate(work, seed=5, names=[name], scale=1e-2)
    second = commit(work, "one changed", "--no-verify")
    decoded: list[object] = []
    segment_planes = codec._segment_planes

    def counting(*args: Any, **kwargs: Any) -> Any:
        decoded.append(args[1])
        return segment_planes(*args, **kwargs)

    monkeypatch.setattr(codec, "_segment_planes", counting)
    repo = Repository.open(work)
    try:
        depths = [
            {r.name: r.depth for r in repo.read_revision(c).manifest.tensors}[name]
            for c in (first, second)
        ]
        changed = porcelain.diff(repo, first, second)
        assert [t.name for t in changed.tensors if t.status != "unchanged"] == [name]
        assert 0 < len(decoded) <= sum(d + 1 for d in depths)  # that tensor's chains only
        decoded.clear()
        assert all(t.status == "unchanged" for t in porcelain.diff(repo, "HEAD").tensors)
        assert decoded == []  # a clean work tree: hashed, nothing decoded
    finally:
        repo.close()


def test_ignored_files_stay_out_of_commits_and_status(work: Path, tmp_path: Path) -> None:
    # A Trainer's checkpoint holds its optimizer state (~70% of a store's growth per revision,
    # measured): `.mint/info/exclude` and a .mintignore leave such files out, in gitignore's
    # syntax, as git's own excludes do.
    checkpoint = tmp_path / "checkpoint-40"
    copy_adapter(work, checkpoint)
    (checkpoint / "optimizer.pt").write_bytes(os.urandom(4096))
    (checkpoint / "runs" / "x").mkdir(parents=True)
    (checkpoint / "runs" / "x" / "events").write_text("loss\n")
    (checkpoint / "train.log").write_text("step 40\n")
    (checkpoint / "keep.log").write_text("kept\n")
    (checkpoint / ".mintignore").write_text("*.log\n!keep.log\n")
    exclude = work / ".mint" / "info" / "exclude"
    assert "# optimizer.pt" in exclude.read_text()  # init's sample: comments only
    exclude.write_text(exclude.read_text() + "optimizer.pt\nruns/\n")
    commit(work, "r0", "--from", str(checkpoint), "--no-verify")
    stored = git(work / ".mint", "ls-tree", "-r", "--name-only", "HEAD", "files").stdout.split()
    assert stored == ["files/.mintignore", "files/README.md", "files/keep.log"]
    git_fsck(work)
    mint(work, "checkout", "--force", "main")
    assert (work / "keep.log").read_text() == "kept\n" and not (work / "train.log").exists()
    # Ignored files in the work tree are no change, and no commit takes them.
    (work / "optimizer.pt").write_bytes(os.urandom(4096))
    (work / "other.log").write_text("x\n")
    assert json.loads(mint(work, "status", "--json").stdout)["clean"] is True
    (work / "keep.log").write_text("changed\n")
    changes = json.loads(mint(work, "status", "--json").stdout)["changes"]
    assert changes == [{"status": "modified", "path": "keep.log"}]
    # A .mintignore that is not a regular file is skipped, as git skips a .gitignore that is a
    # directory; it is not read (opening a FIFO would block, as git 2.39 does). A FIFO is then
    # refused as any FIFO in the adapter directory, unless ignored.
    (work / ".mintignore").unlink()
    os.mkfifo(work / ".mintignore")
    error = mint_fails(work, "commit", "-m", "x")
    assert ".mintignore is not a regular file (a pipe, socket or device)" in error
    exclude.write_text(exclude.read_text() + ".mintignore\n")
    changes = json.loads(mint(work, "status", "--json").stdout)["changes"]
    assert {"status": "added", "path": "other.log"} in changes


def test_a_committed_file_ignored_since_and_edited_is_not_lost_by_checkout(work: Path) -> None:
    # Ignored files are no adapter content, but one committed before its pattern was added
    # still has a committed version: checkout deleted or overwrote an edit of it.
    (work / "optimizer.pt").write_bytes(b"state 1")
    r0 = commit(work, "r0", "--no-verify")
    (work / "optimizer.pt").write_bytes(b"state 2")
    r1 = commit(work, "r1", "--no-verify")
    exclude = work / ".mint" / "info" / "exclude"
    exclude.write_text("optimizer.pt\n")
    (work / "optimizer.pt").write_bytes(b"state 3, edited")
    line = mint_fails(work, "checkout", r0)
    assert "would be overwritten by checkout (optimizer.pt)" in line
    assert (work / "optimizer.pt").read_bytes() == b"state 3, edited"
    (work / "optimizer.pt").write_bytes(b"state 2")  # HEAD's: nothing to lose
    mint(work, "checkout", r0)
    assert (work / "optimizer.pt").read_bytes() == b"state 1" and head(work) == r0 != r1


def test_commit_from_the_work_tree_by_another_path_keeps_its_base(work: Path) -> None:
    # `commit --from .` is a commit of the work tree: its base record must follow, or the
    # next plain commit was refused as if the branch had moved under it.
    commit(work, "r0", "--no-verify")
    (work / "notes.txt").write_text("1\n")
    mint(work, "commit", "-m", "r1", "--from", ".", "--no-verify")
    (work / "notes.txt").write_text("2\n")
    commit(work, "r2", "--no-verify")
    assert json.loads(mint(work, "status", "--json").stdout)["clean"] is True


def test_a_record_of_an_earlier_mintvcs_claims_no_base(work: Path) -> None:
    # The previous version's record (no "files") was not kept up to date as a base (its reset
    # left it): read as one, it made the recommit after that reset refused.
    r0 = commit(work, "r0", "--no-verify")
    (work / "notes.txt").write_text("1\n")
    commit(work, "r1", "--no-verify")
    record = work / ".mint" / "mint-worktree.json"
    record.write_text(json.dumps({"commit": r0, "weights": None, "known_ns": 0}))
    (work / "notes.txt").write_text("2\n")
    commit(work, "r2", "--no-verify")


@pytest.mark.parametrize(
    ("exclude", "ignore_files"),
    [
        ("", {"": "logs/*\n!logs/keep.txt\n"}),
        ("", {"": "doc/*\n!doc/sub\n"}),
        ("", {"": "sub/*\n!sub/foo/\n"}),
        ("", {"": "bar/*/\n"}),
        ("", {"": "sub/**/\n"}),
        ("", {"": "*\n!*/\n!*.txt\n"}),
        ("", {"": "logs/\n!logs/keep.txt\n"}),
        ("", {"": "/*\n!/sub\n"}),
        ("", {"": "**/foo/\n*.pt\n!keep.pt\n"}),
        # A .mintignore below the top: its patterns are relative to its directory, and the
        # deepest file with a matching pattern decides, as with git's nested .gitignore files.
        ("", {"": "*.pt\n", "sub/": "!a.pt\n"}),
        ("", {"sub/": "/a.pt\ndeep/\n"}),
        ("", {"": "!keep.pt\n", "sub/": "*.pt\nfoo\n"}),
        ("", {"": "sub/\n", "sub/": "!a.pt\n"}),
        ("", {"doc/": "*.md\n", "doc/sub/": "!readme.md\n"}),
        ("", {"bar/baz/": "*\n", "logs/": "keep.txt\n"}),
        ("", {"": "sub/**\n!sub/foo/\n!sub/foo/**\n"}),
        ("", {"": "*.txt\n", "logs/": "!*\n", "bar/": "*\n!baz/\n"}),
        ("", {"": "x.log/\ndoc\n", "sub/": "**/a.pt\n!deep/a.pt\n"}),
        # info/exclude comes last: every .mintignore overrides it.
        ("*.pt\nlogs/\n", {"sub/": "!*.pt\n"}),
        ("*.txt\n", {"": "!keep.txt\n"}),
        # Read as git reads them: a UTF-8 BOM skipped, a trailing space trimmed after an
        # escaped backslash (`a\\ `: the file `a\`, which mintvcs refuses, not `a `), kept after
        # a backslash (`a\ `).
        ("", {"sub/": "\ufeff*.pt\n"}),
        ("\ufeff*.pt\n", {}),
        ("", {"": "\ufeffa.pt\r\n!sub/a.pt\r\n"}),
        ("", {"": "a\\\\ \n"}),
        ("", {"": "a\\ \n"}),
        ("", {"": "a\\\\\\ \n"}),
        ("", {"": "a\\   \nx.log\\\\  \n"}),
        # A malformed pattern matches nothing, with no warning (git is silent).
        ("[\n", {"": "[\n*.pt\n", "sub/": "!a[.pt\n"}),
    ],
)
def test_ignore_patterns_leave_out_what_git_leaves_out(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    exclude: str,
    ignore_files: dict[str, str],
) -> None:
    from mintvcs.adapter import extra_files, read_patterns

    root = tmp_path / "tree"
    for name in (
        "a.pt", "keep.pt", "logs/x.txt", "logs/keep.txt", "sub/a.pt", "sub/deep/a.pt",
        "sub/foo/b.txt", "foo/c.txt", "bar/baz/q.txt", "bar/q.txt", "doc/readme.md",
        "doc/sub/readme.md", "x.log", "a ", "x.log ",
    ):  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    for folder, patterns in ignore_files.items():
        (root / folder / ".mintignore").write_text(patterns)
        (root / folder / ".gitignore").write_text(patterns)
    subprocess.run(["git", "init", "-q", str(root)], check=True, env=ENV)
    (root / ".git" / "info" / "exclude").write_text(exclude)
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--others", "--exclude-standard"],
        capture_output=True, text=True, check=True, env=ENV,
    ).stdout.split("\0")  # fmt: skip
    ours = extra_files(root, read_patterns(io.BytesIO(exclude.encode())))
    assert {p for p in ours if not p.endswith("ignore")} == {
        p for p in listed if p and not p.endswith("ignore")
    }
    assert not caplog.records


def test_a_symlinked_or_non_file_ignore_file_is_skipped_as_git_skips_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mintvcs.adapter import extra_files

    # git 2.32+ does not follow an in-tree .gitignore symlink (it warns, then ignores nothing by
    # it) and skips one that is a directory. mintvcs followed the link and refused a directory.
    root = tmp_path / "tree"
    for name in ("a.log", "s1/a.log", "s2/a.log", "s3/a.log", "s3/b.txt", "pats"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (root / "pats").write_text("*.log\n")
    (root / "s3" / "pats").write_text("*.txt\n")
    for ignore in (".gitignore", ".mintignore"):
        (root / ignore).symlink_to("pats")
        (root / "s1" / ignore).symlink_to("../pats")
        (root / "s2" / ignore).mkdir()
        (root / "s3" / ignore).symlink_to(root / "s3" / "pats")  # absolute
    subprocess.run(["git", "init", "-q", str(root)], check=True, env=ENV)
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--others", "--exclude-standard"],
        capture_output=True, text=True, check=True, env=ENV,
    )  # fmt: skip
    ours = extra_files(root)
    assert {p for p in ours if "ignore" not in p} == {
        p for p in listed.stdout.split("\0") if p and "ignore" not in p
    }
    assert "s3/b.txt" in ours
    # git's warning, once per file, naming it by its path.
    theirs = sorted(listed.stderr.splitlines())
    assert theirs == [
        f"warning: unable to access '{name}': Too many levels of symbolic links"
        for name in (".gitignore", "s1/.gitignore", "s3/.gitignore")
    ]
    assert sorted(capsys.readouterr().err.splitlines()) == [
        line.replace(f"'{name}'", f"'{root / name.replace('.gitignore', '.mintignore')}'")
        for line, name in zip(theirs, (".gitignore", "s1/.gitignore", "s3/.gitignore"), strict=True)
    ]


def test_checkout_force_of_a_work_tree_left_behind_removes_what_only_it_had(
    work: Path, tmp_path: Path
) -> None:
    # checkout and reset --hard removed only the files HEAD's revision had: a file of the
    # revision the work tree still held (main moved under it) stayed, and status was not clean.
    (work / "notes.txt").write_text("r0\n")
    commit(work, "r0", "--no-verify")
    checkpoint = tmp_path / "checkpoint"
    copy_adapter(work, checkpoint)
    (checkpoint / "notes.txt").unlink()
    name = tensor_names(checkpoint)[1]
    mutate(checkpoint, seed=3, names=[name])
    commit(work, "trainer step", "--from", str(checkpoint), "--no-verify")
    mint(work, "checkout", "--force", "main")
    assert not (work / "notes.txt").exists()
    assert json.loads(mint(work, "status", "--json").stdout)["clean"] is True
    # One edited since is the user's: it stays, as an untracked file.
    (work / "notes.txt").write_text("r2\n")
    commit(work, "r2", "--no-verify")
    mutate(checkpoint, seed=4, names=[name])
    commit(work, "trainer step 2", "--from", str(checkpoint), "--no-verify")
    (work / "notes.txt").write_text("edited\n")
    mint(work, "reset", "--hard", "main")
    assert (work / "notes.txt").read_text() == "edited\n"
    changes = json.loads(mint(work, "status", "--json").stdout)["changes"]
    assert changes == [{"status": "added", "path": "notes.txt"}]
