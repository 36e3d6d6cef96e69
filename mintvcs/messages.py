"""Commit and tag messages as git cleans, checks and shows them (strbuf_stripspace, format_subject)."""

from __future__ import annotations

import codecs
import re

from mintvcs.errors import MintError

# git's isspace (its own ctype table, not the C library's): no \v, \f, NBSP or other Unicode
# space, which git keeps in a message as any other character.
GIT_SPACE = " \t\n\r"

# Python text codecs that are not character sets (git's iconv knows none of them): a commit's
# `encoding` header naming one is ignored, as git ignores an encoding iconv lacks.
_NOT_CHARSETS = frozenset({"unicode_escape", "raw_unicode_escape", "idna", "punycode", "undefined"})


class BadMessageError(MintError):
    """A message git could not store as given: a NUL byte, or text that is not UTF-8."""


def clean_message(message: str, comment: bytes | None = None) -> str:
    """`message` as git's strbuf_stripspace leaves it: lines split on "\\n" only, git's
    whitespace off the end of each, blank lines at either end dropped and runs of them made
    one, a final newline ("" if nothing is left); with `comment` (one byte), lines whose UTF-8
    starts with it are dropped first (git tag's default cleanup)."""
    kept: list[str] = []
    blank = False
    for line in message.split("\n"):
        # git compares bytes: a byte that is not ASCII begins the lines of the characters
        # it leads in UTF-8 (0xe9: U+9000 to U+9FFF).
        if comment and line.encode("utf-8", "surrogatepass")[:1] == comment:
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


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_in(value: object) -> str | None:
    """The first key or string of a parsed JSON value that holds a lone surrogate (JSON can
    spell one, `"\\ud800"`; no UTF-8 text holds it, and strict JSON readers refuse it), else
    None."""
    if isinstance(value, str):
        return value if _LONE_SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate_in(key) or lone_surrogate_in(item)
            if found is not None:
                return found
    elif isinstance(value, list):
        for item in value:
            found = lone_surrogate_in(item)
            if found is not None:
                return found
    return None


def without_lone_surrogates(value: object) -> object:
    """A parsed JSON value with each lone surrogate in its keys and strings made U+FFFD, as
    lenient JSON readers read them: what strict JSON output can hold."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {
            without_lone_surrogates(key): without_lone_surrogates(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [without_lone_surrogates(item) for item in value]
    return value


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


def decode_commit_texts(parts: list[bytes], encoding: bytes | None) -> list[str]:
    """A commit's texts (identities, message) in the character set its `encoding` header
    names (UTF-8 without one), as git log re-encodes the commit: all of them, or, where one
    does not decode or Python does not know the encoding, none (read as UTF-8, bytes that are
    not UTF-8 as U+FFFD), as git then shows the commit's bytes as they are."""
    if encoding:
        try:
            info = codecs.lookup(encoding.decode("ascii").strip())
        except (UnicodeDecodeError, LookupError):
            pass
        else:
            if info._is_text_encoding and info.name.replace("-", "_") not in _NOT_CHARSETS:
                try:
                    return [part.decode(info.name) for part in parts]
                except (UnicodeDecodeError, LookupError, ValueError, TypeError):
                    pass  # not in that encoding after all (or a codec failing on its own)
    return [part.decode("utf-8", "replace") for part in parts]


def _lines(message: str) -> list[str]:
    """The message's lines as git's pretty-printer reads them: split on "\\n" only, git's
    whitespace off each line's end."""
    return [line.rstrip(GIT_SPACE) for line in message.split("\n")]


def subject(message: str) -> str:
    """The one-line subject git shows (`%s`, `log --oneline`): the first paragraph after any
    leading blank lines, its lines joined by a space, each with its trailing whitespace off."""
    line, _nl, rest = message.partition("\n")
    line = line.rstrip(GIT_SPACE)
    if line and not rest.partition("\n")[0].rstrip(GIT_SPACE):
        return line  # most messages: a first line, then a blank one (or nothing); no split
    first: list[str] = []
    for line in _lines(message):
        if line:
            first.append(line)
        elif first:
            break
    return " ".join(first)


def body_lines(message: str) -> list[str]:
    """The lines `git log` prints for a message: leading and trailing blank lines left out,
    trailing whitespace off each line (blank lines inside kept, each of them)."""
    lines = _lines(message)
    start = next((i for i, line in enumerate(lines) if line), len(lines))
    end = len(lines)
    while end > start and not lines[end - 1]:
        end -= 1
    return lines[start:end]


# Control characters (C0 but tab, DEL, C1), the line and paragraph separators (lines to
# Python's splitlines()) and bidi overrides and isolates: what would break a line in two,
# drive the terminal or reorder what it shows.
_UNSAFE = "\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE_IN_A_LINE = re.compile(f"[{_UNSAFE}]")
_CONTROL = re.compile(f"[{_UNSAFE}\ud800-\udfff]")  # and lone surrogates


def _escaped(match: re.Match[str]) -> str:
    """The characters matched, as Python escapes them (`\\x1b`, `\\u202e`)."""
    return match.group().encode("unicode_escape").decode("ascii")


