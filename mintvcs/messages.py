"""Commit and tag messages as git cleans and checks them (strbuf_stripspace)."""

from __future__ import annotations

from mintvcs.errors import MintError

# git's isspace (its own ctype table, not the C library's): no \v, \f, NBSP or other Unicode
# space, which git keeps in a message as any other character.
GIT_SPACE = " \t\n\r"


class BadMessageError(MintError):
    """A message git could not store as given: a NUL byte, or text that is not UTF-8."""


def clean_message(message: str, comment: str | None = None) -> str:
    """`message` as git's strbuf_stripspace leaves it: lines split on "\\n" only, git's
    whitespace off the end of each, blank lines at either end dropped and runs of them made
    one, a final newline ("" if nothing is left); with `comment`, lines starting with it are
    dropped first (git tag's default cleanup)."""
    kept: list[str] = []
    blank = False
    for line in message.split("\n"):
        if comment and line.startswith(comment):
            continue  # a dropped comment line is not a blank one
        line = line.rstrip(GIT_SPACE)
        if not line:
            blank = True
            continue
        if blank and kept:
            kept.append("")
        blank = False
        kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


def join_paragraphs(parts: tuple[str, ...] | list[str]) -> str:
    """Several `-m` values as git joins them: each its own paragraph."""
    return "\n\n".join(parts)


def check_message(message: str, what: str) -> None:
    """Refuse a message holding NUL (git refuses it) or what does not encode as UTF-8 (bytes
    that are not UTF-8, which argv passes on as surrogate escapes, or a lone surrogate)."""
    if "\0" in message:
        raise BadMessageError(f"a NUL byte in the {what} message is not allowed (nor in git)")
    try:
        message.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(message[err.start])
        where = message[max(0, err.start - 20) : err.start].rsplit("\n", 1)[-1]
        after = f" after {where!a}" if where else " at its start"
        if 0xDC80 <= char <= 0xDCFF:  # how Python passes on a byte of argv that is not UTF-8
            bad = f"the byte 0x{char - 0xDC00:02x}{after} is not UTF-8"
        else:
            bad = f"it holds a lone surrogate, U+{char:04X}{after}, which UTF-8 cannot encode"
        raise BadMessageError(
            f"the {what} message is not valid UTF-8 text: {bad}; give the message in UTF-8"
        ) from None


def decode_message(raw: bytes, what: str) -> str:
    """A message read back as bytes (the commit-msg hook's file): strict UTF-8, NUL refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = raw[max(0, err.start - 20) : err.start].rsplit(b"\n", 1)[-1]
        after = f" after {where.decode('utf-8', 'replace')!a}" if where else " at its start"
        raise BadMessageError(
            f"the {what} is not valid UTF-8 text: the byte 0x{raw[err.start]:02x}{after} is "
            "not UTF-8"
        ) from None
    if "\0" in text:
        raise BadMessageError(f"a NUL byte in the {what} is not allowed (nor in git)")
    return text
