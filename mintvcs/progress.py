"""Progress bars on stderr for long work: encoding, decoding, loading a base model."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Progress = Callable[[int], None]


@contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Progress]:
    """A byte progress bar on stderr that appears only when the work takes over a second."""
    if not sys.stderr.isatty():
        # tqdm would disable itself here (disable=None); skip importing it at all.
        yield lambda _n: None
        return
    from tqdm import tqdm

    with tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, delay=1.0, leave=False, disable=None
    ) as bar:
        yield bar.update
