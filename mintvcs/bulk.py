"""Making tens of thousands of objects at once: a revision's records, a weights file's layout."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """CPython's cyclic garbage collector held off inside the block.

    Its collections are triggered by allocations and each older one walks every live object:
    reading a 37k-tensor revision (a few objects per tensor) ran it over and over, 25-50% of
    the read. Reference counting still frees what is dropped; only cycles wait for the block's
    end. Process-wide: a block that finds the collector off (another thread's block, or a
    caller that turned it off) leaves it as it found it, and one ending first turns it back on
    under the other, which then is only slower.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