# Looked up now, not at the first escape: finding a codec imports its module, which takes a
# file descriptor, and a server at its limit on them escapes each line it logs (serve.app's
# formatter), which failed into a "--- Logging error ---" traceback per line.
codecs.lookup("unicode_escape")


def printable(text: str) -> str:
    """`text` with each control character (C0 but tab, DEL, C1), bidi override or isolate, and
    lone surrogate escaped (`\\x1b`, `\\u202e`): a revision's text must not drive the terminal
    or reorder what it shows. Everything else (NBSP, joiners, accents) prints as it is."""
    if text.isprintable():  # what it escapes is all of Unicode's Cc, Cf or Cs: none here
        return text
    return _CONTROL.sub(_escaped, text)


# quote_c_style's escapes (git's quote.c); every other byte it quotes is written in octal.
_C_ESCAPES = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r"}
_C_ESCAPES |= {0x22: '\\"', 0x5C: "\\\\"}


def quote_path(path: str, *, non_ascii: bool = False) -> str:
    """`path` as git prints a file name (quote_c_style): as it is when it needs no escape,
    else in double quotes, `\\n`, `\\t`, `\\"`, `\\\\` and the like escaped, and in octal every
    other control character and the non-ASCII ones of _QUOTED_NON_ASCII (C1, bidi overrides:
    git prints them raw, but a name must neither drive the terminal nor reorder the line).
    `non_ascii` (git's core.quotePath, on in git by default) puts every byte of a character
    that is not ASCII in octal too (`"caf\\303\\251.md"`), so that two spellings of one name
    (NFC, NFD) look different; error lines name paths without it, as git's do."""
    quoted = _c_escaped(path, non_ascii)
    return path if quoted == path else f'"{quoted}"'


def _c_escaped(text: str, non_ascii: bool) -> str:
    """`text` with what quote_path escapes escaped, without the quotes around it."""
    out = []
    for char in text:
        if char.isascii():
            plain = char.isprintable() and char not in '"\\'
        else:  # as git, but for what must not reach the terminal raw (_QUOTED_NON_ASCII)
            plain = not non_ascii and not _QUOTED_NON_ASCII.match(char)
        out.append(char if plain else _octal(char))
    return "".join(out)


def quote_meta(text: str, *, key: bool = False) -> str:
    """A revision's metadata key or value as `show` prints it on its `meta KEY: VALUE` line: as
    it is when it reads back one way only, else C-quoted as quote_path quotes a name with
    core.quotePath off (`"two\\nlines"`, `"a\\\\nb"`, `"\\033[2J"`; accents and emoji plain).
    Quoted are: what quote_path escapes (a backslash, a double quote, control characters, line
    separators, bidi overrides), leading or trailing whitespace, the empty string, and in a
    key ": ", which would read as the end of the key."""
    quoted = _c_escaped(text, non_ascii=False)
    if quoted == text and text and text == text.strip() and not (key and ": " in text):
        return text
    return f'"{quoted}"'


# unquote_c_style's escapes: the named ones of _C_ESCAPES, read back.
_C_UNESCAPES = {ord(text[1]): byte for byte, text in _C_ESCAPES.items()}


def unquote_c_style(text: str) -> str | None:
    """A name as git wrote it in double quotes (quote_c_style: `"sp\\040ace"`, `"a\\"b"`), read
    back; None where `text` does not start with a quote or its quoting is broken (no closing
    quote, an unknown escape), as git's unquote_c_style refuses it. What follows the closing
    quote is ignored."""
    data = text.encode("utf-8", "surrogateescape")
    if not data.startswith(b'"'):
        return None
    out = bytearray()
    at = 1
    while at < len(data):
        byte = data[at]
        at += 1
        if byte == 0x22:
            return out.decode("utf-8", "surrogateescape")  # a byte that is not UTF-8 kept as one
        if byte != 0x5C:
            out.append(byte)
            continue
        escape = data[at : at + 1]
        if not escape:
            return None
        if escape[0] in _C_UNESCAPES:
            out.append(_C_UNESCAPES[escape[0]])
            at += 1
        elif re.fullmatch(rb"[0-3][0-7][0-7]", data[at : at + 3]):
            out.append(int(data[at : at + 3], 8))
            at += 3
        else:
            return None
    return None


# Quoted whatever core.quotePath says: C1 controls (NEL, the 8-bit CSI), the line and paragraph
# separators, bidi embeddings, overrides and isolates (they reorder the line), and the lone
# surrogates that stand for the bytes of a name that is not UTF-8.
_QUOTED_NON_ASCII = re.compile("[\x80-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _octal(char: str) -> str:
    """One character's bytes C-escaped: `\\n` and the like where C has a name, else octal."""
    try:
        raw = char.encode("utf-8", "surrogateescape")  # a byte of a name that is not UTF-8
    except UnicodeEncodeError:
        raw = char.encode("utf-8", "surrogatepass")
    return "".join(_C_ESCAPES.get(byte, f"\\{byte:03o}") for byte in raw)


def one_line(text: str) -> str:
    """`text` with each control character (C0 but tab, DEL, C1) and bidi override or isolate
    escaped, as printable() does, but for lone surrogates (the bytes of a name that is not
    UTF-8, which print as they are): an error line stays one line and cannot drive the
    terminal, whatever value it names."""
    return _UNSAFE_IN_A_LINE.sub(_escaped, text)
