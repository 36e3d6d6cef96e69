"""The store through the Python API: bit-exact revisions, PEFT and git as oracles, the XOR chain bound."""

from __future__ import annotations

import filecmp
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mintvcs import codec, porcelain
from mintvcs.store import Repository
from tests.mintvcs.storekit import (
    CONFIG,
    WEIGHTS,
    copy_adapter,
    git,
    git_fsck,
    git_log,
    handmade_adapter,
    mutate,
    tensor_names,
)


def _commit(repo: Repository, message: str, **kwargs: object) -> str:
    return porcelain.commit(repo, message, verify=False, show_progress=False, **kwargs).commit  # type: ignore[arg-type]


def _lora_state(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors PEFT loads from `adapter_dir` onto a fresh tiny base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("which", ["fp32", "bf16"])
def test_checkout_is_byte_identical_and_peft_loads_it(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path, peft_adapter_bf16: Path, which: str
) -> None:
    from safetensors import safe_open

    original = peft_adapter if which == "fp32" else peft_adapter_bf16
    work = tmp_path / "work"
    repo = porcelain.init(work, str(tiny_base))
    copy_adapter(original, work)
    first = _commit(repo, "as PEFT saved it")
    # Work on: change every tensor, commit, then check the first revision out again.
    mutate(work, seed=11)
    _commit(repo, "trained a step")
    assert not filecmp.cmp(work / WEIGHTS, original / WEIGHTS, shallow=False)
    porcelain.checkout(repo, first[:10])
    for name in (WEIGHTS, CONFIG, "README.md"):
        assert filecmp.cmp(work / name, original / name, shallow=False), name
    with (
        safe_open(str(work / WEIGHTS), "pt") as ours,
        safe_open(str(original / WEIGHTS), "pt") as theirs,
    ):
        assert ours.metadata() == theirs.metadata() and ours.metadata()
    # PEFT as oracle: the checkout loads to exactly the state dict of the original directory.
    expected, got = _lora_state(tiny_base, original), _lora_state(tiny_base, work)
    assert expected.keys() == got.keys() and expected
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    repo.close()
    git_fsck(work)


def test_api_reads_revisions_without_touching_the_work_tree(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    from safetensors.numpy import load_file

    work = tmp_path / "work"
    repo = porcelain.init(work, str(tiny_base))
    copy_adapter(peft_adapter, work)
    first = _commit(repo, "first", meta={"step": "1", "reward": "0.25"})
    mutate(work, seed=3)
    second = _commit(repo, "second", meta={"step": "2"})
    porcelain.tag_create(repo, "prod", first, message="ship it")
    porcelain.branch_create(repo, "eval", first)
    repo.close()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.iterdir() if p.is_file()}

    api = Repository.open(work / ".mint")
    assert api.list_refs() == {
        "refs/heads/eval": first,
        "refs/heads/main": second,
        "refs/tags/prod": first,
    }
    assert (
        api.resolve("prod")
        == api.resolve("eval")
        == api.resolve(first[:7])
        == api.resolve("main~1")
        == first
    )
    assert api.resolve("HEAD") == api.resolve("main") == second
    rev = api.read_revision(api.resolve("prod"))
    assert rev.commit == first and rev.manifest.meta == {"step": "1", "reward": "0.25"}
    assert rev.config == json.loads((peft_adapter / CONFIG).read_bytes())
    assert rev.config_bytes == (peft_adapter / CONFIG).read_bytes()
    assert rev.base_fingerprint is not None and rev.base_fingerprint.startswith("sha256:")
    # The safetensors library is the oracle for the tensors.
    oracle = load_file(str(peft_adapter / WEIGHTS))
    tensors = rev.tensors()
    assert set(tensors) == set(oracle)
    for name, (dtype, shape, raw) in tensors.items():
        assert dtype == "F32" and shape == oracle[name].shape
        assert raw == oracle[name].astype("<f4").tobytes()
        assert rev.tensor(name) == raw
    assert rev.safetensors_bytes() == (peft_adapter / WEIGHTS).read_bytes()
    assert [c.id for c in porcelain.log(api, "main")] == [second, first]
    api.close()
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.iterdir() if p.is_file()}
    assert after == before


