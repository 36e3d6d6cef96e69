"""Git objects on disk as we write and read them: zlib streams, loose files and packs.

Tensor blobs are written zlib-"stored" (level 0: their planes are zstd already), so a reader
can find their bytes inside a stream or a pack without inflating. Commits, trees and other
packed objects are read here too (PackFile.read_object); dulwich reads what this reader cannot
(alternates, version-1 indexes) and reports damage.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import mmap
import os
import resource
import struct
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mintvcs import codec
from mintvcs.checksums import adler32, crc32
from mintvcs.errors import MintError
from mintvcs.filemodes import TempFile, file_mode, make_dirs, not_writable, write_failed
from mintvcs.ids import shared_hex_digits

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from dulwich.file import SharedPerm

    from mintvcs.store import Repository

TMP_OBJECT_PREFIX = "tmp_obj_"  # git's own prefix for objects being written
# What a user who may not write the object directories is told could not be done (git's words).
ADDING_OBJECTS = "adding an object to repository database"
# Tensor blobs are zstd-coded planes already; zlib on top would only burn time. Manifests,
# trees, headers and commits are JSON and names: zlib level 6 shrinks them 3-9x.
TENSOR_ZLIB_LEVEL = 0
META_ZLIB_LEVEL = 6
_BIG_READ = 1 << 20  # loose object files at least this large are mapped
_PROBE_FROM = 4 << 20  # blobs at least this large are probed for compressibility (see below)
_PROBE = 1 << 20
_STORED = struct.Struct("<BHH")  # a zlib stored block header: BFINAL/BTYPE, LEN, NLEN
_IOV_MAX = 1024
_MAX_PREFIX = 1 << 16  # a deflated blob header is searched for its flush marker this far
_INFLATE_STEP = 1 << 16  # a pack entry of unknown stream length is inflated this much at a time


def read_fd(fd: int) -> bytes | memoryview:
    """The whole content of an open loose object file: a large one mapped, not read."""
    size = os.fstat(fd).st_size
    if size < _BIG_READ:
        chunks = []
        while chunk := os.read(fd, max(size, 1 << 16)):
            chunks.append(chunk)
        return b"".join(chunks)
    # Mapped: no fresh memory to fault in and no copy (a 400 MB object inflated in 0.53 s
    # instead of 0.85-2.2 s). A loose object is written whole under a temporary name and
    # renamed into place, never rewritten, so the map cannot change under its reader.
    return memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))


def inflate(raw: bytes | memoryview) -> bytes | memoryview:
    """Decompress a loose object's zlib stream, gathering stored blocks without zlib where it can."""
    view = memoryview(raw).cast("B")
    if view.nbytes >= _BIG_READ:
        fast = _fast_inflate(view, 0, None)
        if fast is not None and fast[1] == view.nbytes:
            return fast[0].data
    return zlib.decompress(view)


def _stored_layout(
    view: memoryview, pos: int, size: int | None
) -> tuple[bytes, list[tuple[int, int]], int] | None:
    """Where the content of the zlib stream at view[pos:] lies, if it is what we write for tensors.

    That is: an optional deflated prefix ending in a full flush (the headers), then stored
    blocks (the payload, zstd-coded already). Returns the inflated prefix, the (offset,
    length) of each stored block's data in `view`, and the offset of the stream's Adler-32;
    None for any other shape or any inconsistency in the framing (the caller then inflates
    with zlib, which also reports real corruption). The Adler-32 is not checked here.
    """
    end = view.nbytes
    if pos + 2 > end or view[pos] != 0x78 or (view[pos] * 256 + view[pos + 1]) % 31:
        return None
    pos += 2
    head = b""
    if pos < end and view[pos] & 0xFE:
        # Not a stored block: a deflated prefix, which our writer ends with a full flush
        # (an empty stored block: LEN 0000, NLEN FFFF).
        # Tensor headers deflate to a few hundred bytes: look near first, copying little.
        # The prefix is inflated from a copy: zlib takes ~2 us longer from a view of a map.
        # Deflate never grows its input by more than a few bytes, so a small blob's prefix
        # lies within its own size and a little more (a copy of 2 KiB took ~1.5 us longer).
        near = bytes(view[pos : pos + (2048 if size is None else min(2048, size + 64))])
        mark = near.find(b"\x00\x00\xff\xff")
        if mark < 0:
            near = bytes(view[pos : pos + _MAX_PREFIX])
            mark = near.find(b"\x00\x00\xff\xff")
        if mark < 0:
            return None
        inflater = zlib.decompressobj(-15)
        try:
            # Room for the content and one byte more (a head longer than the content is
            # refused below), not zlib's default 32 KiB output buffer for ~300 bytes.
            head = inflater.decompress(near[: mark + 4], 0 if size is None else size + 1)
        except zlib.error:
            return None
        if inflater.eof or inflater.unconsumed_tail:
            return None
        pos += mark + 4
    pieces: list[tuple[int, int]] = []
    total = len(head)
    while True:
        if pos + 5 > end or view[pos] & 0xFE:
            return None
        final = view[pos] & 1
        length = view[pos + 1] | view[pos + 2] << 8
        if length ^ (view[pos + 3] | view[pos + 4] << 8) != 0xFFFF:
            return None
        pieces.append((pos + 5, length))
        pos += 5 + length
        total += length
        if final:
            break
    if pos + 4 > end or (size is not None and total != size):
        return None
    return head, pieces, pos


def _fast_inflate(
    view: memoryview, pos: int, size: int | None
) -> tuple[npt.NDArray[np.uint8], int] | None:
    """Inflate the zlib stream at view[pos:] if it is what we write for tensor blobs.

    The stored part is gathered with memcpy (see _stored_layout). Returns the content
    (checked against the stream's Adler-32) and the offset after the stream, or None for any
    other shape, or any inconsistency: the caller then inflates with zlib.
    """
    import numpy as np

    layout = _stored_layout(view, pos, size)
    if layout is None:
        return None
    head, pieces, pos = layout
    out = np.empty(len(head) + sum(length for _, length in pieces), dtype=np.uint8)
    out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    source = np.frombuffer(view, dtype=np.uint8)
    at = len(head)
    for start, length in pieces:
        out[at : at + length] = source[start : start + length]
        at += length
    del source
    if adler32(out.data) != int.from_bytes(view[pos : pos + 4], "big"):
        return None
    return out, pos + 4


