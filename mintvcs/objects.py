"""The manifest: what one adapter revision holds, stored as JSON beside the tensor blobs."""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from mintvcs.errors import MintError, NewerFormatError
from mintvcs.ids import is_object_id, is_sha256
from mintvcs.safetensors_file import DTYPE_SIZES, check_tensor_name
from mintvcs.treenames import alias_of, git_special_name, repository_dir_name

MANIFEST_FORMAT = "mintvcs-adapter"
MANIFEST_VERSION = 1
# Paths inside a revision's git tree.
CONFIG_PATH = "adapter_config.json"
MANIFEST_PATH = "manifest.json"
HEADER_PATH = "safetensors-header"
TENSORS_DIR = "tensors"
FILES_DIR = "files"


class CorruptManifestError(MintError):
    """A manifest blob that is not the JSON this version writes."""


class NewerManifestError(CorruptManifestError, NewerFormatError):
    """A manifest of a newer version than this mintvcs reads."""


CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
GIT_DIR = ".mint"
# Most components an extra file's path may have, so a revision's tree nests at most this deep
# (`files/`, then a tree per directory). git caps trees at core.maxTreeDepth (thousands); an
# adapter directory is shallow, and this keeps every path a work tree must hold well inside
# PATH_MAX (4096 bytes) and every walk of a tree short.
MAX_PATH_DEPTH = 256
_RECORDS_PER_STEP = 1024  # tensor records made between two progress reports


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of a revision: where it sits in the safetensors file and which blob holds it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    blob: str
    sha256: str
    encoding: str
    depth: int

    def __post_init__(self) -> None:
        # A manifest may come from anyone: every field is checked before a reader sizes a
        # buffer, places bytes or names a tree entry by it. Inline checks for the common,
        # valid case (a checkout of an MoE adapter reads 37k records, twice); the specific
        # reason only on failure.
        start, end, size = self.start, self.end, DTYPE_SIZES.get(self.dtype)
        valid = (
            type(start) is int
            and type(end) is int
            and 0 <= start <= end
            and type(self.depth) is int
            and self.depth >= 0
            and type(self.dtype) is str
            and type(self.encoding) is str
            and is_object_id(self.blob)
            and is_sha256(self.sha256)
        )
        for dim in self.shape:
            if type(dim) is not int or dim < 0:
                valid = False
            elif size is not None:
                size *= dim
        if valid and (size is None or size == end - start):
            check_tensor_name(self.name)
            return
        raise ValueError(f"tensor {self.name!r}: {self._fault()}")

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> TensorRecord:
        """The record a manifest's tensor entry (its JSON object) describes, `shape` as a tuple
        of ints, checked as every record is.

        Positional arguments, not `cls(**entry)`: no merged copy of the entry and no keyword
        matching (37k records a read of a large MoE adapter). Built without __init__ (its
        __dict__ filled in one call) it took ~1.5 us less, but each record then held a dict of
        its own, ~170 bytes more.
        """
        return cls(
            entry["name"],
            entry["dtype"],
            tuple(map(int, entry["shape"])),
            entry["start"],
            entry["end"],
            entry["blob"],
            entry["sha256"],
            entry["encoding"],
            entry["depth"],
        )

    def _fault(self) -> str:
        """What is wrong with a record the fast check refused."""
        if not (_is_int(self.start) and _is_int(self.end) and 0 <= self.start <= self.end):
            return f"offsets {self.start!r}..{self.end!r}"
        if not _is_int(self.depth) or self.depth < 0:
            return f"depth {self.depth!r}"
        if not isinstance(self.dtype, str) or not isinstance(self.encoding, str):
            return "dtype and encoding must be strings"
        if not all(_is_int(d) and d >= 0 for d in self.shape):
            return f"shape {self.shape!r}"
        if not is_object_id(self.blob):
            return f"blob {self.blob!r}"
        if not is_sha256(self.sha256):
            return f"sha256 {self.sha256!r}"
        return f"{self.dtype} {list(self.shape)} does not fill {self.start}..{self.end}"


# The longest file name, in bytes, that the file systems mintvcs runs on hold.
NAME_MAX = 255


def _holds_booleans(entry: dict[str, Any]) -> bool:
    """Whether a header entry's shape or data_offsets holds `true` or `false`."""
    return any(
        type(v) is bool
        for key in ("shape", "data_offsets")
        if type(entry.get(key)) is list
        for v in entry[key]
    )


