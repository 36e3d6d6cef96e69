"""Tests for the lossless tensor codec (mintvcs.codec)."""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from mintvcs import codec
from mintvcs.codec import MAX_CHAIN, CodecInputError, CorruptBlobError, decode, encode, read_header
from mintvcs.errors import MintError

BASE_ID = "ab" * 20


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bf16 bit patterns (round to nearest even)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


def _lora_like(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> bytes:
    """Kaiming-uniform-like values in the given dtype, as safetensors stores them."""
    x = rng.uniform(-1 / 64, 1 / 64, shape).astype(np.float32)
    if dtype == "BF16":
        return _bf16(x).tobytes()
    return x.astype({"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]).tobytes()


CASES = [
    ("F32", (16, 257), lambda r: r.standard_normal((16, 257)).astype("<f4").tobytes()),
    ("F16", (33, 7), lambda r: r.standard_normal((33, 7)).astype("<f2").tobytes()),
    ("BF16", (129, 16), lambda r: _bf16(r.standard_normal((129, 16)) * 1e-3).tobytes()),
    ("F64", (5, 3), lambda r: r.standard_normal((5, 3)).astype("<f8").tobytes()),
    ("I64", (1001,), lambda r: r.integers(-(2**62), 2**62, 1001, dtype="<i8").tobytes()),
    ("I64", (4000,), lambda r: np.arange(4000, dtype="<i8").tobytes()),
    ("U8", (3, 5, 7), lambda r: r.integers(0, 256, (3, 5, 7), dtype=np.uint8).tobytes()),
    ("BOOL", (11,), lambda r: r.integers(0, 2, 11, dtype=np.uint8).tobytes()),
    ("F32", (), lambda r: np.float32(3.5).tobytes()),
    ("BF16", (), lambda r: _bf16(np.array(-2.0)).tobytes()),
    ("F32", (0,), lambda r: b""),
    ("BF16", (4, 0, 3), lambda r: b""),
    ("U8", (0,), lambda r: b""),
    ("F16", (1,), lambda r: np.float16(1.0).tobytes()),
]


@pytest.mark.parametrize(("dtype", "shape", "make"), CASES)
def test_round_trip_bit_exact(dtype, shape, make) -> None:
    data = make(np.random.default_rng(0))
    blob = encode(data, dtype, shape)
    out = decode(blob)
    assert out == data
    header = read_header(blob)
    assert header.dtype == dtype
    assert header.shape == shape
    assert header.nbytes == len(data)
    assert header.sha256 == hashlib.sha256(data).hexdigest()
    assert header.encoding == ("planes" if dtype in ("F32", "F16", "BF16") else "raw")
    assert header.base is None
    assert header.depth == 0


def test_accepts_memoryview_input() -> None:
    data = np.arange(64, dtype="<f4")
    blob = encode(memoryview(data), "F32", (64,))
    assert decode(blob) == data.tobytes()


def test_unknown_dtype_is_stored_raw() -> None:
    data = bytes(range(10))
    blob = encode(data, "F4", (20,))
    assert read_header(blob).encoding == "raw"
    assert decode(blob) == data


def test_nan_payloads_and_special_values_preserved() -> None:
    # Signalling/quiet NaNs with payloads, both infinities, -0.0 and subnormals.
    f32 = np.array(
        [0x7F800001, 0x7FC12345, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001],
        dtype="<u4",
    ).tobytes()
    bf16 = np.array([0x7F81, 0xFFC3, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x7FFF], dtype="<u2").tobytes()
    f16 = np.array([0x7C01, 0xFE55, 0x7C00, 0x8000, 0x0001], dtype="<u2").tobytes()
    for dtype, data in (("F32", f32), ("BF16", bf16), ("F16", f16)):
        n = len(data) // (4 if dtype == "F32" else 2)
        assert decode(encode(data, dtype, (n,))) == data


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_planes_compress_realistic_lora(dtype) -> None:
    data = _lora_like(np.random.default_rng(1), dtype, (16, 4096))
    blob = encode(data, dtype, (16, 4096))
    header = read_header(blob)
    assert header.encoding == "planes"
    assert header.group == {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    # The exponent plane compresses; the mantissa planes are near-random.
    assert [seg[0] for seg in header.segments].count("zstd") >= 1
    assert len(blob) < len(data)
    assert decode(blob) == data


def test_bf16_and_f32_reach_the_compression_goals() -> None:
    rng = np.random.default_rng(2)
    for dtype, goal in (("BF16", 1.45), ("F32", 1.15)):
        raw = stored = 0
        for shape in ((16, 4096), (4096, 16), (16, 14336), (14336, 16)):
            # A: kaiming-uniform; B: small normal values, as after training.
            data = _lora_like(rng, dtype, shape)
            if shape[1] == 16:
                x = (rng.standard_normal(shape) * 3e-3).astype(np.float32)
                data = _bf16(x).tobytes() if dtype == "BF16" else x.tobytes()
            raw += len(data)
            stored += len(encode(data, dtype, shape))
        assert raw / stored >= goal, (dtype, raw / stored)


def test_incompressible_planes_are_kept_raw() -> None:
    data = np.random.default_rng(3).integers(0, 256, 8192, dtype=np.uint8).tobytes()
    header = read_header(encode(data, "F32", (2048,)))
    assert all(codec == "none" for codec, _, _ in header.segments)
    header = read_header(encode(data, "U8", (8192,)))
    assert header.segments[0][:2] == ("none", 8192)


def test_compressible_raw_dtype_uses_zstd() -> None:
    data = np.zeros(10000, dtype="<i8").tobytes()
    blob = encode(data, "I64", (10000,))
    assert read_header(blob).segments[0][0] == "zstd"
    assert len(blob) < 1000
    assert decode(blob) == data


def _rl_step(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """One small optimiser step at lr 1e-5 applied to float32 master weights."""
    return x - 1e-5 * np.sign(rng.standard_normal(x.shape)).astype(np.float32)


def test_xor_chain_round_trip_and_smaller() -> None:
    rng = np.random.default_rng(4)
    master = rng.uniform(-1 / 64, 1 / 64, (16, 2048)).astype(np.float32)
    prev = _bf16(master).tobytes()
    blob = encode(prev, "BF16", (16, 2048))
    depth = 0
    for step in range(1, 5):
        master = _rl_step(rng, master)
        data = _bf16(master).tobytes()
        blob = encode(data, "BF16", (16, 2048), base=prev, base_id=BASE_ID, base_depth=depth)
        header = read_header(blob)
        assert header.encoding == "xor"
        assert header.base == BASE_ID
        assert header.depth == depth + 1 == step
        assert len(blob) < len(encode(data, "BF16", (16, 2048))) / 2
        assert decode(blob, prev) == data
        prev, depth = data, header.depth


@pytest.mark.parametrize("dtype", ["F32", "I64", "U8"])
def test_xor_for_every_dtype(dtype) -> None:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, 4096, dtype=np.uint8)
    data = base.copy()
    data[::97] ^= 1
    blob = encode(
        data.tobytes(),
        dtype,
        (4096 // {"F32": 4, "I64": 8, "U8": 1}[dtype],),
        base=base.tobytes(),
        base_id=BASE_ID,
    )
    assert read_header(blob).encoding == "xor"
    assert decode(blob, base.tobytes()) == data.tobytes()


def test_keeps_planes_when_xor_does_not_pay() -> None:
    rng = np.random.default_rng(6)
    data = _lora_like(rng, "BF16", (64, 256))
    unrelated = rng.integers(0, 2**16, 64 * 256, dtype="<u2").tobytes()
    blob = encode(data, "BF16", (64, 256), base=unrelated, base_id=BASE_ID)
    header = read_header(blob)
    assert header.encoding == "planes"
    assert (header.base, header.depth) == (None, 0)
    assert decode(blob) == data


def test_base_of_another_size_is_ignored() -> None:
    data = np.zeros(100, dtype="<f4").tobytes()
    blob = encode(data, "F32", (100,), base=b"\0" * 40, base_id=BASE_ID)
    assert read_header(blob).encoding == "planes"


def test_depth_bound() -> None:
    base = np.arange(1000, dtype="<f4")
    data = base.copy()
    data[0] = 7
    for depth in range(MAX_CHAIN):
        header = read_header(
            encode(data, "F32", (1000,), base=base.tobytes(), base_id=BASE_ID, base_depth=depth)
        )
        assert (header.encoding, header.depth) == ("xor", depth + 1)
    # A blob at depth MAX_CHAIN is never used as a base.
    header = read_header(
        encode(data, "F32", (1000,), base=base.tobytes(), base_id=BASE_ID, base_depth=MAX_CHAIN)
    )
    assert (header.encoding, header.depth) == ("planes", 0)
    with pytest.raises(CodecInputError):
        encode(data, "F32", (1000,), base=base.tobytes(), base_id=BASE_ID, base_depth=MAX_CHAIN + 1)


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(CodecInputError, match="needs 8 bytes"):
        encode(b"\0" * 6, "F32", (2,))
    with pytest.raises(CodecInputError, match="dtype"):
        encode(b"", "float32", (0,))
    with pytest.raises(CodecInputError, match="base_id"):
        encode(b"\0" * 8, "F32", (2,), base=b"\1" * 8, base_id="HEAD")
    # Two negative dimensions multiply to the right element count: the sign is checked itself.
    with pytest.raises(CodecInputError, match="negative"):
        encode(b"\0" * 8, "F32", (-1, -2))
    assert issubclass(CodecInputError, MintError)


def test_read_header_fields() -> None:
    data = _lora_like(np.random.default_rng(7), "BF16", (16, 64))
    blob = encode(data, "BF16", (16, 64))
    header = read_header(blob)
    assert header.group == 2 and header.rotate == 1
    assert len(header.segments) == 2
    assert header.payload_offset + sum(seg[1] for seg in header.segments) == len(blob)
    assert blob[:8] == b"MINTBLOB" and blob[8] == codec.FORMAT_VERSION
    (hlen,) = struct.unpack_from("<I", blob, 9)
    assert header.payload_offset == 13 + hlen + 4


def test_reader_independent_of_our_code() -> None:
    """Decode a BF16 planes blob with only the documented rules (docs/format.md)."""
    import json
    import zlib

    import zstandard

    data = _lora_like(np.random.default_rng(8), "BF16", (16, 128))
    blob = encode(data, "BF16", (16, 128))
    (hlen,) = struct.unpack_from("<I", blob, 9)
    assert zlib.crc32(blob[: 13 + hlen]) == struct.unpack_from("<I", blob, 13 + hlen)[0]
    h = json.loads(blob[13 : 13 + hlen])
    pos, planes = 13 + hlen + 4, []
    for kind, size, _crc in h["segments"]:
        seg = blob[pos : pos + size]
        pos += size
        planes.append(zstandard.ZstdDecompressor().decompress(seg) if kind == "zstd" else seg)
    rot = np.frombuffer(b"".join(planes), np.uint8).reshape(h["group"], -1).T.copy().view("<u2")
    out = ((rot >> 1) | (rot << 15)).astype("<u2").tobytes()
    assert out == data and hashlib.sha256(out).hexdigest() == h["sha256"]


def _blobs() -> list[tuple[bytes, bytes | None, str]]:
    rng = np.random.default_rng(9)
    planes = encode(_lora_like(rng, "BF16", (16, 64)), "BF16", (16, 64))
    raw = encode(rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), "U8", (300,))
    zraw = encode(np.arange(300, dtype="<i8").tobytes(), "I64", (300,))
    base = _lora_like(rng, "F32", (8, 32))
    changed = bytearray(base)
    changed[::13] = b"\x55" * len(changed[::13])
    xor = encode(bytes(changed), "F32", (8, 32), base=base, base_id=BASE_ID)
    assert read_header(xor).encoding == "xor"
    return [(planes, None, "planes"), (raw, None, "raw"), (zraw, None, "zraw"), (xor, base, "xor")]


@pytest.mark.parametrize("which", range(4))
def test_flipped_byte_anywhere_is_caught(which) -> None:
    blob, base, _ = _blobs()[which]
    rng = np.random.default_rng(10 + which)
    # Every header byte plus a sample of payload positions, each bit at random.
    header_end = read_header(blob).payload_offset
    positions = list(range(header_end)) + list(
        rng.choice(
            np.arange(header_end, len(blob)), min(200, len(blob) - header_end), replace=False
        )
    )
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(CorruptBlobError, match=re.escape("'layers.3.lora_A'")):
            decode(bytes(bad), base, name="layers.3.lora_A")


@pytest.mark.parametrize("which", range(4))
def test_truncation_and_trailing_bytes_caught(which) -> None:
    blob, base, _ = _blobs()[which]
    for cut in sorted({0, 1, 7, 8, 12, 20, len(blob) // 2, len(blob) - 1}):
        with pytest.raises(CorruptBlobError, match="'w'"):
            decode(blob[:cut], base, name="w")
    with pytest.raises(CorruptBlobError, match="trailing"):
        decode(blob + b"\0", base, name="w")
    with pytest.raises(CorruptBlobError, match="trailing"):
        read_header(blob + b"\0", name="w")


def test_xor_needs_the_right_base() -> None:
    blob, base, _ = _blobs()[3]
    assert base is not None
    with pytest.raises(CorruptBlobError, match=r"'w'.*needs its base blob " + BASE_ID):
        decode(blob, None, name="w")
    with pytest.raises(CorruptBlobError, match=r"'w'.*expected"):
        decode(blob, base[:-4], name="w")
    wrong = bytearray(base)
    wrong[5] ^= 0x10
    with pytest.raises(CorruptBlobError, match=r"'w'.*wrong base"):
        decode(blob, bytes(wrong), name="w")


def test_a_chain_whose_links_do_not_fit_is_refused_as_corrupt() -> None:
    # chain_planes reads links a store located by id: each must be the base its link above
    # names in dtype, size and depth, or the chain is corrupt (CorruptBlobError, which fsck and
    # the CLI report by name), not decoded into bytes only a later sha256 would refuse.
    rng = np.random.default_rng(12)
    root = _lora_like(rng, "F32", (8, 32))
    one = bytearray(root)
    one[::13] = b"\x55" * len(one[::13])
    two = bytearray(one)
    two[::7] = b"\x11" * len(two[::7])
    root_blob = encode(root, "F32", (8, 32))
    link = encode(bytes(one), "F32", (8, 32), base=root, base_id=BASE_ID)
    assert read_header(link).depth == 1
    tip, planes, _ = codec.chain_planes([link, root_blob], name="w")  # a chain that fits
    out = np.empty(len(root), dtype=np.uint8)
    codec.merge_planes(planes, tip, out, name="w")
    assert out.tobytes() == bytes(one)
    # A link claiming depth 1 on a base of depth 1: its depth must be its base's plus one
    # (what bounds every chain by MAX_CHAIN when the next commit reads the depth).
    lying = encode(bytes(two), "F32", (8, 32), base=bytes(one), base_id="cd" * 20, base_depth=0)
    with pytest.raises(CorruptBlobError, match=r"'w'.*has depth 1, expected 0"):
        codec.chain_planes([lying, link, root_blob], name="w")
    # A base of another size under the link: refused by name, not a numpy broadcast error.
    other = encode(_lora_like(rng, "F32", (8, 16)), "F32", (8, 16))
    with pytest.raises(CorruptBlobError, match=r"'w'.*decodes to 512 bytes F32, expected 1024"):
        codec.chain_planes([link, other], name="w")
    # Base planes decoded from another blob than the one the last link names.
    planes_of = codec.decode_planes([root_blob], "ef" * 20)
    with pytest.raises(
        ValueError, match=f"base planes of {'ef' * 20} given for a link on {BASE_ID}"
    ):
        codec.chain_planes([link], name="w", base=planes_of)
    assert codec.chain_planes([link], name="w", base=codec.decode_planes([root_blob], BASE_ID))


def _edit(key: str, value: object) -> object:
    def edit(header: dict[str, object]) -> None:
        header[key] = value

    return edit


def _edit_segment(index: int, item: int, value: object) -> object:
    def edit(header: dict[str, object]) -> None:
        header["segments"][index][item] = value  # type: ignore[index]

    return edit


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_edit("shape", [True, 64]), "shape"),  # JSON's true equals 1 in Python
        (_edit("shape", [16, -64]), "shape"),
        (_edit("shape", [16, 64.0]), "shape"),
        (_edit("shape", "16,64"), "shape"),
        (_edit("shape", [16, 32]), "nbytes 2048 does not match"),
        (_edit("nbytes", 2047), "nbytes"),
        (_edit("nbytes", True), "nbytes"),
        (_edit("dtype", "bf16"), "dtype"),
        (_edit("dtype", 2), "dtype"),
        (_edit("sha256", "AB" * 32), "sha256"),
        (_edit("group", 4), "group"),
        (_edit("rotate", 0), "rotate"),
        (_edit("encoding", "raw"), "raw encoding for BF16"),
        (_edit("base", BASE_ID), "planes blob with base"),
        (_edit("depth", 1), "planes blob with base"),
        (_edit("segments", [["none", 1024, 0]]), "segments"),
        (_edit_segment(0, 1, 1023), "raw segment of 1023 bytes"),
        (_edit_segment(1, 2, 1 << 32), "segment"),
        (_edit_segment(1, 2, -1), "segment"),
        (_edit_segment(1, 1, False), "segment"),
        (_edit_segment(1, 0, ["zstd"]), "segment"),
    ],
)
def test_each_header_field_is_checked(edit: object, reason: str) -> None:
    # The blob header's checks (hand-inlined for speed) refuse each bad field with its reason.
    from tests.mintvcs.storekit import edit_blob_header

    blob = encode(_lora_like(np.random.default_rng(4), "BF16", (16, 64)), "BF16", (16, 64))
    assert [s[0] for s in read_header(blob).segments] == ["none", "zstd"]
    with pytest.raises(CorruptBlobError, match=f"malformed header: {re.escape(reason)}"):
        read_header(edit_blob_header(blob, edit), name="w")


def test_header_checks_accept_what_a_reader_may_see() -> None:
    from tests.mintvcs.storekit import edit_blob_header

    blob = encode(_lora_like(np.random.default_rng(5), "BF16", (16, 64)), "BF16", (16, 64))
    # A key no writer puts there yet is ignored (docs/format.md, section 6).
    noted = edit_blob_header(blob, _edit("note", [1, 2]))
    assert read_header(noted).payload_offset == read_header(blob).payload_offset + 13
    assert decode(noted) == decode(blob)
    # A dtype of unknown size is stored raw: its nbytes is taken as given.
    odd = encode(b"\1\2\3\4\5", "Q7", (2,))
    header = read_header(odd)
    assert (header.dtype, header.nbytes, header.group, header.encoding) == ("Q7", 5, 1, "raw")
    link = read_header(_blobs()[3][0])
    assert (link.encoding, link.base, link.depth) == ("xor", BASE_ID, 1)
    for depth in (0, MAX_CHAIN + 1, True):
        with pytest.raises(CorruptBlobError, match="depth"):
            read_header(edit_blob_header(_blobs()[3][0], _edit("depth", depth)))
    with pytest.raises(CorruptBlobError, match="base"):
        read_header(edit_blob_header(_blobs()[3][0], _edit("base", "x" * 40)))


def test_bad_magic_and_version() -> None:
    blob = encode(b"\1\2\3", "U8", (3,))
    with pytest.raises(CorruptBlobError, match="magic"):
        read_header(b"NOTABLOB" + blob[8:], name="x")
    with pytest.raises(CorruptBlobError, match="version 2"):
        read_header(blob[:8] + b"\2" + blob[9:], name="x")


def test_error_message_is_one_line_with_a_fix() -> None:
    blob = encode(b"\1\2\3", "U8", (3,))
    with pytest.raises(CorruptBlobError) as info:
        decode(blob[:-1], name="base_model.model.q_proj.lora_B.weight")
    message = str(info.value)
    assert "\n" not in message
    assert "'base_model.model.q_proj.lora_B.weight'" in message
    assert "fsck" in message
    assert info.value.name == "base_model.model.q_proj.lora_B.weight"


def test_large_plane_uses_zstd_threads_and_round_trips() -> None:
    # Above the multi-threading threshold: exercises the threaded compressor.
    x = (np.random.default_rng(11).standard_normal(5 << 20) * 1e-2).astype(np.float32)
    data = _bf16(x).tobytes()
    blob = encode(data, "BF16", (5 << 20,))
    assert decode(blob) == data
    assert len(data) / len(blob) > 1.4


def test_codec_import_does_not_load_numpy_zstd_or_torch() -> None:
    code = (
        "import sys, mintvcs.codec; "
        "print(sorted(m for m in ('numpy', 'zstandard', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
