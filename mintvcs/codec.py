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
import itertools
import json
import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, overload

from mintvcs.checksums import crc32
from mintvcs.errors import MintError, NewerFormatError
from mintvcs.ids import is_object_id, is_sha256
from mintvcs.safetensors_file import DTYPE_SIZES

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
    "Encoded",
    "MergeBatch",
    "NewerBlobError",
    "NonFiniteTensorError",
    "Planes",
    "chain_planes",
    "chain_segments",
    "check_base",
    "decode",
    "decode_chain",
    "decode_planes",
    "decode_segments",
    "encode",
    "encode_parts",
    "header_of",
    "header_span",
    "merge_into",
    "merge_planes",
    "nonfinite_count",
    "read_header",
    "verify_sha256",
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

# Byte sizes of safetensors dtypes: the reader's table and two the codec also sizes. Unknown
# (e.g. sub-byte) dtypes are still stored raw; only the shape-vs-size check is skipped for them.
_ITEMSIZE: dict[str, int] = dict(DTYPE_SIZES)
# Float dtypes whose bytes are split into planes; the issue asks for these.
_PLANE_DTYPES = frozenset({"F16", "BF16", "F32"})
# Where the exponent is 8 bits wide, rotating each element left by one bit
# moves the sign to bit 0, so the top byte holds exactly the exponent. For
# kaiming-uniform LoRA A matrices that makes the exponent plane ~15% smaller;
# F16's 5-bit exponent gains nothing from it.
_ROTATE = {"BF16": 1, "F32": 1}
_UINT = {2: "<u2", 4: "<u4"}
_ENCODINGS = frozenset({"raw", "planes", "xor"})
_KNOWN_ENCODINGS = "'raw', 'planes' and 'xor'"
# An encoding or codec name a newer writer could use: anything else in its place is damage.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.+-]{0,31}")
_DTYPE_RE = re.compile(r"[A-Z0-9_]{1,32}")

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
# Planes at least this large are first sampled (a slice of _SAMPLE_BYTES from the middle):
# a plane whose sample doesn't pay skips zstd (mantissa planes are noise), and XOR against
# the parent is chosen or not from the samples, so only the winner is compressed in full.
_SAMPLE_BYTES = 16 << 10
_SAMPLED_PLANE_BYTES = 64 << 10


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


class NewerBlobError(CorruptBlobError, NewerFormatError):
    """A tensor blob of a newer format (version, encoding or segment codec) than this mintvcs reads.

    Still a CorruptBlobError for whoever asks "can this blob be read?", but its message says
    what to do: the blob is not damaged, and restoring it from a backup would change nothing.
    """

    def __init__(self, name: str, reason: str) -> None:
        """Build the one-line message naming the tensor and the way out."""
        self.name = name
        self.reason = reason
        MintError.__init__(
            self,
            f"tensor {name!r}: stored blob was written by a newer mintvcs ({reason}); "
            "upgrade mintvcs to read it",
        )


class _NewerHeader(ValueError):
    """A header field with a value only a newer writer would put there (_check_fields)."""


class NonFiniteTensorError(MintError):
    """A float tensor holding NaN or Inf (refused by the validating pre-commit hook)."""

    def __init__(self, name: str, count: int) -> None:
        """Name the tensor and count its bad values."""
        self.name = name
        self.count = count
        super().__init__(f"tensor {name} holds {count} non-finite value(s) (NaN or Inf)")


class CodecInputError(MintError, ValueError):
    """encode() was given bytes that don't match the dtype and shape it was told."""


class BlobHeader(NamedTuple):
    """The parsed header of a tensor blob.

    A named tuple, not a frozen dataclass: a checkout of a 37k-tensor MoE adapter parses 37k
    headers, and a frozen dataclass takes ~2.5 us to build (a setattr call per field).
    """

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


def _split(
    arr: npt.NDArray[np.uint8], group: int, rotate: int, reuse: bool = False
) -> npt.NDArray[np.uint8]:
    """Rotate each `group`-byte element left by `rotate` bits and split it into byte planes.

    Returns a (group, n) array; row k holds byte k of every rotated element. Rotation and
    the split only move bits, so XOR commutes with them: planes of a XOR b equal planes of
    a XOR planes of b. Decoding an XOR chain relies on that. With `reuse`, the grid is this
    thread's "grid" scratch buffer (valid until the thread's next reuse).
    """
    import numpy as np

    if group == 1:
        return arr.reshape(1, -1)
    count = arr.size // group
    if reuse:
        grid = _scratch("grid", arr.size)[: arr.size].reshape(group, count)
    else:
        grid = np.empty((group, count), dtype=np.uint8)
    if group == 2:
        x = arr.view("<u2")
        # Byte 1 of the rotated element is bits 15-R .. 8-R of x, byte 0 the low bits of
        # x << R with the top R bits of x wrapped around. Shifting into a u8 output
        # truncates, which is the & 0xFF we want; no u16 temporaries (fresh memory is
        # slow to fault in, and the split runs once per tensor).
        np.right_shift(x, 8 - rotate, out=grid[1], casting="unsafe")
        np.left_shift(x, rotate, out=grid[0], casting="unsafe")
        if rotate:
            wrap = np.right_shift(
                x, 16 - rotate, out=_scratch("tmp", count)[:count], casting="unsafe"
            )
            np.bitwise_or(grid[0], wrap, out=grid[0])
        return grid
    x = arr.view(_UINT[group])
    rotated = (x << rotate) | (x >> (8 * group - rotate)) if rotate else x
    columns = rotated.view(np.uint8).reshape(count, group)
    for k in range(group):
        grid[k] = columns[:, k]
    return grid


