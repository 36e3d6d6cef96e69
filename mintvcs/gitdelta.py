"""Git's delta format (what an OFS_DELTA entry holds), made in one pass over its two objects.

gc deltifies a revision's manifest and `tensors` tree against its child's: records (manifest
lines, tree entries) that a revision changes are new, the rest are the same bytes, often at
other offsets. So the base is indexed by its records (split at each newline and NUL: a tree
entry's id then goes with the next entry's name), each of the target's records is looked up
whole, and each one found (and the two objects' starts) is extended forward and backward as
far as the bytes match into one copy; what no copy covers is inserted. Time and memory are
linear in the two sizes: the extending compares slices (of doubling, then halving length).

The format (git's `patch-delta.c`, dulwich's `apply_delta`): the base's and the result's
sizes as varints, then ops: a copy (bit 7 set; bits 0-3 say which of four little-endian offset
bytes follow, bits 4-6 which of three size bytes; size 0 means 0x10000) or an insert (1-127:
that many literal bytes follow).
"""

from __future__ import annotations

from collections.abc import Iterator

# Records shorter than this are not looked up (`]`, an empty line): they would match anywhere.
# Copies extend over them from the records around them.
_ANCHOR = 16
_COPY_MAX = 0x10000  # what git's own encoder writes at most per copy op
_INSERT_MAX = 0x7F
# The largest slice compared at once while extending a match (each compare copies its slices).
_STEP_MAX = 1 << 16


def create(base: bytes, target: bytes, limit: int = 1 << 62) -> bytes | None:
    """A delta that rebuilds `target` from `base`; None, given up early, where it would be over
    `limit` bytes."""
    if len(base) >> 32:
        return None  # a copy's offset has four bytes
    index: dict[bytes, int] = {}
    offset = 0
    for record in _records(base):
        if len(record) >= _ANCHOR:
            index.setdefault(record, offset)
        offset += len(record) + 1
    out = bytearray(_varint(len(base)) + _varint(len(target)))
    done = 0  # how much of `target` the ops so far rebuild

    def insert(stop: int) -> None:
        for start in range(done, stop, _INSERT_MAX):
            piece = target[start : min(start + _INSERT_MAX, stop)]
            out.append(len(piece))
            out.extend(piece)

    def copy(start: int, size: int) -> None:
        while size:
            piece = min(size, _COPY_MAX)
            op, args = 0x80, bytearray()
            for i in range(4):
                if byte := start >> 8 * i & 0xFF:
                    op |= 1 << i
                    args.append(byte)
            for i in range(3 if piece < _COPY_MAX else 0):
                if byte := piece >> 8 * i & 0xFF:
                    op |= 0x10 << i
                    args.append(byte)
            out.append(op)
            out.extend(args)
            start += piece
            size -= piece

    def anchors() -> Iterator[tuple[int, int]]:
        """Where `target` and `base` may match (offsets in each): at their starts (a changed
        first line), then at each record of `target`'s that `base` has."""
        yield 0, 0
        at = 0
        for record in _records(target):
            here, at = at, at + len(record) + 1
            if len(record) >= _ANCHOR and (there := index.get(record)) is not None:
                yield here, there

    for here, there in anchors():
        if here < done:
            continue  # inside the last copy already
        back = _matching(target, here, base, there, min(here - done, there), backward=True)
        ahead = _matching(target, here, base, there, min(len(target) - here, len(base) - there))
        if len(out) + here - back - done > limit:
            return None
        insert(here - back)
        copy(there - back, back + ahead)
        done = here + ahead
    if len(out) + len(target) - done > limit:
        return None
    insert(len(target))
    return None if len(out) > limit else bytes(out)


def _records(data: bytes) -> list[bytes]:
    """`data` split at each newline and NUL (each record is followed by one, the last aside)."""
    return data.replace(b"\0", b"\n").split(b"\n")


def _matching(
    target: bytes, here: int, base: bytes, there: int, limit: int, backward: bool = False
) -> int:
    """How many bytes from `here` in `target` on match those from `there` in `base` (before
    them, `backward`), at most `limit`: slices compared in steps that double while they match
    and halve when not, so a long match costs a few memcmp-speed compares."""
    n, step = 0, 64
    while n < limit:
        step = min(step, limit - n)
        if backward:
            same = target[here - n - step : here - n] == base[there - n - step : there - n]
        else:
            same = target[here + n : here + n + step] == base[there + n : there + n + step]
        if same:
            n += step
            step = min(2 * step, _STEP_MAX)
        elif step == 1:
            break
        else:
            step //= 2
    return n


def _varint(value: int) -> bytes:
    """A size as a delta's header holds it: 7 bits a byte, low first, bit 7 on all but the last."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
