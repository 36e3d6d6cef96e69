"""Tensors a checkout keeps from the weights file it replaces instead of decoding them: which
ones are looked for, reading their bytes from that file, and keeping those whose sha256 is the
manifest's. Only Revision.safetensors_buffer uses it."""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mintvcs.objects import Manifest, TensorRecord

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Tensors up to this size are taken from the weights file a checkout replaces when they are
# there unchanged: most of their decode is per-tensor work in Python, and a hash is far cheaper.
# Larger ones are decoded: per byte that costs little more than the hash, and a miss would cost
# the hash as well.
KEEP_TENSOR_BYTES = 64 << 10
# Fewer small tensors than this decode faster than the weights file is read and hashed.
_KEEP_MIN_TENSORS = 256
# Small tensors closer than this are read in one call (a read per 64-byte tensor of an MoE
# adapter would be 37k system calls).
_KEEP_READ_GAP = 64 << 10


class ReplacedWeights:
    """The small tensors' bytes of a weights file a checkout replaces, each at its place in an
    anonymous map of the file's size whose other pages stay untouched and take no memory (a
    large tensor beside them is decoded anyway)."""

    def __init__(self, content: mmap.mmap, data_start: int) -> None:
        self.content = content
        self.data_start = data_start  # where the file's data section starts (8 + header length)

    @classmethod
    def read(cls, path: Path, manifest: Manifest) -> ReplacedWeights | None:
        """The file at `path` that writing `manifest`'s revision replaces, when that revision has
        many small tensors; None when there is no regular file to read there, or reading it
        fails (everything is decoded)."""
        small = sorted(
            (r.start, r.end) for r in manifest.tensors if r.end - r.start <= KEEP_TENSOR_BYTES
        )
        if len(small) < _KEEP_MIN_TENSORS:
            return None
        try:
            # Not through a symlink, and never blocking on a FIFO: only a plain file is read.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > 2 * manifest.nbytes + (64 << 20):
                return None
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                return None
            data = 8 + int.from_bytes(head, "little")
            # Read, not mapped from the file: it may be truncated meanwhile (a SIGBUS); what a
            # short read leaves zero fails its tensor's sha256 and is decoded.
            content = mmap.mmap(-1, max(info.st_size, 8))
            content[:8] = head
            view = memoryview(content)
            try:
                for begin, end in _runs(small, gap=_KEEP_READ_GAP):
                    at, stop = data + begin, min(data + end, info.st_size)
                    while at < stop and (got := os.preadv(fd, [view[at:stop]], at)):
                        at += got
            finally:
                view.release()
            return cls(content, data)
        except OSError:
            return None
        finally:
            os.close(fd)

    def keep_into(
        self,
        records: Sequence[TensorRecord],
        offsets: Sequence[int],
        buffer: npt.NDArray[np.uint8],
    ) -> list[int]:
        """Copy into `buffer` (tensor i at offsets[i]) each small tensor that the data section
        holds at the record's place with the record's sha256; return the indexes of the others,
        which are left to decode. Only bytes whose sha256 is the one the manifest records are
        kept, whatever file they came from."""
        import numpy as np

        todo: list[int] = []
        # Every view of the map is released before returning: close() can then unmap it.
        with memoryview(self.content) as whole:
            start = min(self.data_start, whole.nbytes)
            with whole[start:] as data:
                sha256 = hashlib.sha256
                runs: list[list[int]] = []  # [first index, last index] of adjacent tensors kept
                for index, record in enumerate(records):
                    if (
                        record.end - record.start > KEEP_TENSOR_BYTES
                        or record.end > data.nbytes
                        or sha256(data[record.start : record.end]).hexdigest() != record.sha256
                    ):
                        todo.append(index)
                    elif (
                        runs and runs[-1][1] == index - 1 and records[index - 1].end == record.start
                    ):
                        runs[-1][1] = index
                    else:
                        runs.append([index, index])
                source = np.frombuffer(data, dtype=np.uint8)
                for first, last in runs:  # a copy per run, not per tensor
                    begin, end = records[first].start, records[last].end
                    at = offsets[first]
                    buffer[at : at + end - begin] = source[begin:end]
                del source
        return todo

    def close(self) -> None:
        """Unmap the bytes read (the checkout is done with them)."""
        self.content.close()


def _runs(ranges: Sequence[tuple[int, int]], gap: int) -> Iterator[tuple[int, int]]:
    """Sorted (start, end) ranges merged where less than `gap` bytes lie between them."""
    run: tuple[int, int] | None = None
    for begin, end in ranges:
        if run is not None and begin - run[1] < gap:
            run = (run[0], max(run[1], end))
            continue
        if run is not None:
            yield run
        run = (begin, end)
    if run is not None:
        yield run
