"""mintvcs repositories under real git: what git writes, rewrites or names, mintvcs reads as git does."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mintvcs.serve.refwatch import RefWatcher
from mintvcs.store import CorruptObjectError, Repository
from tests.mintvcs.storekit import (
    ENV,
    blobs,
    damage_checks,
    git,
    git_fsck,
    git_log,
    loose_path,
    mint,
    mint_fails,
    mutate,
)


def assert_sound_and_checks_out(work: Path, weights: bytes) -> None:
    """fsck passes and a fresh checkout of main writes `weights` byte for byte."""
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    (work / "adapter_model.safetensors").unlink()
    mint(work, "checkout", "--force", "main")
    assert (work / "adapter_model.safetensors").read_bytes() == weights


def test_fsck_follows_every_parent_of_a_merge(work: Path) -> None:
    # git can merge two mintvcs branches; a blob missing from the history reached only through
    # the merge's second parent must still be found (fsck used to walk first parents only).
    git_dir = work / ".mint"
    mint(work, "checkout", "-b", "other")
    mutate(work, seed=3)
    mint(work, "commit", "-m", "rev 3", "--no-verify")
    mint(work, "checkout", "main")
    main_tip = git(git_dir, "rev-parse", "main").stdout.strip()
    other_tip = git(git_dir, "rev-parse", "other").stdout.strip()
    merge = git(
        git_dir, "commit-tree", "main^{tree}", "-p", main_tip, "-p", other_tip, "-m", "merge"
    ).stdout.strip()
    git(git_dir, "update-ref", "refs/heads/main", merge)
    git(git_dir, "branch", "-D", "other")
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    elsewhere = {b for rev in ("main^1", "side") for b in blobs(work, rev)}
    only_other = [b for b in blobs(work, other_tip) if b not in elsewhere]
    assert only_other, "rev 3 should have changed some tensors"
    loose_path(work, only_other[0]).unlink()
    problems, (git_status, _) = damage_checks(work)
    assert git_status != 0
    assert any(only_other[0] in p for p in problems), problems


def test_gc_skips_reflog_lines_that_do_not_parse(work: Path) -> None:
    # git ignores a torn or hand-edited reflog line; gc used to refuse the whole repository.
    log = work / ".mint" / "logs" / "HEAD"
    lines = log.read_bytes().splitlines(keepends=True)
    garbage = [b"garbage\n", b"0" * 40 + b" not-an-id x 1 +0000\n"]
    log.write_bytes(b"".join([lines[0], *garbage, *lines[1:]]))
    assert mint(work, "gc").stdout.startswith("packed ")
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]


def test_gc_keeps_xor_bases_that_only_a_tensor_blob_names(work: Path) -> None:
    # Squash the history with git: the tip's XOR tensor blobs still name their bases (older
    # revisions' blobs) inside their content, where git's reachability cannot see them.
    git_dir = work / ".mint"
    weights = (work / "adapter_model.safetensors").read_bytes()
    squashed = git(git_dir, "commit-tree", "main^{tree}", "-m", "squashed").stdout.strip()
    git(git_dir, "update-ref", "refs/heads/main", squashed)
    git(git_dir, "branch", "-D", "side")
    shutil.rmtree(git_dir / "logs")
    two_hours_ago = time.time() - 7200
    for path in (git_dir / "objects").rglob("*"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    pruned = mint(work, "gc").stdout
    assert ", pruned " in pruned and ", pruned 0;" not in pruned  # the old commits went
    assert_sound_and_checks_out(work, weights)


def test_gc_keeps_what_info_grafts_makes_a_parent(work: Path) -> None:
    # Older history stitched on below the root with git's (deprecated) grafts file: git's gc
    # keeps the grafted parent; mintvcs gc pruned it, and git then found main broken.
    git_dir = work / ".mint"
    root = git(git_dir, "rev-list", "--max-parents=0", "main").stdout.strip()
    older = git(git_dir, "commit-tree", "-m", "imported history", f"{root}^{{tree}}").stdout.strip()
    (git_dir / "info" / "grafts").write_text(f"# imported\n{root} {older}\n")
    three_hours_ago = time.time() - 3 * 3600
    os.utime(loose_path(work, older), (three_hours_ago, three_hours_ago))
    assert ", pruned 0;" in mint(work, "gc").stdout
    assert git(git_dir, "cat-file", "-t", older).stdout.strip() == "commit"
    git_fsck(work)
    assert git_log(work, "main")[-1] == older
    # mintvcs still reads history without grafts (docs/format.md).
    assert older not in mint(work, "log", "--json").stdout


def test_commit_retry_after_a_backwards_move_encodes_against_the_new_tip(work: Path) -> None:
    # The branch moves back (a reset elsewhere) while a commit is in flight: the commit lands
    # on the new tip, so its XOR bases must come from the new tip's history, or git's own gc
    # (which cannot see bases) drops them once the old revisions are unreachable.
    git_dir = work / ".mint"
    root = git(git_dir, "rev-list", "--max-parents=0", "main").stdout.strip()
    hook = git_dir / "hooks" / "commit-msg"
    hook.write_text(f"#!/bin/sh\ngit --git-dir='{git_dir}' update-ref refs/heads/main {root}\n")
    hook.chmod(0o755)
    mutate(work, seed=7)
    weights = (work / "adapter_model.safetensors").read_bytes()
    mint(work, "commit", "-m", "rev 3")
    hook.unlink()
    assert git(git_dir, "rev-parse", "main~1").stdout.strip() == root
    git(git_dir, "branch", "-D", "side")
    shutil.rmtree(git_dir / "logs")
    git(git_dir, "gc", "--prune=now", "--quiet")
    assert_sound_and_checks_out(work, weights)


def test_fsck_and_tag_accept_git_notes_and_tags_of_trees_and_blobs(work: Path) -> None:
    # Ordinary git: notes on a revision, a tag of a tree, an annotated tag of a blob. They are
    # not adapter revisions; fsck used to call them broken and `tag` died listing them.
    git_dir = work / ".mint"
    git(git_dir, "notes", "add", "-m", "eval: reward 0.73", "main")
    git(git_dir, "tag", "treetag", "main^{tree}")
    git(git_dir, "tag", "-a", "blobtag", "-m", "x", "main:adapter_config.json")
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    rows = {t["name"]: t for t in json.loads(mint(work, "tag", "--json").stdout)}
    tree = git(git_dir, "rev-parse", "main^{tree}").stdout.strip()
    assert rows["treetag"] == {
        "name": "treetag",
        "value": tree,
        "annotated": False,
        "commit": None,
        "object": tree,
        "type": "tree",
    }
    assert rows["blobtag"]["type"] == "blob" and rows["blobtag"]["commit"] is None
    assert (
        rows["blobtag"]["annotated"]
        and rows["blobtag"]["value"] == git(git_dir, "rev-parse", "blobtag").stdout.strip()
    )
    assert {"blobtag", "treetag"} <= set(mint(work, "tag").stdout.split())
    # Their objects are still checked: a missing note blob is reported.
    note = git(git_dir, "notes", "list", "main").stdout.split()[0]
    loose_path(work, note).unlink()
    problems = json.loads(mint(work, "fsck", "--json", ok=False).stdout)["problems"]
    assert any(note in p and "refs/notes/commits" in p for p in problems), problems


def test_a_shared_clone_and_version_1_pack_indexes_are_not_called_damaged(
    work: Path, tmp_path: Path
) -> None:
    # `git clone --shared` borrows objects through objects/info/alternates, and git can write
    # version-1 pack indexes; fsck called every borrowed object missing and gc refused.
    weights = (work / "adapter_model.safetensors").read_bytes()
    clone = tmp_path / "clone"
    clone.mkdir()
    subprocess.run(
        ["git", "clone", "-q", "--bare", "--shared", str(work / ".mint"), str(clone / ".mint")],
        check=True,
    )
    assert (clone / ".mint" / "objects" / "info" / "alternates").exists()
    mint(clone, "checkout", "--force", "main")
    # Every object is borrowed: nothing of its own to pack, and gc says so, as git's writes none.
    assert mint(clone, "gc").stdout.startswith("nothing to do: ")
    assert_sound_and_checks_out(clone, weights)

    git(work / ".mint", "-c", "pack.indexVersion=1", "repack", "-adq")
    assert mint(work, "gc").stdout.startswith("packed ")
    assert_sound_and_checks_out(work, weights)


def _pack_ids(git_dir: Path) -> set[str]:
    """The ids of every object in the packs of store `git_dir` (its own, not its alternates')."""
    ids: set[str] = set()
    for idx in (git_dir / "objects" / "pack").glob("*.idx"):
        listing = subprocess.run(
            ["git", "show-index"], stdin=idx.open("rb"), capture_output=True, check=True
        )
        ids.update(line.split()[1].decode() for line in listing.stdout.splitlines())
    return ids


def _loose_ids(git_dir: Path) -> set[str]:
    """The ids of the loose objects of store `git_dir`."""
    return {
        f"{path.parent.name}{path.name}"
        for path in (git_dir / "objects").glob("??/*")
        if len(path.name) == 38
    }


def test_gc_in_a_shared_clone_packs_only_the_clone_s_own_objects(
    work: Path, tmp_path: Path
) -> None:
    # `git clone --shared` borrows the source's objects; git's gc (`repack -l`) packs only the
    # clone's own. mintvcs gc copied the source's whole history into the clone's pack.
    mint(work, "gc")
    source = work / ".mint"
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "-q", "--bare", "--shared", str(source), str(clone / ".mint")],
        check=True,
    )
    mint(clone, "checkout", "--force", "main")
    mutate(clone, seed=11)
    weights = (clone / "adapter_model.safetensors").read_bytes()
    mint(clone, "commit", "-m", "rev in the clone", "--no-verify")
    own = _loose_ids(clone / ".mint")
    borrowed = _pack_ids(source)
    assert own and borrowed
    assert mint(clone, "gc").stdout.startswith(f"packed {len(own)} objects")
    assert _pack_ids(clone / ".mint") == own
    assert not _loose_ids(clone / ".mint")
    assert _pack_ids(source) == borrowed  # the source is left as it was
    git_fsck(clone)
    assert_sound_and_checks_out(clone, weights)
    # A second gc finds the same, and git's own gc packs nothing mintvcs left out.
    mint(clone, "gc")
    assert _pack_ids(clone / ".mint") == own
    git(clone / ".mint", "gc", "-q")
    assert _pack_ids(clone / ".mint") <= own


