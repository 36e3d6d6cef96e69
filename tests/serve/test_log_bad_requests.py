"""A malformed request is one warning line in the server's log (serve/log_bad_requests.py):
no traceback, none of the client's bytes, and repeats held back; real errors keep theirs."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp.http_parser
import aiohttp.web_protocol
import pytest
from aiohttp import web

from mintvcs import porcelain
from mintvcs.serve.app import BackgroundServer, ServerConfig, _repeats_ctx
from mintvcs.serve.log_bad_requests import BadRequestFilter
from mintvcs.serve.log_repeats import RepeatFilter
from tests.serve.http_kit import serving_app

# Every byte a test client sends that could end up in a log line carries this mark.
MARK = b"EVIL"
_LOGGERS = ("aiohttp.server", "mintvcs.serve")


class _Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def complaints(self) -> list[logging.LogRecord]:
        """The records of a failure: warnings and errors, and aiohttp's own at any level."""
        return [
            r for r in self.records if r.levelno >= logging.WARNING or r.name == "aiohttp.server"
        ]

    def text(self, records: list[logging.LogRecord]) -> str:
        """The records as a handler writes them, tracebacks included."""
        return "\n".join(self.format(r) for r in records)


@pytest.fixture
def recorded() -> Iterator[_Recorded]:
    handler = _Recorded()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