def _entry_text(entry: object) -> str:
    """A header entry as an error message shows it (`F32 [8, 64] at 0..2048`)."""
    if type(entry) is not dict:
        return json.dumps(entry)[:80]
    dtype, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets"))
    if type(offsets) is list and len(offsets) == 2 and all(type(o) is int for o in offsets):
        where = f"{offsets[0]}..{offsets[1]}"
    else:
        where = json.dumps(offsets)[:80]
    dtype_text = dtype if type(dtype) is str else json.dumps(dtype)
    return f"{dtype_text[:40]} {json.dumps(shape)[:80]} at {where}"


def malformed_path_reason(path: str) -> str | None:
    """Why `path` is no relative path a revision's tree can hold, or None when it is one.

    What every reader of a manifest refuses: no mintvcs ever wrote such a path. The names
    unsafe_path_reason refuses besides are refused where a file would be written (commit,
    checkout), not where a revision is read: earlier releases committed some of them.
    """
    if not path or path.startswith("/"):
        return "it is empty or absolute"
    if not path.isascii():
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # JSON can spell one; a name in a tree is bytes
            return "it holds a lone surrogate, which is no UTF-8 name (mintvcs stores no other)"
    if path.count("/") >= MAX_PATH_DEPTH:
        return f"it has {path.count('/') + 1} components, more than the {MAX_PATH_DEPTH} mintvcs stores"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "it has an empty, '.' or '..' component"
    return None


def unsafe_path_reason(path: str) -> str | None:
    """Why an extra file's path may not be written under a work tree, or None when it may.

    A revision is data that may come from anyone: a path that climbs out of the work tree,
    names the repository itself (.mint/hooks/...: code that would run) or holds bytes a file
    system treats specially must never reach a checkout, as git refuses such tree entries.
    Nor may one that checkout could not write whole: a component no file name holds, or one
    inside the config or weights file, which checkout writes first.
    """
    reason = malformed_path_reason(path)
    if reason is not None:
        return reason
    if "\\" in path:
        return "it holds a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "it holds a control character"
    parts = path.split("/")
    for part in parts:
        reason = git_special_name(part)
        if reason is not None:
            return reason
        if repository_dir_name(part):  # .mint: git stores it, but it would be our repository
            return f"it is inside {part}, a repository's own directory"
        # 63 characters are at most 252 bytes: only a longer one is counted.
        if len(part) > 63 and (size := len(part.encode("utf-8", "surrogatepass"))) > NAME_MAX:
            return f"its component {part[:24]!r}... is {size} bytes; a file name holds {NAME_MAX}"
    if parts[0] in (CONFIG_FILE, WEIGHTS_FILE):
        # Also as a directory (`adapter_config.json/x`): checkout writes that file itself.
        return "it is (or is inside) the adapter's config or weights file, which the revision holds itself"
    if parts[0].isascii() and not parts[0][:5].lower().startswith("adapt"):
        return None  # the usual name: no alias of either
    alias = alias_of(parts[0], (CONFIG_FILE, WEIGHTS_FILE))
    if alias is not None:
        # Written after the file it aliases, it would replace the verified config or weights
        # on macOS or Windows, and status would call that checkout clean.
        return (
            f"macOS and Windows take {parts[0]!r} for {alias}, which the revision holds "
            "itself and checkout writes first"
        )
    return None