# Per-thread buffers of at most this size are kept for reuse; larger ones are allocated
# each time (a long-lived thread should not pin a huge tensor's worth of memory).
_SCRATCH_MAX = 64 << 20


def _scratch(slot: str, nbytes: int) -> npt.NDArray[np.uint8]:
    """A uint8 buffer of at least `nbytes`, reused by this thread for `slot`.

    Reused because fresh anonymous memory is slow to fault in (each tensor's planes and
    temporaries used to cost new pages). Contents are undefined.
    """
    import numpy as np

    if nbytes > _SCRATCH_MAX:
        return np.empty(nbytes, dtype=np.uint8)
    buffers: dict[str, npt.NDArray[np.uint8]] | None = getattr(_local, "scratch", None)
    if buffers is None:
        buffers = _local.scratch = {}
    buffer = buffers.get(slot)
    if buffer is None or buffer.size < nbytes:
        buffer = buffers[slot] = np.empty(nbytes, dtype=np.uint8)
    return buffer


# Elements merged per pass: the scratch stays a few MB (reused, cache-warm) whatever the
# tensor's size, instead of two temporaries as large as the tensor.
_MERGE_CHUNK = 1 << 20


def _merge(
    planes: list[npt.NDArray[np.uint8]], group: int, rotate: int, out: npt.NDArray[np.uint8]
) -> None:
    """Undo _split: interleave the planes and rotate right, writing the bytes into `out`."""
    if group == 1:
        out[:] = planes[0]
        return
    target = out.view(_UINT[group])
    count = planes[0].size
    if count <= _MERGE_CHUNK:  # the usual case (LoRA factors): no slicing
        _merge_words(planes, group, rotate, target)
        return
    for start in range(0, count, _MERGE_CHUNK):
        stop = min(start + _MERGE_CHUNK, count)
        _merge_words([p[start:stop] for p in planes], group, rotate, target[start:stop])


def _join(dst: npt.NDArray[Any], low: npt.NDArray[Any], high: npt.NDArray[Any], bits: int) -> None:
    """dst = high << bits | low, in place in dst (at least as wide as low and high)."""
    import numpy as np

    np.copyto(dst, high)
    np.multiply(dst, 1 << bits, out=dst)  # a left shift that numpy vectorizes
    np.bitwise_or(dst, low, out=dst)


def _merge_words(
    planes: list[npt.NDArray[np.uint8]], group: int, rotate: int, target: npt.NDArray[Any]
) -> None:
    """Words of `group` (2 or 4) bytes from their byte planes, rotated right, into `target`.

    Widened into registers-sized words and rebuilt with arithmetic, in this thread's scratch: about
    twice as fast as interleaving bytes with strided copies, and no fresh temporaries (fresh pages
    cost more than the arithmetic here). A cold hot-swap merges ~400 tensors of 8-45K elements,
    where each numpy call counts: left shifts are multiplies by powers of two (numpy vectorizes
    unsigned multiplication but not shifts: 1.3-1.9 against 2.5-2.9 us on 16K u16; the product
    wraps as a shift), and operands have one type (or-ing u16 into u32 costs more than a
    widening copy and a u32 or).
    """
    import numpy as np

    count = target.size
    # One scratch for both temporaries: the wrapped-around bits (words), then the u16 halves.
    scratch = _scratch("merge", 2 * target.nbytes)
    wrap = scratch[: target.nbytes].view(target.dtype)
    if group == 2:
        _join(target, planes[0], planes[1], 8)
    else:  # F32: byte pairs to u16 halves, then the halves to u32 words
        halves = scratch[4 * count : 8 * count].view(np.uint16)
        low, high = halves[:count], halves[count:]
        _join(low, planes[0], planes[1], 8)
        _join(high, planes[2], planes[3], 8)
        np.copyto(wrap, low)  # widened first: an or of u16 into u32 is the slower one
        _join(target, wrap, high, 16)
    if rotate:
        np.multiply(target, 1 << (8 * group - rotate), out=wrap)  # the bits that wrap around
        np.right_shift(target, rotate, out=target)
        np.bitwise_or(target, wrap, out=target)


def _segments_of(
    grid: npt.NDArray[np.uint8], level: int | None, pays: list[bool] | None = None
) -> list[tuple[str, Any]]:
    """Compress each plane of `grid` where that pays (`pays[k]` False: known not to, skip zstd)."""
    if level is None and grid.shape[0] == 1:
        # Bytes in element order (integers, other dtypes) do have repeats
        # worth matching, so they get zstd's ordinary default instead.
        level = 3
    out: list[tuple[str, Any]] = []
    for k, plane in enumerate(grid):
        n = plane.nbytes
        if n == 0 or (pays is not None and not pays[k]):
            out.append(("none", plane))
            continue
        threads = -1 if n >= _MT_PLANE_BYTES else 0
        packed = _compressor(level, threads).compress(plane)
        if len(packed) + n // _PAYS_DIVISOR < n:
            out.append(("zstd", packed))
        else:
            out.append(("none", plane))
    return out


