"""The commit path's speed-ups keep every byte the same: reused plane buffers, the checksum
functions, the NaN/Inf shortcut, the pack's loose-object check and the hook sample lookup."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from mintvcs import checksums, codec, hooks
from mintvcs.packs import TENSOR_ZLIB_LEVEL, PackWriter
from mintvcs.store import Repository

BASE_ID = "cd" * 20


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2")


def _tensors(rng: np.random.Generator) -> list[tuple[str, tuple[int, ...], bytes]]:
    """Tensors of each plane dtype, small and large enough (planes >= 64 kB) to be sampled."""
    out: list[tuple[str, tuple[int, ...], bytes]] = []
    for rows, cols in ((16, 4096), (4096, 16), (16, 300), (64, 2048)):
        x = rng.standard_normal((rows, cols)).astype(np.float32) * 2e-3
        out.append(("BF16", (rows, cols), _bf16_bits(x).tobytes()))
        out.append(("F32", (rows, cols), x.astype("<f4").tobytes()))
        out.append(("F16", (rows, cols), x.astype("<f2").tobytes()))
    return out


def test_reused_buffers_give_the_same_blobs() -> None:
    rng = np.random.default_rng(7)
    tensors = _tensors(rng)
    # Each blob is consumed before the next encode, as the store does; a buffer reused too
    # early would change an earlier blob's planes before it is compared.
    for dtype, shape, data in tensors:
        fresh = codec.encode_parts(data, dtype, shape)
        reused = codec.encode_parts(data, dtype, shape, reuse=True)
        assert reused.to_bytes() == fresh.to_bytes()
        assert codec.decode(reused.to_bytes()) == data


def test_reused_buffers_with_an_xor_base() -> None:
    rng = np.random.default_rng(8)
    for dtype, shape, data in _tensors(rng):
        base_blob = codec.encode(data, dtype, shape)
        base = codec.decode_planes([base_blob], BASE_ID)
        words = np.frombuffer(data, dtype=np.uint8).copy()
        words[::97] ^= 1  # a small step: XOR against the parent pays
        nxt = words.tobytes()
        fresh = codec.encode_parts(nxt, dtype, shape, base=base)
        reused = codec.encode_parts(nxt, dtype, shape, base=base, reuse=True)
        assert reused.header.encoding == fresh.header.encoding == "xor"
        assert reused.to_bytes() == fresh.to_bytes()
        # The base's planes are not the reused buffers: a second encode leaves them intact.
        again = codec.encode_parts(nxt, dtype, shape, base=base, reuse=True)
        assert again.to_bytes() == fresh.to_bytes()
        assert codec.decode(fresh.to_bytes(), data) == nxt


@pytest.mark.parametrize("dtype", ["BF16", "F32", "F16"])
@pytest.mark.parametrize("bad", [0, 1, 5])
def test_nonfinite_count_of_large_tensors(dtype: str, bad: int) -> None:
    x = np.random.default_rng(9).standard_normal(40000).astype(np.float32)
    x[:bad] = [np.nan, np.inf, -np.inf, np.nan, np.inf][:bad]
    data = {
        "BF16": _bf16_bits(x).tobytes(),
        "F32": x.astype("<f4").tobytes(),
        "F16": x.astype("<f2").tobytes(),
    }[dtype]
    encoded = codec.encode_parts(data, dtype, (40000,), reuse=True)
    assert encoded.nonfinite == bad == codec.nonfinite_count(data, dtype)


def test_nonfinite_count_is_numpy_isfinite_over_every_f16_and_bf16_pattern() -> None:
    # Every bit pattern, not only normal-range draws: large finite values, subnormals, both
    # infinities and every NaN payload, with numpy as the oracle.
    bits = np.arange(1 << 16, dtype=np.uint16)
    for dtype, values in (
        ("F16", bits.view(np.float16)),
        ("BF16", (bits.astype(np.uint32) << 16).view(np.float32)),
    ):
        want = int(np.count_nonzero(~np.isfinite(values)))
        data = bits.astype("<u2").tobytes()
        assert codec.encode_parts(data, dtype, (1 << 16,)).nonfinite == want, dtype
        assert codec.nonfinite_count(data, dtype) == want, dtype
    f64 = np.array([1.0, np.nan, -np.inf, 1e308, -0.0], dtype="<f8")
    assert codec.nonfinite_count(f64.tobytes(), "F64") == 2
    assert codec.encode_parts(f64.tobytes(), "F64", (5,)).nonfinite == 2


def test_checksums_match_zlib() -> None:
    data = memoryview(os.urandom(300_000))
    for start, value in ((0, 0), (1, 1), (7, 0xDEADBEEF)):
        assert checksums.crc32(data[start:], value) == zlib.crc32(data[start:], value)
        assert checksums.adler32(data[start:], value) == zlib.adler32(data[start:], value)
    assert checksums.crc32(b"") == 0 and checksums.adler32(b"") == 1


def test_pack_writer_skips_an_object_already_loose(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    blob = codec.encode(os.urandom(2048), "U8", (2048,))
    prefix = codec.read_header(blob).payload_offset
    loose = repo.write_object(b"blob", [blob], TENSOR_ZLIB_LEVEL, prefix)
    pack = PackWriter(repo, expected=2)
    assert pack.add(b"blob", [blob], TENSOR_ZLIB_LEVEL, prefix) == loose
    other = codec.encode(os.urandom(2048), "U8", (2048,))
    packed = pack.add(b"blob", [other], TENSOR_ZLIB_LEVEL, codec.read_header(other).payload_offset)
    pack.finish()
    assert list(pack.entries) == [bytes.fromhex(packed)]
    fresh = Repository.open(tmp_path / "r")
    assert fresh.read_blob(packed) == other and fresh.read_blob(loose) == blob
    repo.close()
    fresh.close()


def test_hook_sample_is_read_from_the_package() -> None:
    shipped = Path(__file__).resolve().parents[2] / "hooks" / "pre-commit"
    assert hooks._sample_bytes("pre-commit") == shipped.read_bytes()
    assert hooks._sample_bytes("no-such-hook") is None