def _shared_clone(work: Path, dst: Path) -> Path:
    """`git clone --bare --shared` of `work`'s store into `dst/.mint`, checked out; returns `dst`."""
    subprocess.run(
        ["git", "clone", "-q", "--bare", "--shared", str(work / ".mint"), str(dst / ".mint")],
        check=True,
    )
    mint(dst, "checkout", "--force", "main")
    return dst


def test_gc_in_a_shared_clone_lists_its_pack_directory_once_not_per_borrowed_object(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each borrowed object the walk met listed the clone's pack directory five times (rescans
    # looking for a pack written since the scan): 20,017 listings and 6.4 s for 4,003 borrowed
    # objects beside 40 packs of the clone's own; 2 and 0.7 s now.
    from mintvcs import maintenance

    mint(work, "gc")
    clone = _shared_clone(work, tmp_path / "clone")
    borrowed = _pack_ids(work / ".mint")
    own_packs = str(clone / ".mint" / "objects" / "pack")
    listings: list[str] = []
    listdir = os.listdir

    def counting(path: Any = ".") -> list[str]:
        if os.fspath(path).rstrip("/") == own_packs:
            listings.append(os.fspath(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", counting)
    with Repository.open(clone) as repo:
        result = maintenance.gc(repo)
    monkeypatch.undo()
    assert len(borrowed) > 20 and result.packed == 0  # all borrowed, none packed into the clone
    assert len(listings) <= 3, len(listings)
    assert not (clone / ".mint" / "objects" / "pack").exists() or not _pack_ids(clone / ".mint")
    git_fsck(clone)


def test_alternates_files_git_accepts_never_crash_a_lookup(work: Path, tmp_path: Path) -> None:
    # dulwich read objects/info/alternates itself: a blank line made the store its own
    # alternate, and two stores borrowing from each other were followed for ever, so looking
    # up any absent object ended in a RecursionError traceback. git skips both.
    unknown = "1234567890123456789012345678901234567890"
    alone = mint_fails(work, "show", unknown)
    clone = _shared_clone(work, tmp_path / "clone")
    listing = clone / ".mint" / "objects" / "info" / "alternates"
    source_listing = work / ".mint" / "objects" / "info" / "alternates"
    blank = listing.read_text() + "\n"
    cycle = str(clone / ".mint" / "objects") + "\n"
    for ours, theirs in [(blank, None), (listing.read_text(), cycle), (blank, cycle)]:
        listing.write_text(ours)
        if theirs is not None:
            source_listing.write_text(theirs)
        assert "fatal: bad object" in git(clone / ".mint", "show", unknown, ok=False).stderr
        assert mint_fails(clone, "show", unknown) == alone
        assert mint_fails(clone, "checkout", unknown) == alone.replace("show", "checkout")
        repo = Repository.open(clone)
        try:
            assert not repo.has_object(unknown)
            with pytest.raises(CorruptObjectError, match=r"is missing from the store$"):
                repo.get_object(unknown)
        finally:
            repo.close()
        assert json.loads(mint(clone, "fsck", "--json").stdout)["ok"]
        # Every object borrowed: nothing of its own to pack, and gc says so.
        assert mint(clone, "gc").stdout.startswith("nothing to do: ")
        assert git_log(clone) == [
            i["commit"] for i in json.loads(mint(clone, "log", "--json").stdout)
        ]


def test_an_alternate_that_moved_is_named_and_a_quoted_one_is_read(
    work: Path, tmp_path: Path
) -> None:
    # The store a shared clone borrows from, moved or unmounted: git names the alternates line
    # that resolves to nothing; mintvcs said "missing from the store", and gc advised restoring
    # from a backup. git also reads a line in C quotes (`"sp\\040ace"`), which mintvcs took
    # literally.
    weights = (work / "adapter_model.safetensors").read_bytes()
    clone = _shared_clone(work, tmp_path / "clone")
    listing = clone / ".mint" / "objects" / "info" / "alternates"
    source = tmp_path / "source"
    shutil.move(work, source)
    moved = str(work / ".mint" / "objects")
    assert moved in git(clone / ".mint", "log", "-1", ok=False).stderr
    named = f".mint/objects/info/alternates names the object directory {moved}, which does not"
    for command in (["log"], ["checkout", "--force", "main~1"]):
        line = mint_fails(clone, *command)
        assert "is missing from the store" in line and named in line, line
    line = mint_fails(clone, "gc")
    assert named in line and "backup" not in line, line
    problems = json.loads(mint(clone, "fsck", "--json", ok=False).stdout)["problems"]
    assert problems and all(named in p for p in problems), problems

    spaced = tmp_path / 'sp ace\t"x"'
    shutil.move(source, spaced)
    quoted = '"' + str(spaced).replace("\t", "\\t").replace('"', '\\"').replace(" ", "\\040")
    listing.write_text(f'{quoted}/.mint/objects"\n')
    assert git_log(clone) == [i["commit"] for i in json.loads(mint(clone, "log", "--json").stdout)]
    assert_sound_and_checks_out(clone, weights)


def test_tags_get_no_reflog_so_git_gc_runs_clean(work: Path) -> None:
    # git (core.logAllRefUpdates=true) logs branches, not tags; our tag reflogs made git gc's
    # reflog expiry print "error: Object ... not a commit" for every annotated tag.
    mint(work, "tag", "-m", "ship it", "prod")
    mint(work, "tag", "light", "HEAD~1")
    assert not (work / ".mint" / "logs" / "refs" / "tags").exists()
    result = git(work / ".mint", "gc", "--quiet")
    assert result.stderr == "", result.stderr
    git_fsck(work)


def test_revision_names_resolve_as_git_rev_parse_does(work: Path) -> None:
    from mintvcs.store import Repository

    git_dir = work / ".mint"
    git(git_dir, "update-ref", "refs/remotes/origin/main", "main~1")
    git(git_dir, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/main")
    mint(work, "tag", "-m", "ship", "prod", "main~2")
    mint(work, "checkout", "side")
    mint(work, "checkout", "main")
    mint(work, "reset", "--hard", "main~1")
    specs = [
        *("heads/main", "tags/prod", "origin/main", "origin", "refs/remotes/origin/main"),
        *("main@{1}", "main@{1}~1", "HEAD@{2}", "@{1}", "@{-1}", "@{-2}", "HEAD@{0}"),
        *("prod^{}", "prod^{commit}", "main^{commit}~1"),
    ]
    repo = Repository.open(work)
    for spec in specs:
        expected = git(git_dir, "rev-parse", "--verify", "-q", f"{spec}^{{commit}}").stdout.strip()
        assert repo.resolve(spec) == expected, spec
    line = mint_fails(work, "checkout", "main@{99}")
    assert "main@{99}" in line and "reflog" in line
    assert "@{N}" in mint_fails(work, "checkout", "main@{yesterday}")


def test_a_full_id_of_a_tree_or_blob_is_told_as_one_not_as_a_missing_commit(work: Path) -> None:
    from mintvcs.store import Repository, UnknownRevisionError

    git_dir = work / ".mint"
    tree = git(git_dir, "rev-parse", "main^{tree}").stdout.strip()
    listing = git(git_dir, "ls-tree", "-r", "main").stdout.split()
    blob = listing[listing.index("blob") + 1]
    missing = "0123456789" * 4
    for packed in (False, True):
        if packed:
            git(git_dir, "gc", "--quiet")
        repo = Repository.open(work)
        for oid, kind in ((tree, "tree"), (blob, "blob")):
            # git: "expected commit type, but the object dereferences to tree type"
            assert git(git_dir, "cat-file", "-t", oid).stdout.strip() == kind
            with pytest.raises(UnknownRevisionError, match=f"{oid} is a {kind}, not a commit"):
                repo.resolve(oid)
        with pytest.raises(UnknownRevisionError, match="never committed there, or pruned since"):
            repo.resolve(missing)


def test_reflog_selectors_at_the_ends_of_a_reflog_resolve_as_git_does(work: Path) -> None:
    # git rev-parse: NAME@{N} with N entries is the oldest entry's old id when it is not zero;
    # NAME@{0} of an emptied reflog is the ref's value; a zero old id passes to the older entry.
    from mintvcs.store import Repository, UnknownRevisionError

    git_dir = work / ".mint"
    zero = "0" * 40

    def agree(*specs: str) -> None:
        repo = Repository.open(work)
        try:
            for spec in specs:
                got = git(git_dir, "rev-parse", "--verify", "-q", spec, ok=False)
                if got.returncode == 0:
                    assert repo.resolve(spec) == got.stdout.strip(), spec
                else:
                    with pytest.raises(UnknownRevisionError):
                        repo.resolve(spec)
        finally:
            repo.close()

    revs = git(git_dir, "rev-list", "--reverse", "main").stdout.split()
    assert len(revs) == 3
    git(
        git_dir, "reflog", "delete", "main@{2}"
    )  # the creation entry: the oldest left has an old id
    agree(*(f"main@{{{n}}}" for n in range(5)))
    assert Repository.open(work).resolve("main@{2}") == revs[0]

    # A hand-edited log with a gap and a zero old id in the middle.
    log = git_dir / "logs" / "refs" / "heads" / "main"
    lines = [
        (zero, revs[0]),
        (revs[0], revs[1]),
        (revs[0], revs[2]),
        (zero, revs[1]),
        (revs[1], revs[2]),
    ]
    log.write_text("".join(f"{o} {n} T <t@t> {i} +0000\tx\n" for i, (o, n) in enumerate(lines)))
    agree(*(f"main@{{{n}}}" for n in range(7)))

    git(git_dir, "reflog", "expire", "--expire=now", "--all")
    assert log.read_bytes() == b"" and (git_dir / "logs" / "HEAD").read_bytes() == b""
    agree("main@{0}", "HEAD@{0}", "@{0}", "main@{1}", "HEAD@{1}", "@{1}")
    assert Repository.open(work).resolve("main@{0}") == revs[2]

    # No reflog file at all: git reads HEAD@{0} through the branch's log and @{0} as the
    # current branch's, but refuses main@{0}.
    (git_dir / "logs" / "HEAD").unlink()
    agree("HEAD@{0}", "@{0}", "main@{0}")
    log.unlink()
    agree("HEAD@{0}", "@{0}", "main@{0}", "side@{0}")


def test_log_json_lists_a_commit_made_with_git_with_null_meta(work: Path) -> None:
    # A branch whose tip git made from a tree with no manifest: the text log lists it, and
    # log --json used to print nothing and fail ("not an adapter revision").
    git_dir = work / ".mint"
    readme = git(git_dir, "hash-object", "-w", "--stdin", input_text="docs\n").stdout.strip()
    tree = git(git_dir, "mktree", input_text=f"100644 blob {readme}\tREADME.md\n").stdout.strip()
    tip = git(git_dir, "commit-tree", tree, "-p", "main", "-m", "docs made with git")
    git(git_dir, "update-ref", "refs/heads/docs", tip.stdout.strip())
    items = json.loads(mint(work, "log", "--json", "docs").stdout)
    assert [i["commit"] for i in items] == git_log(work, "docs")
    assert items[0]["meta"] is None and items[0]["message"] == "docs made with git\n"
    assert all(isinstance(i["meta"], dict) for i in items[1:])
    assert len(mint(work, "log", "--oneline", "docs").stdout.splitlines()) == len(items)


def _clone(work: Path, dst: Path, *options: str) -> Path:
    """`git clone --bare OPTIONS` of `work`'s store into `dst/.mint` (through file://, so that
    --depth and --filter apply); returns `dst`."""
    subprocess.run(
        ["git", "clone", "-q", "--bare", *options, (work / ".mint").as_uri(), str(dst / ".mint")],
        env=ENV,
        check=True,
        capture_output=True,
    )
    return dst


def test_shallow_clone_stops_at_its_boundary_and_names_itself(work: Path, tmp_path: Path) -> None:
    # `git clone --depth`: git treats the boundary commits (listed in .mint/shallow) as having
    # no parents. log printed nothing, fsck called the boundary damage, gc refused, and a read
    # of a tensor whose XOR base was not fetched said only "missing from the store".
    git_dir = work / ".mint"
    revs = git(git_dir, "rev-list", "--reverse", "main").stdout.split()
    root_tree = git(git_dir, "rev-parse", f"{revs[0]}^{{tree}}").stdout.strip()
    tip = git(git_dir, "commit-tree", root_tree, "-p", "main", "-m", "back to rev 0")
    git(git_dir, "update-ref", "refs/heads/main", tip.stdout.strip())  # self-contained blobs
    mint(work, "checkout", "--force", "main")
    weights_0 = (work / "adapter_model.safetensors").read_bytes()

    whole_tip = _clone(work, tmp_path / "d1", "--depth", "1")
    assert (whole_tip / ".mint" / "shallow").is_file()
    assert git_log(whole_tip) == [tip.stdout.strip()]
    assert mint(whole_tip, "log", "--oneline").stdout.count("\n") == 1
    assert json.loads(mint(whole_tip, "fsck", "--json").stdout)["ok"]
    mint(whole_tip, "gc")
    assert json.loads(mint(whole_tip, "fsck", "--json").stdout)["ok"]
    mint(whole_tip, "checkout", "--force", "main")
    assert (whole_tip / "adapter_model.safetensors").read_bytes() == weights_0

    two = _clone(work, tmp_path / "d2", "--depth", "2")
    items = json.loads(mint(two, "log", "--json").stdout)
    assert [i["commit"] for i in items] == git_log(two)
    assert items[-1]["parents"] == []  # as `git log --format=%P` shows a grafted commit
    assert "goes past the first commit" in mint_fails(two, "checkout", "main~2")
    # The boundary revision's tensors are XOR-encoded against blobs that were not fetched.
    line = mint_fails(two, "checkout", "--force", "main~1")
    assert "shallow clone" in line and "git --git-dir .mint fetch --unshallow" in line, line
    report = json.loads(mint(two, "fsck", "--json", ok=False).stdout)
    assert report["problems"] and all("shallow clone" in p for p in report["problems"])
    assert not any(revs[1] in p for p in report["problems"])  # the boundary's parent
    # gc packs what is there: a base the clone never had is no damage, nor can it be pruned.
    done = mint(two, "gc")
    assert done.stdout.startswith("packed ") and ", pruned 0;" in done.stdout, done.stdout
    warning = done.stderr.strip()
    assert warning.startswith("warning: ") and "XOR base" in warning, done.stderr
    assert "shallow clone" in warning and "backup" not in warning, warning
    git_fsck(two)
    assert (
        json.loads(mint(two, "fsck", "--json", ok=False).stdout)["problems"] == report["problems"]
    )
    # The command the hint names makes it whole.
    git(two / ".mint", "fetch", "-q", "--unshallow")
    assert json.loads(mint(two, "fsck", "--json").stdout)["ok"]
    assert mint(two, "gc").stderr == ""
    assert len(json.loads(mint(two, "log", "--json").stdout)) == len(revs) + 1
    mint(two, "checkout", "--force", "main~1")


def test_partial_clone_names_itself_when_an_object_is_missing(work: Path, tmp_path: Path) -> None:
    git(work / ".mint", "config", "uploadpack.allowFilter", "true")
    partial = _clone(work, tmp_path / "p", "--filter=blob:none")
    line = mint_fails(partial, "checkout", "--force", "main")
    assert "partial clone" in line and "without --filter" in line, line
    assert "partial clone" in mint_fails(partial, "gc")
    # A filter that leaves nothing out: gc runs, and deletes the fetched pack's `.promisor`
    # with it (git's repack does; left behind, git counts it as garbage and warns).
    whole = _clone(work, tmp_path / "w", "--filter=blob:limit=1m")
    pack_dir = whole / ".mint" / "objects" / "pack"
    assert list(pack_dir.glob("*.promisor"))
    assert mint(whole, "gc").stdout.startswith("packed ")
    assert all(p.with_suffix(".pack").exists() for p in pack_dir.glob("*.promisor"))
    assert "garbage: 0" in git(whole / ".mint", "count-objects", "-v").stdout
    assert "warning" not in git(whole / ".mint", "gc", "-q").stderr
    git_fsck(whole)


def test_git_commit_in_a_worktree_says_which_hook_refused_it(work: Path, tmp_path: Path) -> None:
    # git runs the store's shared pre-commit hook for a `git commit` in a worktree; its refusal
    # only said ". is not a PEFT adapter", naming neither mintvcs nor --no-verify.
    git_dir = work / ".mint"
    wt = tmp_path / "wt"
    git(git_dir, "worktree", "add", "-q", "-b", "notes", str(wt), "main")
    (wt / "files").mkdir(exist_ok=True)
    (wt / "files" / "NOTE.md").write_text("hi\n")

    def in_wt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args], cwd=wt, env=ENV, capture_output=True, text=True, check=False
        )

    assert in_wt("add", "files/NOTE.md").returncode == 0
    refused = in_wt("commit", "-q", "-m", "notes")
    assert refused.returncode != 0
    assert "mintvcs's pre-commit hook" in refused.stderr, refused.stderr
    assert "PEFT adapter" in refused.stderr and "git commit --no-verify" in refused.stderr
    assert in_wt("commit", "-q", "--no-verify", "-m", "notes").returncode == 0


def test_commit_takes_git_identity_and_date_variables(work: Path) -> None:
    # GIT_COMMITTER_* and GIT_*_DATE as git takes them (reproducible commits, bots); git
    # writes no `encoding` header for UTF-8, so `git cat-file` shows what git would write.
    mutate(work, seed=5)
    env = {
        "GIT_AUTHOR_NAME": "Ada",
        "GIT_AUTHOR_EMAIL": "ada@example.com",
        "GIT_AUTHOR_DATE": "2026-01-02T03:04:05+01:00",
        "GIT_COMMITTER_NAME": "Bot",
        "GIT_COMMITTER_EMAIL": "bot@example.com",
        "GIT_COMMITTER_DATE": "@1767225600 -0700",
    }
    result = subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", "commit", "-m", "dated", "--no-verify"],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    body = git(work / ".mint", "cat-file", "commit", "HEAD").stdout
    assert "author Ada <ada@example.com> 1767319445 +0100\n" in body
    assert "committer Bot <bot@example.com> 1767225600 -0700\n" in body
    assert "encoding" not in body
    assert git(work / ".mint", "log", "-1", "--format=%an|%cn|%aI").stdout.strip() == (
        "Ada|Bot|2026-01-02T03:04:05+01:00"
    )
    for date in ("next tuesday", "@99999999999999999999", "1960-01-01", "@1 +9999", "@1 +0060"):
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "mintvcs.cli",
                "commit",
                "-m",
                "x",
                "--no-verify",
                "--allow-empty",
            ],
            cwd=work,
            env={**os.environ, **env, "GIT_AUTHOR_DATE": date},
            capture_output=True,
            text=True,
            check=False,
        )
        assert bad.returncode != 0 and "GIT_AUTHOR_DATE" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