def _estimate(
    grid: npt.NDArray[np.uint8], level: int | None, skip_top: bool = False
) -> tuple[int, list[bool]]:
    """Estimated stored size of `grid` from a sample of each plane, and which planes pay zstd.

    With `skip_top`, the last plane is not sampled: it is reported as paying, and its size
    is not counted (the caller only wants to know which planes to compress).
    """
    if level is None and grid.shape[0] == 1:
        level = 3
    n = grid.shape[1]
    start = (n - _SAMPLE_BYTES) // 2
    total, pays = 0, []
    for plane in grid[:-1] if skip_top else grid:
        size = len(_compressor(level, 0).compress(plane[start : start + _SAMPLE_BYTES]))
        # Half the margin of the full-plane rule, so sampling noise doesn't skip a plane
        # that the full-size rule would keep compressed.
        pays.append(size + _SAMPLE_BYTES // (2 * _PAYS_DIVISOR) < _SAMPLE_BYTES)
        total += (size if pays[-1] else _SAMPLE_BYTES) * n // _SAMPLE_BYTES
    if skip_top:
        pays.append(True)
    return total, pays


def _stored(segments: list[tuple[str, Any]]) -> int:
    return sum(len(memoryview(s).cast("B")) for _, s in segments)


class Planes:
    """A tensor in plane space (rotated, split into byte planes): what XOR encoding works on."""

    def __init__(self, grid: npt.NDArray[np.uint8], blob_id: str, depth: int) -> None:
        """Wrap a (group, n) plane grid decoded from blob `blob_id` at chain depth `depth`."""
        self.grid = grid
        self.blob_id = blob_id
        self.depth = depth

    @property
    def nbytes(self) -> int:
        """Size of the tensor."""
        return int(self.grid.size)


@dataclass
class Encoded:
    """An encoded blob in pieces (header, then segments), so a writer need not join them."""

    header: BlobHeader
    parts: list[Any]  # bytes-like pieces whose concatenation is the blob
    planes: npt.NDArray[np.uint8]  # the tensor's own planes (a later revision may XOR on them)
    nonfinite: int  # elements whose exponent is all ones (NaN or Inf); 0 for non-float dtypes

    @property
    def size(self) -> int:
        """Length of the blob."""
        return sum(len(memoryview(p).cast("B")) for p in self.parts)

    def to_bytes(self) -> bytes:
        """The blob as one bytes object."""
        return b"".join(self.parts)


# Masks whose bits all set mean NaN or Inf: the exponent of IEEE-like types; for F8_E4M3
# (OCP's fn variant, no Inf) exponent and mantissa, S.1111.111 being its only NaN; for
# F8_E8M0 (an exponent alone) 0xFF, its NaN.
_EXPONENT_MASKS = {
    "BF16": ("<u2", 0x7F80),
    "F16": ("<u2", 0x7C00),
    "F32": ("<u4", 0x7F800000),
    "C64": ("<u4", 0x7F800000),  # two F32s
    "F8_E5M2": ("u1", 0x7C),
    "F8_E4M3": ("u1", 0x7F),
    "F8_E8M0": ("u1", 0xFF),
}


def nonfinite_count(data: bytes | memoryview, dtype: str) -> int:
    """How many values of a float tensor's raw bytes are NaN or Inf (0 for other dtypes; a C64
    element counts once per non-finite part)."""
    import numpy as np

    if dtype == "F64":
        values = np.frombuffer(memoryview(data).cast("B"), dtype="<f8")
        return int(values.size - np.count_nonzero(np.isfinite(values)))
    if dtype not in _EXPONENT_MASKS:
        return 0
    kind, mask = _EXPONENT_MASKS[dtype]
    words = np.frombuffer(memoryview(data).cast("B"), dtype=kind)
    return int(np.count_nonzero((words & mask) == mask))


def _nonfinite(grid: npt.NDArray[np.uint8], dtype: str, data: memoryview) -> int:
    """Count NaN/Inf, from the exponent plane the split already built where there is one."""
    import numpy as np

    if dtype in ("BF16", "F32"):
        # Rotated by one bit, the top byte is exactly the 8-bit exponent. Its max (a SIMD
        # pass, no temporary) rules out NaN/Inf in the usual case before any counting.
        top = grid[-1]
        return int(np.count_nonzero(top == 0xFF)) if top.size and top.max() == 0xFF else 0
    if dtype == "F16":
        # Unrotated: the top byte is sign, 5 exponent bits, 2 mantissa bits.
        return int(np.count_nonzero((grid[1] & 0x7C) == 0x7C))
    return nonfinite_count(data, dtype)


def encode(
    data: bytes | memoryview,
    dtype: str,
    shape: tuple[int, ...],
    *,
    base: bytes | memoryview | Planes | None = None,
    base_id: str | None = None,
    base_depth: int = 0,
    level: int | None = None,
    sha256: str | None = None,
) -> bytes:
    """Encode one tensor's raw little-endian bytes into a self-describing blob.

    `level` None uses the plane-tuned zstd settings; an int is a plain zstd level.
    `sha256`, when the caller has it already, is the hex digest of `data` (not recomputed).
    """
    return encode_parts(
        data, dtype, shape, base=base, base_id=base_id, base_depth=base_depth,
        level=level, sha256=sha256,
    ).to_bytes()  # fmt: skip


def encode_parts(
    data: bytes | memoryview,
    dtype: str,
    shape: tuple[int, ...],
    *,
    base: bytes | memoryview | Planes | None = None,
    base_id: str | None = None,
    base_depth: int = 0,
    level: int | None = None,
    sha256: str | None = None,
    reuse: bool = False,
) -> Encoded:
    """Like encode(), returning the blob in pieces with the tensor's planes and NaN/Inf count.

    `base` is the same tensor in the parent revision, as raw bytes or as Planes (then
    `base_id` and `base_depth` default to the Planes' own). With `reuse`, the planes are
    built in buffers this thread reuses: the result (its parts and planes) is valid only
    until the same thread's next encode_parts(reuse=True).
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
    if isinstance(base, Planes):
        base_id = base.blob_id if base_id is None else base_id
        base_depth = base.depth
    if base_depth < 0 or base_depth > MAX_CHAIN:
        raise CodecInputError(f"base_depth {base_depth} is outside 0..{MAX_CHAIN}")

    arr = np.frombuffer(view, dtype=np.uint8)
    group = _group_for(dtype)
    rotate = _ROTATE.get(dtype, 0)
    sha = sha256 if sha256 is not None else hashlib.sha256(view).hexdigest()
    grid = _split(arr, group, rotate, reuse)
    encoding = "planes" if group > 1 else "raw"
    base_ref: str | None = None
    depth = 0

    # A blob at depth MAX_CHAIN is never a base, so decoding reads at most
    # MAX_CHAIN + 1 blobs. A base of another size (the shape changed) can't
    # be XORed against and is ignored.
    base_grid: npt.NDArray[np.uint8] | None = None
    if base is not None and base_depth < MAX_CHAIN and nbytes > 0:
        if isinstance(base, Planes):
            if base.grid.shape == grid.shape:
                base_grid = base.grid
        elif len(base) == nbytes:
            base_arr = np.frombuffer(memoryview(base).cast("B"), dtype=np.uint8)
            base_grid = _split(base_arr, group, rotate)
    if base_grid is not None and not is_object_id(base_id):
        raise CodecInputError(
            f"base_id {base_id!r} is not a 40-hex git blob id; pass the base blob's id"
        )

    if base_grid is None:
        # The top plane of a float holds the exponents (or sign and exponent), which pay in
        # practice: it is compressed without a sample (the full-size rule still decides).
        pays = (
            _estimate(grid, level, skip_top=grid.shape[0] > 1)[1]
            if grid.shape[1] >= _SAMPLED_PLANE_BYTES
            else None
        )
        segments = _segments_of(grid, level, pays)
    else:
        xor_out = _scratch("xor", grid.size)[: grid.size].reshape(grid.shape) if reuse else None
        xored = np.bitwise_xor(grid, base_grid, out=xor_out)
        if grid.shape[1] >= _SAMPLED_PLANE_BYTES:
            # Large tensor: decide between XOR and self-contained from samples of both, and
            # compress only the winner (compressing both doubled the commit's zstd time).
            own_size, own_pays = _estimate(grid, level)
            xor_size, xor_pays = _estimate(xored, level)
            use_xor = xor_size < own_size
            segments = _segments_of(
                xored if use_xor else grid, level, xor_pays if use_xor else own_pays
            )
        else:
            segments = _segments_of(grid, level)
            xor_segments = _segments_of(xored, level)
            use_xor = _stored(xor_segments) < _stored(segments)
            if use_xor:
                segments = xor_segments
        if use_xor:
            encoding, base_ref, depth = "xor", base_id, base_depth + 1

    seg_meta = tuple(
        (codec_name, len(memoryview(s).cast("B")), crc32(s)) for codec_name, s in segments
    )
    header_json = {
        "base": base_ref,
        "depth": depth,
        "dtype": dtype,
        "encoding": encoding,
        "group": group,
        "nbytes": nbytes,
        "rotate": rotate,
        # zstd frames have bits the decoder ignores, so a flip there would
        # pass the sha256; a CRC32 per segment catches any stored-byte flip.
        "segments": [list(s) for s in seg_meta],
        "sha256": sha,
        "shape": list(shape),
    }
    head = json.dumps(header_json, sort_keys=True, separators=(",", ":")).encode("ascii")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head
    crc = _CRC.pack(crc32(prefix))
    header = BlobHeader(
        dtype=dtype, shape=shape, encoding=encoding, base=base_ref, depth=depth, sha256=sha,
        nbytes=nbytes, group=group, rotate=rotate, segments=seg_meta,
        payload_offset=len(prefix) + _CRC.size,
    )  # fmt: skip
    return Encoded(
        header, [prefix + crc, *(s for _, s in segments)], grid, _nonfinite(grid, dtype, view)
    )


def read_header(blob: bytes | memoryview, *, name: str = "<tensor>") -> BlobHeader:
    """Parse and check a blob's header without touching its payload."""
    view = memoryview(blob).cast("B")
    return header_of(view, view.nbytes, name=name)


def header_span(head: bytes | memoryview) -> int | None:
    """Bytes a blob's header takes through its CRC32, read from `head`; None if too short to tell."""
    if len(head) < _PREFIX.size:
        return None
    return int(_PREFIX.size + _PREFIX.unpack_from(head, 0)[2] + _CRC.size)


def header_of(head: bytes | memoryview, size: int, *, name: str = "<tensor>") -> BlobHeader:
    """Parse and check the header of a `size`-byte blob from `head`, its first bytes.

    `head` need only hold the header (through its CRC32); a reader that has the rest of the
    blob elsewhere (a pack's stored blocks) checks the header before touching the payload.
    """
    view = head if type(head) is bytes else memoryview(head).cast("B")
    if size < _PREFIX.size + _CRC.size:
        raise CorruptBlobError(name, f"truncated: {size} bytes is shorter than a header")
    if len(view) < _PREFIX.size:
        raise CorruptBlobError(name, "truncated inside the header")
    magic, version, hlen = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptBlobError(name, f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version > FORMAT_VERSION:  # its layout past the version byte may differ: not read on
        raise NewerBlobError(name, f"format version {version}; this mintvcs reads {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise CorruptBlobError(name, f"format version {version} is not {FORMAT_VERSION}")
    if hlen > _MAX_HEADER:
        raise CorruptBlobError(name, f"header length {hlen} is implausible")
    end = _PREFIX.size + hlen
    if min(size, len(view)) < end + _CRC.size:
        raise CorruptBlobError(name, "truncated inside the header")
    (crc,) = _CRC.unpack_from(view, end)
    if crc32(view[:end]) != crc:
        raise CorruptBlobError(name, "header CRC32 mismatch")
    try:
        header = _check_fields(
            _json_object(bytes(view[_PREFIX.size : end]).decode("ascii")),
            payload_offset=end + _CRC.size,
        )
    except _NewerHeader as exc:  # a sound header (its CRC32 checked) that names what is to come
        raise NewerBlobError(name, str(exc)) from None
    except (ValueError, TypeError, KeyError) as exc:
        # Only a CRC collision or a buggy writer gets here.
        raise CorruptBlobError(name, f"malformed header: {exc}") from None
    payload = size - header.payload_offset
    stored = 0
    for segment in header.segments:
        stored += segment[1]
    if payload != stored:
        what = "truncated" if payload < stored else "trailing bytes"
        raise CorruptBlobError(name, f"{what}: payload is {payload} bytes, header says {stored}")
    return header


_JSON = json.JSONDecoder()


def _json_object(text: str) -> Any:
    """json.loads(text), a little faster for what writers write (no space around the value)."""
    try:
        value, stop = _JSON.raw_decode(text)
        if stop == len(text):
            return value
    except ValueError:
        pass
    return json.loads(text)  # anything else: json.loads's own verdict, and its message


# For each dtype the codec knows: (bytes per element, planes, rotation).
_LAYOUT: dict[str, tuple[int | None, int, int]] = {
    dtype: (size, _group_for(dtype), _ROTATE.get(dtype, 0)) for dtype, size in _ITEMSIZE.items()
}


def _check_fields(raw: Any, payload_offset: int) -> BlobHeader:
    """Validate the decoded JSON header; raise ValueError on anything off."""
    # A checkout of an MoE adapter parses 37k headers: the checks are inlined (`type(x) is int`
    # also refuses bool, a header holding true/false is corrupt) to keep this off the profile.
    if type(raw) is not dict:
        raise ValueError("header is not an object")
    encoding = raw.get("encoding")
    if encoding not in _ENCODINGS:
        # First: a newer encoding's header may lack keys that this version's need.
        if type(encoding) is str and _NAME_RE.fullmatch(encoding):
            raise _NewerHeader(f"encoding {encoding!r}; this mintvcs reads {_KNOWN_ENCODINGS}")
        raise ValueError(f"encoding {encoding!r}")
    dtype, shape = raw["dtype"], raw["shape"]
    base, depth, sha, nbytes = raw["base"], raw["depth"], raw["sha256"], raw["nbytes"]
    group, rotate, segments = raw["group"], raw["rotate"], raw["segments"]
    layout = _LAYOUT.get(dtype) if type(dtype) is str else None
    if layout is None:
        if type(dtype) is not str or not _DTYPE_RE.fullmatch(dtype):
            raise ValueError(f"dtype {dtype!r}")
        layout = (None, 1, 0)  # a dtype of unknown size: stored raw
    itemsize, wanted_group, wanted_rotate = layout
    if type(shape) is not list:
        raise ValueError(f"shape {shape!r}")
    expected = itemsize
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise ValueError(f"shape {shape!r}")
        if expected is not None:
            expected *= dim
    if type(nbytes) is not int or nbytes < 0:
        raise ValueError(f"nbytes {nbytes!r}")
    if expected is not None and expected != nbytes:
        raise ValueError(f"nbytes {nbytes} does not match {dtype} {shape}")
    if not is_sha256(sha):
        raise ValueError(f"sha256 {sha!r}")
    if encoding == "xor":
        if not is_object_id(base):
            raise ValueError(f"base {base!r}")
        if type(depth) is not int or not 1 <= depth <= MAX_CHAIN:
            raise ValueError(f"depth {depth!r}")
    elif base is not None or depth != 0:
        raise ValueError(f"{encoding} blob with base {base!r} depth {depth!r}")
    if encoding == "raw" and wanted_group != 1:
        raise ValueError(f"raw encoding for {dtype}")
    if encoding == "planes" and wanted_group == 1:
        raise ValueError(f"planes encoding for {dtype}")
    if group != wanted_group:
        raise ValueError(f"group {group!r} for {dtype}")
    if rotate != wanted_rotate:
        raise ValueError(f"rotate {rotate!r} for {dtype}")
    if type(segments) is not list or len(segments) != group:
        raise ValueError(f"segments {segments!r}")
    plane_len = nbytes // group
    segs: list[tuple[str, int, int]] = []
    for seg in segments:
        if type(seg) is not list or len(seg) != 3:
            raise ValueError(f"segment {seg!r}")
        codec, size, crc = seg
        if (
            (codec != "zstd" and codec != "none")
            or type(size) is not int
            or size < 0
            or type(crc) is not int
            or not 0 <= crc < 1 << 32
        ):
            if codec not in ("zstd", "none") and type(codec) is str and _NAME_RE.fullmatch(codec):
                raise _NewerHeader(f"segment codec {codec!r}; this mintvcs reads 'zstd' and 'none'")
            raise ValueError(f"segment {seg!r}")
        if codec == "none" and size != plane_len:
            raise ValueError(f"raw segment of {size} bytes, plane is {plane_len}")
        segs.append((codec, size, crc))
    return BlobHeader(
        dtype, tuple(shape), encoding, base, depth, sha, nbytes, group, rotate, tuple(segs),
        payload_offset,
    )  # fmt: skip


def _plane_arrays(
    blob: bytes | memoryview, header: BlobHeader, name: str, *, check_raw: bool
) -> list[npt.NDArray[np.uint8]]:
    """The stored planes of one blob, decompressed; raw planes are views into `blob`.

    Every zstd segment's CRC32 is checked (a flip in bits zstd ignores would pass the
    sha256). Raw segments are checked only with `check_raw`: when the caller verifies the
    sha256 of the decoded tensor, a flipped raw byte reaches it unchanged and is caught there.
    """
    return _segment_planes(_blob_segments(blob, header), header, name, check_raw=check_raw)


def _blob_segments(blob: bytes | memoryview, header: BlobHeader) -> list[memoryview]:
    """The stored segments of a whole blob, as views."""
    view = memoryview(blob).cast("B")
    segments = []
    offset = header.payload_offset
    for _, size, _ in header.segments:
        segments.append(view[offset : offset + size])
        offset += size
    return segments


@overload
def _segment_planes(
    segments: Sequence[bytes | memoryview],
    header: BlobHeader,
    name: str,
    *,
    check_raw: bool,
    arrays: Literal[True] = True,
) -> list[npt.NDArray[np.uint8]]: ...
@overload
def _segment_planes(
    segments: Sequence[bytes | memoryview],
    header: BlobHeader,
    name: str,
    *,
    check_raw: bool,
    arrays: Literal[False],
) -> list[bytes | memoryview]: ...
def _segment_planes(
    segments: Sequence[bytes | memoryview],
    header: BlobHeader,
    name: str,
    *,
    check_raw: bool,
    arrays: bool = True,
) -> list[npt.NDArray[np.uint8]] | list[bytes | memoryview]:
    """_plane_arrays() for a blob whose segments the caller located (`segments[k]` holds plane k);
    with `arrays` False, the planes as bytes and views (what a MergeBatch joins)."""
    import numpy as np
    import zstandard

    plane_len = header.nbytes // header.group
    planes: list[bytes | memoryview] = []
    for index, ((codec_name, size, crc), seg) in enumerate(
        zip(header.segments, segments, strict=True)
    ):
        if len(seg) != size:
            raise CorruptBlobError(name, f"plane {index}: {len(seg)} bytes, header says {size}")
        if codec_name == "none":
            if check_raw and crc32(seg) != crc:
                raise CorruptBlobError(name, f"plane {index}: CRC32 mismatch")
            planes.append(seg)
            continue
        if crc32(seg) != crc:
            raise CorruptBlobError(name, f"plane {index}: CRC32 mismatch")
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
    return [np.frombuffer(plane, dtype=np.uint8) for plane in planes] if arrays else planes


class MergeBatch:
    """Small tensors' planes, merged into their outputs a batch at a time (flush()).

    Merging one tensor's planes takes half a dozen numpy calls, ~6 us whatever its size: for
    the 64-byte tensors of a large MoE adapter (37k of them) that was most of a decode. The
    planes of many tensors of one layout, joined end to end, merge in one pass instead, and
    each output is then one copy.
    """

    def __init__(self) -> None:
        """An empty batch."""
        # (group, rotate) -> each tensor's planes, and its output
        self._pending: dict[
            tuple[int, int], tuple[list[list[bytes | memoryview]], list[npt.NDArray[np.uint8]]]
        ] = {}
        self._bytes = 0

    @staticmethod
    def takes(header: BlobHeader) -> bool:
        """Whether a tensor that `header` describes is merged in batches (small, split in planes)."""
        return header.group > 1 and header.nbytes <= _BATCH_TENSOR_BYTES

    def add(
        self, planes: list[bytes | memoryview], header: BlobHeader, out: npt.NDArray[np.uint8]
    ) -> None:
        """Merge `planes` (of a tensor that `header` describes) into `out` at the next flush."""
        pending = self._pending.get((header.group, header.rotate))
        if pending is None:
            pending = self._pending[header.group, header.rotate] = ([], [])
        pending[0].append(planes)
        pending[1].append(out)
        self._bytes += header.nbytes
        if self._bytes >= _BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write every pending tensor into its output."""
        import numpy as np

        for (group, rotate), (planes, outs) in self._pending.items():
            columns = [
                np.frombuffer(b"".join([p[k] for p in planes]), dtype=np.uint8)
                for k in range(group)
            ]
            total = columns[0].size * group
            merged = _scratch("batch", total)[:total]
            _merge(columns, group, rotate, merged)
            at = 0
            for out in outs:
                size = out.size
                out[:] = merged[at : at + size]
                at += size
        self._pending.clear()
        self._bytes = 0


# Tensors up to this size are merged in batches; larger ones cost more in their arithmetic than
# in numpy's calls, and a batch would only copy them once more.
_BATCH_TENSOR_BYTES = 16 << 10
_BATCH_BYTES = 1 << 20  # a batch is merged once it holds this much (its scratch stays small)


def decode_segments(
    segments: Sequence[bytes | memoryview],
    header: BlobHeader,
    out: npt.NDArray[np.uint8],
    *,
    name: str = "<tensor>",
    batch: MergeBatch | None = None,
) -> None:
    """Decode a self-contained blob, given as its header and its located segments, into `out`.

    Every zstd segment's CRC32 is checked; the sha256 is NOT: the caller must pass `out` to
    verify_sha256() before using it (a reader hashes on another thread meanwhile). With
    `batch`, a small tensor is written into `out` only at `batch.flush()`.
    """
    if header.encoding == "xor":
        raise CorruptBlobError(name, f"xor blob needs its base blob {header.base}")
    if batch is None or not batch.takes(header):
        merge_into(_segment_planes(segments, header, name, check_raw=False), header, out)
        return
    if out.size != header.nbytes:
        raise ValueError(f"output buffer holds {out.size} bytes, the tensor {header.nbytes}")
    # The batch joins the planes as they are: no numpy array per plane.
    batch.add(_segment_planes(segments, header, name, check_raw=False, arrays=False), header, out)


def merge_into(
    planes: Sequence[npt.NDArray[np.uint8]],
    header: BlobHeader,
    out: npt.NDArray[np.uint8],
    *,
    batch: MergeBatch | None = None,
) -> None:
    """Convert a tensor's planes back to its bytes in `out`, WITHOUT the sha256 check (the
    caller's: verify_sha256); with `batch`, a small tensor only at `batch.flush()`."""
    if out.size != header.nbytes:
        raise ValueError(f"output buffer holds {out.size} bytes, the tensor {header.nbytes}")
    if batch is not None and batch.takes(header):
        batch.add([plane.data for plane in planes], header, out)
    else:
        _merge(list(planes), header.group, header.rotate, out)


def verify_sha256(
    data: npt.NDArray[np.uint8], header: BlobHeader, *, name: str = "<tensor>"
) -> None:
    """Raise CorruptBlobError unless `data` (decoded bytes) has the sha256 in `header`."""
    digest = hashlib.sha256(data.data).hexdigest()
    if digest != header.sha256:
        hint = " (or the wrong base was given)" if header.encoding == "xor" else ""
        raise CorruptBlobError(
            name, f"sha256 of decoded bytes is {digest}, header says {header.sha256}{hint}"
        )


def chain_planes(
    blobs: Sequence[bytes | memoryview],
    *,
    name: str = "<tensor>",
    check_raw: bool = False,
    headers: Sequence[BlobHeader] | None = None,
    base: Planes | None = None,
) -> tuple[BlobHeader, list[npt.NDArray[np.uint8]], npt.NDArray[np.uint8] | None]:
    """XOR the planes of a chain (tip first) into the tip's planes: (tip header, planes, grid).

    The chain ends with a self-contained root, or, with `base`, with the xor link whose base
    blob `base` holds already decoded. Rotation and the byte split only move bits, so XOR-ing
    in plane space and converting back once gives the same bytes as decoding each link in turn,
    at a fraction of the cost. When anything was XOR-ed, the planes are the rows of `grid`, a
    fresh (group, n) array the caller owns; otherwise `grid` is None and the planes may be
    views into `blobs`. The sha256 is not checked here.
    """
    if not blobs:
        raise CorruptBlobError(name, "no blob to decode")
    if headers is None or len(headers) != len(blobs):
        headers = [read_header(b, name=name) for b in blobs]
    links = [(h, _blob_segments(b, h)) for b, h in zip(blobs, headers, strict=True)]
    return chain_segments(links, name=name, check_raw=check_raw, base=base)


def chain_segments(
    links: Sequence[tuple[BlobHeader, Sequence[bytes | memoryview]]],
    *,
    name: str = "<tensor>",
    check_raw: bool = False,
    base: Planes | None = None,
) -> tuple[BlobHeader, list[npt.NDArray[np.uint8]], npt.NDArray[np.uint8] | None]:
    """chain_planes() for a chain whose blobs the caller located: each link as its parsed
    header and its stored segments (views into a pack, say), tip first."""
    import numpy as np

    if not links:
        raise CorruptBlobError(name, "no blob to decode")
    headers = [header for header, _ in links]
    tip = headers[0]
    for index, header in enumerate(headers):
        last = index == len(headers) - 1
        if (header.encoding == "xor") != (not last or base is not None):
            what = "is not an xor blob" if header.encoding != "xor" else "needs its base blob"
            raise CorruptBlobError(name, f"blob {index} of the chain {what} ({header.base})")
        if index:  # each link against the blob below it: so all of them against the tip
            check_base(headers[index - 1], header, name=name)
    plane_len = tip.nbytes // tip.group
    if base is not None:
        if base.blob_id != headers[-1].base:
            raise ValueError(
                f"base planes of {base.blob_id} given for a link on {headers[-1].base}"
            )
        _check_base_shape(base, tip, name)
        _check_base_depth(headers[-1], base.depth, name)
    planes = _segment_planes(links[0][1], tip, name, check_raw=check_raw)
    grid: npt.NDArray[np.uint8] | None = None
    # One link at a time: a deep chain never holds every link's planes at once.
    below = (_segment_planes(segs, h, name, check_raw=check_raw) for h, segs in links[1:])
    for others in itertools.chain(below, [list(base.grid)] if base is not None else []):
        if grid is None:
            # One owned grid for the result: the first XOR writes it, later ones update it.
            grid = np.empty((tip.group, plane_len), dtype=np.uint8)
            for row, plane, other in zip(grid, planes, others, strict=True):
                np.bitwise_xor(plane, other, out=row)
            planes = list(grid)
        else:
            for row, other in zip(grid, others, strict=True):
                np.bitwise_xor(row, other, out=row)
    return tip, planes, grid


def _check_base_shape(base: Planes, link: BlobHeader, name: str) -> None:
    """A link whose size disagrees with its base's planes is corrupt (as in a chain read whole)."""
    if base.grid.shape != (link.group, link.nbytes // link.group):
        raise CorruptBlobError(
            name, f"base {base.blob_id} decodes to {base.grid.size} bytes in {base.grid.shape[0]} "
            f"planes, expected {link.nbytes} bytes {link.dtype}",
        )  # fmt: skip


def check_base(link: BlobHeader, base: BlobHeader, *, name: str = "<tensor>") -> None:
    """Refuse a cached base whose header does not fit the xor link built on it."""
    if (base.dtype, base.nbytes, base.group, base.rotate) != (
        link.dtype, link.nbytes, link.group, link.rotate,
    ):  # fmt: skip
        raise CorruptBlobError(
            name, f"base {link.base} decodes to {base.nbytes} bytes {base.dtype}, "
            f"expected {link.nbytes} bytes {link.dtype}",
        )  # fmt: skip
    _check_base_depth(link, base.depth, name)


def _check_base_depth(link: BlobHeader, depth: int, name: str) -> None:
    if depth != link.depth - 1:
        raise CorruptBlobError(
            name, f"base {link.base} has depth {depth}, expected {link.depth - 1}"
        )


def merge_planes(
    planes: Sequence[npt.NDArray[np.uint8]],
    header: BlobHeader,
    out: npt.NDArray[np.uint8],
    *,
    name: str = "<tensor>",
) -> None:
    """Convert a tensor's planes back to its bytes in `out` and verify the header's sha256."""
    if out.size != header.nbytes:
        raise ValueError(f"output buffer holds {out.size} bytes, the tensor {header.nbytes}")
    _merge(list(planes), header.group, header.rotate, out)
    verify_sha256(out, header, name=name)


def decode_chain(
    blobs: Sequence[bytes | memoryview],
    out: npt.NDArray[np.uint8] | None = None,
    *,
    name: str = "<tensor>",
    headers: Sequence[BlobHeader] | None = None,
) -> npt.NDArray[np.uint8]:
    """Decode a tensor from its XOR chain (tip blob first, its self-contained root last).

    Writes into `out` (a writable uint8 array of the tensor's size) when given, and returns
    the decoded bytes as a uint8 array; the tip's sha256 is verified. `headers`, when the
    caller parsed them already with read_header(), are the blobs' headers in the same order.
    """
    import numpy as np

    tip, planes, _ = chain_planes(blobs, name=name, headers=headers)
    if out is None:
        out = np.empty(tip.nbytes, dtype=np.uint8)
    merge_planes(planes, tip, out, name=name)
    return out


def decode_planes(
    blobs: Sequence[bytes | memoryview],
    blob_id: str,
    *,
    name: str = "<tensor>",
    headers: Sequence[BlobHeader] | None = None,
) -> Planes:
    """A tensor in plane space from its chain, to XOR the next revision against.

    The sha256 is not checked (that needs the full conversion back); every segment's CRC32 is.
    """
    import numpy as np

    tip, planes, grid = chain_planes(blobs, name=name, check_raw=True, headers=headers)
    if grid is None:
        grid = np.stack(planes) if planes else np.empty((tip.group, 0), dtype=np.uint8)
    return Planes(grid, blob_id, tip.depth)


def decode(blob: bytes | memoryview, base: bytes | None = None, *, name: str = "<tensor>") -> bytes:
    """Decode a blob to the tensor's raw bytes, verifying sizes and sha256.

    An xor blob needs `base`: the decoded bytes of its base blob.
    """
    import numpy as np

    header = read_header(blob, name=name)
    if header.encoding != "xor":
        return decode_chain([blob], name=name).tobytes()
    if base is None:
        raise CorruptBlobError(
            name, f"xor blob needs its base blob {header.base} and none was given"
        )
    if len(base) != header.nbytes:
        raise CorruptBlobError(
            name, f"base {header.base} decodes to {len(base)} bytes, expected {header.nbytes}"
        )
    planes = _plane_arrays(blob, header, name, check_raw=False)
    base_arr = np.frombuffer(memoryview(base).cast("B"), dtype=np.uint8)
    base_grid = _split(base_arr, header.group, header.rotate)
    planes = [np.bitwise_xor(p, b) for p, b in zip(planes, base_grid, strict=True)]
    out = np.empty(header.nbytes, dtype=np.uint8)
    _merge(planes, header.group, header.rotate, out)
    digest = hashlib.sha256(out.data).hexdigest()
    if digest != header.sha256:
        raise CorruptBlobError(
            name,
            f"sha256 of decoded bytes is {digest}, header says {header.sha256} "
            "(or the wrong base was given)",
        )
    return out.tobytes()
