"""The bytes of a safetensors file: its verbatim header and each tensor's byte range."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass

from mintvcs.errors import MintError
from mintvcs.treenames import git_special_name

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CorruptSafetensorsError(MintError):
    """A safetensors file that cannot be parsed or whose sizes do not add up."""


class BadTensorNameError(MintError):
    """A tensor name that cannot be stored as a path component."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a safetensors file; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data."""
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsLayout:
    """A parsed safetensors file: the exact header prefix and its tensors in file order."""

    header: bytes  # the 8-byte length and the JSON header, verbatim (padding included)
    metadata: dict[str, str]
    tensors: tuple[TensorEntry, ...]

    @property
    def data_size(self) -> int:
        """Length of the data section."""
        return max((t.end for t in self.tensors), default=0)


_CONTROL = re.compile(r"[\x00-\x1f]")  # one regex scan, not a Python loop per character
_UNSTORABLE = re.compile(r"[\x00-\x1f/\\]")  # what the checks below refuse in one scan


def check_tensor_name(name: str) -> None:
    """Refuse tensor names that would escape or break a tree path."""
    if (
        type(name) is str
        and name.isascii()  # encodes as UTF-8
        and not _UNSTORABLE.search(name)
        and name not in ("", ".", "..")
        and git_special_name(name) is None
    ):
        return  # every name of a real adapter: a revision's read checks 37k of them
    if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        raise BadTensorNameError(
            f"tensor name {name!r} cannot be stored: names must be non-empty and hold no '/', '\\' or NUL"
        )
    if _CONTROL.search(name):
        raise BadTensorNameError(
            f"tensor name {name!r} cannot be stored: it holds a control character"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON can spell and no file name holds
        raise BadTensorNameError(
            f"tensor name {name!a} cannot be stored: it is not valid Unicode (a lone surrogate)"
        ) from None
    reason = git_special_name(name)
    if reason is not None:
        raise BadTensorNameError(f"tensor name {name!r} cannot be stored: {reason}")


def parse_layout(data: bytes | memoryview, source: str) -> SafetensorsLayout:
    """Parse and validate a whole safetensors file held in memory."""
    view = memoryview(data)
    if len(view) < 8:
        raise CorruptSafetensorsError(f"{source}: truncated safetensors file ({len(view)} bytes)")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(view):
        raise CorruptSafetensorsError(
            f"{source}: header length {header_len} does not fit the file of {len(view)} bytes (truncated?)"
        )
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptSafetensorsError(f"{source}: header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CorruptSafetensorsError(f"{source}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptSafetensorsError(f"{source}: __metadata__ must map strings to strings")
    entries = [_entry(name, info, source) for name, info in header.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    position = 0
    for entry in entries:
        if entry.start != position:
            raise CorruptSafetensorsError(
                f"{source}: tensor {entry.name!r} starts at {entry.start}, expected {position} (overlap or gap)"
            )
        position = entry.end
    held = len(view) - 8 - header_len
    if held != position:
        hint = "truncated?" if held < position else "trailing bytes after the last tensor"
        raise CorruptSafetensorsError(
            f"{source}: data section holds {held} bytes, the header describes {position} ({hint})"
        )
    return SafetensorsLayout(bytes(view[: 8 + header_len]), dict(metadata), tuple(entries))


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (`true` is an int to Python, not to safetensors)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, info: object, source: str) -> TensorEntry:
    """Validate one header entry."""
    check_tensor_name(name)
    if not isinstance(info, dict):
        raise CorruptSafetensorsError(f"{source}: entry for {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CorruptSafetensorsError(
            f"{source}: tensor {name!r} has dtype {dtype!r}, which mintvcs does not store; "
            f"it stores {', '.join(DTYPE_SIZES)}"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CorruptSafetensorsError(f"{source}: tensor {name!r} has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CorruptSafetensorsError(
            f"{source}: tensor {name!r} has invalid data_offsets {offsets!r}"
        )
    count = 1
    for dim in shape:
        count *= dim
    if count * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
        raise CorruptSafetensorsError(
            f"{source}: tensor {name!r} ({dtype} {shape}) needs {count * DTYPE_SIZES[dtype]} bytes, "
            f"the header gives {offsets[1] - offsets[0]}"
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
