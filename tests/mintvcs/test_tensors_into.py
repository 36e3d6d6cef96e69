"""Repository.tensors_into: a whole revision decoded straight from its pack, every sha256 checked."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mintvcs import codec, porcelain
from mintvcs import store as store_module
from mintvcs.errors import MintError
from mintvcs.objects import TensorRecord
from mintvcs.plane_cache import PlaneCache
from mintvcs.store import PACK_THRESHOLD, TENSOR_ZLIB_LEVEL, Repository
from tests.mintvcs.storekit import (
    WEIGHTS,
    handmade_adapter,
    mutate,
    random_f32,
    tensor_names,
)


def _adapter(path: Path, seed: int) -> Path:
    """More tensors than PACK_THRESHOLD (so the commit writes a pack), of every plane layout."""
    rng = np.random.default_rng(seed)
    # Six bytes first: every later tensor's bytes start 2 bytes off 4-byte alignment.
    tensors: dict[str, tuple[str, list[int], bytes]] = {"odd": ("BF16", [3], b"\x80\x3f" * 3)}
    for i in range(PACK_THRESHOLD // 2 + 2):
        # fp32 [16, 2048]: 32 KiB planes, so some planes straddle 64 KiB stored blocks.
        shape = [16, 2048] if i % 10 == 0 else [4, 96]
        tensors[f"layers.{i}.lora_A.weight"] = ("F32", shape, random_f32(rng, shape))
        bf16 = (rng.standard_normal(384).astype("<f4") * 0.02).view("<u4") >> 16
        b_shape = [24, 16] if i % 10 == 0 else [96, 4]  # B's columns are A's rows: the rank
        tensors[f"layers.{i}.lora_B.weight"] = ("BF16", b_shape, bf16.astype("<u2").tobytes())
    f16 = (rng.standard_normal(256) * 0.02).astype("<f2").tobytes()
    tensors["extra.f16"] = ("F16", [16, 16], f16)
    tensors["extra.i32"] = ("I32", [64], rng.integers(-5, 5, 64, dtype="<i4").tobytes())
    return handmade_adapter(path, tensors)


def _commit(repo: Repository, message: str, source: Path) -> str:
    return porcelain.commit(repo, message, source=source, verify=False, show_progress=False).commit


def _decode_all(repo: Repository, commit: str) -> dict[str, bytes]:
    records = repo.read_revision(commit).manifest.tensors
    outs = [np.empty(r.end - r.start, dtype=np.uint8) for r in records]
    repo.tensors_into(list(zip(records, outs, strict=True)))
    return {r.name: out.tobytes() for r, out in zip(records, outs, strict=True)}


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    repository = porcelain.init(tmp_path / "work", install_hooks=False)
    yield repository
    repository.close()


def test_matches_tensor_bytes_for_packed_xor_and_loose_blobs(
    repo: Repository, tmp_path: Path
) -> None:
    src = _adapter(tmp_path / "src", seed=1)
    first = _commit(repo, "r0", src)
    bf16 = [f"layers.{i}.lora_B.weight" for i in range(PACK_THRESHOLD // 2 + 2)]
    mutate(src, seed=2, names=bf16)  # bf16 nudges: the next revision stores those as XOR links
    second = _commit(repo, "r1", src)
    small = handmade_adapter(
        tmp_path / "small",
        {"w.lora_A.weight": ("F32", [8, 64], random_f32(np.random.default_rng(3), [8, 64]))},
    )
    third = _commit(repo, "r2", small)
    encodings = {r.encoding for r in repo.read_revision(second).manifest.tensors}
    assert {"planes", "raw", "xor"} <= encodings
    for commit in (first, second, third):
        decoded = _decode_all(repo, commit)
        for record in repo.read_revision(commit).manifest.tensors:
            assert decoded[record.name] == repo.tensor_bytes(record.blob, record.name), record.name
    record = repo.read_revision(third).manifest.tensors[0]
    assert (repo.git_dir / "objects" / record.blob[:2] / record.blob[2:]).exists()


def _packed_location(repo: Repository, blob: str, content_offset: int) -> tuple[Path, int]:
    """The pack file and file offset of byte `content_offset` of a packed blob's content."""
    key = bytes.fromhex(blob)
    for pack in repo._packs(refresh=True):
        offset = pack.find(key)
        if offset is None:
            continue
        _, head, pieces = pack.stored_layout(offset)
        at = len(head)
        for start, length in pieces:
            if at <= content_offset < at + length:
                return Path(pack.pack_path), start + content_offset - at
            at += length
    raise AssertionError(f"{blob} is in no pack")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("plane", "reason"), [(0, "sha256 of decoded bytes"), (3, "plane 3: CRC32")]
)
def test_flipped_plane_byte_is_named(
    repo: Repository, tmp_path: Path, plane: int, reason: str
) -> None:
    commit = _commit(repo, "r0", _adapter(tmp_path / "src", seed=4))
    record = next(r for r in repo.read_revision(commit).manifest.tensors if r.shape == (16, 2048))
    out = np.empty(record.end - record.start, dtype=np.uint8)
    (found,) = repo._locate_packed([record.blob])
    assert found is not None, "the blob must be packed"
    decoded = repo._decode_packed(record, out, found)
    assert decoded is not None, "the blob must take the pack fast path"
    header = decoded[0]
    assert [s[0] for s in header.segments] == ["none", "none", "none", "zstd"]
    start = header.payload_offset + sum(s[1] for s in header.segments[:plane])
    pack_path, offset = _packed_location(repo, record.blob, start + 7)
    repo.close()
    _flip(pack_path, offset)
    reopened = Repository.open(repo.git_dir.parent)
    try:
        with pytest.raises(codec.CorruptBlobError, match=reason) as info:
            _decode_all(reopened, commit)
        assert record.name in str(info.value)
    finally:
        reopened.close()


