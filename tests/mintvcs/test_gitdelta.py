"""gc's delta encoder: what it makes, dulwich's `apply_delta` (as git's `patch-delta.c` reads the
format) turns back into the target, with ops git's own encoder would write."""

from __future__ import annotations

import hashlib
import itertools
import random
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from dulwich.pack import apply_delta

from mintvcs import gitdelta, porcelain
from mintvcs.packs import PackWriter
from tests.mintvcs.storekit import git


def _varint(delta: bytes, at: int) -> tuple[int, int]:
    """The size at `at` in a delta's header, and where the next field starts."""
    value = shift = 0
    while True:
        byte = delta[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _ops(delta: bytes) -> list[tuple[str, int, int]]:
    """The delta's ops, read as git reads them: ("copy", offset, size), ("insert", 0, size)."""
    _, at = _varint(delta, 0)
    _, at = _varint(delta, at)
    ops = []
    while at < len(delta):
        op = delta[at]
        at += 1
        if op & 0x80:
            offset = size = 0
            for bit in range(7):
                if op & 1 << bit:
                    if bit < 4:
                        offset |= delta[at] << 8 * bit
                    else:
                        size |= delta[at] << 8 * (bit - 4)
                    at += 1
            ops.append(("copy", offset, size or 0x10000))
        else:
            assert op, "op 0 is reserved"
            ops.append(("insert", 0, op))
            at += op
    return ops


def _round_trip(base: bytes, target: bytes) -> list[tuple[str, int, int]]:
    delta = gitdelta.create(base, target)
    assert delta is not None
    assert b"".join(apply_delta(base, delta)) == target
    return _ops(delta)


def _lines(count: int, seed: int = 0) -> list[bytes]:
    """Manifest-like lines: each unique, ~100 bytes."""
    return [
        b'  {"blob": "%s", "name": "layers.%d.weight"},'
        % (hashlib.sha1(b"%d %d" % (seed, i)).hexdigest().encode(), i)
        for i in range(count)
    ]


def _tree(seed: Callable[[int], int]) -> bytes:
    """Tree-like entries (mode, name, NUL, a binary 20-byte id): entry i's id is seed(i)'s hash."""
    return b"".join(
        b"100644 t%d\0" % i + hashlib.sha1(b"%d" % seed(i)).digest() for i in range(2000)
    )


def test_round_trips_and_ops_in_git_limits() -> None:
    lines = _lines(3000)
    base = b"\n".join(lines)
    cases = {
        "both empty": (b"", b""),
        "empty base": (b"", base),
        "empty target": (base, b""),
        "identical": (base, base),
        "no separators": (b"x" * 5000, b"x" * 3000 + b"y" + b"x" * 2000),
        "short records": (b"\n".join([b"]"] * 400), b"\n".join([b"]"] * 500)),
        "all new": (base, b"\n".join(_lines(3000, seed=1))),
        "a line changed": (base, b"\n".join([*lines[:1500], b"changed", *lines[1501:]])),
        "lines moved": (base, b"\n".join(lines[2000:] + lines[:2000])),
        "duplicates": (b"\n".join(lines[:10] * 50), b"\n".join(lines[:10] * 60)),
        "a NUL-split tree": (_tree(lambda i: i), _tree(lambda i: i * (i % 7 != 3))),
    }
    for name, (old, new) in cases.items():
        ops = _round_trip(old, new)
        assert all(size <= (0x10000 if op == "copy" else 127) for op, _, size in ops), name
    # A copy of more than 64 KiB is split as git's encoder splits it; the identical object is
    # copies alone; an insert of more than 127 bytes is several.
    ops = _round_trip(base, base)
    assert {op for op, _, _ in ops} == {"copy"} and len(ops) == -(-len(base) // 0x10000)
    ops = _round_trip(base, base[:1000] + b"\n" + bytes(range(256)) * 2 + b"\n" + base[1000:])
    assert [op for op, _, size in ops if op == "insert"] == ["insert"] * 5
    # A changed first line (a manifest's, holding the revision's metadata) costs what changed.
    head = b'{"format": "mintvcs-adapter", "meta": {%s}, "safetensors": {"header": "%s"}, "x": ['
    old, new = (head % (meta, b"0" * 40) + b"\n" + base for meta in (b"", b'"run": "a"'))
    assert [(op, size) for op, _, size in _round_trip(old, new) if op == "insert"] == [
        ("insert", len(b'"run": "a"'))
    ]
    # A changed tree entry costs its 20-byte id at most (a byte at either end may match by
    # chance): the copies reach into its name from both sides.
    old, new = cases["a NUL-split tree"]
    inserted = sum(size for op, _, size in _round_trip(old, new) if op == "insert")
    assert inserted <= 20 * sum(i % 7 == 3 and i > 0 for i in range(2000))


def test_git_reads_a_pack_of_such_deltas(tmp_path: Path) -> None:
    # Real git resolves them (its own patch-delta.c): a base over 16 MiB (4-byte offsets),
    # copies split at 64 KiB, inserts of more than 127 bytes, one delta on another.
    lines = _lines(200_000)
    versions = [
        b"\n".join(lines),
        b"\n".join([*lines[:50], b"x" * 300, *lines[100_000:], *lines[50:100_000]]),
        b"\n".join([b"new first line", *lines[90_000:100_000], b"and a last one"]),
    ]
    with porcelain.init(tmp_path / "work", install_hooks=False) as repo:
        writer = PackWriter(repo, repack=True)
        oids = [writer.add(b"blob", [versions[0]], 6)]
        ops: list[tuple[str, int, int]] = []
        for base, target in itertools.pairwise(versions):
            delta = gitdelta.create(base, target)
            assert delta is not None and len(delta) < 4000
            ops += _ops(delta)
            oids.append(hashlib.sha1(b"blob %d\0%b" % (len(target), target)).hexdigest())
            writer.add_delta(oids[-1], oids[-2], len(delta), zlib.compress(delta))
        assert writer.finish()
    assert max(offset for op, offset, _ in ops if op == "copy") >= 1 << 24
    assert max(size for op, _, size in ops if op == "insert") == 127
    assert max(size for op, _, size in ops if op == "copy") == 0x10000
    git_dir = tmp_path / "work" / ".mint"
    pack = next((git_dir / "objects" / "pack").glob("*.idx"))
    rows = git(git_dir, "verify-pack", "-v", str(pack)).stdout
    assert f"{oids[2]} blob" in rows and "chain length = 2: 1 object" in rows, rows
    for oid, version in zip(oids, versions, strict=True):
        assert git(git_dir, "cat-file", "blob", oid).stdout.encode() == version


def test_random_edits_round_trip() -> None:
    rng = random.Random(7)
    for _ in range(40):
        lines = [rng.randbytes(rng.randrange(0, 60)).replace(b"\n", b"") for _ in range(300)]
        new = list(lines)
        for _ in range(rng.randrange(1, 30)):
            at = rng.randrange(len(new))
            match rng.randrange(4):
                case 0:
                    new[at] = rng.randbytes(rng.randrange(0, 300))
                case 1:
                    del new[at]
                case 2:
                    new.insert(at, rng.choice(lines))
                case _:
                    new[at] = new[at][: rng.randrange(len(new[at]) + 1)]
        _round_trip(b"\n".join(lines), b"\0".join(new))


def test_gives_up_past_its_limit_early() -> None:
    base = b"\n".join(_lines(60_000))  # ~6 MB, a manifest's size for ~20k tensors
    new = b"\n".join(_lines(60_000, seed=2))
    t0 = time.perf_counter()
    assert gitdelta.create(base, new, len(new) // 2) is None
    assert time.perf_counter() - t0 < 5  # one pass (~0.1 s): not a diff's minute
    changed = b"\n".join([*_lines(60_000)[:-10], *_lines(10, seed=2)])
    delta = gitdelta.create(base, changed, len(changed) // 2)
    assert delta is not None and len(delta) < 2000
    assert gitdelta.create(base, changed, len(delta) - 1) is None


def test_a_delta_of_exactly_the_limit_is_made() -> None:
    """create() gives None only past its limit: a delta of exactly `limit` bytes is made."""
    lines = _lines(3000)
    base = b"\n".join(lines)
    new = b"\n".join([*lines[:1500], b"changed", *lines[1501:]])
    delta = gitdelta.create(base, new)
    assert delta is not None
    assert gitdelta.create(base, new, len(delta)) == delta
    assert gitdelta.create(base, new, len(delta) - 1) is None


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 1 << 40])
def test_sizes_are_git_varints(size: int) -> None:
    assert _varint(gitdelta._varint(size), 0) == (size, len(gitdelta._varint(size)))