@dataclass(frozen=True)
class FileRecord:
    """An extra file of the adapter directory (README, tokenizer, ...)."""

    path: str
    blob: str
    executable: bool = False

    def __post_init__(self) -> None:
        # Only what no tree holds is refused here: a name an earlier mintvcs committed and
        # today's refuses to write (`.gitmodules`, `back\\slash`) leaves its revision readable.
        reason = malformed_path_reason(self.path) if isinstance(self.path, str) else "not a string"
        if reason is not None:
            raise ValueError(f"file path {self.path!r:.200} is unsafe: {reason}")
        if not is_object_id(self.blob):
            raise ValueError(f"file {self.path!r}: blob {self.blob!r}")
        if not isinstance(self.executable, bool):
            raise ValueError(f"file {self.path!r}: executable {self.executable!r}")

    @property
    def unsafe_reason(self) -> str | None:
        """Why checkout may not write this file (unsafe_path_reason), or None when it may."""
        return unsafe_path_reason(self.path)


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild a PEFT directory bit-exact from a revision's tree."""

    base_id: str | None
    base_fingerprint: str | None
    header_blob: str
    tensors: tuple[TensorRecord, ...]
    files: tuple[FileRecord, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)

    def tensor(self, name: str) -> TensorRecord | None:
        """The record of tensor `name`, if the revision has it."""
        for record in self.tensors:
            if record.name == name:
                return record
        return None

    @property
    def nbytes(self) -> int:
        """Decoded size of all tensors."""
        return sum(t.end - t.start for t in self.tensors)

    def header_problem(self, header: bytes | memoryview) -> str | None:
        """How the safetensors header blob `header` disagrees with the tensor records, or None.

        Checkout writes the header verbatim ahead of the tensors placed where the records say,
        and whoever loads the file reads them where the header says: both must name the same
        tensors with the same dtype, shape and data_offsets (its `__metadata__` is free). A
        header that swapped two tensors' offsets would otherwise check out other weights than
        diff, status, fsck and the server read through the manifest.
        """
        if len(header) < 8:
            return f"it is {len(header)} bytes, too short for its length prefix"
        (length,) = struct.unpack_from("<Q", header)
        if length != len(header) - 8:
            return f"its length prefix says {length:,} bytes of JSON, the blob holds {len(header) - 8:,}"
        raw = bytes(header[8:])
        try:
            # A float never equals the manifest's integers: `2.0` in a shape is a difference.
            entries = json.loads(raw, parse_float=str)
        except (ValueError, RecursionError):  # bad UTF-8 or JSON, or nested too deeply
            return "it is not valid JSON"
        if type(entries) is not dict:
            return "it is not a JSON object"
        entries.pop("__metadata__", None)
        # JSON's `true` and `false` equal 1 and 0 in Python: where either appears, each value's
        # type is checked as well (a list comparison alone is ~4x faster for ~400 tensors).
        strict = b"true" in raw or b"false" in raw
        for record in self.tensors:
            entry = entries.pop(record.name, None)
            if (
                type(entry) is dict
                and entry.get("dtype") == record.dtype
                and entry.get("shape") == list(record.shape)
                and entry.get("data_offsets") == [record.start, record.end]
                and not (strict and _holds_booleans(entry))
            ):
                continue
            where = "is missing there" if entry is None else f"is {_entry_text(entry)} there"
            return (
                f"tensor {record.name} is {record.dtype} {list(record.shape)} at "
                f"{record.start}..{record.end} in the manifest, and {where}"
            )
        if entries:
            return f"it lists tensor {next(iter(entries))!r:.200}, which the manifest does not"
        return None

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, one tensor per line) so equal manifests share a blob."""
        body = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "base": {"id": self.base_id, "fingerprint": self.base_fingerprint},
            "safetensors": {"header": self.header_blob},
            "meta": dict(sorted(self.meta.items())),
            "files": [dict(vars(f)) for f in self.files],
        }
        head = json.dumps(body, sort_keys=True)[:-1]
        # vars(), not asdict(): asdict deep-copies every field (~20 ms for 448 tensors).
        encode = json.JSONEncoder(sort_keys=True).encode
        lines = ",\n  ".join(encode({**vars(t), "shape": list(t.shape)}) for t in self.tensors)
        return f'{head}, "tensors": [\n  {lines}\n]}}\n'.encode()

    @staticmethod
    def meta_from_bytes(data: bytes, where: str = "manifest") -> dict[str, str]:
        """Only the `meta` of a manifest blob: what `log --json` shows, without building its tensor records."""
        try:
            return _meta_strings(
                _checked(_head_of(data) or json.loads(data), where).get("meta", {})
            )
        except CorruptManifestError:
            raise
        except (ValueError, TypeError, AttributeError, RecursionError) as err:
            raise CorruptManifestError(f"{where}: corrupt manifest ({err})") from None

    @classmethod
    def from_bytes(
        cls, data: bytes, where: str = "manifest", progress: Callable[[int], None] | None = None
    ) -> Manifest:
        """Parse a manifest blob, refusing other formats and versions; `progress(n)` hears of
        the tensor records made (a 37k-tensor manifest takes most of a second)."""
        try:
            raw = _parse(data, where)
            entries = raw["tensors"]
            made: list[TensorRecord] = []
            for at in range(0, len(entries), _RECORDS_PER_STEP):
                made.extend(
                    TensorRecord.from_entry(_known(t, _TENSOR_KEYS, "tensor"))
                    for t in entries[at : at + _RECORDS_PER_STEP]
                )
                if progress:
                    progress(len(made) - at)
            tensors = tuple(made)
            files = tuple(FileRecord(**_known(f, _FILE_KEYS, "file")) for f in raw.get("files", []))
            _check_layout(tensors, files)
            return cls(
                raw["base"]["id"],
                raw["base"]["fingerprint"],
                raw["safetensors"]["header"],
                tensors,
                files,
                _meta_strings(raw.get("meta", {})),
            )
        except CorruptManifestError:
            raise
        except MintError as err:  # a tensor name check_tensor_name refuses
            raise CorruptManifestError(f"{where}: corrupt manifest ({err})") from None
        except RecursionError:
            raise CorruptManifestError(
                f"{where}: corrupt manifest (JSON nested too deeply)"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptManifestError(f"{where}: corrupt manifest ({err})") from None


# Each record's keys: (all, the required ones). A key not listed is ignored (docs/format.md §3).
_TENSOR_KEYS = (
    frozenset(f.name for f in fields(TensorRecord)),
    frozenset(f.name for f in fields(TensorRecord) if f.default is MISSING),
)
_FILE_KEYS = (
    frozenset(f.name for f in fields(FileRecord)),
    frozenset(f.name for f in fields(FileRecord) if f.default is MISSING),
)


def _known(record: Any, keys: tuple[frozenset[str], frozenset[str]], what: str) -> dict[str, Any]:
    """A manifest record's keys this version knows, checking it has the required ones.

    Unknown keys are ignored, as at the manifest's top level and in a blob header: a newer
    writer may add a key that an older reader can do without; one it cannot bumps `version`.
    """
    if type(record) is not dict:
        raise ValueError(f"a {what} record is {type(record).__name__}, not an object")
    known, required = keys
    if record.keys() == known:  # what this version writes: the common case, as is
        return record
    missing = required - record.keys()
    if missing:
        raise ValueError(f"a {what} record lacks {', '.join(sorted(missing))}")
    return {k: v for k, v in record.items() if k in known}


def _meta_strings(meta: Any) -> dict[str, str]:
    """A manifest's `meta` as strings: another tool's value that is not one (a number, null, a
    list) as its JSON text (`1`, `null`, `[1]`), not as Python spells it (`None`). A lone
    surrogate is refused, as in a tensor name: JSON can spell one, no UTF-8 text holds it, and
    strict JSON readers refuse the output that repeats it (docs/format.md)."""
    strings = {}
    for key, value in meta.items():
        text = value if type(value) is str else json.dumps(value, ensure_ascii=False)
        try:
            (key + text).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"meta {key!a:.60} holds a lone surrogate, which is no UTF-8 text "
                "(mintvcs stores no other)"
            ) from None
        strings[key] = text
    return strings


# Where to_bytes starts the tensor records, after every other key on one line: a raw newline
# is in no JSON string, so this is structure, not text.
_TENSORS_START = b', "tensors": [\n'


def _head_of(data: bytes) -> dict[str, Any] | None:
    """A manifest's keys but `tensors`, parsed without its tensor records (all but a few
    hundred bytes of it: 6 MB for 20k tensors), where it is laid out as to_bytes writes it;
    else None (another writer's layout: parse the whole). Only `meta` is read from it."""
    cut = data.find(_TENSORS_START)
    # A second `meta` after the records would be the one a whole parse keeps.
    if cut < 0 or data.find(b'"meta"', cut) >= 0:
        return None
    try:
        head = json.loads(data[:cut] + b"}")
    except (ValueError, RecursionError):  # cut inside a nested value: no top-level key
        return None
    return head if isinstance(head, dict) and "tensors" not in head else None


def _parse(data: bytes, where: str) -> dict[str, Any]:
    """A manifest's JSON, refusing other formats and versions."""
    return _checked(json.loads(data), where)


def _checked(raw: Any, where: str) -> dict[str, Any]:
    """A parsed manifest, refusing other formats and versions."""
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise CorruptManifestError(f"{where}: not a mintvcs manifest")
    version = raw.get("version")
    if type(version) is int and version > MANIFEST_VERSION:
        raise NewerManifestError(
            f"{where}: manifest version {version} is newer than this mintvcs reads "
            f"({MANIFEST_VERSION}); upgrade mintvcs"
        )
    if version != MANIFEST_VERSION:
        raise CorruptManifestError(
            f"{where}: corrupt manifest (version {version!r}: no mintvcs writes it; this one "
            f"reads {MANIFEST_VERSION})"
        )
    return raw


def _check_layout(tensors: tuple[TensorRecord, ...], files: tuple[FileRecord, ...]) -> None:
    """The tensors tile the data section with no gap or overlap; names and paths are unique.

    A gap would be filled from uninitialised memory at checkout and a far offset would make it
    write a file of any size; a file path that is also a directory of another cannot be written.
    """
    ordered = tensors  # in file order, as writers list them: sorted only if not
    if any(a.end != b.start for a, b in itertools.pairwise(tensors)):
        ordered = tuple(sorted(tensors, key=lambda t: (t.start, t.end)))
    position = 0
    for record in ordered:
        if record.start != position:
            raise ValueError(
                f"tensor {record.name!r} starts at {record.start}, expected {position} (gap or overlap)"
            )
        position = record.end
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError("a tensor name appears twice")
    paths = {f.path for f in files}
    if len(paths) != len(files):
        raise ValueError("a file path appears twice")
    for path in paths:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in paths:
                raise ValueError(f"file path {parent!r} is also the directory of {path!r}")
            parent = parent.rpartition("/")[0]