def test_flipped_header_byte_is_named(repo: Repository, tmp_path: Path) -> None:
    commit = _commit(repo, "r0", _adapter(tmp_path / "src", seed=5))
    record = repo.read_revision(commit).manifest.tensors[0]
    key = bytes.fromhex(record.blob)
    pack = next(p for p in repo._packs(refresh=True) if p.find(key) is not None)
    pack_path, offset = Path(pack.pack_path), pack.find(key)
    assert offset is not None
    repo.close()
    _flip(pack_path, offset + 40)  # inside the deflated blob header
    reopened = Repository.open(repo.git_dir.parent)
    try:
        with pytest.raises(MintError, match=record.name.replace(".", r"\.")):
            _decode_all(reopened, commit)
    finally:
        reopened.close()


def test_pack_index_lookup_agrees_with_git(repo: Repository, tmp_path: Path) -> None:
    _commit(repo, "r0", _adapter(tmp_path / "src", seed=6))
    (pack,) = repo._packs(refresh=True)
    listing = subprocess.run(
        ["git", "show-index"],
        input=Path(str(pack.pack_path)[: -len(".pack")] + ".idx").read_bytes(),
        capture_output=True,
        check=True,
    ).stdout.decode()
    expected = {
        bytes.fromhex(line.split()[1]): int(line.split()[0]) for line in listing.splitlines()
    }
    assert len(expected) > PACK_THRESHOLD
    assert {key: pack.find(key) for key in expected} == expected
    assert pack.find(b"\0" * 20) is None
    # find_many: the same answers, one search of the index for all of them, in the keys' order.
    keys = sorted(expected, reverse=True)
    first = keys[0]
    near = [b"\0" * 20, b"\xff" * 20, first[:8] + bytes(12), first[:19] + bytes([first[19] ^ 1])]
    assert pack.find_many([*keys, *near]) == [expected[k] for k in keys] + [None] * len(near)
    assert pack.find_many([]) == []


