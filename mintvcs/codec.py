"""Lossless tensor codec: one self-describing, sha256-verified blob per tensor.

A blob is ``MAGIC | version | header length | JSON header | CRC32 | payload``
(docs/format.md specifies it byte by byte). The payload holds the tensor's
raw little-endian bytes split into byte planes (byte k of every element
together, so exponent bytes sit apart from noisy mantissa bytes), each plane
zstd-compressed or kept raw, optionally after XOR with the same tensor in a
parent revision.

numpy and zstandard are imported inside functions so that CLI commands that
never touch tensors don't pay for them at start-up.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mintvcs.errors import MintError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHAIN",
    "BlobHeader",
    "CodecInputError",
    "CorruptBlobError",
    "decode",
    "encode",
    "read_header",
]

MAGIC = b"MINTBLOB"
FORMAT_VERSION = 1
MAX_CHAIN: int = 8
"""Longest XOR chain; a blob at depth MAX_CHAIN is never used as a base."""

# magic(8) + version(1) + header length(u32 LE)
_PREFIX = struct.Struct("<8sBI")
_CRC = struct.Struct("<I")
# A header is a few hundred bytes; the bound stops a corrupt length from
# making us slice or parse something absurd.
_MAX_HEADER = 1 << 20

# Byte sizes of safetensors dtypes. Unknown (e.g. sub-byte) dtypes are still
# stored raw; only the shape-vs-size check is skipped for them.
_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
# Float dtypes whose bytes are split into planes; the issue asks for these.
_PLANE_DTYPES = frozenset({"F16", "BF16", "F32"})
# Where the exponent is 8 bits wide, rotating each element left by one bit
# moves the sign to bit 0, so the top byte holds exactly the exponent. For
# kaiming-uniform LoRA A matrices that makes the exponent plane ~15% smaller;
# F16's 5-bit exponent gains nothing from it.
_ROTATE = {"BF16": 1, "F32": 1}
_UINT = {2: "<u2", 4: "<u4"}
_ENCODINGS = frozenset({"raw", "planes", "xor"})
_DTYPE_RE = re.compile(r"[A-Z0-9_]{1,32}")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")

# Encoder settings for planes, chosen by measurement on LoRA tensors: a
# plane of exponents is close to i.i.d. symbols, where matches cost more than
# they save, so a tiny hash table and the longest minimum match leave zstd
# doing mostly Huffman-coded literals. Against zstd level 1 this is ~12%
# smaller on exponent planes and about twice as fast; level 3 is worse still.
_PLANE_PARAMS = {
    "window_log": 17, "hash_log": 6, "chain_log": 6, "search_log": 1,
    "min_match": 7, "target_length": 0, "strategy": 1,
}  # fmt: skip
# Planes at least this large are compressed by zstd's own worker threads;
# smaller ones finish faster on one thread than the job split costs.
_MT_PLANE_BYTES = 8 << 20
# Keep zstd output only when it saves at least 1/64 of the plane: a raw
# plane decodes with a memcpy, which is worth more than a ~1% saving.
_PAYS_DIVISOR = 64


class CorruptBlobError(MintError):
    """A tensor blob failed verification: bad magic, version, sizes, base or sha256."""

    def __init__(self, name: str, reason: str) -> None:
        """Build the one-line message naming the tensor and the way out."""
        self.name = name
        self.reason = reason
        super().__init__(
            f"tensor {name!r}: stored blob is corrupt ({reason}); "
            "run `mintvcs fsck` and restore the object from a clone or backup"
        )


class CodecInputError(MintError, ValueError):
    """encode() was given bytes that don't match the dtype and shape it was told."""


@dataclass(frozen=True)
class BlobHeader:
    """The parsed header of a tensor blob."""

    dtype: str
    shape: tuple[int, ...]
    encoding: str  # "raw" | "planes" | "xor"
    base: str | None  # 40-hex git blob id of the base blob (only for "xor")
    depth: int  # 0 for self-contained blobs, base depth + 1 for xor
    sha256: str  # hex sha256 of the decoded tensor bytes
    nbytes: int  # decoded size
    group: int = 1  # number of byte planes; 1 = bytes kept in element order
    rotate: int = 0  # bits each element was rotated left by before the split
    # per plane: ("zstd" | "none", stored size, CRC32 of the stored bytes)
    segments: tuple[tuple[str, int, int], ...] = ()
    payload_offset: int = 0  # where the first segment starts in the blob


# zstd contexts are not thread-safe, and creating one per plane costs more
# than compressing a small plane, so each thread keeps its own.
_local = threading.local()


