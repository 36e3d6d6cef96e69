"""The server's log holds back repeats of a warning or error (serve/log_repeats.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from mintvcs.serve.log_repeats import RepeatFilter


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, list[str]]]:
    logger = logging.getLogger("tests.log_repeats")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = _Lines()
    logger.addHandler(handler)
    repeats = RepeatFilter(interval=0.5)
    logger.addFilter(repeats)
    try:
        yield logger, handler.lines
    finally:
        logger.removeFilter(repeats)
        logger.removeHandler(handler)


def test_a_repeat_is_held_back_for_the_interval_then_counted(
    logged: tuple[logging.Logger, list[str]],
) -> None:
    logger, lines = logged
    for _ in range(5):
        logger.error("request %s %s failed: %s", "POST", "/generate", "object x is corrupt")
    logger.error("request %s %s failed: %s", "POST", "/generate", "object y is corrupt")
    logger.warning("request %s %s failed: %s", "POST", "/generate", "object x is corrupt")
    for _ in range(3):
        logger.info("moved")  # below warnings: never held back
    assert lines == [
        "request POST /generate failed: object x is corrupt",
        "request POST /generate failed: object y is corrupt",
        "request POST /generate failed: object x is corrupt",  # another level
        "moved",
        "moved",
        "moved",
    ]
    time.sleep(0.6)
    logger.error("request %s %s failed: %s", "POST", "/generate", "object x is corrupt")
    logger.error("request %s %s failed: %s", "POST", "/generate", "object y is corrupt")
    assert lines[6:] == [
        "request POST /generate failed: object x is corrupt (4 more like it in the 1 s "
        "before, not logged)",
        "request POST /generate failed: object y is corrupt",
    ]


def test_failures_with_one_exception_are_repeats_whatever_their_counts(
    logged: tuple[logging.Logger, list[str]],
) -> None:
    logger, lines = logged
    for n in (7, 3, 5):
        try:
            raise RuntimeError("CUDA error: an illegal memory access")
        except RuntimeError as err:
            logger.error("an engine step of %d sequences failed", n, exc_info=err)
    try:
        raise RuntimeError("another fault")
    except RuntimeError as err:
        logger.error("an engine step of %d sequences failed", 2, exc_info=err)
    assert lines == ["an engine step of 7 sequences failed", "an engine step of 2 sequences failed"]


def test_what_it_remembers_is_bounded(logged: tuple[logging.Logger, list[str]]) -> None:
    logger, lines = logged
    for n in range(1025):
        logger.warning("failure %d", n)
    logger.warning("failure %d", 0)  # forgotten: logged again
    logger.warning("failure %d", 1024)  # remembered: held back
    assert len(lines) == 1026 and lines[-1] == "failure 0"
