"""Progress bars on stderr for long work: encoding, decoding, loading a base model."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Progress = Callable[[int], None]

# When the running command began (the CLI sets it, see `command`): a bar then shows once the
# command has run for a second, not only once its own phase has. A 37k-tensor revision is read,
# checked and hashed in phases of under a second each: with a second per phase, the terminal
# stayed silent for several. None (a library call): each bar waits a second of its own.
_command_start: float | None = None
SHOW_AFTER_SECONDS = 1.0  # how long work runs before its bar is drawn
_quiet = False  # --json: a script reads the output, no bar is drawn


@contextmanager
def command() -> Iterator[None]:
    """Time the bars of the command run inside from now (see _command_start)."""
    global _command_start
    was, _command_start = _command_start, time.monotonic()
    try:
        yield
    finally:
        _command_start = was


@contextmanager
def quiet() -> Iterator[None]:
    """Draw no bar inside (a command's --json output is for a script)."""
    global _quiet
    was, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = was


def _shown() -> bool:
    """Whether bars are drawn: on a terminal, not under --json."""
    return not _quiet and sys.stderr.isatty()


def _delay() -> float:
    """Seconds a bar starting now waits before it is drawn (it is never drawn if done by then)."""
    if _command_start is None:
        return SHOW_AFTER_SECONDS
    return max(0.0, SHOW_AFTER_SECONDS - (time.monotonic() - _command_start))


@contextmanager
def progress_bar(total: int | None, desc: str, unit: str = "B") -> Iterator[Progress]:
    """A progress bar on stderr (bytes unless `unit` says otherwise; total None: a counter)
    that appears only once the work (or the command it is part of) has run for a second."""
    if not _shown():
        # tqdm would disable itself here (disable=None); skip importing it at all.
        yield lambda _n: None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        delay=_delay(),
        leave=False,
        disable=None,
    ) as bar:
        yield bar.update


PhaseProgress = Callable[[str, int], None]


@contextmanager
def phase_counter(desc: str) -> Iterator[PhaseProgress]:
    """A counter on stderr for work in phases (`fsck: tensors: 812`): call it with (phase, n).

    Each phase gets its own count; like progress_bar, a phase shows only once it (or the
    command it is part of) has run for over a second, and nothing shows off a terminal.
    """
    if not _shown():
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
                delay=_delay(),
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