def test_entry_header_reads_what_a_writer_writes_and_names_each_fault() -> None:
    from mintvcs.packs import (
        PACK_HEADER,
        PackEntryError,
        _ofs_distance,
        _pack_entry_header,
        entry_header,
    )

    pad = bytes(PACK_HEADER + 300)  # entries sit after the pack header; OFS bases before them
    at = len(pad)
    for kind in (1, 2, 3, 4):
        for size in (0, 15, 16, 300, 1 << 20, 1 << 40):
            head = _pack_entry_header(kind, size)
            buf = pad + head + b"x"
            assert entry_header(buf, at, len(buf)) == (kind, size, at + len(head), None)
            for cut in range(len(head)):  # every byte of the header is checked against `end`
                with pytest.raises(PackEntryError, match="runs past the end"):
                    entry_header(buf, at, at + cut)
    for distance in (1, 127, 128, 300):
        head = _pack_entry_header(6, 9) + _ofs_distance(distance)
        buf = pad + head
        assert entry_header(buf, at, len(buf)) == (6, 9, len(buf), at - distance)
        with pytest.raises(PackEntryError, match="runs past the end"):
            entry_header(buf, at, len(buf) - 1)
    buf = pad + _pack_entry_header(6, 9) + _ofs_distance(at)  # back into the pack header
    with pytest.raises(PackEntryError, match="outside the pack"):
        entry_header(buf, at, len(buf))
    buf = pad + _pack_entry_header(7, 9) + b"\1" * 20
    assert entry_header(buf, at, len(buf)) == (7, 9, len(buf), b"\1" * 20)
    with pytest.raises(PackEntryError, match=r"REF_DELTA .* runs past"):
        entry_header(buf, at, len(buf) - 1)
    buf = pad + b"\xb0" + b"\x80" * 10 + b"\x01"  # a blob whose size never ends
    with pytest.raises(PackEntryError, match="size header that never ends"):
        entry_header(buf, at, len(buf))
    buf = pad + b"\x60" + b"\x80" * 10 + b"\x01"  # an OFS_DELTA whose base offset never ends
    with pytest.raises(PackEntryError, match="base offset that never ends"):
        entry_header(buf, at, len(buf))
    buf = pad + b"\x50"
    with pytest.raises(PackEntryError, match="unknown type 5"):
        entry_header(buf, at, len(buf))


