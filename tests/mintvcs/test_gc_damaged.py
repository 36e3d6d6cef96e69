"""`mintvcs gc` on a damaged store refuses as `git gc` does, and changes nothing while refusing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.mintvcs.storekit import copy_adapter, git, git_fsck, mint, mint_fails, mutate

Snapshot = dict[str, tuple[int, bytes | None]]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, peft_adapter: Path) -> Path:
    """A repository with three revisions on main and a branch, every object loose; built once."""
    work = tmp_path_factory.mktemp("gc-damaged") / "work"
    mint(work.parent, "init", str(work), "--base-model", str(tiny_base))
    copy_adapter(peft_adapter, work)
    mint(work, "commit", "-m", "rev 0", "--no-verify")
    for seed in (1, 2):
        mutate(work, seed=seed)
        mint(work, "commit", "-m", f"rev {seed}", "--no-verify")
    mint(work, "branch", "side", "HEAD~1")
    return work


@pytest.fixture
def work(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built repository (modes and mtimes kept), for one test to damage."""
    copy = tmp_path / "work"
    shutil.copytree(built, copy)
    return copy


def snapshot(git_dir: Path) -> Snapshot:
    """Every path under `git_dir`: its mode and, for files, its bytes."""
    out: Snapshot = {}
    for path in sorted(git_dir.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(git_dir))] = (
            st.st_mode,
            None if path.is_dir() else path.read_bytes(),
        )
    return out


def blobs(work: Path, rev: str = "HEAD") -> list[str]:
    """Blob ids of `rev`'s tree, largest first (real git lists them)."""
    out = git(work / ".mint", "ls-tree", "-r", "-l", rev).stdout
    rows = [line.split() for line in out.splitlines()]
    return [row[2] for row in sorted(rows, key=lambda r: -int(r[3])) if row[1] == "blob"]


def loose_path(work: Path, oid: str) -> Path:
    """Where loose object `oid` lives."""
    return work / ".mint" / "objects" / oid[:2] / oid[2:]


def rewrite(path: Path, data: bytes) -> None:
    """Replace a read-only object file's bytes, keeping its mode and mtime."""
    st = path.stat()
    path.chmod(0o644)
    path.write_bytes(data)
    path.chmod(st.st_mode)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def damage_checks(work: Path) -> tuple[list[str], tuple[int, str]]:
    """What `mintvcs fsck --json` and `git fsck --strict` report."""
    report = json.loads(mint(work, "fsck", "--json", ok=False).stdout)
    strict = git(work / ".mint", "fsck", "--strict", "--no-dangling", ok=False)
    return sorted(report["problems"]), (strict.returncode, strict.stdout + strict.stderr)


def gc_refuses(work: Path, oid: str) -> str:
    """Run gc expecting a refusal naming `oid`; the repository must come out unchanged."""
    before = snapshot(work / ".mint")
    checks = damage_checks(work)
    assert checks[0], "the test should have damaged the store"
    result = mint(work, "gc", ok=False)  # asserts that no traceback was printed
    assert result.returncode == 128, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gc refused: "), result.stderr
    line = lines[0]
    assert oid in line and "mintvcs fsck" in line and "backup" in line, line
    assert result.stdout == "", "gc must not report packing after refusing"
    assert snapshot(work / ".mint") == before, "a refused gc changed the repository"
    assert damage_checks(work) == checks
    return line


def test_gc_refuses_bit_flipped_loose_blob(work: Path) -> None:
    oid = blobs(work)[0]
    path = loose_path(work, oid)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the stored (zstd) part of the tensor blob
    rewrite(path, bytes(data))
    line = gc_refuses(work, oid)
    assert "corrupt loose object" in line


def test_gc_refuses_recompressed_blob_with_wrong_content(work: Path) -> None:
    oid, other = blobs(work)[:2]
    path = loose_path(work, oid)
    body = zlib.decompress(loose_path(work, other).read_bytes())
    # A well-formed object whose content is another blob's: only its hash gives it away.
    rewrite(path, zlib.compress(body))
    line = gc_refuses(work, oid)
    assert "hashes to" in line


@pytest.mark.parametrize("which", [0, -1], ids=["largest-tensor", "safetensors-header"])
def test_gc_refuses_missing_reachable_blob(work: Path, which: int) -> None:
    oid = blobs(work, "side")[which]
    loose_path(work, oid).unlink()
    line = gc_refuses(work, oid)
    assert "missing" in line and "reachable from" in line


