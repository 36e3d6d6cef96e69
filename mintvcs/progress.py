"""Progress bars on stderr for long work: encoding, decoding, loading a base model."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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


PhaseProgress = Callable[[str, int], None]


@contextmanager
def phase_counter(desc: str) -> Iterator[PhaseProgress]:
    """A counter on stderr for work in phases (`fsck: tensors: 812`): call it with (phase, n).

    Each phase gets its own count; like progress_bar, a phase shows only once it has run for
    over a second, and nothing shows off a terminal.
    """
    if not sys.stderr.isatty():
        yield lambda _phase, _n: None
        return
    from tqdm import tqdm

    bars: list[tuple[str, tqdm[Any]]] = []

    def step(phase: str, n: int) -> None:
        if not bars or bars[-1][0] != phase:
            if bars:
                bars[-1][1].close()
            bar = tqdm(
                total=None,
                desc=f"{desc}: {phase}",
                delay=1.0,
                leave=False,
                bar_format="{desc}: {n_fmt} [{elapsed}, {rate_noinv_fmt}]",
                unit="",
            )
            bars.append((phase, bar))
        bars[-1][1].update(n)

    try:
        yield step
    finally:
        if bars:
            bars[-1][1].close()