def test_a_symbolic_branch_is_listed_and_deleted_as_git_does(work: Path) -> None:
    git_dir = work / ".mint"
    main = git(git_dir, "rev-parse", "main").stdout.strip()
    git(git_dir, "symbolic-ref", "refs/heads/alias", "refs/heads/main")
    rows = {b["name"]: b for b in json.loads(mint(work, "branch", "--json").stdout)}
    assert rows["alias"] == {"name": "alias", "commit": main, "current": False, "alias_of": "main"}
    assert rows["main"]["alias_of"] is None
    assert "  alias  -> main" in mint(work, "branch").stdout.splitlines()
    assert mint(work, "branch", "-D", "alias").stdout.strip() == "Deleted branch alias (was main)."
    assert git(git_dir, "rev-parse", "main").stdout.strip() == main
    assert "alias" not in git(git_dir, "branch").stdout


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        # dulwich writes such trees (git mktree would refuse); no ref needs to reach them.
        (b"..", "invalid name .."),
        # dulwich's check only knows ".git"; git's hasDotgit also catches case and NTFS aliases.
        (b".GIT", "entry git reads '.GIT' as .git"),
        (b"git~1", "entry 'git~1' is an NTFS short name"),
        (b"GIT~1. ", "entry 'GIT~1. ' is an NTFS short name"),  # NTFS drops the dot and space
        # Code points HFS+ ignores, from both ends of git's ranges.
        (".g\u202eit".encode(), "entry git reads"),
        (".gi\u206ft".encode(), "entry git reads"),
    ],
)
def test_fsck_flags_tree_entries_git_fsck_flags(work: Path, name: bytes, problem: str) -> None:
    from dulwich.objects import Blob, Tree
    from dulwich.repo import Repo

    store = Repo(str(work / ".mint")).object_store
    blob = Blob.from_string(b"x")
    store.add_object(blob)
    tree = Tree()
    tree.add(name, 0o100644, blob.id)
    store.add_object(tree)
    problems, (git_status, git_text) = damage_checks(work)
    assert git_status != 0 and tree.id.decode() in git_text
    assert len(problems) == 1
    assert problems[0].startswith(f"malformed tree {tree.id.decode()}: {problem}"), problems