def test_tree_layout_is_plain_git(tmp_path: Path, tiny_base: Path, peft_adapter: Path) -> None:
    work = tmp_path / "work"
    repo = porcelain.init(work, str(tiny_base))
    copy_adapter(peft_adapter, work)
    _commit(repo, "first", meta={"run": "r1"})
    repo.close()
    git_dir = work / ".mint"
    # Real git reads our tree: the config verbatim, the manifest, one blob per tensor, the extra files.
    assert (
        git(git_dir, "show", "HEAD:adapter_config.json").stdout.encode()
        == (peft_adapter / CONFIG).read_bytes()
    )
    assert (
        git(git_dir, "show", "HEAD:files/README.md").stdout.encode()
        == (peft_adapter / "README.md").read_bytes()
    )
    listed = git(git_dir, "ls-tree", "-r", "--name-only", "HEAD").stdout.splitlines()
    assert {f"tensors/{n}" for n in tensor_names(peft_adapter)} <= set(listed)
    manifest = json.loads(git(git_dir, "show", "HEAD:manifest.json").stdout)
    assert manifest["meta"] == {"run": "r1"} and manifest["base"]["fingerprint"].startswith(
        "sha256:"
    )
    data = (peft_adapter / WEIGHTS).read_bytes()
    header_len = 8 + int.from_bytes(data[:8], "little")
    for record in manifest["tensors"]:
        raw = data[header_len + record["start"] : header_len + record["end"]]
        assert record["sha256"] == hashlib.sha256(raw).hexdigest()
        assert (
            git(git_dir, "rev-parse", f"HEAD:tensors/{record['name']}").stdout.strip()
            == record["blob"]
        )
    # Tensor blobs are zstd already: no zlib on top.
    assert git(git_dir, "config", "core.looseCompression").stdout.strip() == "0"
    git_fsck(work)


def test_xor_chain_stays_bounded_and_every_revision_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    work = handmade_adapter(
        tmp_path / "work",
        {
            "w.lora_A.weight": (
                "F32",
                [16, 64],
                (rng.standard_normal((16, 64)) * 0.02).astype("<f4").tobytes(),
            ),
            "w.lora_B.weight": (
                "F32",
                [64, 16],
                (rng.standard_normal((64, 16)) * 0.02).astype("<f4").tobytes(),
            ),
        },
    )
    repo = porcelain.init(work, None, install_hooks=False)
    ids, snapshots = [], []
    for step in range(2 * codec.MAX_CHAIN + 3):
        if step:
            mutate(work, seed=step, names=["w.lora_A.weight"], scale=1e-4)
        ids.append(_commit(repo, f"step {step}", meta={"step": str(step)}))
        snapshots.append((work / WEIGHTS).read_bytes())
    depths = []
    for oid, expected in zip(ids, snapshots, strict=True):
        rev = repo.read_revision(oid)
        record = rev.manifest.tensor("w.lora_A.weight")
        assert record is not None and 0 <= record.depth <= codec.MAX_CHAIN
        depths.append(record.depth)
        assert rev.safetensors_bytes() == expected
        # The untouched tensor is stored once.
        assert rev.manifest.tensor("w.lora_B.weight") == repo.read_revision(ids[0]).manifest.tensor(
            "w.lora_B.weight"
        )
    assert max(depths) == codec.MAX_CHAIN and depths.count(0) >= 2, depths
    assert git_log(work) == list(reversed(ids))
    repo.close()
    git_fsck(work)


def test_other_dtypes_round_trip_bit_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "half.weight": ("F16", [7, 9], rng.standard_normal((7, 9)).astype("<f2").tobytes()),
        "double.weight": ("F64", [5], rng.standard_normal(5).astype("<f8").tobytes()),
        "ids": ("I64", [11], rng.integers(-(2**40), 2**40, 11).astype("<i8").tobytes()),
        "mask": ("BOOL", [13], rng.integers(0, 2, 13).astype("u1").tobytes()),
        "bytes": ("U8", [3, 3], rng.integers(0, 256, 9).astype("u1").tobytes()),
        "scalar": ("F32", [], np.float32(-0.0).tobytes()),
        "empty": ("BF16", [0, 4], b""),
    }
    work = handmade_adapter(tmp_path / "work", tensors)
    original = (work / WEIGHTS).read_bytes()
    repo = porcelain.init(work, None, install_hooks=False)
    oid = _commit(repo, "odd dtypes")
    rev = repo.read_revision(oid)
    assert {n: (d, list(s), r) for n, (d, s, r) in rev.tensors().items()} == tensors
    assert rev.safetensors_bytes() == original
    (work / WEIGHTS).write_bytes(b"")
    porcelain.checkout(repo, oid, force=True)
    assert (work / WEIGHTS).read_bytes() == original
    repo.close()
    git_fsck(work)


