"""What a repository's config says about its format, checked as git checks it before use.

git's rule (its setup.c): `core.repositoryformatversion` is 0 (or absent) or 1, never more;
with version 1 every `extensions.*` key must be one the reader understands, since each names
something a reader must honour; with version 0 unknown extensions are ignored (they predate
the rule), except the ones that only exist with version 1. mintvcs builds its own ref and
object stores, so it checks this itself, once, when a repository is opened: a repository it
cannot honour (SHA-256 objects, reftable refs, an extension it does not know) is refused
before anything is read or written. `mint.formatVersion` is mintvcs's own repository format
(docs/format.md, Versions). `core.sharedRepository`, the modes of what is written into the
repository, is read here too, once (mintvcs.filemodes applies it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from mintvcs.errors import MintError

T = TypeVar("T")

if TYPE_CHECKING:
    from dulwich.file import SharedPerm

__all__ = [
    "MINT_FORMAT_VERSION",
    "RepositoryFormat",
    "UnsupportedRepositoryError",
    "config_bool",
    "config_int",
    "parse_shared",
    "read_format",
    "shared_setting",
]

MINT_FORMAT_VERSION = 1
"""The mintvcs repository format this version reads and writes (`mint.formatVersion`)."""

# Extensions git honours whatever the version (handle_extension_v0), with what mintvcs does:
# noop nothing; preciousObjects gc refuses to repack or prune; partialClone objects may be
# missing (an error about one says so); worktreeConfig `config.worktree` is read over `config`.
_ANY_VERSION = ("noop", "preciousObjects", "partialClone", "worktreeConfig")
# Extensions that exist only with version 1 (git's handle_extension; refStorage since git 2.45).
_V1_ONLY = ("noop-v1", "objectFormat", "refStorage", "compatObjectFormat")
_NAMES = {name.lower(): name for name in (*_ANY_VERSION, *_V1_ONLY)}
# Those whose value is a string: git refuses one written without `=` ("missing value") before
# it looks at the version (git 2.39 crashes on a bare partialClone; later ones refuse it so).
_STRING_VALUED = ("partialClone", "objectFormat", "refStorage", "compatObjectFormat")
# git reads integers with C's strtol (base 0: 0x.. hex, 0.. octal) and a k/m/g unit.
_GIT_INT = re.compile(r"\s*([-+]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)([kKmMgG]?)")
_INT_MAX = 2**31 - 1  # git_config_int's range (a C int, less INT_MIN)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
# What C's strtol(value, &end, 8) reads whole: blanks, a sign, octal digits (git's parse).
_OCTAL = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-7]+)")
_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off", ""})


class UnsupportedRepositoryError(MintError):
    """A repository whose format this mintvcs cannot honour; nothing was read or written."""

    exit_code = 128  # git's exit status for the same refusal (`fatal:`)


@dataclass(frozen=True)
class RepositoryFormat:
    """The checked format of a repository: git's version and the extensions mintvcs honours."""

    version: int = 0
    precious_objects: bool = False  # other repositories may borrow its objects: never delete any
    worktree_config: bool = False  # `config.worktree` is read over `config`
    shared: SharedPerm | None = None  # core.sharedRepository: None leaves modes to the umask


def _git_int(text: str) -> int | None:
    """An integer as git reads a config value (`1k` is 1024), or None if git refuses it."""
    matched = _GIT_INT.fullmatch(text)
    if matched is None:
        return None
    sign, digits, unit = matched.groups()
    base = 16 if digits[:2] in ("0x", "0X") else 8 if digits[0] == "0" else 10
    value = int(digits, base)
    return (-value if sign == "-" else value) * _UNITS[unit.lower()]


def _git_bool(text: str) -> bool | None:
    """A boolean as git reads a config value, or None if git refuses it."""
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    number = _git_int(text)
    return None if number is None else number != 0


def _key_name(section: tuple[bytes, ...], name: bytes) -> str:
    return ".".join(part.decode(errors="replace") for part in (*section, name))


def config_bool(config: Any, section: tuple[bytes, ...], name: bytes, default: bool) -> bool:
    """A boolean key as git reads it (yes/on/1 ... in any case), `default` when absent;
    ValueError naming the key and value for what git refuses.

    Not dulwich's get_boolean, which takes only true and false and raises for git's `no`.
    """
    flag = _config_value(config, section, name, _git_bool, "a boolean")
    return default if flag is None else flag


def config_int(config: Any, section: tuple[bytes, ...], name: bytes) -> int | None:
    """An integer key as git reads it (strtol's bases, a k/m/g unit), None when absent;
    ValueError naming the key and value for what git refuses."""
    return _config_value(config, section, name, _git_int, "an integer")


