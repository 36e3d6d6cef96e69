"""Ids as text: a git object id is 40 lowercase hex digits, a tensor's sha256 is 64."""

from __future__ import annotations

import hashlib
import re

_OBJECT_ID = re.compile(r"[0-9a-f]{40}\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def is_object_id(value: object) -> bool:
    """True for a full git object id in the form git writes it (lowercase hex)."""
    return type(value) is str and _OBJECT_ID.match(value) is not None


def is_sha256(value: object) -> bool:
    """True for a sha256 digest as a manifest and a blob header write it (lowercase hex)."""
    return type(value) is str and _SHA256.match(value) is not None


def blob_id(content: bytes | memoryview) -> str:
    """The git blob id of `content` (what `git hash-object` prints)."""
    # Hashed in place: a large extra file (an optimizer state) is a map, not copied into a Blob.
    digest = hashlib.sha1(b"blob %d\0" % memoryview(content).nbytes)
    digest.update(content)
    return digest.hexdigest()


def shared_hex_digits(a: bytes, b: bytes) -> int:
    """How many leading hex digits two raw ids of one length have in common."""
    differ = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return (len(a) * 8 - differ.bit_length()) // 4