def test_gc_refuses_corrupt_object_inside_pack(work: Path) -> None:
    mint(work, "gc")
    packs = list((work / ".mint" / "objects" / "pack").glob("*.pack"))
    assert len(packs) == 1
    oid = blobs(work)[0]
    # `git verify-pack -v` rows: id, type, size, size in pack, offset.
    rows = git(work / ".mint", "verify-pack", "-v", str(packs[0].with_suffix(".idx"))).stdout
    entry = next(line.split() for line in rows.splitlines() if line.startswith(oid))
    in_pack, offset = int(entry[3]), int(entry[4])
    data = bytearray(packs[0].read_bytes())
    data[offset + in_pack // 2] ^= 0x01
    rewrite(packs[0], bytes(data))
    line = gc_refuses(work, oid)
    assert "corrupt packed object" in line


def test_gc_skips_reflog_entry_whose_commit_is_gone(work: Path) -> None:
    # As git: a reflog that names a pruned commit is no reason to refuse.
    dropped = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    mint(work, "reset", "--hard", "HEAD~1")
    loose_path(work, dropped).unlink()
    checks = damage_checks(work)
    assert checks[1][0] != 0 and "invalid reflog entry" in checks[1][1]
    assert "packed " in mint(work, "gc").stdout
    assert damage_checks(work) == checks  # the same damage, nothing new


def test_gc_on_healthy_repository_packs_and_cleans_up(work: Path) -> None:
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    assert mint(work, "gc").stdout.startswith("packed ")
    git_dir = work / ".mint"
    assert not (git_dir / "gc.pid").exists()
    assert not [p for p in (git_dir / "objects").iterdir() if len(p.name) == 2]
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    git_fsck(work)
    assert git(git_dir, "rev-parse", "HEAD").stdout.strip() == head
    assert mint(work, "gc").stdout.startswith("packed ")  # and again, on a packed store


def test_gc_refuses_while_another_gc_holds_the_lock(work: Path) -> None:
    lock = work / ".mint" / "gc.pid"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}")  # this test process: alive
    before = snapshot(work / ".mint")
    line = mint_fails(work, "gc")
    assert "another gc is running" in line and f"pid {os.getpid()}" in line
    assert snapshot(work / ".mint") == before


def test_gc_takes_over_the_lock_of_a_dead_gc(work: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    lock = work / ".mint" / "gc.pid"
    lock.write_text(f"{dead.stdout.strip()} {socket.gethostname()}")
    assert mint(work, "gc").stdout.startswith("packed ")
    assert not lock.exists()


def test_gc_prunes_old_unreachable_objects_and_keeps_young_ones(work: Path) -> None:
    git_dir = work / ".mint"
    ids = []
    for name in ("old", "young"):
        source = work.parent / f"{name}.txt"
        source.write_text(f"unreachable and {name}\n")
        ids.append(git(git_dir, "hash-object", "-w", str(source)).stdout.strip())
    old, young = ids
    two_hours_ago = time.time() - 7200
    os.utime(loose_path(work, old), (two_hours_ago, two_hours_ago))
    assert ", pruned 1;" in mint(work, "gc").stdout
    assert git(git_dir, "cat-file", "-e", old, ok=False).returncode != 0
    assert git(git_dir, "cat-file", "-t", young).stdout.strip() == "blob"
    git_fsck(work)


def test_fsck_flags_tree_entries_git_fsck_flags(work: Path) -> None:
    # A tree with a '..' entry (dulwich writes it; git mktree would refuse) checks out nowhere
    # sane: both fscks must name it even though no ref reaches it.
    from dulwich.objects import Blob, Tree
    from dulwich.repo import Repo

    store = Repo(str(work / ".mint")).object_store
    blob = Blob.from_string(b"x")
    store.add_object(blob)
    tree = Tree()
    tree.add(b"..", 0o100644, blob.id)
    store.add_object(tree)
    problems, (git_status, git_text) = damage_checks(work)
    assert git_status != 0 and tree.id.decode() in git_text
    assert problems == [f"malformed tree {tree.id.decode()}: invalid name .."]


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
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    (work / "adapter_model.safetensors").unlink()
    mint(work, "checkout", "--force", "main")
    assert (work / "adapter_model.safetensors").read_bytes() == weights


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
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    (work / "adapter_model.safetensors").unlink()
    mint(work, "checkout", "--force", "main")
    assert (work / "adapter_model.safetensors").read_bytes() == weights


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
    assert rows["treetag"] == {"name": "treetag", "commit": None, "object": tree, "type": "tree"}
    assert rows["blobtag"]["type"] == "blob" and rows["blobtag"]["commit"] is None
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
    assert json.loads(mint(clone, "fsck", "--json").stdout)["ok"]
    assert mint(clone, "gc").stdout.startswith("packed ")
    (clone / "adapter_model.safetensors").unlink()
    mint(clone, "checkout", "--force", "main")
    assert (clone / "adapter_model.safetensors").read_bytes() == weights

    git(work / ".mint", "-c", "pack.indexVersion=1", "repack", "-adq")
    assert json.loads(mint(work, "fsck", "--json").stdout)["ok"]
    assert mint(work, "gc").stdout.startswith("packed ")
    (work / "adapter_model.safetensors").unlink()
    mint(work, "checkout", "--force", "main")
    assert (work / "adapter_model.safetensors").read_bytes() == weights


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
    bad = subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", "commit", "-m", "x", "--no-verify", "--allow-empty"],
        cwd=work,
        env={**os.environ, **env, "GIT_AUTHOR_DATE": "next tuesday"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0 and "GIT_AUTHOR_DATE" in bad.stderr and "Traceback" not in bad.stderr