def _config_value(
    config: Any,
    section: tuple[bytes, ...],
    name: bytes,
    parse: Callable[[str], T | None],
    kind: str,
) -> T | None:
    """Key `name` read by `parse` (None where git refuses it: a ValueError naming the key and
    value as not `kind`); None when absent."""
    try:
        raw = config.get(section, name).decode(errors="replace")
    except KeyError:
        return None
    value = parse(raw)
    if value is None:
        raise ValueError(f"{_key_name(section, name)} = {raw!r} is not {kind}")
    return value


def parse_shared(value: str | None) -> SharedPerm | None:
    """core.sharedRepository (or `init --shared`; None: the key or option without a value)
    read as git reads it (git_config_perm): None for the umask alone; ValueError with the
    reason for what git refuses.

    Not dulwich's parse_shared_repository, which takes `Group` and `yes` otherwise than git,
    accepts a mode that takes the owner's read or write away, and keeps an octal mode's
    execute bits, which would make every object file executable (git drops them).
    """
    from dulwich.file import PERM_EVERYBODY, PERM_GROUP, SharedPerm

    if value is None:
        return PERM_GROUP
    if value == "umask":
        return None
    if value == "group":
        return PERM_GROUP
    if value in ("all", "world", "everybody"):
        return PERM_EVERYBODY
    octal = _OCTAL.fullmatch(value)
    if octal is None:
        flag = _git_bool(value)
        if flag is None:
            raise ValueError(
                f"{value!r} is none of umask, group, all (world, everybody), an octal mode "
                "such as 0660, or a boolean"
            )
        return PERM_GROUP if flag else None
    mode = int(octal[1], 8)
    if mode in (0, 1, 2):  # git's older spellings of umask, group and all
        return (None, PERM_GROUP, PERM_EVERYBODY)[mode]
    if mode & 0o600 != 0o600:
        raise ValueError(
            f"{value!r}: the owner of files must always have read and write permissions"
        )
    # Execute bits go: directories get them from the read bits, files never. (A negative
    # value that passes the check above is masked as git masks it, in two's complement.)
    return SharedPerm(tweak=mode & 0o666, replace=True)


def shared_setting(perm: SharedPerm | None) -> str | None:
    """core.sharedRepository as `git init --shared` writes it (`1`, `2` or `0660`, readable by
    older gits), or None for the umask alone (nothing is written)."""
    from dulwich.file import PERM_EVERYBODY, PERM_GROUP

    if perm is None:
        return None
    if perm == PERM_GROUP:
        return "1"
    if perm == PERM_EVERYBODY:
        return "2"
    return f"0{perm.tweak:o}"


def _extensions(config: Any) -> dict[str, tuple[str, str]]:
    """Every `extensions.*` key, lower-cased, to (its name as written, its last value)."""
    found: dict[str, tuple[str, str]] = {}
    for section in config.sections():
        if section[0].lower() != b"extensions":
            continue
        # `[extensions "x"] y` is git's `extensions.x.y`: an extension no reader knows.
        prefix = "".join(s.decode(errors="replace") + "." for s in section[1:])
        for key, value in config.items(section):
            name = prefix + key.decode(errors="replace")
            found[name.lower()] = (name, value.decode(errors="replace"))
    return found