def test_checkout_logs_a_detached_head_by_its_full_id(work: Path) -> None:
    # As git: `checkout: moving from <40 hex> to main`, so @{-1} names the exact commit.
    git_dir = work / ".mint"
    tip = git(git_dir, "rev-parse", "main~1").stdout.strip()
    mint(work, "checkout", tip)
    mint(work, "checkout", "main")
    assert f"checkout: moving from {tip} to main" in (git_dir / "logs" / "HEAD").read_text()
    assert git(git_dir, "rev-parse", "@{-1}").stdout.strip() == tip


def test_branch_and_tag_delete_every_name_given(work: Path) -> None:
    # `branch -d a b` deleted a and silently ignored b (taken as a start point); git deletes both.
    for name in ("x1", "x2"):
        mint(work, "branch", name)
        mint(work, "tag", f"t-{name}")
    out = mint(work, "branch", "-d", "x1", "x2").stdout
    assert "Deleted branch x1" in out and "Deleted branch x2" in out
    mint(work, "tag", "-d", "t-x1", "t-x2")
    assert not {"x1", "x2"} & set(
        git(work / ".mint", "branch", "--format=%(refname:short)").stdout.split()
    )
    assert git(work / ".mint", "tag").stdout.split() == []
    assert "name required" in mint_fails(work, "branch", "-d")
    # A name that fails is reported; the others still go, and the exit status says so.
    mint(work, "branch", "y1")
    mint(work, "branch", "y2")
    result = mint(work, "branch", "-d", "y1", "nosuch", "y2", ok=False)
    assert result.returncode == 1 and "nosuch" in result.stderr
    assert "Deleted branch y1" in result.stdout and "Deleted branch y2" in result.stdout
    assert "too many arguments" in mint_fails(work, "branch", "a", "main", "extra")