@pytest.fixture(scope="module")
def empty_repo(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A repository without commits: the server has its base and nothing else to serve."""
    return porcelain.init(tmp_path_factory.mktemp("bad-requests") / "repo", str(tiny_base)).git_dir


@pytest.fixture
def server(empty_repo: Path, tiny_base: Path) -> Iterator[BackgroundServer]:
    """A server of its own: each test starts with nothing held back."""
    with BackgroundServer(ServerConfig(repo=empty_repo, base_model=tiny_base, port=0)) as srv:
        yield srv


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _exchange(port: int, *parts: bytes) -> bytes:
    """Send `parts` on one connection, a moment apart, and read the answer until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        for n, part in enumerate(parts):
            if n:
                time.sleep(0.1)  # the handler is reading the body by now
            sock.sendall(part)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _post(path: str, headers: str, body: bytes) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n\r\n".encode() + body


# name -> (what the client sends, the reason logged, the status answered)
MALFORMED: dict[str, tuple[tuple[bytes, ...], str, int]] = {
    "bad chunk size": (
        (
            _post(
                "/v1/completions",
                "Transfer-Encoding: chunked",
                b"zz" + MARK + b"\r\nab\r\n0\r\n\r\n",
            ),
        ),
        "a malformed chunked body",
        400,
    ),
    "header line too long": (
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + MARK * 3000 + b"\r\n\r\n",),
        "a request or header line over 8190 bytes",
        400,
    ),
    "bad version": ((b"GET /health HTTP/" + MARK + b"\r\n\r\n",), "a malformed request line", 400),
    "bad header name": (
        (b"GET /health HTTP/1.1\r\nHost: x\r\n" + MARK + b" x: 1\r\n\r\n",),
        "a malformed header",
        400,
    ),
    "bad target": (
        (b"GET /" + MARK + b"\x7f HTTP/1.1\r\nHost: x\r\n\r\n",),
        "a malformed request target",
        400,
    ),
    # The handler reading the body by the time the bad chunk comes: aiohttp's C parser left
    # that read waiting out the body timeout, and logged nothing.
    "bad chunk size mid-body": (
        (
            _post("/v1/completions", "Transfer-Encoding: chunked", b'5\r\n{"a":\r\n'),
            b"zz" + MARK + b"\r\nab\r\n0\r\n\r\n",
        ),
        "a malformed chunked body",
        400,
    ),
    # Read by the handler, past the parser: aiohttp's 500, our 400 now.
    "corrupt gzip body": (
        (
            _post("/v1/completions", "Content-Encoding: gzip\r\nContent-Length: 12", b""),
            MARK * 3,
        ),
        "a body that does not decode as its Content-Encoding says",
        400,
    ),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_request_is_one_warning_without_traceback_or_client_bytes(
    server: BackgroundServer, recorded: _Recorded, kind: str
) -> None:
    parts, reason, status = MALFORMED[kind]
    answer = _exchange(_port(server.url), *parts)
    assert answer.split(b"\r\n", 1)[0].endswith(f" {status} Bad Request".encode()), answer[:200]
    time.sleep(0.2)  # aiohttp logs after it answers
    complaints = recorded.complaints()
    assert [(r.levelno, r.getMessage()) for r in complaints] == [
        (logging.WARNING, f"bad HTTP request from 127.0.0.1: {reason}")
    ], recorded.text(complaints)
    assert complaints[0].exc_info is None
    text = recorded.text(recorded.records)
    assert "Traceback" not in text and MARK.decode() not in text, text


def test_a_request_that_is_not_http_stays_a_debug_line_without_client_bytes(
    server: BackgroundServer, recorded: _Recorded
) -> None:
    # aiohttp logs garbage on a connection's first request at debug (port scanners, TLS).
    answer = _exchange(_port(server.url), MARK + b"\x01 garbage\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 400 ")
    answer = _exchange(_port(server.url), b"\x16\x03\x01\x02\x00" + MARK + b"\r\n\r\n")
    time.sleep(0.2)
    complaints = recorded.complaints()
    assert [(r.levelno, r.getMessage()) for r in complaints] == [
        (logging.DEBUG, "bad HTTP request from 127.0.0.1: not an HTTP request (an invalid method)"),
        (
            logging.DEBUG,
            "bad HTTP request from 127.0.0.1: TLS (an https:// client) on this plain-HTTP port",
        ),
    ]
    text = recorded.text(recorded.records)
    assert "Traceback" not in text and MARK.decode() not in text, text


def test_a_flood_of_bad_requests_is_a_bounded_number_of_lines(
    server: BackgroundServer, recorded: _Recorded
) -> None:
    port = _port(server.url)
    for n in range(200):  # each with bytes of its own: not what makes lines repeats
        kind = ("bad chunk size", "header line too long")[n % 2]
        parts = tuple(part.replace(MARK, MARK + str(n).encode()) for part in MALFORMED[kind][0])
        assert _exchange(port, *parts).startswith(b"HTTP/1.0 400 ")
    time.sleep(0.2)
    lines = [r.getMessage() for r in recorded.complaints()]
    assert lines == [
        "bad HTTP request from 127.0.0.1: a malformed chunked body",
        "bad HTTP request from 127.0.0.1: a request or header line over 8190 bytes",
    ]


def test_at_log_level_error_a_bad_request_is_not_logged(
    server: BackgroundServer, recorded: _Recorded
) -> None:
    # aiohttp logs it at error, which the level lets through; the warning it becomes must
    # not pass (MINT_LOG_LEVEL=ERROR).
    logging.getLogger("aiohttp.server").setLevel(logging.ERROR)
    answer = _exchange(_port(server.url), *MALFORMED["bad version"][0])
    assert answer.startswith(b"HTTP/1.0 400 ")
    time.sleep(0.2)
    assert recorded.complaints() == []


async def _fails(request: web.Request) -> web.Response:
    raise RuntimeError("a genuine fault")


def test_a_handler_that_raises_is_still_an_error_with_its_traceback(recorded: _Recorded) -> None:
    # No middleware of ours: the handler's exception reaches aiohttp's own log, the filter's.
    app = web.Application()
    app.cleanup_ctx.append(_repeats_ctx)
    app.router.add_get("/fails", _fails)
    with serving_app(app) as port:
        answer = _exchange(port, b"GET /fails HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 500 ")
        assert _exchange(port, b"GET /health HTTP/" + MARK + b"\r\n\r\n").startswith(
            b"HTTP/1.0 400 "
        )
        time.sleep(0.2)
        assert [
            f
            for f in logging.getLogger("aiohttp.server").filters
            if isinstance(f, BadRequestFilter)
        ]
    complaints = recorded.complaints()
    assert [(r.levelno, r.name) for r in complaints] == [
        (logging.ERROR, "aiohttp.server"),
        (logging.WARNING, "aiohttp.server"),
    ]
    failed = recorded.text(complaints[:1])
    assert "Traceback" in failed and "RuntimeError: a genuine fault" in failed, failed
    assert complaints[1].getMessage() == "bad HTTP request from 127.0.0.1: a malformed request line"
    # Stopped: the log is as it was, for whatever the process runs next.
    assert not [
        f for f in logging.getLogger("aiohttp.server").filters if isinstance(f, BadRequestFilter)
    ]
    assert not [
        f for f in logging.getLogger("mintvcs.serve").filters if isinstance(f, RepeatFilter)
    ]


def test_a_stopped_server_leaves_no_filter_on_aiohttps_log(
    empty_repo: Path, tiny_base: Path
) -> None:
    aiohttp_log = logging.getLogger("aiohttp.server")
    with BackgroundServer(ServerConfig(repo=empty_repo, base_model=tiny_base, port=0)):
        assert [f for f in aiohttp_log.filters if isinstance(f, BadRequestFilter)]
    assert not [f for f in aiohttp_log.filters if isinstance(f, BadRequestFilter)]


def _answer(answer: bytes) -> tuple[bytes, dict[str, Any]]:
    """The status line of a /v1 JSON answer, and its error (or its whole body, if none)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    parsed = json.loads(body)
    return head.split(b"\r\n", 1)[0], parsed.get("error", parsed)


# aiohttp's two HTTP parsers, each a real one: llhttp's (its C extension, the default where
# installed) and its pure-Python one (AIOHTTP_NO_EXTENSIONS=1).
PARSERS = {
    "c": getattr(aiohttp.http_parser, "HttpRequestParserC", None),
    "python": aiohttp.http_parser.HttpRequestParserPy,
}


@pytest.mark.parametrize("parser", list(PARSERS))
def test_a_chunked_body_that_turns_malformed_mid_read_is_400_at_once_not_a_timeout(
    empty_repo: Path,
    tiny_base: Path,
    recorded: _Recorded,
    monkeypatch: pytest.MonkeyPatch,
    parser: str,
) -> None:
    if PARSERS[parser] is None:
        pytest.skip("aiohttp is installed without its C extensions")
    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", PARSERS[parser])
    config = ServerConfig(repo=empty_repo, base_model=tiny_base, port=0, body_timeout=3.0)
    with BackgroundServer(config) as srv:
        port = _port(srv.url)
        started = time.monotonic()
        answer = _exchange(port, *MALFORMED["bad chunk size mid-body"][0])
        took = time.monotonic() - started
        status, body = _answer(answer)
        assert status == b"HTTP/1.1 400 Bad Request" and body["code"] == "invalid_body", answer
        assert "a malformed chunked body" in body["message"], body
        assert took < config.body_timeout / 2, took  # not after the body timeout
        # A chunk split over packets, or a pause shorter than the body timeout, is no fault.
        json_body = b'{"prompt": "Hi", "max_tokens": 1, "model": "nothing-here"}'
        whole = _exchange(
            port,
            _post(
                "/v1/completions",
                f"Content-Length: {len(json_body)}\r\nConnection: close",
                json_body,
            ),
        )
        chunked = _exchange(
            port,
            _post("/v1/completions", "Transfer-Encoding: chunked\r\nConnection: close", b"")
            + f"{len(json_body):x}\r\n".encode()
            + json_body[:10],
            json_body[10:] + b"\r",
            b"\n0\r\n\r\n",
        )
        assert _answer(chunked) == _answer(whole), (chunked, whole)
        assert _answer(whole)[1].get("code") not in ("invalid_body", "body_timeout"), whole
        # A body that stops coming is still the body timeout's.
        started = time.monotonic()
        stalled = _exchange(
            port, _post("/v1/completions", "Transfer-Encoding: chunked", b'5\r\n{"a":\r\n')
        )
        status, body = _answer(stalled)
        assert status.startswith(b"HTTP/1.1 408") and body["code"] == "body_timeout", stalled
        assert time.monotonic() - started >= config.body_timeout
    time.sleep(0.2)
    assert [(r.levelno, r.getMessage()) for r in recorded.complaints()] == [
        (logging.WARNING, "bad HTTP request from 127.0.0.1: a malformed chunked body")
    ], recorded.text(recorded.complaints())


@pytest.mark.parametrize("parser", list(PARSERS))
def test_a_body_that_ends_whole_before_a_malformed_request_behind_it_is_still_answered(
    server: BackgroundServer,
    recorded: _Recorded,
    monkeypatch: pytest.MonkeyPatch,
    parser: str,
) -> None:
    # The body's last data chunk, its end and a malformed pipelined request come in one packet
    # while the handler reads: the parser fails on the second request, after the body ended
    # whole. That failure is not the body's: the first request is answered, then the garbage
    # gets its 400. (Bytes in that packet matter: the read they wake takes them, and the next
    # read looks for a failure first. A read woken by the end alone returns at once, without
    # looking, so a packet of only "0" and the garbage would pass either way.)
    if PARSERS[parser] is None:
        pytest.skip("aiohttp is installed without its C extensions")
    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", PARSERS[parser])
    answer = _exchange(
        _port(server.url),
        _post("/tokenize", "Transfer-Encoding: chunked", b"") + b'a\r\n{"prompt":\r\n',
        b'5\r\n "Hi"\r\n1\r\n}\r\n0\r\n\r\n' + MARK + b"\x01 garbage\r\n\r\n",
    )
    head, _, rest = answer.partition(b"\r\n\r\n")
    status, *header_lines = head.split(b"\r\n")
    assert status == b"HTTP/1.1 200 OK", answer
    length = next(
        int(line.split(b":", 1)[1])
        for line in header_lines
        if line.lower().startswith(b"content-length:")
    )
    assert json.loads(rest[:length])["count"] > 0, answer
    assert rest[length:].startswith(b"HTTP/1.0 400 Bad Request\r\n"), answer
    time.sleep(0.2)  # aiohttp logs after it answers
    assert [(r.name, r.getMessage()) for r in recorded.complaints()] == [
        (
            "aiohttp.server",
            "bad HTTP request from 127.0.0.1: not an HTTP request (an invalid method)",
        )
    ], recorded.text(recorded.complaints())