def located_segments(
    view: memoryview,
    head: bytes,
    pieces: list[tuple[int, int]],
    start: int,
    segments: Sequence[tuple[str, int, int]],
) -> list[bytes | memoryview]:
    """The segments of a blob laid out as _stored_layout() says (its content's bytes from
    `start` on, each segment's size the second item of its triple), without gathering.

    A segment inside the inflated prefix or one stored block is a view; one that spans blocks
    (blocks hold at most 64 KiB) is joined into bytes.
    """
    out: list[bytes | memoryview] = []
    if len(pieces) == 1 and start >= len(head):
        # A blob under 64 KiB whose prefix is its header: every segment lies in one block.
        begin, length = pieces[0]
        at = begin + start - len(head)
        for segment in segments:
            out.append(view[at : at + segment[1]])
            at += segment[1]
        if at <= begin + length:
            return out
        out = []  # past the block (a header that lies about its sizes): read as below
    starts = [len(head)]
    for _, length in pieces:
        starts.append(starts[-1] + length)
    for segment in segments:
        stop = start + segment[1]
        if stop <= len(head):
            out.append(head[start:stop])
            start = stop
            continue
        parts: list[bytes | memoryview] = []
        if start < len(head):
            parts.append(head[start:])
            start = len(head)
        index = bisect.bisect_right(starts, start) - 1
        while start < stop:
            begin, length = pieces[index]
            skip = start - starts[index]
            take = min(length - skip, stop - start)
            parts.append(view[begin + skip : begin + skip + take])
            start += take
            index += 1
        out.append(parts[0] if len(parts) == 1 else b"".join(parts))  # b"" for an empty one
    return out


def zlib_tensor(views: list[memoryview], prefix: int) -> list[Any]:
    """A zlib stream for a tensor blob: the first `prefix` bytes (git and blob headers, JSON)
    deflated and ended with a full flush, the rest (zstd planes) in stored blocks.

    Any zlib reader inflates it; our readers gather the stored part without zlib.
    """
    head_parts: list[memoryview] = []
    rest: list[memoryview] = []
    left = prefix
    for view in views:
        if left >= view.nbytes:
            head_parts.append(view)
            left -= view.nbytes
        elif left > 0:
            head_parts.append(view[:left])
            rest.append(view[left:])
            left = 0
        else:
            rest.append(view)
    head = b"".join(head_parts)
    # A header is a few hundred bytes: a 512-byte window and a small hash table deflate it
    # to the same size as the defaults, and setting them up costs a quarter as much.
    deflater = zlib.compressobj(9, zlib.DEFLATED, -9, 4)
    deflated = deflater.compress(head) + deflater.flush(zlib.Z_FULL_FLUSH)
    stored = zlib_stored(rest, adler32(head))
    # The stored part without its own stream header; its Adler-32 covers the prefix too.
    return [b"\x78\xda", deflated, *stored[1:]]


def zlib_stored(views: list[memoryview], adler: int = 1) -> list[Any]:
    """A zlib stream of stored (uncompressed) blocks holding `views`, as pieces to write.

    `adler` is the Adler-32 of whatever precedes `views` in the stream.
    """
    total = sum(v.nbytes for v in views)
    out: list[Any] = [b"\x78\x01"]
    remaining, left = total, 0
    for view in views:
        adler = adler32(view, adler)
        pos = 0
        while pos < view.nbytes:
            if left == 0:
                left = min(0xFFFF, remaining)
                out.append(_STORED.pack(int(left == remaining), left, left ^ 0xFFFF))
            take = min(left, view.nbytes - pos)
            out.append(view[pos : pos + take])
            pos += take
            left -= take
            remaining -= take
    if total == 0:
        out.append(_STORED.pack(1, 0, 0xFFFF))
    out.append(adler.to_bytes(4, "big"))
    return out


def _write_all(fd: int, pieces: list[Any], offset: int | None = None) -> None:
    """Write every piece in order (at `offset`, or the file position), in few system calls."""
    index = 0
    while index < len(pieces):
        batch = pieces[index : index + _IOV_MAX]
        written = os.writev(fd, batch) if offset is None else os.pwritev(fd, batch, offset)
        expected = sum(len(memoryview(p)) for p in batch)
        if written < expected:
            # A short write (rare on regular files): finish this batch piece by piece.
            data = b"".join(bytes(memoryview(p)) for p in batch)[written:]
            while data:
                n = os.write(fd, data) if offset is None else os.pwrite(fd, data, offset + written)
                written += n
                data = data[n:]
        if offset is not None:
            offset += expected
        index += _IOV_MAX


def place_file(
    directory: Path, path: Path, pieces: list[Any], shared: SharedPerm | None = None
) -> None:
    """Create read-only file `path` holding `pieces` via a temporary renamed into place, as git
    does: mode 0444 less the umask, then as core.sharedRepository (`shared`) says."""
    with temp_file(directory, pieces, shared) as temp:  # removed unless renamed
        os.replace(temp.path, path)
        temp.keep()


def temp_file(directory: Path, pieces: list[Any], shared: SharedPerm | None = None) -> TempFile:
    """A read-only temporary file in `directory` holding `pieces`, named as git names an object
    being written (gc removes it once stale), closed: the caller renames it or discards it."""
    try:
        temp = TempFile(directory, TMP_OBJECT_PREFIX)
    except OSError as err:
        raise not_writable(err, directory, ADDING_OBJECTS) from None
    try:
        _write_all(temp.fd, pieces)
        os.fchmod(temp.fd, file_mode(0o444, shared))
        temp.close()
    except OSError as err:
        temp.discard()
        raise write_failed(err, directory, "unable to write loose object file") from None
    except BaseException:
        temp.discard()
        raise
    return temp


def object_zlib_level(kind: bytes, content: bytes | memoryview) -> tuple[int, int]:
    """(zlib level, deflated prefix) to store an object with, as Repository.write_object takes
    them: a tensor blob's zstd payload stored after its deflated header; a large blob zlib
    shrinks by less than a fifth (a trainer's optimizer state) stored whole; META_ZLIB_LEVEL
    otherwise."""
    view = memoryview(content).cast("B")
    if kind == b"blob" and bytes(view[: len(codec.MAGIC)]) == codec.MAGIC:
        try:
            return TENSOR_ZLIB_LEVEL, codec.read_header(view).payload_offset
        except MintError:
            pass  # an extra file that only starts like a tensor blob, or a newer blob version
    if kind == b"blob" and view.nbytes >= _PROBE_FROM:
        # Deflate runs at 10-40 MB/s on float data and saves it ~7% (fp32 optimizer state):
        # 20 s of a commit for 268 MB, against ~1 s stored. One MiB from the middle (past a
        # pickle's or zip's header) says whether the blob is text-like enough to be worth it.
        middle = (view.nbytes - _PROBE) // 2
        if len(zlib.compress(view[middle : middle + _PROBE], 1)) > _PROBE * 0.8:
            return TENSOR_ZLIB_LEVEL, 0
    return META_ZLIB_LEVEL, 0


# ------------------------------------------------------------------- packs
# git's object type numbers (pack entries, dulwich's ShaFile.from_raw_string).
OBJECT_TYPE_NUMBERS = {b"commit": 1, b"tree": 2, b"blob": 3, b"tag": 4}
_STALE_SECONDS = 3600  # temporaries older than this belong to no live writer


def _pack_entry_header(type_num: int, size: int) -> bytes:
    """A pack entry's type and size: 3 type bits and a little-endian base-128 size."""
    out = bytearray([(type_num << 4) | (size & 0x0F)])
    size >>= 4
    while size:
        out[-1] |= 0x80
        out.append(size & 0x7F)
        size >>= 7
    return bytes(out)