def test_git_push_into_the_checked_out_branch_is_refused(work: Path, tmp_path: Path) -> None:
    # git takes .mint for a bare repository, so receive.denyCurrentBranch never applied: a push
    # moved main under the work tree, and the next commit recorded the stale files on top.
    clone = tmp_path / "clone"
    clone.mkdir()
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(work / ".mint"), str(clone / ".mint")], check=True
    )
    mint(clone, "checkout", "--force", "main")
    mutate(clone, seed=17)
    mint(clone, "commit", "-m", "from the clone", "--no-verify")
    before = git(work / ".mint", "rev-parse", "main").stdout
    pushed = git(clone / ".mint", "push", "-q", str(work / ".mint"), "main", ok=False)
    assert pushed.returncode != 0 and "checked out in the mintvcs work tree" in pushed.stderr
    assert git(work / ".mint", "rev-parse", "main").stdout == before
    git(clone / ".mint", "push", "-q", str(work / ".mint"), "main:refs/heads/from-clone")
    assert json.loads(mint(work, "status", "--json").stdout)["clean"]


def test_a_hand_made_reflog_line_cannot_send_at_minus_n_in_circles(work: Path) -> None:
    log = work / ".mint" / "logs" / "HEAD"
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    with log.open("a") as f:
        f.write(f"{head} {head} T <t@t> 1 +0000\tcheckout: moving from @{{-1}} to main\n")
    line = mint_fails(work, "checkout", "@{-1}")
    assert "checkout" in line and "reflog" in line