def _compressor(level: int | None, threads: int) -> Any:
    cache: dict[tuple[int | None, int], Any] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    key = (level, threads)
    cctx = cache.get(key)
    if cctx is None:
        import zstandard

        # Content size in the frame lets decode check a plane's size before
        # allocating; sha256 covers integrity, so no zstd checksum.
        if level is None:
            params = zstandard.ZstdCompressionParameters(
                threads=threads, write_content_size=1, write_checksum=0, **_PLANE_PARAMS
            )
            cctx = zstandard.ZstdCompressor(compression_params=params)
        else:
            cctx = zstandard.ZstdCompressor(
                level=level, threads=threads, write_content_size=True, write_checksum=False
            )
        cache[key] = cctx
    return cctx


def _decompressor() -> Any:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        import zstandard

        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def _group_for(dtype: str) -> int:
    return _ITEMSIZE[dtype] if dtype in _PLANE_DTYPES else 1


def _expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int | None:
    size = _ITEMSIZE.get(dtype)
    if size is None:
        return None
    for dim in shape:
        size *= dim
    return size


def _rotl(arr: npt.NDArray[np.uint8], width: int, bits: int) -> npt.NDArray[np.uint8]:
    """Rotate each little-endian `width`-byte element left by `bits` bits."""
    import numpy as np

    x = arr.view(_UINT[width])
    out = np.left_shift(x, bits)
    out |= x >> (8 * width - bits)
    return out.view(np.uint8)


def _rotr(arr: npt.NDArray[np.uint8], width: int, bits: int) -> npt.NDArray[np.uint8]:
    """Undo _rotl."""
    import numpy as np

    x = arr.view(_UINT[width])
    out = np.right_shift(x, bits)
    out |= x << (8 * width - bits)
    return out.view(np.uint8)


def _pack(
    arr: npt.NDArray[np.uint8], group: int, rotate: int, level: int | None
) -> list[tuple[str, Any]]:
    """Split bytes into `group` planes and compress each one where that pays."""
    import numpy as np

    if level is None and group == 1:
        # Bytes in element order (integers, other dtypes) do have repeats
        # worth matching, so they get zstd's ordinary default instead.
        level = 3
    if rotate:
        arr = _rotl(arr, group, rotate)
    if group == 1:
        planes = [arr]
    else:
        grid = np.ascontiguousarray(arr.reshape(-1, group).T)
        planes = list(grid)
    out: list[tuple[str, Any]] = []
    for plane in planes:
        n = plane.nbytes
        if n == 0:
            out.append(("none", b""))
            continue
        threads = -1 if n >= _MT_PLANE_BYTES else 0
        packed = _compressor(level, threads).compress(plane)
        if len(packed) + n // _PAYS_DIVISOR < n:
            out.append(("zstd", packed))
        else:
            out.append(("none", plane))
    return out


def _stored(segments: list[tuple[str, Any]]) -> int:
    return sum(len(memoryview(s).cast("B")) for _, s in segments)