class PackWriter:
    """Writes a commit's new tensor blobs into one git pack (`objects/pack/pack-<sha>.{pack,idx}`).

    One file instead of hundreds of loose ones: creating a file costs far more than
    writing its bytes. Entries are appended as workers finish them (thread-safe); finish()
    writes the object count, the checksums and the version-2 index, then renames the pack
    and then the index into place, so readers (which find packs by their index) never see
    a partial pack. A writer killed before that leaves only `tmp_pack_*`/`tmp_idx_*` files,
    which the next writer deletes once they are an hour old.
    """

    def __init__(
        self, repo: Repository, expected: int | None = None, *, repack: bool = False
    ) -> None:
        """Open a temporary pack in `repo`'s objects/pack.

        With `expected` (the number of objects the caller will add), the header is written
        now and the pack's SHA-1 is computed as entries arrive; if a different number ends up
        in the pack (an object the store or the pack already held), finish() reads it back.
        With `repack` (gc), objects the store holds already are written too.
        """
        self.repo = repo
        self.repack = repack
        self.directory = repo.git_dir / "objects" / "pack"
        try:
            make_dirs(self.directory, repo.shared_perm)
            _remove_stale_packs(self.directory)
        except PermissionError as err:
            raise not_writable(err, self.directory, ADDING_OBJECTS) from None
        try:
            # Owned by the writer: a writer dropped before its caller could abort() it (a
            # Ctrl-C as PackWriter() returns) closes and removes it (TempFile).
            self.temp = TempFile(self.directory, "tmp_pack_")
        except OSError as err:  # a read-only file system too: the directory is named
            raise not_writable(err, self.directory, ADDING_OBJECTS) from None
        try:
            self.lock = threading.Lock()
            self.offset = 12
            self.entries: dict[bytes, tuple[int, int]] = {}  # binary id -> (offset, crc32)
            self.expected = expected
            # Fan-out directories of loose objects, listed once: a store checks hundreds of
            # new ids, and most have no directory (a failed stat each was ~20 us). One created
            # meanwhile by another writer can only make us store an object twice, which git
            # allows.
            objects = repo.git_dir / "objects"
            self.loose_dirs = {name for name in os.listdir(objects) if len(name) == 2}
            header = _pack_header(expected or 0)  # rewritten by finish() when the count differs
            self.checksum = hashlib.sha1(header) if expected else None  # of the pack so far
            os.pwrite(self.temp.fd, header, 0)
        except BaseException as err:
            # The caller has no writer to abort() yet (a full disk, a SIGTERM while the loose
            # directories are listed): the temporary goes here.
            self.temp.discard()
            if isinstance(err, OSError):
                raise self._failed(err) from None
            raise

    def _failed(self, err: OSError) -> OSError:
        """`err`, raised writing the pack or its index (a full disk, a file size limit), in
        git's words and naming the pack directory, as a loose object's names its directory:
        the temporary's name would mean nothing once it is removed."""
        return write_failed(err, self.directory, "unable to write pack file")

    def add(
        self,
        kind: bytes,
        parts: Sequence[Any],
        level: int,
        prefix: int = 0,
        deflated: bytes | None = None,
    ) -> str:
        """Append an object (unless this pack or the store holds it); returns its id.

        `level` and `prefix` are as for Repository.write_object; `deflated`, when given, is the
        content's zlib stream already made (gc weighed it against a delta).
        """
        views = [memoryview(p).cast("B") for p in parts]
        size = sum(v.nbytes for v in views)
        head = b"%s %d\0" % (kind, size)
        digest = hashlib.sha1(head)
        for view in views:
            digest.update(view)
        oid = digest.hexdigest()
        if not self.repack and self.repo.has_object(oid, loose=oid[:2] in self.loose_dirs):
            self.repo.freshen(oid)  # reused: gc must not take it for old garbage
            return oid
        if deflated is not None:
            body = [deflated]
        elif level == 0:
            body = zlib_tensor(views, prefix) if prefix else zlib_stored(views)
        else:
            body = [zlib.compress(b"".join(views), level)]
        self._append(digest.digest(), [_pack_entry_header(OBJECT_TYPE_NUMBERS[kind], size), *body])
        return oid

    def add_delta(self, oid: str, base: str, delta_size: int, deflated: bytes) -> None:
        """Append object `oid` as an OFS_DELTA against `base`, an entry of this pack already:
        `deflated` is the zlib stream of a git delta of `delta_size` bytes (the caller checked
        that it rebuilds `oid`). Its type is its base's, as git reads it."""
        base_offset = self.entries[bytes.fromhex(base)][0]
        head = _pack_entry_header(OFS_DELTA, delta_size)
        self._append(bytes.fromhex(oid), [head, deflated], base_offset)

    def _append(self, key: bytes, pieces: list[Any], base_offset: int | None = None) -> None:
        """Write the entry `pieces` for binary id `key`, unless this pack holds it; with
        `base_offset`, it is an OFS_DELTA whose distance back goes after its first piece."""
        crc = _crc(pieces) if base_offset is None else 0
        with self.lock:
            if key in self.entries:
                return
            offset = self.offset
            if base_offset is not None:  # the distance is known only now, as is its CRC
                pieces = [pieces[0], _ofs_distance(offset - base_offset), *pieces[1:]]
                crc = _crc(pieces)
            self.offset += sum(len(memoryview(p)) for p in pieces)
            self.entries[key] = (offset, crc)
            if self.checksum is not None:
                # In offset order, under the lock; hashlib releases the GIL meanwhile, so
                # the other workers keep encoding.
                for piece in pieces:
                    self.checksum.update(piece)
        self.repo._count_written()
        # Each entry owns its byte range, so workers write without holding the lock.
        try:
            _write_all(self.temp.fd, pieces, offset)
        except OSError as err:
            raise self._failed(err) from None

    def abort(self) -> None:
        """Drop the temporary pack: nothing of it reaches the store."""
        with suppress(OSError):
            self.temp.discard()

    def finish(self) -> str | None:
        """Seal the pack and move it and its index into place; its name (`pack-<sha>`), or
        None when it holds no object (then nothing is written)."""
        try:
            if not self.entries:
                return None
            count = len(self.entries)
            if self.checksum is not None and count == self.expected:
                checksum = self.checksum.digest()
            else:
                os.pwrite(self.temp.fd, _pack_header(count), 0)
                checksum = _sha1_of_file(self.temp.fd, self.offset)
            os.pwrite(self.temp.fd, checksum, self.offset)
            name = f"pack-{checksum.hex()}"
            idx = _pack_index(self.entries, checksum)
            mode = file_mode(0o444, self.repo.shared_perm)  # as git's, and its objects'
            try:
                index_temp = TempFile(self.directory, "tmp_idx_")
            except OSError as err:
                raise not_writable(err, self.directory, ADDING_OBJECTS) from None
            # Closed, and removed unless placed or held (a full disk: not left for an hour).
            with index_temp:
                _write_all(index_temp.fd, [idx])
                os.fchmod(index_temp.fd, mode)
                index_temp.close()
                os.fchmod(self.temp.fd, mode)
                held = self.repo.held_writes()
                if held is not None:  # placed, the pack before its index, when the hold ends
                    held.add(self.temp.path, str(self.directory / f"{name}.pack"))
                    held.add(index_temp.path, str(self.directory / f"{name}.idx"))
                    self.temp.keep()
                    index_temp.keep()
                    return name
                os.replace(self.temp.path, self.directory / f"{name}.pack")
                self.temp.keep()
                os.replace(index_temp.path, self.directory / f"{name}.idx")
                index_temp.keep()
            return name
        except OSError as err:  # one naming its file already (not_writable's) stays as it is
            raise self._failed(err) from None
        finally:
            self.temp.discard()