def test_a_reshape_or_retype_alone_is_committed_and_checked_out_exact(tmp_path: Path) -> None:
    # The same bytes under another shape, then another dtype: only the header differs, so a
    # tensor must count as unchanged only when its sha256, dtype and shape all match the parent's.
    raw = np.random.default_rng(5).standard_normal(48).astype("<f4").tobytes()
    work = handmade_adapter(tmp_path / "work", {"t.weight": ("F32", [6, 8], raw)})
    repo = porcelain.init(work, None, install_hooks=False)
    _commit(repo, "F32 [6, 8]")
    for dtype, shape in (("F32", [8, 6]), ("I32", [8, 6])):
        again = handmade_adapter(tmp_path / f"as-{dtype}", {"t.weight": (dtype, shape, raw)})
        wanted = (again / WEIGHTS).read_bytes()
        (work / WEIGHTS).write_bytes(wanted)
        oid = _commit(repo, f"{dtype} {shape}")
        assert repo.read_revision(oid).tensors()["t.weight"] == (dtype, tuple(shape), raw)
        (work / WEIGHTS).write_bytes(b"")
        porcelain.checkout(repo, oid, force=True)
        assert (work / WEIGHTS).read_bytes() == wanted
    repo.close()
    git_fsck(work)


def test_commit_reports_no_new_blobs_for_an_unchanged_adapter(
    tmp_path: Path, peft_adapter: Path
) -> None:
    work = copy_adapter(peft_adapter, tmp_path / "work")
    repo = porcelain.init(work, None, install_hooks=False)
    first = porcelain.commit(repo, "first", verify=False, show_progress=False)
    with pytest.raises(porcelain.NothingToCommit, match="identical to HEAD"):
        porcelain.commit(repo, "again", verify=False, show_progress=False)
    assert repo.head_commit() == first.commit
    again = porcelain.commit(repo, "again", verify=False, show_progress=False, allow_empty=True)
    assert first.new_objects > first.tensors
    assert again.new_objects == 1  # the commit object alone
    assert again.parent == first.commit and again.branch == "main"
    assert repo.read_revision(again.commit).info.tree == repo.read_revision(first.commit).info.tree
    repo.close()


