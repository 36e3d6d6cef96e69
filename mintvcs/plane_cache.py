"""Decoded XOR-chain tips kept in plane space, so that the next revision decodes one link, not its chain.

A training run commits each revision as XOR links on its parent (up to codec.MAX_CHAIN deep);
decoding a revision at depth d decompresses d + 1 blobs per tensor. A server that follows a
branch has just decoded the parent, so keeping the parent's planes makes the child one link;
fsck, checking each history from its oldest revision, keeps them for the same reason.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mintvcs.codec import BlobHeader, Planes


class PlaneCache:
    """Tensors in plane space by blob id (least recently used out first), bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self._entries: OrderedDict[str, tuple[BlobHeader, Planes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, blob_id: str) -> tuple[BlobHeader, Planes] | None:
        """The blob's header and planes if cached (then most recently used)."""
        with self._lock:
            entry = self._entries.get(blob_id)
            if entry is not None:
                self._entries.move_to_end(blob_id)
                self.hits += 1
            return entry

    def put(self, header: BlobHeader, planes: Planes) -> None:
        """Keep a verified blob's planes (read-only from now on), evicting the oldest past the bound."""
        size = planes.grid.nbytes
        if size > self.max_bytes:
            return
        planes.grid.flags.writeable = False  # a base for later decodes: nothing may change it
        with self._lock:
            old = self._entries.pop(planes.blob_id, None)
            if old is not None:
                self.nbytes -= old[1].grid.nbytes
            self._entries[planes.blob_id] = (header, planes)
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.nbytes -= evicted.grid.nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._entries