def test_hostile_revision_specs_are_refused_quickly_and_cleanly(work: Path) -> None:
    from mintvcs.store import Repository, UnknownRevisionError

    with Repository.open(work) as repo:
        for spec in (
            "main@{\u00b2}",
            "main@{\u0661}",
            "@{-0}",
            "main~" + "9" * 5000,
            "main^{tree}",
        ):
            with pytest.raises(UnknownRevisionError):
                repo.resolve(spec)
        started = time.monotonic()
        with pytest.raises(UnknownRevisionError):
            repo.resolve("~" * 16000 + "x")
        assert repo.resolve("main" + "^0" * 510) == repo.resolve("main")
        assert time.monotonic() - started < 2, "spec parsing is not linear"


def test_update_hook_sees_through_a_branch_alias(work: Path, tmp_path: Path) -> None:
    git_dir = work / ".mint"
    git(git_dir, "symbolic-ref", "refs/heads/alias", "refs/heads/main")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--bare", str(git_dir), str(clone)], check=True)
    tip = git(clone, "rev-parse", "main~1").stdout.strip()
    pushed = git(clone, "push", "-q", "-f", str(git_dir), f"{tip}:refs/heads/alias", ok=False)
    assert pushed.returncode != 0 and "checked out in the mintvcs work tree" in pushed.stderr


def _age_objects(work: Path, seconds: float = 7200) -> None:
    """Make every object file look `seconds` old, past gc's grace period for unreachable ones."""
    old = time.time() - seconds
    for path in (work / ".mint" / "objects").rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))


def test_gc_keeps_what_a_git_worktree_holds_and_its_branch_cannot_be_deleted(
    work: Path, tmp_path: Path
) -> None:
    git_dir = work / ".mint"
    tree = tmp_path / "wt"
    git(git_dir, "worktree", "add", "-q", "--detach", str(tree), "main")
    (tree / "files").mkdir(exist_ok=True)
    (tree / "files" / "NOTES.md").write_text("notes\n")
    subprocess.run(["git", "add", "files/NOTES.md"], cwd=tree, env=ENV, check=True)
    subprocess.run(
        ["git", "commit", "-q", "--no-verify", "-m", "in a worktree"], cwd=tree, env=ENV, check=True
    )
    detached = git(git_dir, "rev-parse", "--verify", "HEAD", ok=False)  # the store's own HEAD
    worktree_head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tree, env=ENV, capture_output=True, text=True, check=True
    ).stdout.strip()
    (tree / "STAGED.md").write_text("staged, not committed\n")
    subprocess.run(["git", "add", "STAGED.md"], cwd=tree, env=ENV, check=True)
    staged = git(git_dir, "hash-object", str(tree / "STAGED.md")).stdout.strip()
    _age_objects(work)
    mint(work, "gc")
    # gc used to prune both: only refs, HEAD and their reflogs counted as roots.
    for oid in (worktree_head, staged):
        assert git(git_dir, "cat-file", "-t", oid).returncode == 0
    git_fsck(work)
    assert detached.stdout.strip() == git(git_dir, "rev-parse", "HEAD").stdout.strip()
    git(git_dir, "worktree", "add", "-q", str(tmp_path / "wt2"), "side")
    assert "checked out in the git worktree" in mint_fails(work, "branch", "-D", "side")


@pytest.mark.parametrize("version", ["2", "4"])
def test_gc_reads_a_split_index_and_keeps_what_both_halves_stage(
    work: Path, tmp_path: Path, version: str
) -> None:
    # A split index (core.splitIndex, update-index --split-index) ends in a `link` extension
    # naming sharedindex.<id> beside it; gc read it with dulwich, which failed its checksum,
    # and refused every such repository as damaged, advising a `git reset` that split it again.
    git_dir = work / ".mint"
    tree = tmp_path / "wt"
    git(git_dir, "worktree", "add", "-q", "--detach", str(tree), "main")

    def stage(where: list[str], folder: Path, name: str) -> str:
        (folder / name).write_text(f"{name} in {folder.name}, staged only\n")
        subprocess.run(["git", *where, "add", name], cwd=folder, env=ENV, check=True)
        return git(git_dir, "hash-object", str(folder / name)).stdout.strip()

    store = ["--git-dir", str(git_dir), "--work-tree", str(work)]
    git(git_dir, "config", "core.splitIndex", "true")
    staged = [stage(store, work, "SHARED.txt"), stage(store, work, "SPLIT.txt")]
    in_tree: list[str] = []
    subprocess.run(
        ["git", "update-index", "--index-version", version], cwd=tree, env=ENV, check=True
    )
    staged.append(stage(in_tree, tree, "SHARED.txt"))
    subprocess.run(["git", "update-index", "--split-index"], cwd=tree, env=ENV, check=True)
    staged.append(stage(in_tree, tree, "SPLIT.txt"))
    admin = Path(git(git_dir, "rev-parse", "--git-path", "worktrees").stdout.strip())
    for index in (git_dir / "index", next(admin.iterdir()) / "index"):
        assert b"link" in index.read_bytes(), "git did not write a split index"
    _age_objects(work)
    mint(work, "gc")
    for oid in staged:
        assert git(git_dir, "cat-file", "-t", oid).stdout.strip() == "blob", oid
    git_fsck(work)
    # Genuine damage is still refused, not read past.
    index = git_dir / "index"
    index.write_bytes(index.read_bytes()[:-1] + b"!")
    assert "the index of the store cannot be read" in mint_fails(work, "gc")


