"""The store's fast paths: commits written as one pack, mixed zlib streams, the clean-by-stat
record, in-place work-tree writes and the in-process sample pre-commit hook."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mintvcs import porcelain
from mintvcs.ids import blob_id
from mintvcs.keep import ReplacedWeights
from mintvcs.store import PACK_THRESHOLD, Repository
from tests.mintvcs.storekit import (
    ENV,
    WEIGHTS,
    count_reads,
    git,
    git_fsck,
    handmade_adapter,
    mint,
    mint_fails,
    mint_fsck_ok,
    mutate,
    set_value,
    tensor_names,
    whole_commit_reads,
)


def _many_tensors(
    path: Path,
    seed: int,
    count: int = PACK_THRESHOLD + 4,
    extra: dict[str, tuple[str, list[int], bytes]] | None = None,
) -> Path:
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[str, list[int], bytes]] = {
        f"layers.{i}.lora_{ab}.weight": (
            "BF16",
            [4, 96] if ab == "A" else [96, 4],
            ((rng.standard_normal(384).astype("<f4") * 0.02).view("<u4") >> 16)
            .astype("<u2")
            .tobytes(),
        )
        for i in range(count // 2)
        for ab in "AB"
    }
    return handmade_adapter(path, {**tensors, **(extra or {})})


def _repository_of(tmp_path: Path, src: Path) -> Path:
    """A new repository at tmp_path/work (no hooks) whose work tree holds the adapter in `src`."""
    work = tmp_path / "work"
    mint(tmp_path, "init", str(work), "--no-hooks")
    for name in os.listdir(src):
        shutil.copyfile(src / name, work / name)
    return work


def _loose_blobs(git_dir: Path) -> list[Path]:
    return [
        p
        for d in (git_dir / "objects").iterdir()
        if len(d.name) == 2
        for p in d.iterdir()
        if (git_dir / "objects").exists()
    ]


@pytest.fixture(autouse=True)
def _identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_CONFIG_NOSYSTEM", "GIT_CONFIG_GLOBAL"):
        monkeypatch.setenv(key, ENV[key])


def test_big_commit_is_one_pack_that_git_reads(tmp_path: Path) -> None:
    src = _many_tensors(tmp_path / "src", seed=1)
    work = _repository_of(tmp_path, src)
    mint(work, "commit", "-m", "r0")
    packs = list((work / ".mint" / "objects" / "pack").glob("pack-*.idx"))
    assert len(packs) == 1
    # Only the small objects (config, header, manifest, trees, commit) are loose.
    assert len(_loose_blobs(work / ".mint")) <= 8
    git_fsck(work)
    mint_fsck_ok(work)
    # Two more revisions: XOR chains across packs, each link read from a pack.
    for k in (1, 2):
        mutate(work, seed=k, scale=1e-3)
        mint(work, "commit", "-m", f"r{k}")
    expected = (work / WEIGHTS).read_bytes()
    repo = Repository.open(work)
    tip = repo.read_revision(repo.head_commit() or "")
    assert max(t.depth for t in tip.manifest.tensors) == 2
    name = tip.manifest.tensors[0].name
    blob = tip.manifest.tensors[0].blob
    # git inflates our tensor blobs (deflated header + stored payload) to the same bytes.
    assert bytes(repo.blob_view(blob)) == _git_blob(work, blob)
    assert tip.tensor(name) == tip.tensors()[name][2]
    repo.close()
    mint(work, "checkout", "HEAD~2")
    mint(work, "checkout", "main")
    assert (work / WEIGHTS).read_bytes() == expected
    git_fsck(work)
    # After gc the same bytes come out of dulwich's pack, with our per-object levels.
    mint(work, "gc")
    git_fsck(work)
    mint_fsck_ok(work)
    mint(work, "checkout", "--force", "HEAD~1")
    mint(work, "checkout", "main")
    assert (work / WEIGHTS).read_bytes() == expected


def _git_blob(work: Path, oid: str) -> bytes:
    import subprocess

    return subprocess.run(
        ["git", "--git-dir", str(work / ".mint"), "cat-file", "blob", oid],
        env=ENV,
        capture_output=True,
        check=True,
    ).stdout


def test_flipped_byte_in_commit_pack_is_named(tmp_path: Path) -> None:
    src = _many_tensors(tmp_path / "src", seed=2)
    work = _repository_of(tmp_path, src)
    mint(work, "commit", "-m", "r0")
    mint(work, "branch", "keep")
    mutate(work, seed=3)
    mint(work, "commit", "-m", "r1")
    # The first commit's pack holds every blob of `keep`.
    pack = min((work / ".mint" / "objects" / "pack").glob("pack-*.pack"), key=os.path.getmtime)
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x10
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(data))
    assert mint(work, "fsck", ok=False).returncode == 1
    line = mint_fails(work, "checkout", "keep")
    assert "layers." in line


def test_loose_tensor_blobs_read_by_git(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    src = handmade_adapter(
        tmp_path / "src",
        {
            "w.lora_A.weight": (
                "F32",
                [8, 64],
                (rng.standard_normal(512) * 0.02).astype("<f4").tobytes(),
            )
        },
    )
    repo = porcelain.init(tmp_path / "work", install_hooks=False)
    porcelain.commit(repo, "one", source=src, verify=False, show_progress=False)
    record = repo.read_revision(repo.head_commit() or "").manifest.tensors[0]
    assert (repo.git_dir / "objects" / record.blob[:2] / record.blob[2:]).exists()
    assert _git_blob(tmp_path / "work", record.blob) == bytes(repo.blob_view(record.blob))
    git_fsck(tmp_path / "work")


def test_status_trusts_stat_only_while_the_file_is_untouched(tmp_path: Path) -> None:
    src = _many_tensors(tmp_path / "src", seed=5, count=8)
    work = _repository_of(tmp_path, src)
    mint(work, "commit", "-m", "r0")
    mint(work, "branch", "old")
    mutate(work, seed=6)
    mint(work, "commit", "-m", "r1")
    mint(work, "checkout", "old")
    assert (work / ".mint" / "mint-worktree.json").exists()
    assert (
        "nothing to commit" in mint(work, "status").stdout or mint(work, "status").returncode == 0
    )
    # An in-place edit of the same size right after checkout is seen: checkout dated the
    # file's mtime back, so any write moves it.
    path = work / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    with open(path, "r+b") as handle:
        handle.write(bytes(data))
    assert "modified" in mint(work, "status").stdout
    assert "local changes" in mint_fails(work, "checkout", "main")
    # touch alone: the stat no longer matches, so the content is hashed (and found clean).
    data[-1] ^= 1
    with open(path, "r+b") as handle:
        handle.write(bytes(data))
    assert "modified" not in mint(work, "status").stdout
    mint(work, "checkout", "main")


def test_sample_hook_runs_in_process_and_edited_hook_as_a_program(tmp_path: Path) -> None:
    work = tmp_path / "work"
    mint(tmp_path, "init", str(work))
    src = _many_tensors(tmp_path / "src", seed=7, count=6)
    bad = handmade_adapter(tmp_path / "bad", {})
    shutil.rmtree(bad)
    shutil.copytree(src, bad)
    name = tensor_names(bad)[3]
    set_value(bad, name, 1, float("nan"))
    line = mint_fails(work, "commit", "-m", "bad", "--from", str(bad))
    assert line == (
        f"error: pre-commit hook refused the commit: error: tensor {name} holds 1 non-finite "
        "value(s) (NaN or Inf) (use --no-verify to skip hooks)"
    )
    # The same hook with one more comment line is no longer the sample: it runs as a program
    # and refuses with the same message.
    hook = work / ".mint" / "hooks" / "pre-commit"
    hook.write_text(hook.read_text() + "# edited\n")
    assert mint_fails(work, "commit", "-m", "bad", "--from", str(bad)) == line
    assert git(work / ".mint", "rev-parse", "-q", "--verify", "HEAD", ok=False).returncode != 0


def test_pack_with_duplicate_tensors_is_valid(tmp_path: Path) -> None:
    # PEFT initializes every lora_B to zeros: same-shaped B's are one blob, so the pack
    # holds fewer objects than tensors and its checksum is computed by reading it back.
    zeros = bytes(2 * 96 * 4)
    tensors = {
        f"layers.{i}.lora_{ab}.weight": (
            "BF16",
            [96, 4] if ab == "B" else [4, 96],  # rank 4 either way, as PEFT's config says
            zeros if ab == "B" else os.urandom(len(zeros)),
        )
        for i in range(PACK_THRESHOLD // 2 + 2)
        for ab in "AB"
    }
    src = handmade_adapter(tmp_path / "src", tensors)
    work = _repository_of(tmp_path, src)
    mint(work, "commit", "-m", "r0")
    git_fsck(work)
    mint_fsck_ok(work)
    for idx in (work / ".mint" / "objects" / "pack").glob("pack-*.idx"):
        subprocess.run(
            ["git", "--git-dir", str(work / ".mint"), "verify-pack", str(idx)], env=ENV, check=True
        )


def test_parent_walks_are_remembered_boundedly_and_follow_the_shallow_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `~N` reads each commit once per Repository (commits never change), keeps only the most
    # recently used few, and still stops at a shallow boundary listed after the walk was made.
    import mintvcs.store as store

    src = handmade_adapter(tmp_path / "src", {"w.lora_A.weight": ("F32", [2, 2], bytes(16))})
    repo = porcelain.init(tmp_path / "work", install_hooks=False)
    first = porcelain.commit(repo, "one", source=src, verify=False, show_progress=False).commit
    who = "T <t@example.com> 1700000000 +0000"
    chain = [first]
    for n in range(6):
        chain.append(repo.write_commit(repo.commit_info(first).tree, [chain[-1]], f"{n}", who, who))
    git(repo.git_dir, "update-ref", "refs/heads/main", chain[-1])
    monkeypatch.setattr(store, "_PARENTS_KEPT", 4)
    reads = count_reads(repo, monkeypatch)
    assert repo.resolve("main~2") == chain[-3]
    assert len(reads) == 3  # main peeled, then two walked
    reads.clear()
    assert repo.resolve("main~2") == repo.resolve("main^^") == chain[-3]
    assert reads == []
    assert repo.resolve("main~6") == first
    assert len(repo._parents) == 4
    (repo.git_dir / "shallow").write_text(f"{chain[-2]}\n")
    with pytest.raises(store.UnknownRevisionError, match="past the first commit"):
        repo.resolve("main~2")
    (repo.git_dir / "shallow").unlink()
    assert repo.resolve("main~2") == chain[-3]


def _extra_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The extra files status reads from now on, by name (the list fills as it reads)."""
    reads: list[str] = []
    read_stable = porcelain.read_stable

    def counting(path: Path, **kwargs: bool) -> tuple[bytes | memoryview, tuple[int, ...] | None]:
        reads.append(path.name)
        return read_stable(path, **kwargs)

    monkeypatch.setattr(porcelain, "read_stable", counting)
    return reads


