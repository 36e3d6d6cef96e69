"""Dates as they stand in git objects: reading an author, committer or tagger line the way git's
readers do (lenient for log and ordering, strict for fsck)."""

from __future__ import annotations

import re

_INT_MAX = 2**31 - 1
_UINTMAX = 2**64 - 1
# What follows the last `>` of an identity, as git log reads it: blanks (never \v or \f),
# digits, blanks, a sign and the zone's digits as far as they go; anything after is ignored.
_SHOWN_DATE = re.compile(rb"[ \t\n\r]*(?P<seconds>[0-9]+)[ \t\n\r]*(?P<sign>[+-])(?P<zone>[0-9]+)")


def ident_date(value: bytes) -> tuple[int, int]:
    """(seconds, zone) that git log shows for an identity line's value (what follows `author `).

    The zone is git's decimal number (`+0100` is 100, `+0060` is 60, `+1a00` is 1). A line with
    no `<...>`, no date or no zone reads as (0, 0), the epoch: git lists such a commit all the
    same. Seconds past 2^63 - 1 are kept (mintvcs shows them as @N: docs/cli.md).
    """
    if not re.search(rb"<[^>]*>", value):
        return 0, 0
    found = _SHOWN_DATE.match(value, value.rfind(b">") + 1)
    if found is None:
        return 0, 0
    zone = int(found["zone"]) * (-1 if found["sign"] == b"-" else 1)
    if not -_INT_MAX - 1 < zone < _INT_MAX:
        zone = 0  # git keeps the zone in an int; a wider one reads as +0000
    return min(int(found["seconds"]), _UINTMAX), zone


def zone_seconds(zone: int) -> int:
    """Seconds east of UTC of git's decimal zone (`+0130`, 130: 5400), minutes past 59 carried."""
    hours, minutes = divmod(abs(zone), 100)
    return (hours * 3600 + minutes * 60) * (-1 if zone < 0 else 1)


def zone_text(zone: int) -> str:
    """git's decimal zone as git log prints it: `+0060` and `+9999` as they are."""
    return f"{zone:+05d}"


# The header git reads a commit's ordering date from: the tree line, any parent lines, an
# author line, then a committer line, whose date is read from its first `>` on; a line must
# follow it (the message's blank line at least).
_ORDERING_HEADER = re.compile(
    rb"tree [^\n]{40}\n(?:parent [^\n]{40}\n)*author[^\n]*\ncommitter[^>\n]*>(?=[^\n]*\n.)",
    re.DOTALL,
)
# A number as C's strtoumax reads it: C's blanks (newlines too), a sign, digits.
_LEADING_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]*)")


def commit_date(body: bytes) -> int:
    """The committer date git orders commits by, from a commit's raw text: the committer line
    read as an unsigned number after its `>`, so `-1` is 2^64 - 1 (the newest) and `1_700` is
    1; 0 where the header is not tree, parents, author, committer."""
    header = _ORDERING_HEADER.match(body)
    if header is None:
        return 0
    return _unsigned_number(body, header.end())[0]


def _unsigned_number(body: bytes, i: int) -> tuple[int, int]:
    """(value, end) of the number at `i` read as strtoumax reads it: blanks and a sign taken, a
    negative number wrapped modulo 2^64, an overflow saturated; no digit: (0, i)."""
    number = _LEADING_NUMBER.match(body, i)
    assert number is not None  # every part of the pattern may be empty
    sign, digits = number.groups()
    if not digits:
        return 0, i
    value = int(digits)
    if value > _UINTMAX:
        return _UINTMAX, number.end()
    return (-value % 2**64 if sign == b"-" else value), number.end()


_LONG_MAX = 2**63 - 1
# An identity line split at its first `<` or `>` and at the next one after it: the name, that
# bracket, the email, the next bracket, the rest of the line and its newline.
_IDENT_LINE = re.compile(
    rb"(?P<name>[^<>\n]*)(?P<open>[<>]?)(?P<email>[^<>\n]*)(?P<close>[<>]?)"
    rb"(?P<rest>[^\n]*\n?)"
)
# What git fsck takes after the email: one space, digits, one space, a sign and four digits.
_FSCK_ZONE = re.compile(rb"[+-][0-9]{4}\n")


def ident_problem(body: bytes, start: int) -> str | None:
    """What git fsck says of the identity at `start` (just past `author `, `committer ` or
    `tagger `), as `msgId: message`, or None for a well-formed `name <email> seconds +HHMM`."""
    line = _IDENT_LINE.match(body, start)
    assert line is not None  # every part of the pattern may be empty
    what = "invalid author/committer line - "
    if line["open"] == b"<" and not line["name"]:
        return f"missingNameBeforeEmail: {what}missing space before email"
    if line["open"] == b">":
        return f"badName: {what}bad name"
    if line["open"] != b"<":
        return f"missingEmail: {what}missing email"
    if not line["name"].endswith(b" "):
        return f"missingSpaceBeforeEmail: {what}missing space before email"
    if line["close"] != b">":
        return f"badEmail: {what}bad email"
    date = line.start("rest") + 1  # past the space that must follow the email
    if body[date - 1 : date] != b" ":
        return f"missingSpaceBeforeDate: {what}missing space before date"
    if body[date : date + 1] == b"0" and body[date + 1 : date + 2] != b" ":
        return f"zeroPaddedDate: {what}zero-padded date"
    seconds, end = _unsigned_number(body, date)
    if seconds > _LONG_MAX:  # no signed 64-bit time holds it
        return f"badDateOverflow: {what}date causes integer overflow"
    if end == date or body[end : end + 1] != b" ":
        return f"badDate: {what}bad date"
    if not _FSCK_ZONE.fullmatch(body, end + 1, end + 7):
        return f"badTimezone: {what}bad time zone"
    return None