def test_new_objects_counts_only_its_own_commits_writes(
    tmp_path: Path, peft_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads committing through one Repository at once each count what their commit stored."""
    import threading

    work = copy_adapter(peft_adapter, tmp_path / "work")
    repo = porcelain.init(work, None, install_hooks=False)
    _commit(repo, "first")
    sources = {}
    for seed, name in enumerate(("a", "b"), start=1):
        porcelain.branch_create(repo, name)
        sources[name] = copy_adapter(peft_adapter, tmp_path / name)
        mutate(sources[name], seed=seed)  # every tensor changes: no blob is shared
    # Both commits have stored their blobs and trees before either writes its commit object.
    both_encoded = threading.Barrier(2, timeout=60)
    write_commit = repo.write_commit

    def meet_then_write(*args: object) -> str:
        both_encoded.wait()
        return write_commit(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(repo, "write_commit", meet_then_write)
    results: dict[str, porcelain.CommitResult] = {}

    def commit_on(name: str) -> None:
        results[name] = porcelain.commit(
            repo, name, source=sources[name], branch=name, verify=False, show_progress=False
        )

    threads = [threading.Thread(target=commit_on, args=(name,)) for name in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    repo.close()
    for name in sources:
        # git's own list of what the branch's commit added over main.
        mine = git(work / ".mint", "rev-list", "--objects", f"main..{name}").stdout.splitlines()
        assert results[name].new_objects == len(mine), name


def test_log_decorations_label_only_the_shown_commits(tmp_path: Path, peft_adapter: Path) -> None:
    """Branches, lightweight and annotated tags, and a detached HEAD, as `git log --decorate` shows them."""
    work = copy_adapter(peft_adapter, tmp_path / "work")
    repo = porcelain.init(work, None, install_hooks=False)
    first = _commit(repo, "first")
    mutate(work, seed=1)
    second = _commit(repo, "second")
    porcelain.branch_create(repo, "old", first)
    porcelain.tag_create(repo, "v1", first, message="annotated")
    porcelain.tag_create(repo, "light", second)
    both = porcelain.decorations(repo, {first, second})
    # After HEAD, git's order: refs in reverse name order, so tags before branches.
    assert both == {first: ["tag: v1", "old"], second: ["HEAD -> main", "tag: light"]}
    assert porcelain.decorations(repo, {first}) == {first: ["tag: v1", "old"]}
    porcelain.checkout(repo, first, force=True)
    assert porcelain.decorations(repo, {first, second})[first] == ["HEAD", "tag: v1", "old"]
    repo.close()


def test_object_kind_reads_only_headers_loose_and_packed(
    tmp_path: Path, peft_adapter: Path
) -> None:
    """What a tag names, from the object's header: what git's `cat-file -t` says, or None."""
    import subprocess

    from mintvcs import maintenance

    work = copy_adapter(peft_adapter, tmp_path / "work")
    repo = porcelain.init(work, None, install_hooks=False)
    first = _commit(repo, "first")
    porcelain.tag_create(repo, "v1", first, message="annotated")
    tag = repo.refs.read("refs/tags/v1")
    tree = repo.commit_info(first).tree
    blob = repo.read_revision(first).manifest.tensors[0].blob

    def git_kind(oid: str) -> str:
        return subprocess.run(
            ["git", "--git-dir", str(repo.git_dir), "cat-file", "-t", oid],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    for _ in ("loose", "packed"):
        for oid in (first, tag, tree, blob):
            assert repo.object_kind(oid) == git_kind(oid), oid
        assert repo.object_kind("0" * 40) is None and repo.object_kind("not an id") is None
        maintenance.gc(repo)
        repo.close()
        repo = Repository.open(work)
    assert porcelain.tags(repo) == [("v1", first, "commit")]
    repo.close()


def test_revision_meta_reads_meta_as_the_full_manifest_does(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    # log --json reads only the meta of each revision; it must say what read_revision says.
    from mintvcs.objects import CorruptManifestError, Manifest

    work = tmp_path / "w"
    porcelain.init(work, str(tiny_base))
    shutil.copytree(peft_adapter, work, dirs_exist_ok=True)
    repo = Repository.open(work)
    commit = porcelain.commit(
        repo, "m", meta={"step": "7", "reward": "0.5"}, verify=False, show_progress=False
    ).commit
    assert (
        repo.revision_meta(commit)
        == repo.read_revision(commit).manifest.meta
        == {
            "step": "7",
            "reward": "0.5",
        }
    )
    with pytest.raises(CorruptManifestError, match="not a mintvcs manifest"):
        Manifest.meta_from_bytes(b'{"format": "other"}')
    repo.close()


def test_recommitting_stored_tensors_from_many_threads_finds_them(tmp_path: Path) -> None:
    # A tensor found in a pack gets a fresh loose copy (freshen), read on the commit's encoding
    # threads; dulwich's lazily filled pack list, read by two threads at once, made some of
    # those reads report the object missing (about one commit in four here).
    from tests.fixtures import ALL_LINEAR, build_base, make_peft_adapter

    base = build_base(tmp_path / "base", num_hidden_layers=8)
    adapters = [
        make_peft_adapter(base, tmp_path / f"a{i}", r=8, seed=i, target_modules=ALL_LINEAR)
        for i in range(6)
    ]
    with porcelain.init(tmp_path / "stored", str(base)) as repo:
        for i, adapter in enumerate(adapters):  # a pack each
            porcelain.commit(repo, f"a{i}", source=adapter, verify=False, show_progress=False)
    for attempt in range(12):
        # A fresh copy each time: once freshened, the loose copies would answer the reads.
        shutil.copytree(tmp_path / "stored", tmp_path / f"r{attempt}", symlinks=True)
        with Repository.open(tmp_path / f"r{attempt}") as repo:
            # Unrelated to its parent (a5): stored whole, as when a0 was committed.
            source = adapters[attempt % 5]
            porcelain.commit(repo, "again", source=source, verify=False, show_progress=False)


def test_threads_sharing_a_repository_keep_reading_while_gc_replaces_its_packs(
    tmp_path: Path,
) -> None:
    # The pack list is refreshed when a lookup misses; two threads refreshing at once tore it
    # (KeyError), and a pack closed under a reader (mmap closed) could be left as the
    # last-hit hint, failing every packed read of that Repository from then on.
    import os
    import sys
    import threading

    from mintvcs import maintenance
    from tests.fixtures import ALL_LINEAR, build_base, make_peft_adapter

    base = build_base(tmp_path / "base", num_hidden_layers=8)
    adapter = make_peft_adapter(base, tmp_path / "a", r=4, alpha=8, target_modules=ALL_LINEAR)
    writer = porcelain.init(tmp_path / "repo", str(base))
    porcelain.commit(writer, "first", source=adapter, verify=False, show_progress=False)
    reader = Repository.open(tmp_path / "repo")
    blobs = [t.blob for t in reader.read_revision(reader.resolve("main")).manifest.tensors]
    errors: list[str] = []
    stop = threading.Event()

    def refresh() -> None:  # what a miss does: list the pack directory again
        while not stop.is_set():
            try:
                reader.has_object(os.urandom(20).hex(), loose=False, rescan=True)
            except Exception as err:
                errors.append(f"refresh: {type(err).__name__}: {err}")

    def read() -> None:
        while not stop.is_set():
            for blob in blobs[::7]:
                try:
                    assert reader.object_kind(blob) == "blob"
                except Exception as err:
                    errors.append(f"read: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=f) for f in (refresh, refresh, read, read)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the windows are a few bytecodes wide
    try:
        for t in threads:
            t.start()
        for step in range(3):  # a new pack, then gc: every old pack is replaced
            mutate(adapter, seed=step)
            porcelain.commit(
                writer, f"step {step}", source=adapter, verify=False, show_progress=False
            )
            maintenance.gc(writer)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
        writer.close()
    assert errors == [], errors[:5]
    for blob in blobs:  # and the Repository is still whole
        assert reader.object_kind(blob) == "blob"
    reader.close()


def test_a_large_deflated_object_is_not_copied_whole_first(tmp_path: Path) -> None:
    # An extra file (a trainer's optimizer.pt, hundreds of MB) was joined into a second copy
    # before zlib saw it: the peak held the file, the copy and the compressed output.
    import os
    import tracemalloc
    import zlib

    repo = porcelain.init(tmp_path / "work", install_hooks=False)
    content = os.urandom(32 << 20)  # incompressible: the output is as large as the input
    tracemalloc.start()
    try:
        oid = repo.write_object(b"blob", [content], 6)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.3 * len(content), peak
    stored = (tmp_path / "work" / ".mint" / "objects" / oid[:2] / oid[2:]).read_bytes()
    assert zlib.decompress(stored) == b"blob %d\0" % len(content) + content
    repo.close()


def test_checkout_and_reset_read_each_revision_once(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading a revision of an MoE adapter (37k tensors) takes about a second: the dirty check
    # reuses HEAD's, and a reset to HEAD itself reads it once.
    from mintvcs.store import Repository

    reads: list[str] = []
    read = Repository.read_revision

    def counted(self: Repository, commit_id: str, *args: Any) -> Any:
        reads.append(commit_id)
        return read(self, commit_id, *args)

    monkeypatch.setattr(Repository, "read_revision", counted)
    with Repository.open(work) as repo:
        head, side = repo.resolve("HEAD"), repo.resolve("side")
        porcelain.checkout(repo, "side")
        assert sorted(reads) == sorted([head, side])
        reads.clear()
        porcelain.reset(repo, "HEAD", hard=True)
        assert reads == [side]