def _tiny_moe(path: Path, seed: int, experts: int = 60, *, twin: bool = False) -> Path:
    """An MoE-shaped adapter of many 64-byte BF16 tensors (rank 4), as in bench/store.py's meta;
    with `twin`, one more tensor holding the first one's bytes (the same blob, two records)."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for e in range(experts):
        for ab, shape in (("A", [4, 8]), ("B", [8, 4])):
            # Values of one binade every other expert: an exponent plane zstd shrinks.
            values = rng.uniform(1, 2, 32) if e % 2 else rng.standard_normal(32) * 0.02
            bits = values.astype("<f4").view("<u4") >> 16
            name = f"model.layers.0.mlp.experts.{e}.up.lora_{ab}.weight"
            tensors[name] = ("BF16", shape, bits.astype("<u2").tobytes())
    if twin:
        tensors[_TWIN] = next(iter(tensors.values()))
    return handmade_adapter(path, tensors)


_TWIN = "model.layers.1.mlp.experts.0.up.lora_A.weight"


def test_has_objects_answers_for_packed_loose_and_missing_ids(
    repo: Repository, tmp_path: Path
) -> None:
    commit = _commit(repo, "r0", _tiny_moe(tmp_path / "src", seed=14))
    packed = repo.read_revision(commit).manifest.tensors[0].blob
    loose = repo.commit_info(commit).tree
    assert repo._locate_packed([packed, loose]) == [repo._locate_packed([packed])[0], None]
    ids = [loose, packed, "0" * 40, "not an id", packed.upper()]
    assert repo.has_objects(ids) == [True, True, False, False, False]
    assert repo.has_objects(ids) == [repo.has_object(oid) for oid in ids]


def test_fsck_checks_packed_tensors_in_batches_and_names_each_damaged_one(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fsck decoded each tensor on its own (verify_tensor: ~120 us a 64-byte tensor, 30 s for a
    # 37k-tensor adapter's store); packed ones now go through verify_tensors as a checkout's.
    from mintvcs.maintenance import fsck

    src = _tiny_moe(tmp_path / "src", seed=15, twin=True)
    names = tensor_names(src)
    commits = [_commit(repo, "r0", src)]
    mutate(src, seed=40, names=names[:40])
    commits.append(_commit(repo, "r1", src))
    records = {c: repo.read_revision(c).manifest.tensors for c in commits}
    singles: list[str] = []
    verify_tensor = Repository.verify_tensor

    def counting(self: Repository, record: TensorRecord, planes: PlaneCache) -> None:
        singles.append(record.name)
        verify_tensor(self, record, planes)

    monkeypatch.setattr(Repository, "verify_tensor", counting)
    report = fsck(repo)
    assert report.ok, report.problems
    assert report.tensors == 2 * len(names) and singles == []
    # A raw plane of the first tensor's root, which its twin shares and on which r1 builds a
    # link: each revision names both tensors.
    first, twin = records[commits[0]][0], records[commits[0]][-1]
    assert twin.name == _TWIN and twin.blob == first.blob
    assert records[commits[1]][0].encoding == "xor"
    header = codec.read_header(repo.blob_view(first.blob))
    assert header.segments[0][0] == "none"
    pack_path, offset = _packed_location(repo, first.blob, header.payload_offset + 5)
    repo.close()
    _flip(pack_path, offset)
    with Repository.open(repo.git_dir.parent) as reopened:
        problems = fsck(reopened).problems
    for name in (first.name, twin.name):
        named = [p for p in problems if f"'{name}'" in p]
        assert {p.split(":")[0] for p in named} == {f"commit {c[:12]}" for c in commits}, problems
        assert all("sha256 of decoded bytes" in p for p in named), named


def test_small_tensors_are_merged_in_batches(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each tensor's planes were merged on their own, ~6 us of numpy calls for 64 bytes: most of
    # a 37k-tensor checkout's decode. A batch merges many tensors' joined planes in one pass.
    src = _tiny_moe(tmp_path / "src", seed=11)
    commit = _commit(repo, "r0", src)
    merges: list[int] = []
    merge = codec._merge

    def counting(planes: list[np.ndarray], group: int, rotate: int, out: np.ndarray) -> None:
        merges.append(out.size)
        merge(planes, group, rotate, out)

    monkeypatch.setattr(codec, "_merge", counting)
    revision = repo.read_revision(commit)
    assert revision.safetensors_bytes() == (src / WEIGHTS).read_bytes()
    assert len(revision.manifest.tensors) == 120 and merges == [120 * 64]


def test_xor_chains_are_read_from_the_pack(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a plane cache, each XOR link took the general path: every blob of its chain
    # gathered out of the pack (blob_view, an Adler-32 pass) and decoded on its own, ~6x the
    # cost of a self-contained tensor. Its chain is now read where it lies in the packs.
    src = _tiny_moe(tmp_path / "src", seed=12)
    names = tensor_names(src)
    commits = [_commit(repo, "r0", src)]
    for step in (1, 2):
        mutate(src, seed=20 + step, names=names[: 40 * step])
        commits.append(_commit(repo, f"r{step}", src))
    expected = (src / WEIGHTS).read_bytes()
    records = repo.read_revision(commits[-1]).manifest.tensors
    assert {r.depth for r in records} == {0, 1, 2}, "links of both depths, and roots"
    reads = []
    blob_view = Repository.blob_view

    def counting(self: Repository, oid: str, **kwargs: object) -> bytes | memoryview:
        reads.append(oid)
        return blob_view(self, oid, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Repository, "blob_view", counting)
    with Repository.open(repo.git_dir.parent) as fresh:
        assert fresh.read_revision(commits[-1]).safetensors_bytes() == expected
        tensor_blobs = {r.blob for r in records}
        assert not tensor_blobs & set(reads)
        monkeypatch.setattr(Repository, "blob_view", blob_view)
        for record in records:  # the general path agrees
            assert _decode_all(fresh, commits[-1])[record.name] == fresh.tensor_bytes(
                record.blob, record.name
            )


@pytest.mark.parametrize(
    ("depth", "which", "plane", "codec_name", "reason"),
    [
        (0, "root", 0, "none", "sha256 of decoded bytes"),  # a raw plane: the sha256 covers it
        (0, "root", 1, "zstd", "plane 1: CRC32"),
        (1, "root", 0, "none", "sha256 of decoded bytes"),  # the root below a link
        (1, "tip", 1, "zstd", "plane 1: CRC32"),  # the link itself
    ],
)
def test_a_flipped_byte_in_a_batched_tensor_or_its_chain_is_named(
    repo: Repository,
    tmp_path: Path,
    depth: int,
    which: str,
    plane: int,
    codec_name: str,
    reason: str,
) -> None:
    src = _tiny_moe(tmp_path / "src", seed=13)
    commits = [_commit(repo, "r0", src)]
    mutate(src, seed=30, names=tensor_names(src))
    commits.append(_commit(repo, "r1", src))
    tips = repo.read_revision(commits[depth]).manifest.tensors
    roots = repo.read_revision(commits[0]).manifest.tensors
    blobs = [
        tip.blob if which == "tip" else root.blob for tip, root in zip(tips, roots, strict=True)
    ]
    index = next(
        i
        for i, (tip, blob) in enumerate(zip(tips, blobs, strict=True))
        if tip.depth == depth
        and codec.read_header(repo.blob_view(blob)).segments[plane][0] == codec_name
    )
    header = codec.read_header(repo.blob_view(blobs[index]))
    start = header.payload_offset + sum(s[1] for s in header.segments[:plane])
    pack_path, offset = _packed_location(repo, blobs[index], start + 3)
    repo.close()
    _flip(pack_path, offset)
    with Repository.open(repo.git_dir.parent) as reopened:
        with pytest.raises(codec.CorruptBlobError, match=reason) as info:
            reopened.read_revision(commits[depth]).safetensors_buffer()
        assert tips[index].name in str(info.value)


@pytest.mark.parametrize("bad", [None, 0, 5])
def test_verify_all_names_the_bad_tensor_on_either_thread(
    monkeypatch: pytest.MonkeyPatch, bad: int | None
) -> None:
    monkeypatch.setattr(store_module, "_THREADED_HASH_BYTES", 0)  # two threads even for this
    rng = np.random.default_rng(7)
    jobs = []
    for i in range(6):
        raw = random_f32(rng, [32, 32])
        header = codec.read_header(codec.encode(raw, "F32", (32, 32)))
        data = np.frombuffer(raw, dtype=np.uint8).copy()
        if i == bad:
            data[11] ^= 1
        jobs.append((data, header, f"t{i}"))
    if bad is None:
        store_module._verify_all(jobs)
        return
    with pytest.raises(codec.CorruptBlobError, match=f"'t{bad}'.*sha256"):
        store_module._verify_all(jobs)


def test_revision_reads_take_it_at_any_alignment(repo: Repository, tmp_path: Path) -> None:
    # safetensors_buffer decodes each tensor at header length + its offset: rarely 4-aligned.
    src = _adapter(tmp_path / "src", seed=8)
    commit = _commit(repo, "r0", src)
    revision = repo.read_revision(commit)
    header_len = len(repo.read_blob(revision.manifest.header_blob))
    assert header_len % 4 or any(r.start % 4 for r in revision.manifest.tensors)
    assert revision.safetensors_bytes() == (src / WEIGHTS).read_bytes()


# ------------------------------------------------------------------------------- plane cache
def _chain_of_revisions(repo: Repository, src: Path, count: int) -> list[str]:
    """`count` revisions, each a small nudge of the one before: XOR links up the chain."""
    commits = [_commit(repo, "r0", src)]
    for i in range(1, count):
        names = [n for n in tensor_names(src) if n.endswith("weight")]
        mutate(src, seed=10 + i, names=names)
        commits.append(_commit(repo, f"r{i}", src))
    return commits


def test_plane_cache_decodes_each_child_from_its_parents_planes(
    repo: Repository, tmp_path: Path
) -> None:
    commits = _chain_of_revisions(repo, _adapter(tmp_path / "src", seed=6), 5)
    depths = {r.depth for r in repo.read_revision(commits[-1]).manifest.tensors}
    assert max(depths) == 4, depths
    expected = [_decode_all(repo, c) for c in commits]  # no cache: every chain from its root
    with Repository.open(repo.git_dir.parent) as cached:
        cached.plane_cache = PlaneCache(1 << 30)
        hits = []
        for commit, want in zip(commits, expected, strict=True):
            assert _decode_all(cached, commit) == want
            hits.append(cached.plane_cache.hits)
        links = sum(r.encoding == "xor" for r in repo.read_revision(commits[2]).manifest.tensors)
        # r2 on: every link's base is the tip the revision before left in the cache.
        assert hits[0] == hits[1] == 0 and hits[2] >= links > 0, hits
        # Out of order (an old revision, then the newest again) decodes the same bytes.
        assert _decode_all(cached, commits[1]) == expected[1]
        assert _decode_all(cached, commits[4]) == expected[4]
    with Repository.open(repo.git_dir.parent) as small:
        small.plane_cache = PlaneCache(40_000)  # holds a few small tensors, never a big one
        for commit, want in zip(commits, expected, strict=True):
            assert _decode_all(small, commit) == want
        assert 0 < small.plane_cache.nbytes <= 40_000


def _cached(blob_id: str, size: int) -> tuple[codec.BlobHeader, codec.Planes]:
    """A PlaneCache entry of `size` bytes of planes."""
    header = codec.BlobHeader("uint8", (size,), "planes", None, 0, "0" * 64, size)
    return header, codec.Planes(np.zeros((1, size), dtype=np.uint8), blob_id, 0)


def test_plane_cache_evicts_the_least_recently_used_first() -> None:
    """A get() keeps an entry recent: the next put evicts the one unused longest, not the oldest put."""
    cache = PlaneCache(200)
    cache.put(*_cached("a", 100))
    cache.put(*_cached("b", 100))
    assert cache.get("a") is not None
    cache.put(*_cached("c", 100))
    assert "a" in cache and "b" not in cache and "c" in cache and cache.nbytes == 200


def test_plane_cache_counts_an_entry_put_again_once() -> None:
    """Putting a blob that is cached already replaces it: its bytes count once."""
    cache = PlaneCache(300)
    cache.put(*_cached("a", 100))
    cache.put(*_cached("a", 100))
    assert cache.nbytes == 100 and len(cache) == 1
    cache.put(*_cached("b", 100))
    cache.put(*_cached("c", 100))
    assert len(cache) == 3 and cache.nbytes == 300


def test_plane_cache_keeps_entries_that_fill_its_bound_exactly() -> None:
    """The bound is inclusive: one entry of max_bytes, or two halves, are all kept."""
    cache = PlaneCache(200)
    cache.put(*_cached("whole", 200))
    assert "whole" in cache and cache.nbytes == 200
    cache = PlaneCache(200)
    cache.put(*_cached("a", 100))
    cache.put(*_cached("b", 100))
    assert len(cache) == 2 and cache.nbytes == 200


def test_plane_cache_skips_an_entry_over_its_bound_and_evicts_nothing() -> None:
    """A tensor bigger than the whole cache is not kept, and does not flush what is cached."""
    cache = PlaneCache(200)
    cache.put(*_cached("a", 100))
    cache.put(*_cached("big", 300))
    assert "a" in cache and "big" not in cache and cache.nbytes == 100


def test_plane_cache_reads_only_the_last_link(tmp_path: Path) -> None:
    """A child decodes with its ancestors' blobs gone: only its own link is read."""
    repo = porcelain.init(tmp_path / "work", install_hooks=False)
    src = handmade_adapter(
        tmp_path / "src",
        {
            f"w{i}.lora_A.weight": (
                "F32",
                [16, 256],
                random_f32(np.random.default_rng(i), [16, 256]),
            )
            for i in range(3)
        },
    )
    commits = _chain_of_revisions(repo, src, 3)
    tip_records = repo.read_revision(commits[2]).manifest.tensors
    assert {r.encoding for r in tip_records} == {"xor"} and {r.depth for r in tip_records} == {2}
    ancestors = {r.blob for c in commits[:2] for r in repo.read_revision(c).manifest.tensors}
    repo.plane_cache = PlaneCache(1 << 20)
    _decode_all(repo, commits[1])
    expected = _decode_all(repo, commits[2])
    for blob in ancestors:  # loose objects: fewer tensors than a pack needs
        (repo.git_dir / "objects" / blob[:2] / blob[2:]).unlink()
    with Repository.open(repo.git_dir.parent) as fresh, pytest.raises(MintError):
        _decode_all(fresh, commits[2])  # without the cache the chain is needed
    assert _decode_all(repo, commits[2]) == expected
    repo.close()