def test_gc_leaves_git_s_pack_files_consistent(work: Path) -> None:
    git_dir = work / ".mint"
    pack_dir = git_dir / "objects" / "pack"
    git(git_dir, "-c", "pack.writeReverseIndex=true", "repack", "-a", "-d", "-q")
    git(git_dir, "multi-pack-index", "write")
    git(git_dir, "commit-graph", "write", "--reachable")
    kept = next(pack_dir.glob("*.pack"))
    kept.with_suffix(".keep").touch()
    mutate(work, seed=5)
    mint(work, "commit", "-m", "after the kept pack", "--no-verify")
    git(git_dir, "repack", "-d", "-q")  # a second pack of git's, with its .rev
    mint(work, "gc")
    # gc used to delete the kept pack, leave the dropped pack's .rev behind and keep a
    # multi-pack-index and commit-graph naming what it removed (git fsck then failed).
    assert kept.exists() and kept.with_suffix(".idx").exists()
    for path in pack_dir.iterdir():
        assert path.with_suffix(".pack").exists(), f"{path.name} outlives its pack"
    assert not (pack_dir / "multi-pack-index").exists()
    git_fsck(work)
    assert "\ngarbage: 0\n" in git(git_dir, "count-objects", "-v").stdout
    assert_sound_and_checks_out(work, (work / "adapter_model.safetensors").read_bytes())


def test_gc_rewrites_git_s_pack_list_for_dumb_http_clones(work: Path, tmp_path: Path) -> None:
    # Every git repack writes objects/info/packs (update-server-info); gc deleted the packs it
    # named and left it, so a dumb-HTTP clone failed ("Cannot obtain needed object"), and left
    # the multi-pack-index's bitmap and reverse index behind it.
    git_dir = work / ".mint"
    pack_dir = git_dir / "objects" / "pack"
    git(git_dir, "gc", "-q")
    git(git_dir, "repack", "-d", "-q", "--write-midx", "--write-bitmap-index")
    assert list(pack_dir.glob("multi-pack-index-*.bitmap"))
    mutate(work, seed=7)
    mint(work, "commit", "-m", "after git's gc", "--no-verify")
    mint(work, "gc")
    listed = (git_dir / "objects" / "info" / "packs").read_text()
    assert not list(pack_dir.glob("multi-pack-index*"))
    assert {line.split()[1] for line in listed.splitlines() if line} == {
        path.name for path in pack_dir.glob("*.pack")
    }
    git(git_dir, "update-server-info")  # git's own listing, the oracle: the same file
    assert (git_dir / "objects" / "info" / "packs").read_text() == listed

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(work))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (git_dir / "objects" / "info" / "packs").write_text(listed)  # ours again, not git's
        url = f"http://127.0.0.1:{server.server_address[1]}/.mint"
        clone = tmp_path / "dumb"
        subprocess.run(["git", "clone", "-q", "--bare", url, str(clone)], env=ENV, check=True)
    finally:
        server.shutdown()
        server.server_close()
    assert git(clone, "rev-parse", "main").stdout == git(git_dir, "rev-parse", "main").stdout
    git(clone, "fsck", "--strict")


def test_pseudo_refs_of_the_git_directory_resolve_as_git_resolves_them(
    work: Path, tmp_path: Path
) -> None:
    # git reads FETCH_HEAD, ORIG_HEAD, MERGE_HEAD, CHERRY_PICK_HEAD (any name of capitals and
    # underscores) from the git directory before refs/; mintvcs read HEAD only, so `git fetch`
    # then `mintvcs checkout FETCH_HEAD` failed ("unknown revision 'FETCH_HEAD'").
    git_dir = work / ".mint"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--bare", str(git_dir), str(clone)], env=ENV, check=True)
    git(git_dir, "fetch", "-q", str(clone), "side", "main")
    git(git_dir, "update-ref", "ORIG_HEAD", "main~1")
    git(git_dir, "update-ref", "CHERRY_PICK_HEAD", "main~2")
    ids = git(git_dir, "rev-parse", "main~2", "side").stdout.split()
    (git_dir / "MERGE_HEAD").write_text(f"{ids[0]}\n{ids[1]}\n")
    git(git_dir, "update-ref", "refs/heads/ORIG_HEAD", "main")  # the git directory's wins
    (git_dir / "COMMIT_EDITMSG").write_text("rev 3\n")  # no ref: the next reading is taken
    git(git_dir, "tag", "COMMIT_EDITMSG", "main~1")
    repo = Repository.open(work)
    watcher = RefWatcher(repo)

    def agree(*specs: str) -> None:
        for spec in specs:
            expected = git(git_dir, "rev-parse", "--verify", spec).stdout.strip()
            logged = json.loads(mint(work, "log", "-n", "1", "--json", spec).stdout)
            assert logged[0]["commit"] == expected, spec
            assert repo.resolve(spec) == expected, spec
            assert watcher.resolve(spec).commit == expected, spec

    agree("FETCH_HEAD", "FETCH_HEAD~1", "ORIG_HEAD", "MERGE_HEAD", "CHERRY_PICK_HEAD")
    agree("COMMIT_EDITMSG")
    # git 2.39 takes FETCH_HEAD's first line, even one marked not-for-merge.
    (git_dir / "FETCH_HEAD").write_text(
        f"{ids[0]}\tnot-for-merge\tbranch 'old' of ../clone\n{ids[1]}\t\tbranch 'side' of ../clone\n"
    )
    agree("FETCH_HEAD")
    mint(work, "checkout", "FETCH_HEAD")
    assert git(git_dir, "rev-parse", "HEAD").stdout.strip() == ids[0]


def test_history_is_read_as_stored_replace_refs_and_grafts_ignored(work: Path) -> None:
    # mintvcs reads history as `git --no-replace-objects` with info/grafts ignored, and serves
    # `main~N` so (docs/format.md): log, resolve and the server follow the parents each commit
    # stores. Pinned, so that it cannot change silently.
    git_dir = work / ".mint"
    stored = git(git_dir, "log", "--format=%H", "main").stdout.split()
    git(git_dir, "replace", "--graft", "main~1")  # for git, main~1 has no parent now
    assert git(git_dir, "log", "--format=%H", "main").stdout.split() == stored[:2]
    assert (
        git(git_dir, "--no-replace-objects", "log", "--format=%H", "main").stdout.split() == stored
    )
    repo = Repository.open(work)
    watcher = RefWatcher(repo)
    for grafts in (False, True):
        if grafts:  # for git (deprecated but read), main has no parent either
            (git_dir / "info" / "grafts").write_text(f"{stored[0]}\n")
        logged = json.loads(mint(work, "log", "--json", "main").stdout)
        assert [entry["commit"] for entry in logged] == stored
        assert repo.resolve("main~2") == watcher.resolve("main~2").commit == stored[2]
        assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]