def encode(
    data: bytes | memoryview,
    dtype: str,
    shape: tuple[int, ...],
    *,
    base: bytes | None = None,
    base_id: str | None = None,
    base_depth: int = 0,
    level: int | None = None,
) -> bytes:
    """Encode one tensor's raw little-endian bytes into a self-describing blob.

    `level` None uses the plane-tuned zstd settings; an int is a plain zstd level.
    """
    import numpy as np

    view = memoryview(data).cast("B")
    nbytes = view.nbytes
    shape = tuple(int(d) for d in shape)
    if not _DTYPE_RE.fullmatch(dtype):
        raise CodecInputError(f"dtype {dtype!r} is not a safetensors dtype name (e.g. 'BF16')")
    if any(d < 0 for d in shape):
        raise CodecInputError(f"shape {shape} has a negative dimension")
    expected = _expected_nbytes(dtype, shape)
    if expected is not None and expected != nbytes:
        raise CodecInputError(
            f"{dtype} tensor of shape {list(shape)} needs {expected} bytes, got {nbytes}; "
            "pass the tensor's own bytes"
        )
    if base_depth < 0 or base_depth > MAX_CHAIN:
        raise CodecInputError(f"base_depth {base_depth} is outside 0..{MAX_CHAIN}")

    arr = np.frombuffer(view, dtype=np.uint8)
    group = _group_for(dtype)
    rotate = _ROTATE.get(dtype, 0)
    sha = hashlib.sha256(view).hexdigest()
    segments = _pack(arr, group, rotate, level)
    encoding = "planes" if group > 1 else "raw"
    base_ref: str | None = None
    depth = 0

    # A blob at depth MAX_CHAIN is never a base, so decoding reads at most
    # MAX_CHAIN + 1 blobs. A base of another size (the shape changed) can't
    # be XORed against and is ignored.
    if base is not None and base_depth < MAX_CHAIN and len(base) == nbytes and nbytes > 0:
        if base_id is None or not _HEX40.fullmatch(base_id):
            raise CodecInputError(
                f"base_id {base_id!r} is not a 40-hex git blob id; pass the base blob's id"
            )
        base_arr = np.frombuffer(memoryview(base).cast("B"), dtype=np.uint8)
        xored = np.bitwise_xor(arr, base_arr)
        xor_segments = _pack(xored, group, rotate, level)
        if _stored(xor_segments) < _stored(segments):
            segments, encoding, base_ref, depth = xor_segments, "xor", base_id, base_depth + 1

    header = {
        "base": base_ref,
        "depth": depth,
        "dtype": dtype,
        "encoding": encoding,
        "group": group,
        "nbytes": nbytes,
        "rotate": rotate,
        # zstd frames have bits the decoder ignores, so a flip there would
        # pass the sha256; a CRC32 per segment catches any stored-byte flip.
        "segments": [[codec, len(memoryview(s).cast("B")), zlib.crc32(s)] for codec, s in segments],
        "sha256": sha,
        "shape": list(shape),
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head
    crc = _CRC.pack(zlib.crc32(prefix))
    return b"".join([prefix, crc, *(s for _, s in segments)])


def _is_int(value: object) -> bool:
    # bool is an int subclass; a header holding true/false is corrupt.
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(blob: bytes | memoryview, *, name: str = "<tensor>") -> BlobHeader:
    """Parse and check a blob's header without touching its payload."""
    view = memoryview(blob).cast("B")
    if view.nbytes < _PREFIX.size + _CRC.size:
        raise CorruptBlobError(name, f"truncated: {view.nbytes} bytes is shorter than a header")
    magic, version, hlen = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptBlobError(name, f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptBlobError(
            name, f"format version {version} is not {FORMAT_VERSION} (a newer mintvcs may read it)"
        )
    if hlen > _MAX_HEADER:
        raise CorruptBlobError(name, f"header length {hlen} is implausible")
    end = _PREFIX.size + hlen
    if view.nbytes < end + _CRC.size:
        raise CorruptBlobError(name, "truncated inside the header")
    (crc,) = _CRC.unpack_from(view, end)
    if zlib.crc32(view[:end]) != crc:
        raise CorruptBlobError(name, "header CRC32 mismatch")
    try:
        raw = json.loads(bytes(view[_PREFIX.size : end]).decode("ascii"))
        header = _check_fields(raw, payload_offset=end + _CRC.size)
    except (ValueError, TypeError, KeyError) as exc:
        # Only a CRC collision or a buggy writer gets here.
        raise CorruptBlobError(name, f"malformed header: {exc}") from None
    payload = view.nbytes - header.payload_offset
    stored = sum(size for _, size, _ in header.segments)
    if payload != stored:
        what = "truncated" if payload < stored else "trailing bytes"
        raise CorruptBlobError(name, f"{what}: payload is {payload} bytes, header says {stored}")
    return header


def _check_fields(raw: Any, payload_offset: int) -> BlobHeader:
    """Validate the decoded JSON header; raise ValueError on anything off."""
    if not isinstance(raw, dict):
        raise ValueError("header is not an object")
    dtype, shape, encoding = raw["dtype"], raw["shape"], raw["encoding"]
    base, depth, sha, nbytes = raw["base"], raw["depth"], raw["sha256"], raw["nbytes"]
    group, rotate, segments = raw["group"], raw["rotate"], raw["segments"]
    if not isinstance(dtype, str) or not _DTYPE_RE.fullmatch(dtype):
        raise ValueError(f"dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"shape {shape!r}")
    if encoding not in _ENCODINGS:
        raise ValueError(f"encoding {encoding!r}")
    if not _is_int(nbytes) or nbytes < 0:
        raise ValueError(f"nbytes {nbytes!r}")
    expected = _expected_nbytes(dtype, tuple(shape))
    if expected is not None and expected != nbytes:
        raise ValueError(f"nbytes {nbytes} does not match {dtype} {shape}")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise ValueError(f"sha256 {sha!r}")
    if encoding == "xor":
        if not isinstance(base, str) or not _HEX40.fullmatch(base):
            raise ValueError(f"base {base!r}")
        if not _is_int(depth) or not 1 <= depth <= MAX_CHAIN:
            raise ValueError(f"depth {depth!r}")
    elif base is not None or depth != 0:
        raise ValueError(f"{encoding} blob with base {base!r} depth {depth!r}")
    wanted_group = _group_for(dtype)
    if encoding == "raw" and wanted_group != 1:
        raise ValueError(f"raw encoding for {dtype}")
    if encoding == "planes" and wanted_group == 1:
        raise ValueError(f"planes encoding for {dtype}")
    if group != wanted_group:
        raise ValueError(f"group {group!r} for {dtype}")
    if rotate != _ROTATE.get(dtype, 0):
        raise ValueError(f"rotate {rotate!r} for {dtype}")
    if not isinstance(segments, list) or len(segments) != group:
        raise ValueError(f"segments {segments!r}")
    segs: list[tuple[str, int, int]] = []
    for seg in segments:
        if not isinstance(seg, list) or len(seg) != 3:
            raise ValueError(f"segment {seg!r}")
        codec, size, crc = seg
        if codec not in ("zstd", "none") or not _is_int(size) or size < 0:
            raise ValueError(f"segment {seg!r}")
        if not _is_int(crc) or not 0 <= crc < 1 << 32:
            raise ValueError(f"segment {seg!r}")
        if codec == "none" and size != nbytes // group:
            raise ValueError(f"raw segment of {size} bytes, plane is {nbytes // group}")
        segs.append((codec, size, crc))
    return BlobHeader(
        dtype=dtype,
        shape=tuple(shape),
        encoding=encoding,
        base=base,
        depth=depth,
        sha256=sha,
        nbytes=nbytes,
        group=group,
        rotate=rotate,
        segments=tuple(segs),
        payload_offset=payload_offset,
    )


def decode(blob: bytes | memoryview, base: bytes | None = None, *, name: str = "<tensor>") -> bytes:
    """Decode a blob to the tensor's raw bytes, verifying sizes and sha256."""
    import numpy as np
    import zstandard

    header = read_header(blob, name=name)
    view = memoryview(blob).cast("B")
    nbytes, group = header.nbytes, header.group
    plane_len = nbytes // group
    if header.encoding == "xor":
        if base is None:
            raise CorruptBlobError(
                name, f"xor blob needs its base blob {header.base} and none was given"
            )
        if len(base) != nbytes:
            raise CorruptBlobError(
                name, f"base {header.base} decodes to {len(base)} bytes, expected {nbytes}"
            )

    planes: list[Any] = []
    offset = header.payload_offset
    for index, (codec, size, crc) in enumerate(header.segments):
        seg = view[offset : offset + size]
        offset += size
        if zlib.crc32(seg) != crc:
            raise CorruptBlobError(name, f"plane {index}: CRC32 mismatch")
        if codec == "none":
            planes.append(seg)
            continue
        # Check the frame's declared size first so a flipped size field
        # can't make zstd allocate gigabytes.
        try:
            declared = zstandard.frame_content_size(seg)
        except zstandard.ZstdError as exc:
            raise CorruptBlobError(name, f"plane {index}: bad zstd frame: {exc}") from None
        if declared != plane_len:
            raise CorruptBlobError(
                name, f"plane {index}: zstd frame declares {declared} bytes, expected {plane_len}"
            )
        try:
            out = _decompressor().decompress(seg)
        except zstandard.ZstdError as exc:
            raise CorruptBlobError(name, f"plane {index}: zstd: {exc}") from None
        if len(out) != plane_len:
            raise CorruptBlobError(
                name, f"plane {index}: decompressed to {len(out)} bytes, expected {plane_len}"
            )
        planes.append(out)

    result: npt.NDArray[np.uint8]
    if group == 1:
        result = np.frombuffer(planes[0], dtype=np.uint8)
    else:
        result = np.empty((plane_len, group), dtype=np.uint8)
        for k, plane in enumerate(planes):
            result[:, k] = np.frombuffer(plane, dtype=np.uint8)
        result = result.reshape(-1)
        if header.rotate:
            result = _rotr(result, group, header.rotate)
    if header.encoding == "xor":
        assert base is not None
        base_arr = np.frombuffer(memoryview(base).cast("B"), dtype=np.uint8)
        result = np.bitwise_xor(result, base_arr)

    digest = hashlib.sha256(result.data).hexdigest()
    if digest != header.sha256:
        hint = " (or the wrong base was given)" if header.encoding == "xor" else ""
        raise CorruptBlobError(
            name, f"sha256 of decoded bytes is {digest}, header says {header.sha256}{hint}"
        )
    return result.tobytes()