def read_format(config: Any, where: str) -> RepositoryFormat:
    """Check a repository's config (`where` names the file) as git does, and what mintvcs
    honours of it; raise UnsupportedRepositoryError for what it cannot honour, BadConfigError
    for an extension git wants a string of written without a value."""

    def refuse(message: str) -> UnsupportedRepositoryError:
        return UnsupportedRepositoryError(f"{where}: {message}")

    raw, version = _format_version(config, where)
    if version > 1:
        raise refuse(
            f"core.repositoryformatversion = {version}, newer than the git repository formats "
            "mintvcs reads (0 and 1), as git says (`Expected git repo version <= 1`); use the "
            "tool that made it, or a mintvcs that reads it"
        )
    from mintvcs.gitconfig import refuse_valueless

    extensions = _extensions(config)
    flags: dict[str, bool] = {}
    for key, (name, value) in extensions.items():
        known = _NAMES.get(key)
        if known in _STRING_VALUED:
            refuse_valueless(config, (b"extensions",), name.encode())
        if known is None:
            if version < 1:
                continue  # git ignores them in a version-0 repository: they predate the rule
            raise refuse(
                f"unknown repository extension extensions.{name} (core.repositoryformatversion "
                "= 1): mintvcs does not know what it requires, and git refuses it too; use the "
                "tool that set it, or a mintvcs that knows it"
            )
        if known in _V1_ONLY and version < 1:
            raise refuse(
                f"extensions.{known} is set but core.repositoryformatversion is {raw}, which "
                "cannot have it (git refuses this too: `repo version is 0, but v1-only extension "
                "found`); set core.repositoryformatversion to 1"
            )
        if known in ("preciousObjects", "worktreeConfig"):
            flag = _git_bool(value)
            if flag is None:
                raise refuse(
                    f"extensions.{known} = {value!r} is not a boolean (git refuses it too); "
                    "set it to true or false"
                )
            flags[known] = flag
        elif known == "objectFormat" and value.lower() != "sha1":
            if value.lower() == "sha256":
                raise refuse(
                    "extensions.objectFormat = sha256: this is a SHA-256 git repository, and "
                    "mintvcs reads and writes SHA-1 repositories only; keep adapters in a "
                    "repository made by `mintvcs init` (nothing was read or written)"
                )
            raise refuse(
                f"extensions.objectFormat = {value!r} is not an object format git knows "
                "(sha1, sha256); set it to sha1, or remove it"
            )
        elif known == "refStorage" and value.lower() != "files":
            what = "its refs are in git's reftable format" if value == "reftable" else "unknown"
            raise refuse(
                f"extensions.refStorage = {value!r}: {what}, and mintvcs reads and writes git's "
                "files ref backend only; convert the refs with `git refs migrate "
                "--ref-format=files` (git 2.46 or later)"
            )
        elif known == "compatObjectFormat":
            raise refuse(
                f"extensions.compatObjectFormat = {value!r}: mintvcs does not keep the second "
                "object format's ids that it asks for (nor does this git); remove it"
            )
    _check_mint_version(config, where)
    try:
        shared = parse_shared(config.get((b"core",), b"sharedRepository").decode(errors="replace"))
    except KeyError:
        shared = None
    except ValueError as err:
        raise refuse(
            f"core.sharedRepository = {err} (git refuses it in every command that writes); "
            "fix or remove it"
        ) from None
    return RepositoryFormat(
        version, flags.get("preciousObjects", False), flags.get("worktreeConfig", False), shared
    )


def _format_version(config: Any, where: str) -> tuple[str, int]:
    """core.repositoryformatversion (its last value, 0 when absent) as git's setup reads it:
    each value it is given must be an int (git_config_int), or git dies naming that value."""
    from mintvcs.gitconfig import valueless_at

    written_bare = valueless_at(config, (b"core",), b"repositoryformatversion")
    try:
        values = [
            v.decode(errors="replace")
            for v in config.get_multivar((b"core",), b"repositoryformatversion")
        ]
    except KeyError:
        values = []
    if written_bare is not None:
        values = [""]  # git reads the key written without `=` as no value: its message shows ''
    raw, version = "0", 0
    for raw in values:
        number = _git_int(raw)
        reason = (
            "invalid unit"
            if number is None
            else "out of range"
            if not -_INT_MAX <= number <= _INT_MAX
            else ""
        )
        if reason:
            raise UnsupportedRepositoryError(
                f"bad numeric config value '{raw}' for 'core.repositoryformatversion' in file "
                f"{where}: {reason} (git refuses it too); set it to 0, or to 1 if the "
                "repository uses extensions"
            )
        assert number is not None
        version = number
    return raw, version


def _check_mint_version(config: Any, where: str) -> None:
    """Refuse a `mint.formatVersion` newer than this mintvcs's, or one that is no version.

    Absent is version 1: `git clone` of a repository does not copy its config.
    """
    try:
        raw = config.get((b"mint",), b"formatVersion").decode(errors="replace")
    except KeyError:
        return
    text = raw.strip()
    if text.isascii() and text.isdigit() and int(text) > MINT_FORMAT_VERSION:
        raise UnsupportedRepositoryError(
            f"{where}: mint.formatVersion = {int(text)}: the repository's format is newer than this "
            f"mintvcs reads ({MINT_FORMAT_VERSION}); upgrade mintvcs"
        )
    if not (text.isascii() and text.isdigit() and int(text) == MINT_FORMAT_VERSION):
        raise UnsupportedRepositoryError(
            f"{where}: mint.formatVersion = {raw!r} is not a mintvcs repository format (this mintvcs "
            f"reads and writes {MINT_FORMAT_VERSION}); if this is a mintvcs repository, set it "
            f"back with `git --git-dir .mint config mint.formatVersion {MINT_FORMAT_VERSION}`"
        )