def test_a_tree_changed_with_git_is_refused_not_read_through_its_manifest(work: Path) -> None:
    git_dir = work / ".mint"

    def tensors(rev: str) -> dict[str, str]:
        listing = git(git_dir, "ls-tree", "-r", rev, "tensors").stdout.splitlines()
        return {path: info.split()[2] for info, path in (line.split("\t") for line in listing)}

    old_blob = tensors("main~1")
    changed = next(path for path, oid in tensors("main").items() if old_blob[path] != oid)
    # A user rolls one tensor back with git and commits: the tree changes, the manifest does not.
    git(git_dir, "read-tree", "main")
    git(git_dir, "update-index", "--cacheinfo", f"100644,{old_blob[changed]},{changed}")
    tree = git(git_dir, "write-tree").stdout.strip()
    (git_dir / "index").unlink()
    commit = git(git_dir, "commit-tree", tree, "-p", "main", "-m", "roll back").stdout.strip()
    git(git_dir, "update-ref", "refs/heads/gitedit", commit)
    # checkout wrote main's tensors, diff saw no change and fsck said ok.
    for args in (("checkout", "gitedit"), ("diff", "main", "gitedit"), ("show", "gitedit")):
        assert f"{changed} is" in mint_fails(work, *args) and "changed with git" in mint_fails(
            work, *args
        )
    report = json.loads(mint(work, "fsck", "--json", ok=False).stdout)
    assert not report["ok"] and any("changed with git" in p for p in report["problems"])


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ("100755,{blob},tensors/{name}", "tensors/{name} has mode 100755 in the tree"),
        ("100644,{blob},tensors/{name}.extra", "tensors/{name}.extra is in the tree, not in"),
        ("100644,{blob},tensors/sub/{name}", "tensors/sub/{name} is in the tree, not in"),
    ],
)
def test_a_tensors_tree_git_changed_otherwise_is_named_too(
    work: Path, entry: str, named: str
) -> None:
    # The tensors tree is compared whole with the bytes git writes for the manifest's records;
    # any other tree is walked entry by entry, so that the difference is still named.
    git_dir = work / ".mint"
    line = git(git_dir, "ls-tree", "main", "tensors/").stdout.splitlines()[0]
    blob, name = line.split()[2], line.split("\t")[1].split("/", 1)[1]
    git(git_dir, "read-tree", "main")
    git(git_dir, "update-index", "--add", "--cacheinfo", entry.format(blob=blob, name=name))
    tree = git(git_dir, "write-tree").stdout.strip()
    (git_dir / "index").unlink()
    commit = git(git_dir, "commit-tree", tree, "-p", "main", "-m", "edit").stdout.strip()
    git(git_dir, "update-ref", "refs/heads/gitedit", commit)
    line = mint_fails(work, "show", "gitedit")
    assert named.format(name=name) in line and "changed with git" in line, line


def test_an_intact_tensors_tree_is_compared_whole_not_walked(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dulwich.objects import Tree

    from mintvcs.store import Repository

    walked: list[bytes] = []
    items = Tree.items

    def counting(self: Tree) -> Any:
        walked.append(self.id)
        return items(self)

    repo = Repository.open(work)
    commit = repo.resolve("main")
    root = repo.get_object(repo.commit_info(commit).tree)
    assert isinstance(root, Tree)
    tensors_tree = root[b"tensors"][1]
    monkeypatch.setattr(Tree, "items", counting)
    revision = repo.read_revision(commit)
    assert len(revision.manifest.tensors) > 1 and walked and tensors_tree not in walked
    repo.close()


# ASCII, and 84 three-byte characters: 252 bytes, which a count of characters took for 84.
@pytest.mark.parametrize(("branch", "tag"), [("n" * 300, "t" * 300), ("中" * 84, "標" * 84)])
def test_a_ref_name_no_file_can_hold_is_ignored_kept_by_gc_and_deletable(
    work: Path, tmp_path: Path, branch: str, tag: str
) -> None:
    # git takes a ref whose component is over 250 bytes, and `git clone` writes it into
    # packed-refs, where no file name limit applies. `branch` (and --json) and `gc` failed on it
    # for everyone, and `branch -d` could not remove it.
    git_dir = work / ".mint"
    tree = git(git_dir, "rev-parse", "main^{tree}").stdout.strip()
    only_long = git(git_dir, "commit-tree", tree, "-p", "main", "-m", "kept").stdout.strip()
    main = git(git_dir, "rev-parse", "main").stdout.strip()
    git(git_dir, "pack-refs", "--all")
    packed = (git_dir / "packed-refs").read_text().splitlines(keepends=True)
    packed += [f"{only_long} refs/heads/{branch}\n", f"{main} refs/tags/{tag}\n"]
    by_name = sorted(packed[1:], key=lambda line: line.split()[1])  # no peeled lines: no tags
    (git_dir / "packed-refs").write_text(packed[0] + "".join(by_name))
    victim = _clone(work, tmp_path / "victim")
    assert f"refs/heads/{branch}" in (victim / ".mint" / "packed-refs").read_text()
    mint(victim, "checkout", "--force", "main")

    listed = mint(victim, "branch")
    assert listed.stdout.split() == ["*", "main", main[:7], "side", listed.stdout.split()[-1]]
    assert listed.stderr.startswith(f"warning: ignoring ref refs/heads/{branch}: component ")
    assert "branch -D NAME" in listed.stderr
    rows = json.loads(mint(victim, "branch", "--json").stdout)
    assert [row["name"] for row in rows] == ["main", "side"]
    tags = mint(victim, "tag")
    assert tags.stdout == "" and f"ignoring ref refs/tags/{tag}" in tags.stderr

    mint(victim, "gc")
    assert git(victim / ".mint", "cat-file", "-t", only_long).stdout.strip() == "commit"
    assert f"{only_long} refs/heads/{branch}" in (victim / ".mint" / "packed-refs").read_text()
    git_fsck(victim)

    assert mint(victim, "branch", "-D", branch).stdout.startswith(f"Deleted branch {branch}")
    assert mint(victim, "tag", "-d", tag).stdout.startswith(f"Deleted tag '{tag}'")
    names = git(victim / ".mint", "for-each-ref", "--format=%(refname)").stdout.split()
    assert names == ["refs/heads/main", "refs/heads/side"]
    assert mint(victim, "branch").stderr == ""
    git_fsck(victim)
