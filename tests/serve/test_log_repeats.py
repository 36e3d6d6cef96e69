"""The server's log holds back repeats of a warning or error (serve/log_repeats.py)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mintvcs.serve.app import BackgroundServer, ServerConfig
from mintvcs.serve.log_bad_requests import BadRequestFilter
from mintvcs.serve.log_repeats import ALWAYS, RepeatFilter
from mintvcs.store import Repository


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
        except Exception:
            self.handleError(record)  # as logging's own handlers do


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


def test_a_change_of_state_is_never_held_back(logged: tuple[logging.Logger, list[str]]) -> None:
    # Gone, back, gone again within the interval: the log must not end on "back".
    logger, lines = logged
    for _ in range(2):
        logger.warning("the repository is gone", extra=ALWAYS)
        logger.warning("the repository is back", extra=ALWAYS)
    assert lines == ["the repository is gone", "the repository is back"] * 2


def test_threads_logging_at_once_never_make_a_log_call_raise(
    logged: tuple[logging.Logger, list[str]],
) -> None:
    # The engine's thread and the event loop both log; past the bound, two threads evicted the
    # same oldest key and the second's KeyError came out of log.warning().
    logger, lines = logged
    errors: list[BaseException] = []

    def spam(thread: int) -> None:
        try:
            for n in range(3000):
                logger.warning("warning %d of thread %d", n, thread)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=spam, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(lines) == 12000


def test_a_bad_format_call_is_left_to_logging_to_report() -> None:
    # Formatting it in the filter raised out of the log call, where logging's handlers print
    # "--- Logging error ---" and the caller goes on.
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "%d tokens", ("x",), None)
    assert RepeatFilter().filter(record)


def test_a_server_that_cannot_start_leaves_no_filter_on_the_log(
    repo: Repository, tiny_base: Path
) -> None:
    # The port taken: the app's contexts had run and nothing undid them, so the process's
    # "mintvcs.serve" log kept holding back repeats for whatever ran in it next.
    serve_log = logging.getLogger("mintvcs.serve")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=taken.getsockname()[1])
        with pytest.raises(OSError):
            BackgroundServer(config).start()
    assert not [f for f in serve_log.filters if isinstance(f, RepeatFilter)]
    aiohttp_log = logging.getLogger("aiohttp.server")
    assert not [f for f in aiohttp_log.filters if isinstance(f, BadRequestFilter)]


# Formats a log line holding a newline (asyncio's reports hold several) with every descriptor
# taken, as a server at its limit on open files formats each line it logs; prints the line.
_FORMAT_WITHOUT_DESCRIPTORS = """
import logging, os, resource, sys
from mintvcs.serve.app import OneLineFormatter

resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
record = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "accept() failed\\nsocket: s", (), None)
try:
    line = OneLineFormatter("%(levelname)s %(message)s").format(record)
finally:
    for fd in held:
        os.close(fd)
print(line)
"""


def test_the_log_formatter_needs_no_descriptor() -> None:
    # Its escaping codec was found at its first use, which imports a module and so takes a
    # descriptor: at the server's limit each line failed into logging's "--- Logging error
    # ---" and a 50-line traceback.
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _FORMAT_WITHOUT_DESCRIPTORS],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ERROR accept() failed\\nsocket: s\n"


class _Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_accept_failures_are_one_line_a_while_and_other_errors_pass_on() -> None:
    import asyncio
    import errno

    from mintvcs.serve.log_repeats import ACCEPT_FAILED, AcceptFailures

    logger = logging.getLogger("tests.accept_failures")
    logger.propagate = False
    handler = _Recorded()
    logger.addHandler(handler)
    passed: list[dict[str, object]] = []
    loop = asyncio.new_event_loop()
    try:
        failures = AcceptFailures(logger, lambda _loop, context: passed.append(context), 0.3)
        full = {"message": ACCEPT_FAILED, "exception": OSError(errno.EMFILE, "Too many open files")}
        for _ in range(500):  # what a few wake-ups of CPython 3.11's accept loop report
            failures(loop, full)
        failures(loop, {"message": "Task exception was never retrieved"})
        time.sleep(0.35)
        failures(loop, full)
    finally:
        loop.close()
        logger.removeHandler(handler)
    lines = [record.getMessage() for record in handler.records]
    assert len(lines) == 2 and all(r.levelno == logging.ERROR for r in handler.records)
    assert lines[0].startswith("cannot accept new connections: Too many open files (1 failed")
    assert "(500 failed accept() calls in the last 0 s)" in lines[1], lines
    assert passed == [{"message": "Task exception was never retrieved"}]
