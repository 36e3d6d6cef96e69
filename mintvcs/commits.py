"""A commit's text read as git writes it, without building an object: what history walks
(log, `~N`, ranges, merge bases) read of each commit, ~10x cheaper than dulwich's parse.

Only the common form is read here: a tree line, parent lines, one author and one committer
line, each `name <email> seconds +hhmm`, then other headers (an encoding, a signature) and the
message after the first blank line. Anything else (a damaged or odd line, a mergetag) is left
to the store's full parse, which says what it makes of it; both read a commit of this form
alike (tests compare them).
"""

from __future__ import annotations

import re
from typing import NamedTuple

_UINTMAX = 2**64 - 1

# tree, parents, author's person/seconds/zone, committer's; an identity holds one `<...>`.
_PLAIN_HEAD = re.compile(
    rb"tree ([0-9a-f]{40})\n"
    rb"((?:parent [0-9a-f]{40}\n)*)"
    rb"author ([^<>\n]*<[^<>\n]*>) ([0-9]+) ([+-][0-9]{4})\n"
    rb"committer ([^<>\n]*<[^<>\n]*>) ([0-9]+) ([+-][0-9]{4})\n"
)


class PlainCommit(NamedTuple):
    """The parts of a commit a walk and log use, undecoded (the store decodes them)."""

    tree: str
    parents: tuple[str, ...]
    author: bytes  # `name <email>`
    author_time: int
    author_zone: int  # git's decimal zone: +0100 is 100
    committer: bytes
    commit_time: int
    commit_zone: int
    encoding: bytes | None
    message: bytes


def parse_plain(body: bytes) -> PlainCommit | None:
    """The parts of commit text `body` where it has the common form (see the module's
    docstring); None for anything else."""
    head = _PLAIN_HEAD.match(body)
    if head is None:
        return None
    at = head.end()
    if body.startswith(b"\n", at):
        end = at - 1  # no other header: the blank line follows the committer's
    else:
        end = body.find(b"\n\n", at - 1)
        if end < 0:
            return None  # no message at all: left to the full parse
    encoding: bytes | None = None
    if end >= at:
        extra = body[at:end].split(b"\n")
        if extra[0].startswith(b" "):
            return None  # a continuation of the committer line
        for n, line in enumerate(extra):
            if line.startswith(b" "):
                continue  # a signature's or another header's next line
            key, space, value = line.partition(b" ")
            if not space or key == b"mergetag":
                return None  # a line that is no header; a tag to parse: the full parse
            if key == b"encoding" and encoding is None:
                if n + 1 < len(extra) and extra[n + 1].startswith(b" "):
                    return None  # an encoding on several lines
                encoding = value
    tree, parents, author, a_time, a_zone, committer, c_time, c_zone = head.groups()
    if len(parents) == 48:  # most commits: one parent, without a generator's cost
        ids: tuple[str, ...] = (parents[7:47].decode(),)
    else:
        ids = tuple(parents[n + 7 : n + 47].decode() for n in range(0, len(parents), 48))
    # By position: a walk parses each commit, and keywords cost ~1 us more.
    return PlainCommit(
        tree.decode(),
        ids,
        author,
        min(int(a_time), _UINTMAX),
        int(a_zone),
        committer,
        min(int(c_time), _UINTMAX),
        int(c_zone),
        encoding,
        body[end + 2 :],
    )