def shared_digits_many(packs: Sequence[PackFile], keys: Sequence[bytes]) -> list[int]:
    """max(p.shared_digits(key) for p in packs) for each of `keys`, each index searched once
    for all of them with numpy (worth its import for thousands of keys)."""
    import numpy as np

    if not keys:
        return []
    wanted = np.frombuffer(b"".join(keys), dtype=_NAME_DTYPE)
    nearest = np.full(len(keys), np.iinfo(np.uint64).max, dtype=np.uint64)
    for pack in packs:
        nearest = np.minimum(nearest, pack.nearest_many(wanted))
    # Leading hex digits in common: the zero nibbles atop the XOR (16 when it is 0).
    nibbles = np.array([1 << (60 - 4 * i) for i in range(16)], dtype=np.uint64)
    shared = (nearest[:, None] < nibbles).sum(axis=1).tolist()
    return [
        max(p.shared_digits(key) for p in packs) if digits >= 16 else digits
        for key, digits in zip(keys, shared, strict=True)
    ]


def _crc(pieces: list[Any]) -> int:
    """The CRC-32 of an entry's pieces, as a version-2 index records it."""
    crc = 0
    for piece in pieces:
        crc = crc32(piece, crc)
    return crc


def _ofs_distance(distance: int) -> bytes:
    """An OFS_DELTA's distance back to its base: big-endian base-128, each continuation minus one."""
    out = [distance & 0x7F]
    distance >>= 7
    while distance:
        distance -= 1
        out.append(0x80 | (distance & 0x7F))
        distance >>= 7
    return bytes(reversed(out))


def _pack_header(count: int) -> bytes:
    """A version-2 pack header for `count` objects."""
    return b"PACK" + struct.pack(">II", 2, count)


def _sha1_of_file(fd: int, size: int) -> bytes:
    """SHA-1 of the first `size` bytes of an open file, read back through a memory map."""
    import mmap

    digest = hashlib.sha1()
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mapped:
        digest.update(mapped)
    return digest.digest()


def _pack_index(entries: dict[bytes, tuple[int, int]], checksum: bytes) -> bytes:
    """A version-2 pack index for `entries` (binary id -> (offset, crc32)), as git writes it."""
    ids = sorted(entries)
    fanout = [0] * 256
    for oid in ids:
        fanout[oid[0]] += 1
    total = 0
    for i in range(256):
        total += fanout[i]
        fanout[i] = total
    small: list[int] = []
    large: list[int] = []
    for oid in ids:
        offset = entries[oid][0]
        if offset < 0x80000000:
            small.append(offset)
        else:  # packs over 2 GiB keep the offset in the 64-bit table
            small.append(0x80000000 | len(large))
            large.append(offset)
    n = len(ids)
    body = b"".join(
        [
            b"\xfftOc",
            struct.pack(">I", 2),
            struct.pack(">256I", *fanout),
            *ids,
            struct.pack(f">{n}I", *(entries[oid][1] for oid in ids)),
            struct.pack(f">{n}I", *small),
            struct.pack(f">{len(large)}Q", *large),
            checksum,
        ]
    )
    return body + hashlib.sha1(body).digest()


def _remove_stale_packs(directory: Path) -> None:
    """Delete temporaries of pack writers that were killed, once they are an hour old."""
    now = time.time()
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith(("tmp_pack_", "tmp_idx_")):
                with suppress(OSError):
                    if now - entry.stat().st_mtime > _STALE_SECONDS:
                        os.unlink(entry.path)


def _delta_sizes(stream: bytes | memoryview) -> tuple[int, int] | None:
    """(base size, result size): the two varints a delta's zlib stream starts with."""
    try:
        head = zlib.decompressobj().decompress(bytes(stream), 32)
    except zlib.error:
        return None
    numbers = []
    value = shift = 0
    for byte in head:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            numbers.append(value)
            value = shift = 0
            if len(numbers) == 2:
                return numbers[0], numbers[1]
    return None


OFS_DELTA, REF_DELTA = 6, 7
PACK_HEADER, PACK_TRAILER = 12, 20  # bytes before the first entry; the SHA-1 after the last
_MAX_VARINT_BYTES = 10  # a size or offset of up to 70 bits; more is a damaged header
# Delta bases followed to learn an object's type: git writes chains of at most 4095 (pack.depth
# caps there); more is a cycle or damage, and the object is then read in full instead.
MAX_DELTA_HOPS = 4096


class PackEntryError(ValueError):
    """A pack entry header that cannot be read; the text says why."""


def _runs_past(offset: int) -> PackEntryError:
    """The error for an entry header that runs past the end of the pack's objects."""
    return PackEntryError(f"entry header at offset {offset} runs past the end of the pack data")


def entry_header(
    buf: bytes | memoryview | Any, offset: int, end: int
) -> tuple[int, int, int, int | bytes | None]:
    """(type, size, where its zlib stream starts, delta base) of the pack entry at `offset`.

    The delta base is the base's absolute offset for an OFS_DELTA, its raw id for a
    REF_DELTA, None for a whole object; the size is the inflated entry's (a delta's, for
    deltas). Read without inflating anything; raises PackEntryError for a header that runs
    past `end` (where the objects end), never ends, or names an unknown type.
    """
    # Bytes read in line, each checked against `end` (a call per byte cost ~1 us an entry).
    if offset >= end:
        raise _runs_past(offset)
    first = int(buf[offset])
    pos = offset + 1
    kind, size, shift, count = (first >> 4) & 0x07, first & 0x0F, 4, 1
    more = first & 0x80
    while more:
        if pos >= end:
            raise _runs_past(offset)
        b = int(buf[pos])
        pos += 1
        more, count = b & 0x80, count + 1
        if count > _MAX_VARINT_BYTES:
            raise PackEntryError(f"entry at offset {offset} has a size header that never ends")
        size |= (b & 0x7F) << shift
        shift += 7
    if kind == OFS_DELTA:
        if pos >= end:
            raise _runs_past(offset)
        b = int(buf[pos])
        pos += 1
        distance, count = b & 0x7F, 1
        while b & 0x80:
            if pos >= end:
                raise _runs_past(offset)
            b = int(buf[pos])
            pos += 1
            count += 1
            if count > _MAX_VARINT_BYTES:
                raise PackEntryError(f"entry at offset {offset} has a base offset that never ends")
            distance = ((distance + 1) << 7) | (b & 0x7F)
        if not 0 < distance <= offset - PACK_HEADER:
            raise PackEntryError(
                f"OFS_DELTA at offset {offset} points {distance} bytes back, outside the pack"
            )
        return kind, size, pos, offset - distance
    if kind == REF_DELTA:
        if pos + 20 > end:
            raise PackEntryError(f"REF_DELTA at offset {offset} runs past the end of the pack data")
        return kind, size, pos + 20, bytes(buf[pos : pos + 20])
    if kind not in (1, 2, 3, 4):
        raise PackEntryError(f"entry at offset {offset} has unknown type {kind}")
    return kind, size, pos, None