def test_a_corrupt_link_over_a_cached_base_is_named_and_not_cached(
    repo: Repository, tmp_path: Path
) -> None:
    commits = _chain_of_revisions(repo, _adapter(tmp_path / "src", seed=7), 3)
    record = next(
        r
        for r in repo.read_revision(commits[2]).manifest.tensors
        if r.encoding == "xor" and r.shape == (16, 2048)
    )
    header = codec.read_header(repo.blob_view(record.blob), name=record.name)
    pack_path, offset = _packed_location(repo, record.blob, header.payload_offset + 9)
    repo.close()
    _flip(pack_path, offset)
    with Repository.open(repo.git_dir.parent) as reopened:
        reopened.plane_cache = PlaneCache(1 << 30)
        _decode_all(reopened, commits[1])
        with pytest.raises(codec.CorruptBlobError) as info:
            _decode_all(reopened, commits[2])
        assert record.name in str(info.value)
        assert record.blob not in reopened.plane_cache
        # The revision before is untouched and still decodes.
        _decode_all(reopened, commits[1])


def _flip_raw_byte_of_a_link(repo: Repository, commit: str) -> TensorRecord:
    """Flip a byte in a raw (uncompressed) plane of an xor link: only the sha256 guards those."""
    for record in repo.read_revision(commit).manifest.tensors:
        if record.encoding != "xor":
            continue
        header = codec.read_header(repo.blob_view(record.blob), name=record.name)
        at = header.payload_offset
        for kind, size, _ in header.segments:
            if kind == "none" and size > 16:
                pack_path, offset = _packed_location(repo, record.blob, at + size // 2)
                repo.close()
                _flip(pack_path, offset)
                return record
            at += size
    raise AssertionError("no xor link with a raw plane")


def test_a_link_failing_its_sha256_over_a_cached_base_is_not_cached(
    repo: Repository, tmp_path: Path
) -> None:
    commits = _chain_of_revisions(repo, _adapter(tmp_path / "src", seed=8), 3)
    record = _flip_raw_byte_of_a_link(repo, commits[2])
    with Repository.open(repo.git_dir.parent) as reopened:
        reopened.plane_cache = PlaneCache(1 << 30)
        _decode_all(reopened, commits[1])
        with pytest.raises(codec.CorruptBlobError, match="sha256"):
            _decode_all(reopened, commits[2])
        assert record.blob not in reopened.plane_cache


def test_tensor_into_caches_a_link_only_once_its_sha256_holds(
    repo: Repository, tmp_path: Path
) -> None:
    commits = _chain_of_revisions(repo, _adapter(tmp_path / "src", seed=8), 2)
    with Repository.open(repo.git_dir.parent) as reopened:
        reopened.plane_cache = cache = PlaneCache(1 << 30)
        _decode_all(reopened, commits[1])
        record = next(
            r
            for r in reopened.read_revision(commits[1]).manifest.tensors
            if r.blob in cache and r.dtype == "F32"
        )
        hit = cache.get(record.blob)
        assert hit is not None and hit[1].grid.flags.writeable is False
        data = bytearray(reopened.tensor_bytes(record.blob, record.name))
        data[5] ^= 0x40
        # A link on the cached blob whose header claims another sha256 (a buggy writer).
        encoded = codec.encode_parts(
            bytes(data), record.dtype, record.shape, base=hit[1], sha256="0" * 64
        )
        assert encoded.header.encoding == "xor" and encoded.header.base == record.blob
        link = reopened.write_object(
            b"blob", encoded.parts, TENSOR_ZLIB_LEVEL, encoded.header.payload_offset
        )
        out = np.empty(record.end - record.start, dtype=np.uint8)
        with pytest.raises(codec.CorruptBlobError, match="sha256"):
            reopened.tensor_into(link, record.name, out)
        assert link not in cache
        # A cached tip is still checked when used: planes changed in memory are caught.
        bad = hit[1].grid.copy()
        bad[0, 0] ^= 1
        cache.put(hit[0], codec.Planes(bad, record.blob, hit[1].depth))
        with pytest.raises(codec.CorruptBlobError, match="sha256"):
            reopened.tensor_into(record.blob, record.name, out, expect=record)