def _written_earlier(*paths: Path) -> None:
    """Date files back a few seconds, as a trainer wrote them before the commit: a file written
    in the same instant as the commit reads it is racily clean and rightly read again."""
    earlier = (time.time_ns() // 10**9 - 5) * 10**9
    for path in paths:
        os.utime(path, ns=(earlier, earlier))


def _clean(work: Path) -> bool:
    with Repository.open(work) as repo:
        return porcelain.status(repo).changes == []


def test_status_reads_no_unchanged_extra_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trainer's checkpoint directory holds an optimizer state larger than the adapter: every
    # status used to read and hash it. The clean-by-stat record now lists the extra files too.
    src = _many_tensors(tmp_path / "src", seed=8, count=6)
    work = _repository_of(tmp_path, src)
    (work / "optimizer.pt").write_bytes(os.urandom(5 << 20))
    (work / "trainer_state.json").write_text('{"step": 1}\n')
    _written_earlier(work / "optimizer.pt", work / "trainer_state.json")
    mint(work, "commit", "-m", "r0")
    mint(work, "branch", "old")
    (work / "trainer_state.json").write_text('{"step": 2}\n')
    _written_earlier(work / "trainer_state.json")
    mint(work, "commit", "-m", "r1")
    reads = _extra_reads(monkeypatch)
    assert _clean(work) and reads == []  # as the commit left them
    mint(work, "checkout", "old")
    assert _clean(work) and reads == []  # as checkout wrote them
    # Touched, not changed: read once (clean), and the record refreshed for next time.
    _written_earlier(work / "optimizer.pt")
    assert _clean(work) and reads == ["optimizer.pt"]
    assert _clean(work) and reads == ["optimizer.pt"]
    # Changed in place to other bytes of the same size: seen.
    data = bytearray((work / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (work / "optimizer.pt").write_bytes(bytes(data))
    assert not _clean(work)
    assert "modified:  optimizer.pt" in mint(work, "status").stdout


def test_large_extra_files_are_stored_deflated_only_if_that_pays(tmp_path: Path) -> None:
    # zlib saves ~7% of an optimizer state, at 10-40 MB/s: such a blob is stored in
    # zlib's stored blocks (any git reads them), while a large text file is still deflated.
    src = _many_tensors(tmp_path / "src", seed=9, count=6)
    work = _repository_of(tmp_path, src)
    # fp32 moments, as an optimizer state holds them: zlib would save ~7%.
    noise = (np.random.default_rng(0).standard_normal(6 << 18) * 1e-3).astype("<f4").tobytes()
    text = b"".join(b'{"step": %d, "loss": 0.5}\n' % i for i in range(250_000))
    (work / "optimizer.pt").write_bytes(noise)
    (work / "log.jsonl").write_bytes(text)
    mint(work, "commit", "-m", "r0")
    git_fsck(work)
    mint_fsck_ok(work)
    for name, data in (("optimizer.pt", noise), ("log.jsonl", text)):
        assert _git_blob(work, f"HEAD:files/{name}") == data
    loose = {
        name: (work / ".mint" / "objects" / oid[:2] / oid[2:]).read_bytes()
        for name in ("optimizer.pt", "log.jsonl")
        for oid in [git(work / ".mint", "rev-parse", f"HEAD:files/{name}").stdout.strip()]
    }
    # 78 01: the header of our stored-blocks stream (zlib itself writes 78 9c at level 6,
    # and spends the time to find it cannot compress).
    assert loose["optimizer.pt"][:2] == b"\x78\x01"
    assert len(noise) < len(loose["optimizer.pt"]) < len(noise) * 1.01
    assert loose["log.jsonl"][:2] != b"\x78\x01" and len(loose["log.jsonl"]) < len(text) / 5
    mint(work, "gc")
    git_fsck(work)
    (work / "log.jsonl").unlink()
    mint(work, "checkout", "-f", "main")
    assert (work / "log.jsonl").read_bytes() == text


def test_an_extra_file_that_starts_like_a_tensor_blob_is_packed_by_gc(tmp_path: Path) -> None:
    # gc took any blob starting with the blob magic for a tensor blob and failed on its header,
    # every run, calling the store corrupt while fsck said ok.
    src = _many_tensors(tmp_path / "src", seed=10, count=6)
    work = _repository_of(tmp_path, src)
    (work / "notes.bin").write_bytes(b"MINTBLOB but not one")
    mint(work, "commit", "-m", "r0")
    mint(work, "gc")
    git_fsck(work)
    mint_fsck_ok(work)
    assert _git_blob(work, "HEAD:files/notes.bin") == b"MINTBLOB but not one"


def test_extra_files_are_read_into_a_private_copy(tmp_path: Path) -> None:
    # Mapped, an extra file that a trainer re-saves in place during a commit changed between
    # the hash of its blob and the blob's write (a corrupt object), or cut the map (SIGBUS).
    from mintvcs.adapter import read_adapter

    src = _many_tensors(tmp_path / "src", seed=11, count=6)
    state = src / "optimizer.pt"
    state.write_bytes(b"a" * (3 << 20))
    adapter = read_adapter(src)
    with open(state, "r+b") as handle:  # in place, same size: a map would see it
        handle.write(b"b" * (3 << 20))
    assert bytes(adapter.extra_files["optimizer.pt"][0][:4]) == b"aaaa"


def _revisions_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The commits whose revisions any Repository reads from now on (the list fills as it reads)."""
    reads: list[str] = []
    read_revision = Repository.read_revision

    def counting(self: Repository, commit_id: str, *args: object) -> object:
        reads.append(commit_id)
        return read_revision(self, commit_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Repository, "read_revision", counting)
    return reads


def test_clean_work_tree_needs_no_revision_of_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 37k-tensor revision takes a second to read: status over a clean work tree, and a
    # checkout from one, learn HEAD's config and extra files from the work tree's record.
    src = _many_tensors(tmp_path / "src", seed=9, count=6)
    work = _repository_of(tmp_path, src)
    (work / "notes.txt").write_text("r0\n")
    _written_earlier(*work.iterdir())
    mint(work, "commit", "-m", "r0")
    mint(work, "branch", "old")
    mutate(work, seed=10)
    (work / "notes.txt").write_text("r1\n")
    (work / "extra.md").write_text("only in r1\n")
    _written_earlier(*work.iterdir())
    mint(work, "commit", "-m", "r1")
    reads = _revisions_read(monkeypatch)
    with Repository.open(work) as repo:
        main, old = repo.resolve("main"), repo.resolve("old")
        assert porcelain.status(repo).changes == [] and reads == []  # as the commit left it
        porcelain.checkout(repo, "old")
        assert reads == [old] and not (work / "extra.md").exists()
        assert (work / "notes.txt").read_text() == "r0\n"
        reads.clear()
        assert porcelain.status(repo).changes == [] and reads == []  # as checkout left it
        porcelain.checkout(repo, "main")
        assert reads == [main] and (work / "extra.md").read_text() == "only in r1\n"
        # What the record says is compared with the files, not taken for them.
        (work / "adapter_config.json").write_text('{"r": 1}')
        (work / "extra.md").write_text("edited\n")
        changes = porcelain.status(repo).changes
        assert ("modified", "adapter_config.json") in changes
        assert ("modified", "extra.md") in changes
        porcelain.checkout(repo, "main", force=True)
        # A record without the ids (an older mintvcs wrote it), or with damaged ones: HEAD's
        # revision is read, and the answer is the same.
        record_path = work / ".mint" / "mint-worktree.json"
        record = json.loads(record_path.read_text())
        assert record["committed"] == {
            "extra.md": [blob_id(b"only in r1\n"), False],
            "notes.txt": [blob_id(b"r1\n"), False],
        }
        older = {k: v for k, v in record.items() if k not in ("config", "committed")}
        for damaged in (
            older,
            {**record, "config": None},
            {**record, "committed": {"extra.md": ["x", False], "notes.txt": ["y", 1]}},
            {**record, "committed": []},
        ):
            record_path.write_text(json.dumps(damaged))
            reads.clear()
            assert porcelain.status(repo).changes == [] and reads == [main]


def _decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the tensors each later checkout decodes (Repository.tensors_into, wrapped)."""
    names: list[str] = []
    decode = Repository.tensors_into

    def counting(self: Repository, items: Any) -> None:
        names.extend(record.name for record, _ in items)
        decode(self, items)

    monkeypatch.setattr(Repository, "tensors_into", counting)
    return names


def test_checkout_takes_unchanged_small_tensors_from_the_file_it_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _many_tensors(tmp_path / "src", seed=12, count=300)
    work = _repository_of(tmp_path, src)
    changed = tensor_names(work)[10:13]
    with Repository.open(work) as repo:
        first = porcelain.commit(repo, "r0", verify=False, show_progress=False).commit
        mutate(work, seed=13, names=changed)
        second = porcelain.commit(repo, "r1", verify=False, show_progress=False).commit
        committed = {c: repo.read_revision(c).safetensors_bytes() for c in (first, second)}
    decoded = _decoded(monkeypatch)
    with Repository.open(work) as repo:
        porcelain.checkout(repo, first)
    assert (work / WEIGHTS).read_bytes() == committed[first]
    assert sorted(decoded) == sorted(changed)  # the other 297 were in place, hashed
    # A tensor edited in the file is not kept: its sha256 differs, it is decoded.
    edited = tensor_names(work)[200]
    mutate(work, seed=14, names=[edited])
    decoded.clear()
    with Repository.open(work) as repo:
        porcelain.checkout(repo, second, force=True)
    assert (work / WEIGHTS).read_bytes() == committed[second]
    assert sorted(decoded) == sorted([*changed, edited])
    # With no file to take from (removed, or a directory), everything is decoded.
    (work / WEIGHTS).unlink()
    decoded.clear()
    with Repository.open(work) as repo:
        porcelain.checkout(repo, first, force=True)
    assert (work / WEIGHTS).read_bytes() == committed[first]
    assert len(decoded) == 300


def test_checkout_still_refuses_a_damaged_blob_of_a_changed_tensor(tmp_path: Path) -> None:
    src = _many_tensors(tmp_path / "src", seed=15, count=300)
    work = _repository_of(tmp_path, src)
    changed = tensor_names(work)[20]
    mint(work, "commit", "-m", "r0")
    mint(work, "branch", "keep")
    mutate(work, seed=16, names=[changed])
    mint(work, "commit", "-m", "r1")
    with Repository.open(work) as repo:
        record = repo.read_revision(repo.resolve("keep")).manifest.tensor(changed)
        assert record is not None
        pack, offset = repo._locate_packed([record.blob])[0] or (None, 0)
        assert pack is not None
        path = Path(pack.pack_path)
    data = bytearray(path.read_bytes())
    data[offset + 400] ^= 0x10  # in its payload, past the deflated blob header
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    before = (work / WEIGHTS).read_bytes()
    line = mint_fails(work, "checkout", "keep")
    assert changed in line
    assert (work / WEIGHTS).read_bytes() == before


def test_checkout_reads_only_the_small_tensors_of_the_file_it_replaces(tmp_path: Path) -> None:
    # The whole file was read: a checkout held a second copy of a large tensor beside the
    # small ones (a saved embedding of gigabytes), though only the small ones are taken.
    big = np.random.default_rng(18).standard_normal(256 * 1024).astype("<f4").tobytes()
    extra = {"layers.75.lora_C.weight": ("F32", [256, 1024], big)}
    work = _repository_of(tmp_path, _many_tensors(tmp_path / "src", 17, 300, extra))
    mint(work, "commit", "-m", "r0")
    with Repository.open(work) as repo:
        rev = repo.read_revision(repo.resolve("HEAD"))
        replaced = ReplacedWeights.read(work / WEIGHTS, rev.manifest)
    assert replaced is not None
    previous = replaced.content
    on_disk = (work / WEIGHTS).read_bytes()
    data = 8 + int.from_bytes(on_disk[:8], "little")
    sizes = sorted(record.end - record.start for record in rev.manifest.tensors)
    assert sizes[-1] == len(big) and sizes[-2] <= 64 << 10
    for record in rev.manifest.tensors:
        begin, end = data + record.start, data + record.end
        if end - begin == len(big):
            assert previous[begin:end] == bytes(end - begin)  # never read
        else:
            assert previous[begin:end] == on_disk[begin:end], record.name


def test_only_a_plain_weights_file_of_a_plausible_size_is_read_for_its_tensors(
    tmp_path: Path,
) -> None:
    # A symlink may point anywhere and a directory or a FIFO is no weights file; a file too short
    # for a header, or far larger than the revision, is not what it replaces: all decoded.
    work = _repository_of(tmp_path, _many_tensors(tmp_path / "src", 19, 300))
    mint(work, "commit", "-m", "r0")
    with Repository.open(work) as repo:
        manifest = repo.read_revision(repo.resolve("HEAD")).manifest
    kept = ReplacedWeights.read(work / WEIGHTS, manifest)
    assert kept is not None
    kept.close()
    (tmp_path / "link").symlink_to(work / WEIGHTS)
    (tmp_path / "short").write_bytes(b"\x10\x00\x00")
    with open(tmp_path / "huge", "wb") as handle:  # sparse: no disk taken
        handle.truncate(2 * manifest.nbytes + (64 << 20) + 1)
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "short", "huge", "fifo"):
        assert ReplacedWeights.read(tmp_path / name, manifest) is None, name


def test_a_walk_down_a_packed_history_parses_no_commit_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `~N` over a gc'd history parsed each commit whole (dulwich's parse, then every field
    # decoded): ~130 us a commit, 30x git's walk on a 50,000-commit chain. A commit written as
    # git writes it is read by commits.parse_plain; anything else is read whole.
    from mintvcs import store
    from mintvcs.commits import parse_plain

    git_dir = tmp_path / "repo" / ".mint"
    porcelain.init(tmp_path / "repo", install_hooks=False).close()
    stamp = "Tester <tester@example.com> 1700000000 +0000"
    stream = []
    for mark in range(1, 201):
        message = f"c{mark}"
        stream.append(
            f"commit refs/heads/main\nmark :{mark}\ncommitter {stamp}\n"
            f"data {len(message)}\n{message}\n"
        )
        if mark > 1:
            stream.append(f"from :{mark - 1}\n")
        if mark == 120:
            stream.append("merge :50\n")  # a merge: main~80^2 is c50
    git(git_dir, "fast-import", "--quiet", input_text="".join(stream))
    # A commit with a `parent` line after its author: no parent of it, for git and dulwich.
    tip = git(git_dir, "rev-parse", "main").stdout.strip()
    tree = git(git_dir, "rev-parse", "main^{tree}").stdout.strip()
    odd = f"tree {tree}\nparent {tip}\nauthor {stamp}\nparent {tip}\ncommitter {stamp}\n\nodd\n"
    odd_id = git(
        git_dir, "hash-object", "-t", "commit", "-w", "--literally", "--stdin", input_text=odd
    ).stdout.strip()
    git(git_dir, "update-ref", "refs/heads/odd", odd_id)
    git(git_dir, "repack", "-a", "-d", "-q")
    assert not list(git_dir.glob("objects/??/*"))
    with Repository.open(tmp_path / "repo") as repo:
        whole = whole_commit_reads(repo, monkeypatch)
        for spec in ("main~150", "main~80^2", "main~80^2~49", "odd~1", "odd^1~199"):
            assert repo.resolve(spec) == git(git_dir, "rev-parse", spec).stdout.strip(), spec
        assert whole == [odd_id]  # only the odd commit was read whole, no commit walked
        with pytest.raises(store.UnknownRevisionError, match="has no parent 2"):
            repo.resolve("odd^2")
    # What is not as git writes it is left to the full parse (which refuses, or reads, it).
    assert parse_plain(odd.encode()) is None
    assert parse_plain(f"tree {tree}\nparent {tip}\n x\n".encode()) is None
    assert parse_plain(f"tree {tree}\nparent {tip.upper()}\n".encode()) is None
    assert parse_plain(f"author {stamp}\ntree {tree}\n".encode()) is None


def test_weights_found_to_be_neither_revision_are_not_hashed_again(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a `commit --from` moved main under the work tree and the weights were retrained in
    # place, every status, commit and checkout read and hashed the whole weights file again
    # to learn that they were not main's (0.4 s per 400 MB): the answer was never kept.
    from tests.mintvcs.storekit import copy_adapter

    checkpoint = copy_adapter(work, tmp_path / "checkpoint")
    mutate(checkpoint, seed=3)
    mint(work, "commit", "-m", "r1", "--from", str(checkpoint), "--no-verify")
    r0 = git(work / ".mint", "rev-parse", "HEAD~1").stdout.strip()
    r1 = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    weights = work / WEIGHTS
    read = porcelain.read_stable
    reads: list[Path] = []

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(Path(path))
        return read(path, *args, **kwargs)

    monkeypatch.setattr(porcelain, "read_stable", counting)
    repo = Repository.open(work)

    def settled() -> None:  # an mtime old enough to be trusted (git's racily clean rule)
        old = time.time_ns() - 10**9
        os.utime(weights, ns=(old, old))

    for content, base in ((None, r0), (checkpoint / WEIGHTS, None)):
        if content is None:
            mutate(work, seed=9)  # retrained in place: neither r0's nor r1's
        else:
            shutil.copyfile(content, weights)  # r1's, put there by something keeping no record
            (work / "notes.txt").write_text("an edit, so that status looks further\n")
        settled()
        reads.clear()
        assert porcelain.status(repo).base == base
        assert reads.count(weights) == 1
        for _ in range(2):
            reads.clear()
            assert porcelain.status(repo).base == base and reads.count(weights) == 0, reads
    # Changed again: read again.
    mutate(work, seed=10)
    settled()
    reads.clear()
    assert porcelain.status(repo).base == r0 and reads.count(weights) == 1
    assert r1 != r0