class NotStored(Exception):
    """A pack entry that is not a whole blob in stored zlib blocks."""


class PackGone(NotStored):
    """A pack file removed since its index was read (a gc replaced it): look again."""


_KIND_NAMES = {1: "commit", 2: "tree", 3: "blob", 4: "tag"}
# find's binary search stops at this many names, then looks for the name among them at once.
_FIND_SCAN = 64
# find() searches the index until it has been asked for a quarter of its objects (at least
# _TABLE_AFTER): then it builds a table of them all, which cost no more than the searches so
# far (a walk of a long history looks up each commit: ~4 us a search, ~0.2 us a lookup).
# Not for indexes of more than _TABLE_MAX objects (the table takes ~120 bytes an object).
_TABLE_AFTER = 4096
_TABLE_MAX = 1 << 20
# Where a version-2 index's sorted object names start: magic, version, 256 fan-out entries.
_IDX_NAMES = 8 + 1024
# An object name as numpy compares it: three big-endian words, so the order is the bytes'.
_NAME_DTYPE = [("high", ">u8"), ("middle", ">u8"), ("low", ">u4")]
# Indexes up to this size (~300,000 objects) are read into memory, larger ones mapped. Python's
# mmap keeps a duplicate of its file's descriptor (3.11 has no trackfd=False): a map per index
# took one descriptor per pack for as long as the Repository lived, and a store of 500 packs ran
# out of them at the usual limit of 1024. git maps its indexes and closes their files.
_IDX_READ_MAX = 8 << 20
# The most pack data maps a process keeps at once (each holds a descriptor too): at most an
# eighth of RLIMIT_NOFILE, least recently used dropped first, as git bounds its open packs.
_PACK_MAPS_MAX = 128
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def _map_file(path: str) -> mmap.mmap:
    """A read-only map of the whole file `path` (its descriptor closed; the map keeps its own)."""
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


