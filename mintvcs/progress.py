"""Progress bars on stderr for long work: encoding, decoding, loading a base model."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Progress = Callable[[int], None]


@contextmanager
def progress_bar(total: int | None, desc: str, unit: str = "B") -> Iterator[Progress]:
    """A progress bar on stderr (bytes unless `unit` says otherwise; total None: a counter) that appears only when the work takes over a second."""
    if not sys.stderr.isatty():
        # tqdm would disable itself here (disable=None); skip importing it at all.
        yield lambda _n: None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        delay=1.0,
        leave=False,
        disable=None,
    ) as bar:
        yield bar.update
