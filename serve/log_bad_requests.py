"""Malformed requests in the server's log: one warning line in words of ours, not aiohttp's
error and traceback quoting what the client sent."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterator
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    DecompressSizeError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestPayloadError

from mintvcs.serve.log_repeats import RepeatFilter

# The line logged for each: the client's address (an IP, or "-" where the record names none)
# and bad_request_reason()'s words.
BAD_REQUEST = "bad HTTP request from %s: %s"

# What each failure is, by its type: a subclass before its base. The exceptions' messages are
# never used, they quote the bytes the client sent.
_REASONS: tuple[tuple[type[BadHttpMessage], str], ...] = (
    (BadHttpMethod, "not an HTTP request (an invalid method)"),
    (BadStatusLine, "a malformed request line"),
    (InvalidURLError, "a malformed request target"),
    (InvalidHeader, "a malformed header"),
    (TransferEncodingError, "a malformed chunked body"),
    (ContentLengthError, "a body shorter than its Content-Length"),
    (DecompressSizeError, "a body that decompresses past the size limit"),
    (ContentEncodingError, "a body that does not decode as its Content-Encoding says"),
    (PayloadEncodingError, "a malformed body"),
)
# aiohttp's C parser raises a plain BadHttpMessage for several faults; its message starts with
# llhttp's fixed description, then ":\n\n" and the client's bytes. Words in that description
# (never the bytes after it) pick the reason.
_LLHTTP_SEPARATOR = ":\n\n"
_LLHTTP_WORDS: tuple[tuple[str, str], ...] = (
    ("chunk", "a malformed chunked body"),
    ("Content-Length", "a malformed Content-Length"),
    ("Transfer-Encoding", "a malformed Transfer-Encoding"),
    ("header", "a malformed header"),
)
# aiohttp's fixed message for a TLS handshake sent to a plain-HTTP port.
_TLS_ON_HTTP = "Received HTTPS traffic on an HTTP port"


def bad_request_reason(err: BaseException | None) -> str | None:
    """What is wrong with the client's request, in words of ours, when `err` is aiohttp's
    failure to parse it (None for any other exception)."""
    if isinstance(err, RequestPayloadError):  # a body's failure, as the handler reads it
        err = err.__cause__
    if not isinstance(err, BadHttpMessage):
        return None
    if isinstance(err, BadHttpMethod) and err.message == _TLS_ON_HTTP:
        return "TLS (an https:// client) on this plain-HTTP port"
    if isinstance(err, LineTooLong):
        limit = err.args[1] if len(err.args) > 1 else None
        if isinstance(limit, int):
            return f"a request or header line over {limit} bytes"
        return "an over-long request or header line"
    for kind, reason in _REASONS:
        if isinstance(err, kind):
            return reason
    if _LLHTTP_SEPARATOR in err.message:
        description = err.message.split(_LLHTTP_SEPARATOR, 1)[0]
        for word, reason in _LLHTTP_WORDS:
            if word in description:
                return reason
    return "a malformed message"


# Set on a failure logged already (read_json's), for aiohttp raises it again as it reads what
# is left of the body after the answer: that record is dropped, not a second line.
_LOGGED = "mint_bad_request_logged"


def log_bad_request(logger: logging.Logger, remote: str | None, err: BaseException) -> str | None:
    """Log `err` as BAD_REQUEST from `remote` and return its reason, if it is a malformed
    request's failure (None, nothing logged, for any other)."""
    reason = bad_request_reason(err)
    if reason is not None:
        logger.warning(BAD_REQUEST, client_address(remote), reason)
        setattr(err, _LOGGED, True)
    return reason


def _logged_already(err: BaseException | None) -> bool:
    """Whether log_bad_request logged `err`, or the failure it wraps: aiohttp's pure-Python
    parser fails a body's pending read with its TransferEncodingError, and later reads with a
    RequestPayloadError caused by it."""
    return any(getattr(e, _LOGGED, False) for e in (err, getattr(err, "__cause__", None)))


def client_address(candidate: object) -> str:
    """`candidate` if it is an IP address, else "-": a log line names no other text for it."""
    if isinstance(candidate, str):
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            pass
    return "-"


class BadRequestFilter(logging.Filter):
    """For aiohttp's server log: a record of a request it could not parse becomes one
    BAD_REQUEST warning line without traceback (debug stays debug: aiohttp's level for non-HTTP
    traffic on a first request), held back as `repeats` holds back repeats; other records pass
    as they are.

    aiohttp logged each such request as an error with its traceback and the client's bytes:
    one client could fill the log, and write into it.
    """

    def __init__(self, repeats: RepeatFilter) -> None:
        super().__init__()
        self.repeats = repeats

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a malformed request's record; False for a repeat held back."""
        err = record.exc_info[1] if record.exc_info else None
        reason = bad_request_reason(err)
        if reason is None:
            return True
        if _logged_already(err):
            return False
        # aiohttp's "Error handling request from %s" has the client's address as its one
        # argument; its other records with such an exception name none.
        args = record.args if isinstance(record.args, tuple) else ()
        record.msg = BAD_REQUEST
        record.args = (client_address(args[0] if len(args) == 1 else None), reason)
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = (
                logging.WARNING,
                logging.getLevelName(logging.WARNING),
            )
            # The logger let the error through: a warning must pass its level as well
            # (MINT_LOG_LEVEL=ERROR).
            if not logging.getLogger(record.name).isEnabledFor(logging.WARNING):
                return False
        return self.repeats.filter(record)


class _BodyFailingParser:
    """A connection's HTTP parser, passed through, except that a parse failure while `body` is
    still arriving fails the reads of `body` (a RequestPayloadError caused by it), as aiohttp's
    pure-Python parser fails them.

    aiohttp's C parser (llhttp) raises such a failure out of feed_data and forgets the body: the
    protocol queues it as an error answer for after the running handler, whose read of the body
    waited for bytes that would never come until the body timeout (a 408), and nothing was
    logged.
    """

    def __init__(self, parser: Any, body: StreamReader) -> None:
        self.parser = parser
        self.body = body

    def feed_data(self, data: bytes) -> Any:
        """The parser's feed_data; its failure is the body's too, while the body is unfinished."""
        try:
            return self.parser.feed_data(data)
        except HttpProcessingError as err:
            if not self.body.is_eof() and self.body.exception() is None:
                failure = RequestPayloadError("the request body is malformed")
                failure.__cause__ = err
                self.body.set_exception(failure)
            # The protocol's own handling as well: the error answer it queues is never sent,
            # for a connection whose body failed closes after the handler's answer.
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)


# The protocol's parser: an attribute aiohttp does not publish.
_PARSER = "_parser"


@contextlib.contextmanager
def body_parse_failures(request: web.BaseRequest) -> Iterator[None]:
    """Within it, a rest of `request`'s body that is not well-formed (a bad chunk size) fails
    the body's reads at once, with either of aiohttp's HTTP parsers."""
    protocol = request.protocol
    parser = getattr(protocol, _PARSER, None)
    if parser is None or request.content.is_eof():  # no parser: the reads wait as aiohttp's do
        yield
        return
    stand_in = _BodyFailingParser(parser, request.content)
    setattr(protocol, _PARSER, stand_in)
    try:
        yield
    finally:
        # None instead once the connection is gone: it stays so.
        if getattr(protocol, _PARSER, None) is stand_in:
            setattr(protocol, _PARSER, parser)