class _PackMaps:
    """The pack data maps this process holds (PackFile.pack), least recently used first.

    Each one holds a descriptor, so there are at most _pack_maps_budget() of them; a map
    dropped here stays valid for whoever still uses it (a thread reading, a view of a
    tensor) and goes, with its descriptor, with its last reference.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.used: OrderedDict[int, weakref.ref[PackFile]] = OrderedDict()

    def touch(self, pack: PackFile) -> None:
        """Mark `pack`'s map as just used (no lock: move_to_end is atomic, where a look at the
        order first, from a thread while another changes it, raises RuntimeError)."""
        # Not suppress(): a walk reads a map per commit, and a `with` costs ~0.5 us.
        try:  # noqa: SIM105
            self.used.move_to_end(id(pack))
        except KeyError:
            pass

    def open(self, pack: PackFile) -> mmap.mmap:
        """Map `pack`'s data, dropping the least recently used maps past the budget, or all
        of them when the process is out of descriptors (git's close_one_pack)."""
        with self.lock:
            mapped = pack._pack_map
            if mapped is not None:
                return mapped
            while len(self.used) >= _pack_maps_budget():
                self._drop_oldest()
            try:
                mapped = _map_file(pack.pack_path)
            except OSError as err:
                if err.errno not in _OUT_OF_DESCRIPTORS or not self.used:
                    raise
                while self.used:
                    self._drop_oldest()
                mapped = _map_file(pack.pack_path)
            pack._pack_map = mapped
            key = id(pack)
            self.used[key] = weakref.ref(pack, lambda _ref: self.used.pop(key, None))
            return mapped

    def drop(self, pack: PackFile) -> None:
        """Forget `pack`'s map (PackFile.close)."""
        self.used.pop(id(pack), None)
        pack._pack_map = None

    def drop_all(self) -> None:
        """Let go of every map: descriptors are short (EMFILE) and another reader needs one."""
        with self.lock:
            while self.used:
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        _key, ref = self.used.popitem(last=False)
        pack = ref()
        if pack is not None:
            pack._pack_map = None


def _pack_maps_budget() -> int:
    """How many pack data maps to keep: an eighth of the descriptor limit, within 1 and
    _PACK_MAPS_MAX (read each time: a process may lower its limit, as the tests do)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return _PACK_MAPS_MAX
    return max(1, min(_PACK_MAPS_MAX, soft // 8))


PACK_MAPS = _PackMaps()


def release_pack_maps() -> None:
    """Let go of every pack data map this process keeps (each holds a descriptor)."""
    PACK_MAPS.drop_all()


class _DeltaBases:
    """Objects rebuilt from pack deltas, by pack and offset, least recently used dropped past
    _DELTA_BASES_BYTES: reading the revisions of a history one after another (fsck, log -p)
    rebuilds each manifest from the one its child's read rebuilt, not from its chain's whole
    object each time (git's delta base cache; dulwich keeps one per pack)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kept: OrderedDict[tuple[str, int], tuple[int, bytes]] = OrderedDict()
        self.size = 0

    def get(self, pack: str, offset: int) -> tuple[int, bytes] | None:
        """(type number, content) of the object at `offset` in `pack`, if kept."""
        with self.lock:
            found = self.kept.get((pack, offset))
            if found is not None:
                self.kept.move_to_end((pack, offset))
            return found

    def put(self, pack: str, offset: int, kind: int, data: bytes) -> None:
        """Keep the object rebuilt at `offset` in `pack` (not one larger than the whole cache)."""
        if len(data) > _DELTA_BASES_BYTES // 2:
            return
        with self.lock:
            old = self.kept.pop((pack, offset), None)
            self.size += len(data) - (len(old[1]) if old is not None else 0)
            self.kept[(pack, offset)] = (kind, data)
            while self.size > _DELTA_BASES_BYTES:
                self.size -= len(self.kept.popitem(last=False)[1][1])


_DELTA_BASES_BYTES = 32 << 20
DELTA_BASES = _DeltaBases()


class PackFile:
    """A pack and its version-2 index, for reading objects and whole stored blobs fast.

    The index is read (or, when large, mapped) at once; the pack itself is mapped when an
    entry is first read, and the process keeps only so many such maps (_PackMaps), so a store
    of many packs needs no descriptor per pack.
    """

    def __init__(self, base: Path) -> None:
        """Read `base`.idx; ValueError when it is not a version-2 index, OSError when it or
        `base`.pack cannot be opened."""
        self._maps: list[mmap.mmap] = []
        self._pack_map: mmap.mmap | None = None
        self.gone = False  # the pack file was found removed (PackGone)
        with open(f"{base}.idx", "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size <= _IDX_READ_MAX:
                self.idx: bytes | mmap.mmap = handle.read()
            else:
                self.idx = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps.append(self.idx)
        if self.idx[:8] != b"\xfftOc\0\0\0\2":
            self.close()
            raise ValueError(f"{base}.idx is not a version-2 pack index")
        if len(self.idx) < _IDX_NAMES + 40:
            self.close()
            raise ValueError(f"{base}.idx is truncated")
        self.count = struct.unpack_from(">I", self.idx, 8 + 255 * 4)[0]
        # Names, CRCs and 4-byte offsets for every object, then two checksums: find() reads
        # inside these tables without further checks.
        if len(self.idx) < _IDX_NAMES + self.count * 28 + 40:
            self.close()
            raise ValueError(f"{base}.idx is shorter than its {self.count} objects need")
        self.pack_path = f"{base}.pack"
        self._prefixes: npt.NDArray[np.uint64] | None = None  # find_many's, made when first used
        self._finds = 0  # find()'s searches so far
        self._table: dict[bytes, int] | None = None  # name -> offset, once find() built it
        stat = os.stat(self.pack_path)
        # Which file this is: a repack writes a pack of the same objects under the same name
        # as a new file, and the old one's space is freed only once its readers let it go.
        self.identity = (stat.st_dev, stat.st_ino)
        if stat.st_size < PACK_HEADER + PACK_TRAILER:
            self.close()
            raise ValueError(f"{self.pack_path} is truncated")

    def replaced(self) -> bool:
        """Whether the file at the pack's path is no longer the one this was opened on."""
        try:
            stat = os.stat(self.pack_path)
        except OSError:
            return False  # removed (or unreadable): the listing of the directory tells
        return (stat.st_dev, stat.st_ino) != self.identity

    @property
    def pack(self) -> mmap.mmap:
        """The pack file's map, made when first needed; PackGone when the file was removed."""
        mapped = self._pack_map
        if mapped is not None:
            PACK_MAPS.touch(self)
            return mapped
        try:
            return PACK_MAPS.open(self)
        except FileNotFoundError:
            self.gone = True
            raise PackGone(self.pack_path) from None

    def close(self) -> None:
        """Unmap the files."""
        PACK_MAPS.drop(self)
        for mapped in self._maps:
            with suppress(BufferError):  # a view still in use keeps its map alive
                mapped.close()
        self._maps = []

    def _fan_out(self, key: bytes) -> tuple[int, int]:
        """The positions in the index of the names starting with `key`'s first byte, as the
        fan-out table gives them (kept inside the index where the table lies)."""
        idx, first = self.idx, key[0]
        lo = struct.unpack_from(">I", idx, 8 + (first - 1) * 4)[0] if first else 0
        hi = min(struct.unpack_from(">I", idx, 8 + first * 4)[0], self.count)
        return min(lo, hi), hi

    def _first_not_below(self, key: bytes) -> tuple[int, int, int]:
        """The position of the first name of this index not below `key` (20 bytes), searched in
        the range of `key`'s first byte, and that range's start and end."""
        idx, names = self.idx, _IDX_NAMES
        start, end = self._fan_out(key)
        lo, hi = start, end
        while lo < hi:
            mid = (lo + hi) // 2
            at = names + mid * 20
            if idx[at : at + 20] < key:
                lo = mid + 1
            else:
                hi = mid
        return lo, start, end

    def find(self, key: bytes) -> int | None:
        """The pack offset of object `key` (20 bytes), or None: a binary search of the index.

        In the range the fan-out table gives, as git does: ~15 probes even in a pack of 10^6
        objects, and nothing built first (a table of every object cost 100 ms and 37 MiB per
        command at 240,000 objects, where a command looks up a few hundred); once a command
        has looked up a quarter of the objects one by one (a walk of a long history), a table
        of all of them (_TABLE_AFTER).
        """
        table = self._table
        if table is not None:
            return table.get(key)
        self._finds += 1
        if self._finds >= _TABLE_AFTER and self.count <= min(4 * self._finds, _TABLE_MAX):
            self._table = table = self._offsets_table()
            return table.get(key)
        idx, names = self.idx, _IDX_NAMES
        lo, hi = self._fan_out(key)
        while hi - lo > _FIND_SCAN:
            mid = (lo + hi) // 2
            at = names + mid * 20
            name = idx[at : at + 20]
            if name < key:
                lo = mid + 1
            elif name > key:
                hi = mid
            else:
                return self._offset_at(mid)
        # The last few names in one substring search (a walk looks up every commit: each probe
        # above costs a slice and a comparison in Python); a hit must start at a name's start.
        start, stop = names + lo * 20, names + hi * 20
        at = idx.find(key, start, stop)
        while at >= 0 and (at - names) % 20:
            at = idx.find(key, at + 1, stop)
        return None if at < 0 else self._offset_at((at - names) // 20)

    def _offsets_table(self) -> dict[bytes, int]:
        """Each name of the index -> its pack offset (what find() returns for it)."""
        idx, count = self.idx, self.count
        offsets = list(struct.unpack_from(f">{count}I", idx, _IDX_NAMES + count * 24))
        if offsets and max(offsets) & 0x80000000:  # some in the 64-bit table (packs over 2 GiB)
            offsets = [self._offset_at(n) if o & 0x80000000 else o for n, o in enumerate(offsets)]
        names = [idx[at : at + 20] for at in range(_IDX_NAMES, _IDX_NAMES + count * 20, 20)]
        return dict(zip(names, offsets, strict=True))

    def shared_digits(self, key: bytes) -> int:
        """The most leading hex digits a name of this index other than `key` (20 bytes) shares
        with it: those of the names either side of where `key` sorts, as git's
        find_abbrev_len_packed reads them. Only names of `key`'s first byte are looked at (one
        that shares fewer than two digits never lengthens an abbreviation)."""
        idx, names = self.idx, _IDX_NAMES
        lo, start, end = self._first_not_below(key)
        after = lo
        if after < end and idx[names + after * 20 : names + after * 20 + 20] == key:
            after += 1  # `key` itself
        shared = 0
        for position in (lo - 1, after):
            if start <= position < end:
                at = names + position * 20
                shared = max(shared, shared_hex_digits(key, idx[at : at + 20]))
        return shared

    def with_prefix(self, prefix: str) -> list[str]:
        """The hex ids of this index's objects that start with `prefix` (hex digits, at least two)."""
        low = bytes.fromhex((prefix + "0" * 40)[:40])
        idx, names = self.idx, _IDX_NAMES
        lo, _start, end = self._first_not_below(low)
        found = []
        for position in range(lo, end):
            name = idx[names + position * 20 : names + position * 20 + 20].hex()
            if not name.startswith(prefix):
                break
            found.append(name)
        return found

    def nearest_many(self, wanted: npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
        """For each name of `wanted` (_NAME_DTYPE), the XOR of its first 8 bytes with those of
        the nearest other name of this index, either side of where it sorts (all ones when there
        is none): its leading zero bits are the bits they share. 0 when another name shares
        all 8 bytes: then shared_digits() tells how many more."""
        import numpy as np

        none = np.full(len(wanted), np.iinfo(np.uint64).max, dtype=np.uint64)
        if not self.count:
            return none
        prefixes, count, high = self._name_prefixes(), self.count, wanted["high"]
        at = np.searchsorted(prefixes, high)
        names = np.frombuffer(self.idx, dtype=_NAME_DTYPE, count=count, offset=_IDX_NAMES)
        after = at + (names[np.minimum(at, count - 1)] == wanted)  # past the name itself
        del names  # no view of the map outlives the call: close() can unmap it
        before = np.where(at > 0, prefixes[np.maximum(at - 1, 0)] ^ high, none)
        return np.minimum(
            before, np.where(after < count, prefixes[np.minimum(after, count - 1)] ^ high, none)
        )

    def _name_prefixes(self) -> npt.NDArray[np.uint64]:
        """The first 8 bytes of each name as a sorted uint64 array (a copy, made once)."""
        import numpy as np

        if self._prefixes is None:
            self._prefixes = np.frombuffer(
                self.idx, dtype=_NAME_DTYPE, count=self.count, offset=_IDX_NAMES
            )["high"].copy()
        return self._prefixes

    def find_many(self, keys: Sequence[bytes]) -> list[int | None]:
        """find() for each of `keys` (20 bytes each), the index searched once for all of them.

        A revision's read looks up every tensor blob (37k for a large MoE adapter): ~3 us each
        with find()'s probes in Python, ~0.3 us here. The search runs over the names' first 8
        bytes (a copy, 8 bytes per object, made at the first call); a hit is a name equal to its
        key in full, so an index whose names are out of order (damaged) only makes objects
        missing here, as with find(), and keys whose first 8 bytes some other name shares are
        looked up with find().
        """
        import numpy as np

        if not keys or not self.count:
            return [None] * len(keys)
        prefixes = self._name_prefixes()
        wanted = np.frombuffer(b"".join(keys), dtype=_NAME_DTYPE)
        at = np.minimum(np.searchsorted(prefixes, wanted["high"]), self.count - 1)
        names = np.frombuffer(self.idx, dtype=_NAME_DTYPE, count=self.count, offset=_IDX_NAMES)
        hits = (names[at] == wanted).tolist()
        shared = (prefixes[at] == wanted["high"]).tolist()
        offsets = np.frombuffer(
            self.idx, dtype=">u4", count=self.count, offset=_IDX_NAMES + self.count * 24
        )
        found = offsets[at].tolist()
        del names, offsets  # no view of the map outlives the call: close() can unmap it
        result: list[int | None] = []
        for key, hit, prefix, offset, position in zip(
            keys, hits, shared, found, at.tolist(), strict=True
        ):
            if not hit:
                result.append(self.find(key) if prefix else None)
            elif offset & 0x80000000:  # in the 64-bit table of packs over 2 GiB
                result.append(self._offset_at(position))
            else:
                result.append(offset)
        return result

    def _offset_at(self, position: int) -> int:
        """The pack offset of the index's `position`-th object (large offsets in their own table)."""
        idx, count = self.idx, self.count
        offset: int = struct.unpack_from(">I", idx, _IDX_NAMES + count * 24 + position * 4)[0]
        if offset & 0x80000000:
            large = _IDX_NAMES + count * 28 + (offset & 0x7FFFFFFF) * 8
            if large + 8 > len(idx):  # a lying entry: no such large offset
                return -1
            offset = struct.unpack_from(">Q", idx, large)[0]
        return offset

    def _data(self) -> mmap.mmap | None:
        """The pack's map, or None when the file was removed (the readers that answer None
        for an entry they cannot read answer it then too: whoever asked looks elsewhere)."""
        try:
            return self.pack
        except PackGone:
            return None

    def kind_at(self, offset: int) -> str | None:
        """The type of the whole object at `offset` from its entry header; None for a delta
        (its type is its base's) or an entry that cannot be read."""
        pack = self._data()
        if pack is None or not PACK_HEADER <= offset < len(pack) - PACK_TRAILER:
            return None
        try:
            kind = entry_header(pack, offset, len(pack) - PACK_TRAILER)[0]
        except PackEntryError:
            return None
        return _KIND_NAMES.get(kind)

    def whole_kind_at(self, offset: int) -> str | bytes | None:
        """The type of the object at `offset` from entry headers alone, following OFS_DELTA
        bases inside this pack (a delta's type is its base's); for a REF_DELTA on the way, its
        base's raw id, to be looked up where it is stored; None for an entry that cannot be read."""
        pack = self._data()
        if pack is None:
            return None
        end = len(pack) - PACK_TRAILER
        for _ in range(MAX_DELTA_HOPS):
            if not PACK_HEADER <= offset < end:
                return None
            try:
                kind, _size, _pos, base = entry_header(pack, offset, end)
            except PackEntryError:
                return None
            if base is None:
                return _KIND_NAMES.get(kind)
            if isinstance(base, bytes):
                return base
            offset = base  # entry_header checked that it points back, inside the pack
        return None

    def _blob_entry(self, pack: mmap.mmap, offset: int) -> tuple[int, int]:
        """(size, position of the zlib stream) of the undeltified blob entry at `offset`."""
        if (
            not PACK_HEADER <= offset < len(pack) - PACK_TRAILER
        ):  # a lying index: outside the objects
            raise NotStored  # dulwich reads (or reports) it
        try:
            kind, size, pos, _ = entry_header(pack, offset, len(pack) - PACK_TRAILER)
        except PackEntryError:
            raise NotStored from None
        if kind != 3:
            raise NotStored
        return size, pos

    def _entry_sizes(self, offset: int) -> tuple[int, int, bytes | int | None] | None:
        """(the size the entry's base has, the size it rebuilds, its base) from its headers: a
        whole object's size twice and no base, a delta's two sizes and its base; None when they
        cannot be read."""
        pack = self._data()
        if pack is None or not PACK_HEADER <= offset < len(pack) - PACK_TRAILER:
            return None
        try:
            _kind, size, pos, base = entry_header(pack, offset, len(pack) - PACK_TRAILER)
        except PackEntryError:
            return None
        if base is None:
            return size, size, None
        sizes = _delta_sizes(pack[pos : pos + 64])
        return None if sizes is None else (*sizes, base)

    def entry_size(self, offset: int) -> int | None:
        """The size of the object the entry at `offset` holds, from its headers (a delta's
        result size); None when they cannot be read: whoever reads the entry reports that."""
        sizes = self._entry_sizes(offset)
        return None if sizes is None else sizes[1]

    def object_size(self, offset: int, max_chain: int = 64) -> int | None:
        """The largest object that reading the entry at `offset` inflates, from headers alone.

        For a delta that is the larger of each delta's base and result sizes (the first two
        numbers of its inflated delta stream) down its chain of bases in this pack, up to
        `max_chain` links. None when the first entry cannot be read so far: whoever reads it
        reports that.
        """
        largest: int | None = None
        for _ in range(max_chain):
            sizes = self._entry_sizes(offset)
            if sizes is None:
                return largest
            largest = max(largest or 0, sizes[0], sizes[1])
            base = sizes[2]
            # A REF_DELTA's base elsewhere in the store is not followed.
            next_offset = base if base is None or isinstance(base, int) else self.find(base)
            if next_offset is None:
                return largest
            offset = next_offset
        return largest

    def delta_against(self, offset: int, base: bytes) -> bytes | None:
        """The delta the entry at `offset` holds, if it is a delta against object `base` (20
        bytes): an OFS_DELTA to its entry in this pack, or a REF_DELTA naming it; else None."""
        pack = self._data()
        if pack is None:
            return None
        end = len(pack) - PACK_TRAILER
        if not PACK_HEADER <= offset < end:
            return None
        try:
            _kind, size, pos, at = entry_header(pack, offset, end)
        except PackEntryError:
            return None
        if at is None or at != (base if isinstance(at, bytes) else self.find(base)):
            return None
        return _inflate_entry(pack, pos, size, end)

    def whole_object(self, offset: int, kind: int) -> bytes | None:
        """The content of the entry at `offset` when it is a whole (not deltified) object of
        type number `kind`; None for anything else, which read_object reads (a walk reads
        each commit here: read_object's checks for deltas cost a few us an entry)."""
        pack = self._data()
        if pack is None:
            return None
        end = len(pack) - PACK_TRAILER
        if not PACK_HEADER <= offset < end or (pack[offset] >> 4) & 0x07 != kind:
            return None
        try:
            _kind, size, pos, _base = entry_header(pack, offset, end)
        except PackEntryError:
            return None
        return _inflate_entry(pack, pos, size, end)

    def read_object(
        self, offset: int, external: Callable[[bytes], tuple[int, bytes] | None]
    ) -> tuple[int, bytes] | None:
        """(type number, content) of the object at `offset`: a whole entry inflated, or a
        delta applied to its base, resolved down its chain (OFS_DELTA bases in this pack, a
        REF_DELTA's where this index lists it, else as `external(raw id)` reads it).

        None for an entry that cannot be read so (damaged, a chain too long, a pack removed
        since): the caller then asks dulwich, which reads or reports it. Commits and trees
        are read here, not through dulwich, which keeps each pack it looks in open.
        """
        pack = self._data()
        if pack is None:
            return None
        end = len(pack) - PACK_TRAILER
        deltas: list[tuple[int, bytes]] = []  # (offset, delta), newest first
        for _ in range(MAX_DELTA_HOPS):
            if not PACK_HEADER <= offset < end:
                return None
            try:
                kind, size, pos, base = entry_header(pack, offset, end)
            except PackEntryError:
                return None
            if base is not None or deltas:  # a delta or a delta's base: rebuilt already?
                known = DELTA_BASES.get(self.pack_path, offset)
                if known is not None:
                    kind, data = known
                    break
            inflated = _inflate_entry(pack, pos, size, end)
            if inflated is None:
                return None
            data = inflated
            if base is None:
                if deltas:  # a base: the next read of its chain starts here
                    DELTA_BASES.put(self.pack_path, offset, kind, data)
                break
            deltas.append((offset, data))
            if isinstance(base, bytes):
                found = self.find(base)
                if found is None:
                    outside = external(base)
                    if outside is None:
                        return None
                    kind, data = outside
                    break
                offset = found
            else:
                offset = base
        else:
            return None
        if not deltas:
            return (kind, data) if kind in _KIND_NAMES else None
        from dulwich.pack import apply_delta

        try:
            for at, delta in reversed(deltas):
                data = b"".join(apply_delta(data, delta))
                DELTA_BASES.put(self.pack_path, at, kind, data)
        except Exception:  # dulwich's delta errors alike mean a damaged entry
            return None
        return (kind, data) if kind in _KIND_NAMES else None

    def stored_layout(self, offset: int) -> tuple[int, bytes, list[tuple[int, int]]]:
        """The size of the blob entry at `offset` and where its content lies (_stored_layout)."""
        pack = self.pack
        size, pos = self._blob_entry(pack, offset)
        layout = _stored_layout(memoryview(pack), pos, size)
        if layout is None:
            raise NotStored  # deltas, deflated or corrupt entries: dulwich reads (or reports) them
        return size, layout[0], layout[1]

    def stored_blob(self, offset: int) -> memoryview:
        """The content of the blob entry at `offset`, when it is zlib-stored as we write tensors."""
        pack = self.pack
        size, pos = self._blob_entry(pack, offset)
        fast = _fast_inflate(memoryview(pack), pos, size)
        if fast is None:
            raise NotStored  # deltas, deflated or corrupt entries: dulwich reads (or reports) them
        return fast[0].data


def _inflate_entry(pack: mmap.mmap, pos: int, size: int, end: int) -> bytes | None:
    """The `size` bytes the zlib stream at pack[pos:] inflates to; None when it is damaged,
    ends past `end`, or inflates to another size (never more than `size` + 1 is kept)."""
    if size > (end - pos) * 1032 + 64:
        return None  # deflate makes at most ~1032 bytes of one: a lying header, or a bomb
    inflater = zlib.decompressobj()
    parts: list[bytes] = []
    done = 0
    # The stream's length is known only at its end. First as much as zlib could make of
    # `size` bytes (stored blocks add 5 bytes per 64 KiB, deflate at most a little more), so
    # that a small object takes one call; then a piece at a time.
    step = size + (size >> 12) + 64
    if size < _INFLATE_STEP:  # a commit, a tree: one call on a copy of its bytes
        try:
            small = inflater.decompress(pack[pos : min(pos + step, end)], size + 1)
        except zlib.error:
            return None
        if inflater.eof:
            return small if len(small) == size else None
        inflater = zlib.decompressobj()  # a stream longer than zlib makes: read it as below
    with memoryview(pack) as view:
        try:
            while not inflater.eof and pos < end:
                part = inflater.decompress(view[pos : min(pos + step, end)], size + 1 - done)
                parts.append(part)
                done += len(part)
                if done > size or inflater.unconsumed_tail:
                    return None
                pos += step
                step = _INFLATE_STEP
        except zlib.error:
            return None
    return b"".join(parts) if inflater.eof and done == size else None
