"""The verbs: what `mintvcs init`, `commit`, `checkout` ... do, as functions returning data."""

from __future__ import annotations

import errno
import heapq
import json
import math
import os
import random
import re
import stat
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mintvcs import hooks, revwalk
from mintvcs.adapter import (
    CONFIG_FILE,
    GIT_DIR,
    WEIGHTS_FILE,
    AdapterFiles,
    extra_file_stats,
    extra_files,
    holds_repository,
    read_adapter,
    read_regular,
    read_stable,
    stat_key,
)
from mintvcs.base import BaseModel, read_base_model
from mintvcs.bulk import collector_paused
from mintvcs.codec import NonFiniteTensorError
from mintvcs.errors import MintError, OptionsError
from mintvcs.filemodes import TempFile, file_mode, write_failed
from mintvcs.ids import blob_id, is_object_id
from mintvcs.messages import (
    check_message,
    clean_message,
    decode_message,
    one_line,
    quote_path,
    subject,
)
from mintvcs.objects import Manifest, unsafe_path_reason
from mintvcs.progress import progress_bar
from mintvcs.refs import (
    ANY,
    ZERO,
    InvalidRefNameError,
    OldValue,
    RefConflictError,
    RefFormatError,
    add_note,
    check_branch_name,
    check_name_type,
    check_ref_name,
    check_utf8_name,
    fits_files,
    local_tz,
    tz_text,
)
from mintvcs.repoformat import parse_shared
from mintvcs.safetensors_file import parse_layout
from mintvcs.store import (
    CommitInfo,
    CorruptObjectError,
    Repository,
    Revision,
    UnknownRevisionError,
    WriteCount,
    accepts_path,
    refuse_colliding_paths,
    undo_init,
)
from mintvcs.validate import check_lora_config

if TYPE_CHECKING:
    from dulwich.file import SharedPerm

COMMIT_RETRY_SECONDS = (
    10.0  # how long a commit retries its compare-and-swap while others move the branch
)


class DirtyWorkTreeError(MintError):
    """An operation that would overwrite uncommitted changes."""


class NothingToCommit(MintError):
    """The adapter to commit is identical to HEAD's revision."""


class StaleWorkTreeError(MintError):
    """A commit of a work tree that holds an older revision than its branch's (the branch moved under it)."""


class CheckedOutElsewhereError(MintError):
    """A branch a `git worktree` of the store has checked out, which git will not switch to or force-move."""

    exit_code = 128  # git's `fatal:`


class RefExistsError(MintError):
    """A branch or tag that already exists, without --force."""


class NoWorkTreeError(MintError):
    """A command that writes or reads a work tree, in a repository without one (a bare store)."""

    exit_code = 128  # git's `fatal: this operation must be run in a work tree`


def _work_tree_of(repo: Repository) -> Path:
    """The repository's work tree; NoWorkTreeError for a store without one."""
    if repo.work_tree is None:
        raise NoWorkTreeError("this repository has no work tree")
    return repo.work_tree


# ------------------------------------------------------------------ helpers
class BadIdentityError(MintError):
    """A user name, email or date that would break the commit's author or committer line."""


class UnknownIdentityError(BadIdentityError):
    """No identity configured and none git would make up (a host name without a domain), or an
    empty name: git refuses to commit with one."""

    exit_code = 128  # git's `fatal: unable to auto-detect email address`


_WHO_HINT = (
    'run git config --global user.email "you@example.com" and git config --global user.name '
    '"Your Name" to set your account\'s default identity (git --git-dir .mint config without '
    "--global: this repository only), or set GIT_AUTHOR_NAME, GIT_AUTHOR_EMAIL and the same "
    "for GIT_COMMITTER_"
)


@dataclass(frozen=True)
class Signature:
    """Who and when, as a commit's author or committer line holds it."""

    identity: str  # "Name <email>"
    timestamp: int
    tz: str  # "+HHMM"

    def line(self) -> str:
        """The `Name <email> seconds +HHMM` of a commit or tag header."""
        return f"{self.identity} {self.timestamp} {self.tz}"


def _move_ref(
    repo: Repository,
    ref: str,
    new: str,
    *,
    old: OldValue,
    message: str,
    by: Signature,
    deref: bool = True,
) -> None:
    """Compare-and-swap `ref` to `new`, its reflog line signed and dated by `by`, as git's are."""
    repo.refs.update(
        ref,
        new,
        old=old,
        message=message,
        identity=by.identity,
        timestamp=by.timestamp,
        tz=by.tz,
        deref=deref,
    )


def comment_char(repo: Repository) -> bytes:
    """core.commentChar (repository, then global config), as git 2.39's tag reads it: b'#'
    when unset or "auto" (which only a commit's editor adjusts), else its one byte, which need
    not be ASCII (git compares it with a line's first byte); anything else is refused, as git
    refuses it."""
    from mintvcs.gitconfig import BadConfigError, refuse_valueless

    refuse_valueless(repo.config_with_user, (b"core",), b"commentChar")
    try:
        value = repo.config_with_user.get((b"core",), b"commentChar")
    except KeyError:
        return b"#"
    if value.lower() == b"auto":
        return b"#"
    if len(value) != 1:
        raise BadConfigError(
            f"core.commentChar should only be one character (it is {value!a}), as git says; "
            "set it to one character, or to auto"
        )
    return value


def signature(
    repo: Repository | None = None, role: str = "committer", *, strict: bool = False
) -> Signature:
    """The author or committer, as git picks them: GIT_<ROLE>_NAME/_EMAIL/_DATE, then
    <role>.name/.email, then user.name/.email (each from `git -c` settings handed down, the
    repository's config, then the global and system ones, includeIf matched), then $EMAIL for
    the email, then the password database's user at the host's domain name; now.

    `strict` (a commit's author and committer, an annotated tag's tagger: git's IDENT_STRICT)
    refuses an empty name and an email made up from a host name without a domain
    (UnknownIdentityError); otherwise (reflog lines) they are written as git writes them."""
    env = f"GIT_{role.upper()}_"
    # Set but empty is no unset: git refuses an empty name, and keeps an empty email.
    name, email = os.environ.get(env + "NAME"), os.environ.get(env + "EMAIL")
    name_from, email_from = env + "NAME", env + "EMAIL"
    if name is None or email is None:
        from dulwich.config import StackedConfig

        from mintvcs.gitconfig import env_overrides, refuse_valueless, user_configs

        files = repo.config_with_user.backends if repo else user_configs()
        stacked = StackedConfig([*env_overrides(), *files])

        def lookup(key: bytes) -> tuple[str | None, str]:
            sections = (role.encode(), b"user")  # author.email over user.email, as in git
            for section in sections:  # git refuses either written without a value
                refuse_valueless(stacked, (section,), key)
            for section in sections:
                with suppress(KeyError):
                    value = stacked.get((section,), key)
                    return value.decode(), f"{section.decode()}.{key.decode()}"
            return None, f"user.{key.decode()}"

        if name is None:
            name, name_from = lookup(b"name")
        if email is None:
            email, email_from = lookup(b"email")
            if email is None and os.environ.get("EMAIL"):  # taken when set, then trimmed, as git
                email, email_from = os.environ["EMAIL"].strip(), "EMAIL"
    who = "Author" if role == "author" else "Committer"
    if email is None:
        email, bogus = _default_email()
        if strict and bogus:
            raise UnknownIdentityError(
                f"{who} identity unknown: unable to auto-detect email address (got '{email}'); "
                + _WHO_HINT
            )
    if name is None:
        name, bogus = _default_name()
        if strict and bogus:
            raise UnknownIdentityError(
                f"{who} identity unknown: unable to auto-detect name (got '{name}'); " + _WHO_HINT
            )
    if not name:
        if strict:
            raise UnknownIdentityError(
                f"empty ident name (for <{email}>) not allowed ({name_from} is empty); " + _WHO_HINT
            )
        name = _passwd_entry()[0]  # git's name for a reflog line
    if strict and not _without_crud(name):
        raise UnknownIdentityError(
            f"name consists only of disallowed characters: {name} ({name_from}), as git says; "
            + _WHO_HINT
        )
    name, email = _without_crud(name), _without_crud(email)
    # Checked before anything is written: a NUL would end the commit's header line early.
    for value, where in ((name, name_from), (email, email_from)):
        if "\0" in value:
            raise BadIdentityError(f"{where} is '{value}': a name or email may not hold NUL")
    date = os.environ.get(env + "DATE")
    timestamp, tz = _parse_date(date, env + "DATE") if date else (int(time.time()), None)
    return Signature(f"{name} <{email}>", timestamp, tz or local_tz(timestamp))


# git's crud (ident.c): what it trims off both ends of a name and an email.
_CRUD = "".join(map(chr, range(33))) + ".,:;<>\"\\'"


def _without_crud(value: str) -> str:
    """A name or email as git writes it into an identity (strbuf_addstr_without_crud): crud
    trimmed off both ends (`<a@x>` is `a@x`, ` Dr. A Jr. ` is `Dr. A Jr`), and any newline,
    `<` or `>` left inside dropped, which would otherwise forge the commit's header lines."""
    return re.sub("[\n<>]", "", value.strip(_CRUD))


def _passwd_entry() -> tuple[str, str, bool]:
    """This user id's login name and GECOS, which git's made-up identity comes from, and
    whether they are bogus: a user id without an account (a container's, `docker run -u N`)
    gets git's stand-in, login "unknown" and GECOS "Unknown", so reflog lines are still
    written and a commit is refused with git's words."""
    import pwd

    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return "unknown", "Unknown", True
    return entry.pw_name, entry.pw_gecos or "", False


def _default_name() -> tuple[str, bool]:
    """git's made-up name, and whether git calls it bogus: the password entry's full name
    (GECOS up to its first comma, `&` standing for the login name capitalised)."""
    login, gecos, bogus = _passwd_entry()
    full = gecos.split(",", 1)[0]
    return full.replace("&", login[:1].upper() + login[1:]).strip(), bogus


def _default_email() -> tuple[str, bool]:
    """git's made-up email, and whether git calls it bogus: LOGIN@ the first line of
    /etc/mailname, else the host name if it holds a dot, else its canonical name if that does,
    else HOST.(none), bogus; bogus too when the user id has no account. Trimmed as a whole, as
    git trims it (a space that ends /etc/mailname goes)."""
    email, bogus = _made_up_email()
    return email.strip(), bogus


def _made_up_email() -> tuple[str, bool]:
    """_default_email's, untrimmed."""
    import socket  # only for this fallback: not imported by every commit

    login, _gecos, bogus = _passwd_entry()
    with suppress(OSError, UnicodeDecodeError):
        with open("/etc/mailname", encoding="utf-8") as mailname:
            line = mailname.readline()
        if line:
            return f"{login}@{line.rstrip(chr(10))}", bogus
    try:
        host = socket.gethostname()
    except OSError:
        return f"{login}@(none)", True
    if "." in host:
        return f"{login}@{host}", bogus
    with suppress(OSError, UnicodeError):
        for *_, canonical, _address in socket.getaddrinfo(host, None, flags=socket.AI_CANONNAME)[
            :1
        ]:
            if "." in canonical:
                return f"{login}@{canonical}", bogus
    return f"{login}@{host}.(none)", True


_LATEST_DATE = 253_402_300_799  # 9999-12-31T23:59:59Z: mintvcs's own limit
# `seconds +HHMM`, a zone being at most 23:59 from UTC (`+9999` would print as nonsense).
_RAW_DATE = re.compile(
    r"(?P<at>@?)(?P<seconds>[0-9]+)(?: (?P<tz>(?P<sign>[+-])(?P<hh>[01][0-9]|2[0-3])(?P<mm>[0-5][0-9])))?\Z"
)
# A bare number is seconds only from 9 digits on (git's rule): shorter, it is more likely a
# compact date or a year, so only the exact `@N +HHMM` form takes it.
_SHORTEST_SECONDS = 9
# More digits than any date to 9999 has (and than int() reads past 4300).
_MOST_SECONDS_DIGITS = 20
# An RFC 2822 zone: `+0100`, or `+01:00` as people write it; `-0000` is UTC.
_RFC_ZONE = re.compile(r"(?P<sign>[+-])(?P<hh>[0-9]{2}):?(?P<mm>[0-9]{2})\Z")
# Zone names RFC 2822 defines, in minutes east of UTC; any other name is refused rather than
# read as local time.
_RFC_ZONE_NAMES = {
    "UT": 0, "UTC": 0, "GMT": 0, "Z": 0,
    "EST": -300, "EDT": -240, "CST": -360, "CDT": -300,
    "MST": -420, "MDT": -360, "PST": -480, "PDT": -420, "HST": -600,
    # Others that `date` prints and git reads as these offsets.
    "WET": 0, "CET": 60, "MET": 60, "BST": 60, "CEST": 120, "MEST": 120, "EET": 120,
    "EEST": 180, "JST": 540, "NZST": 720, "NZDT": 780,
}  # fmt: skip
_RFC_WORDS = {
    *("mon", "tue", "wed", "thu", "fri", "sat", "sun"),
    *("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
}
_DATE_FORMS = (
    "give '<unix seconds> <+HHMM>' or '@<unix seconds>' (9 digits or more, or any with a zone: "
    "'@0 +0000'), ISO 8601 ('2026-11-28T12:00:00+01:00') or RFC 2822 with a time of day "
    "('Sat, 28 Nov 2026 12:00:00 +0100', a zone such as +0100, +01:00, -0000, GMT, UT or EST, "
    "AM/PM taken)"
)


def _parse_date(text: str, where: str) -> tuple[int, str | None]:
    """(unix seconds, "+HHMM" or None for local) from git's raw, ISO 8601 or RFC 2822 date forms."""
    seconds, tz = _read_date(text, where)
    if not 0 <= seconds <= _LATEST_DATE:
        raise BadIdentityError(f"{where} is '{text}': give a date from 1970 to 9999")
    return seconds, tz


def _read_date(text: str, where: str) -> tuple[int, str | None]:
    import datetime

    refused = BadIdentityError(f"{where} is '{text}': invalid date format; {_DATE_FORMS}")
    raw = _RAW_DATE.match(text.strip())
    if raw:
        if len(raw["seconds"]) < _SHORTEST_SECONDS and not (raw["at"] and raw["tz"]):
            raise refused  # `20231114` is no instant in 1970
        if len(raw["seconds"]) > _MOST_SECONDS_DIGITS:
            return -1, None  # past any date (and past what int() reads): refused by the caller
        if raw["tz"] is None:
            return int(raw["seconds"]), None
        minutes = int(raw["hh"]) * 60 + int(raw["mm"])
        # -0000 is written +0000, as git writes it.
        return int(raw["seconds"]), tz_text(-minutes if raw["sign"] == "-" else minutes)
    try:
        datetime.date.fromisoformat(text.strip())
    except ValueError:
        pass
    else:
        raise refused  # a date alone: git wants a time of day too
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            rfc = _read_rfc2822(text)
        except ValueError:  # a number past what int() reads
            rfc = None
        if rfc is None:
            raise refused from None
        return rfc
    offset = when.utcoffset()
    if offset is None:  # local time, as git reads it
        return _local_date(when.timetuple()[:6])
    try:
        seconds = int(when.timestamp())
    except (OverflowError, OSError, ValueError):
        seconds = -1  # out of range: refused by the caller
    return seconds, tz_text(int(offset.total_seconds() // 60))


def _local_date(wall: tuple[int, ...]) -> tuple[int, str | None]:
    """(unix seconds, "+HHMM") of a local wall-clock time (year .. second), as git dates it.

    The offset in force where the wall clock read as UTC falls, or else the one in force at the
    instant that offset gives, whichever holds at its own instant; in a spring gap neither
    does, and standard time's stands (tm_isdst 0: the offset before the change where summer
    time is ahead; the one after in Dublin, whose winter time is the "daylight" one). So the
    autumn hour that comes twice takes the offset of its side of the change at that UTC
    reading, and the zone written is the wall clock's distance from the instant (Berlin's 02:30
    in the gap is written +0100), each as a new git process dates it. (mktime would depend on
    the calls before it in the process.)
    """
    import calendar

    try:
        as_utc = calendar.timegm((*wall, 0, 1, 0))
        there = time.localtime(as_utc)
        then = time.localtime(as_utc - there.tm_gmtoff)
        first = there.tm_gmtoff
        if then.tm_gmtoff != first:
            if time.localtime(as_utc - then.tm_gmtoff).tm_gmtoff == then.tm_gmtoff:
                first = then.tm_gmtoff  # the offset that holds at its own instant
            else:  # neither holds: a gap, dated in standard time
                first = then.tm_gmtoff if there.tm_isdst else first
    except (OverflowError, OSError, ValueError):
        return -1, None  # out of range: refused by the caller
    instant = as_utc - first
    apart = as_utc - instant
    minutes = apart // 60 if apart >= 0 else -(-apart // 60)  # toward zero, as git's division
    return instant, tz_text(minutes)


def _read_rfc2822(text: str) -> tuple[int, str | None] | None:
    """(unix seconds, "+HHMM" or None for local) of an RFC 2822 date with a time of day, or None.

    email.utils alone reads `-0000` and any zone it does not know (`+01:00`, `PM`) as local
    time and takes `+0199` as +02:39, so the zone and AM/PM are taken out here first: every
    word must then be a weekday, a month, AM/PM or a known zone, else the date is refused.
    """
    import calendar
    import email.utils

    body = re.sub(r"\s*\([^()]*\)\s*\Z", "", text.strip())  # a trailing `(CET)` comment
    zone: int | None = None
    meridiem = None
    kept = []
    for token in body.replace(",", " ").split():
        named = _RFC_ZONE_NAMES.get(token.upper())
        numeric = _RFC_ZONE.match(token)
        if token.lower() in ("am", "pm"):
            meridiem = token.lower()
        elif named is not None or numeric:
            if zone is not None:
                return None  # two zones
            if numeric:
                hours, minutes = int(numeric["hh"]), int(numeric["mm"])
                if hours > 23 or minutes > 59:
                    return None  # `+0199` is no zone
                zone = (hours * 60 + minutes) * (-1 if numeric["sign"] == "-" else 1)
            else:
                zone = named
        elif any(c.isalpha() for c in token) and token.lower()[:3] not in _RFC_WORDS:
            return None  # an unknown zone name or word: refused, not read as local time
        else:
            kept.append(token)
    if not any(":" in token for token in kept):
        return None  # a date alone, no time of day
    parsed = email.utils.parsedate_tz(" ".join(kept))
    if parsed is None:
        return None
    year, month, day, hour, minute, second = parsed[:6]
    if meridiem is not None:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if meridiem == "pm" else 0)
    datetime_fields = (year, month, day, hour, minute, second)
    if zone is None:
        return _local_date(datetime_fields)
    try:
        return calendar.timegm((*datetime_fields, 0, 1, 0)) - zone * 60, tz_text(zone)
    except (OverflowError, ValueError):
        return -1, None  # out of range: refused by the caller


def _write_atomic(
    path: Path,
    data: bytes | memoryview,
    executable: bool = False,
    mtime_ns: int | None = None,
    temp_dir: Path | None = None,
    shared: SharedPerm | None = None,
    changes: _WorkTreeChanges | None = None,
) -> None:
    """Write a file so that a killed process leaves the old or the new content, never a torn one.

    Not fsync'ed, as git's checkout leaves work-tree files to the page cache: a power cut may
    lose the new content. The temporary is made in `temp_dir` (on the same file system) when given, else beside `path`.
    Its mode is git's for a file it checks out, 0666 (0777 `executable`) less the umask; a file
    of `.mint/` gets core.sharedRepository's (`shared`) too. The rename into place is one of
    a checkout's `changes`. An error names `path`, never the temporary.
    """
    _make_parents(path)
    # The temporary name adds 14 bytes to the file's: a name near the limit (255 bytes, which
    # a stored path may use) takes a short one.
    stem = path.name if len(path.name.encode("utf-8", "surrogatepass")) <= 200 else "long-name"
    folder = path.parent if temp_dir is None else temp_dir
    try:
        temp = TempFile(folder, f".{stem}.", ".tmp")
    except OSError as err:
        if temp_dir is not None:  # `.mint/` refused it (another user's): beside the file, then
            _write_atomic(path, data, executable, mtime_ns, shared=shared, changes=changes)
            return
        # A read-only work tree or `.mint/`: the file is named, not a temporary never made.
        raise OSError(err.errno, err.strerror, os.fspath(path)) from None
    with temp:  # closed, and removed unless renamed into place, whatever ends the block
        fd = temp.fd
        try:
            with os.fdopen(fd, "wb", closefd=False) as handle:
                handle.write(data)
                handle.flush()
                os.fchmod(fd, file_mode(0o777 if executable else 0o666, shared))
                if mtime_ns is not None:
                    os.utime(fd, ns=(time.time_ns(), mtime_ns))
            temp.close()
        except OSError as err:  # a full disk: the file, not the temporary, is named
            raise write_failed(err, path, "unable to write") from None
        try:
            with changes.change() if changes is not None else nullcontext():
                os.replace(temp.path, path)
                temp.keep()
            return
        except OSError as err:
            if err.errno != errno.EXDEV or temp_dir is None:
                # Name the file that could not be written (a read-only work tree), not the
                # temporary.
                raise OSError(err.errno, err.strerror, os.fspath(path)) from None
    # A mount inside the work tree, or a bind-mounted git directory: one device number, but no
    # rename across. Written again beside the file, the temporary removed.
    _write_atomic(path, data, executable, mtime_ns, shared=shared, changes=changes)


def _make_parents(path: Path) -> None:
    """Create the missing directories above `path`, outermost first: pathlib's
    mkdir(parents=True) recurses once per missing level."""
    missing = []
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():  # a file in the way: as mkdir(parents=True) refuses
                raise


def _read_revision(repo: Repository, commit: str, show_progress: bool = True) -> Revision:
    """repo.read_revision, counting its tensor records on a terminal (37k take a second)."""
    if not show_progress:
        return repo.read_revision(commit)
    with progress_bar(None, f"reading {repo.abbrev(commit)}", unit=" tensors") as update:
        return repo.read_revision(commit, update)


def _ref_moved(repo: Repository, ref: str, old: str | None, new: str | None) -> None:
    """Tell the ref-update hook (e.g. one that notifies running servers) that `ref` moved."""
    env = hooks.hook_env(repo.git_dir)
    args = [ref, old or ZERO, new or ZERO]
    _run_hook(repo, "ref-update", args, env, may_refuse=False)


def _run_hook(
    repo: Repository, name: str, args: list[str], env: dict[str, str], *, may_refuse: bool
) -> None:
    """hooks.run_hook in the repository's work tree, where git runs hooks."""
    hooks.run_hook(repo.git_dir, name, args, env, may_refuse=may_refuse, work_tree=repo.work_tree)


# --------------------------------------------------------------------- init
def check_json_path(directory: str | os.PathLike[str]) -> None:
    """Refuse, before anything is made, a directory whose absolute path is not UTF-8 where
    `init --json` would print it: JSON text is Unicode, and its bytes would come out as lone
    surrogate escapes, which strict readers refuse."""
    path = os.path.abspath(directory)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise MintError(
            f"the path {quote_path(path)} is not UTF-8, which --json cannot carry; run init "
            "without --json (it prints the path as its bytes)"
        ) from None


def init(
    directory: Path,
    base_model: str | os.PathLike[str] | None = None,
    *,
    install_hooks: bool = True,
    shared: str | None = None,
    base_model_id: str | None = None,
) -> Repository:
    """Create a repository; `base_model` is a local checkout directory (fingerprinted) or an id;
    `shared` a core.sharedRepository value as `git init --shared=` takes it ("group", "all",
    "umask", an octal mode such as "0660"), to let a group of users write it; `base_model_id`
    the id a directory `base_model` is recorded under (default: base.default_model_id)."""
    try:
        perm = parse_shared(shared) if shared is not None else None
    except ValueError as err:
        raise MintError(f"--shared: {err}") from None
    base: BaseModel | None = None
    if base_model is not None:
        # A Path (not a str) is the caller saying "a directory": never read as a hub id.
        given_as_path = not isinstance(base_model, str)
        base_model = os.fspath(base_model)  # a trainer passes its checkout as a Path
        try:
            path = Path(base_model).expanduser()
        except RuntimeError:  # ~user of no such user
            path = Path(base_model)
        looks_local = base_model.startswith(("/", "./", "../", "~")) or base_model in (".", "..")
        if (looks_local or given_as_path or path.is_file()) and not path.is_dir():
            # 'org/name' is a hub id, but './x' or '/x' means a directory, and so does a path
            # to a file (its config.json, say): a typo must not become an id that silently
            # turns the shape check off.
            give = "an id as a str" if given_as_path else "a model id such as org/name"
            raise MintError(
                f"--base-model {base_model}: "
                f"{'a file, not a directory' if path.is_file() else 'no such directory'}; give "
                f"a local checkpoint directory, or {give}"
            )
        if base_model_id is not None and not path.is_dir():
            raise OptionsError(
                f"--base-model-id names a local --base-model directory; {base_model} is an id, "
                "recorded as given"
            )
        base = read_base_model(path, base_model_id) if path.is_dir() else BaseModel(base_model)
    elif base_model_id is not None:
        raise OptionsError("--base-model-id names the --base-model directory: give --base-model")
    repo = Repository.init(Path(directory), base, shared=perm)
    if install_hooks:
        try:
            hooks.install_samples(repo.git_dir, perm)
        except BaseException as err:
            repo.close()
            raise undo_init(repo.git_dir, err) from None
    return repo


# ------------------------------------------------------------------- commit
@dataclass(frozen=True)
class CommitResult:
    """What `commit` did."""

    commit: str
    branch: str | None
    parent: str | None
    tensors: int
    # Objects this commit stored (new tensor blobs, trees, manifest, commit), not counting
    # those other threads committing through the same Repository stored meanwhile.
    new_objects: int
    nbytes: int  # the adapter's tensor bytes
    summary: str = ""  # the message's subject, as git's commit summary line shows it


@accepts_path
def commit(
    repo: Repository,
    message: str,
    *,
    source: Path | None = None,
    meta: dict[str, str] | None = None,
    verify: bool = True,
    show_progress: bool = True,
    allow_empty: bool = False,
    branch: str | None = None,
) -> CommitResult:
    """Commit the adapter in `source` (default: the work tree) on top of HEAD, or of `branch`.

    With `branch`, the commit goes onto that existing branch whatever HEAD is (a trainer that
    commits with `source` keeps feeding `main` after someone checks out a tag); HEAD and the
    work tree are left alone. An adapter identical to its parent's (tensors, config, files and
    metadata) is refused with NothingToCommit, as git refuses an empty commit, unless
    `allow_empty`.
    """
    if not isinstance(message, str):
        raise TypeError(f"a commit message is a str, not {type(message).__name__}")
    # Before anything is read or written: a message that cannot be stored as given is refused
    # here, not after the tensors are encoded.
    check_message(message, "commit")
    # As git writes the -m message for the commit-msg hook: cleaned already.
    message = clean_message(message)
    source = Path(source) if source is not None else repo.work_tree
    # `--from .`, or the work tree by a symlinked path, is the work tree: its record follows.
    of_work_tree = source is not None and _same_dir(source, repo.work_tree)
    if source is None:
        raise NoWorkTreeError("this repository has no work tree: pass --from DIR")
    if branch is not None:
        check_branch_name(branch)
        ref = f"refs/heads/{branch}"
        # The unborn branch HEAD names (a new repository's main) takes its root commit.
        if repo.refs.read(ref) is None and repo.refs.read_symbolic("HEAD") != ref:
            raise UnknownRevisionError(
                f"branch '{branch}' does not exist; create it with `mintvcs branch {branch} [START]`"
            )
    adapter = read_adapter(source, repo.excludes)
    refuse_colliding_paths(adapter.extra_files)  # before any hook runs or blob is written
    shapes = {t.name: (t.dtype, t.shape) for t in adapter.layout.tensors}
    if repo.base is not None:
        repo.base.check_adapter(shapes, adapter.config)
    # Like the base check, not skipped by --no-verify: PEFT could not load such a revision, or
    # would silently drop some of its weights.
    check_lora_config(adapter.config, shapes)
    env = hooks.hook_env(repo.git_dir, source)
    # The shipped pre-commit sample only runs `python -m mintvcs.validate`: its shape check
    # is the one above, and its NaN/Inf check runs during encoding on the exponent planes
    # the codec builds anyway. Any other pre-commit hook runs as a program, as in git.
    check_in_process = verify and hooks.is_sample(repo.git_dir, "pre-commit")
    if verify and not check_in_process:
        _run_hook(repo, "pre-commit", [], env, may_refuse=True)
    if not message and not (verify and hooks.is_active(repo.git_dir, "commit-msg")):
        raise MintError("aborting commit due to empty commit message (use -m MSG)")
    # Checked before encoding, so that a missing identity costs nothing; dated when written.
    signature(repo, "author", strict=True)
    signature(repo, "committer", strict=True)
    branch_ref = f"refs/heads/{branch}" if branch is not None else repo.refs.read_symbolic("HEAD")
    target = branch_ref or "HEAD"
    parent = repo.refs.read(target)
    if of_work_tree and target in ("HEAD", repo.refs.read_symbolic("HEAD")):
        # git's index would commit the old files as they are, undoing what moved the branch
        # (a trainer's `commit --from`); mintvcs knows the base, so it refuses. Likewise the
        # mix a failed checkout left: some of its files may be an older revision's.
        hint = work_tree_hint(repo, parent, branch_ref and branch_ref.removeprefix("refs/heads/"))
        if hint is not None:
            raise StaleWorkTreeError(hint + "; nothing was committed")
    parent_rev = _read_revision(repo, parent, show_progress) if parent else None
    # This commit's objects only: other threads may commit through `repo` meanwhile.
    written = WriteCount()

    def encode(parent_rev: Revision | None) -> tuple[str, Manifest]:
        """Write the revision's blobs and tree, XOR-encoded against `parent_rev`'s tensors."""
        try:
            # A record per tensor, and the manifest's and tree's entries.
            with repo.counting_writes(written), collector_paused():
                if not show_progress:
                    return repo.write_revision(
                        adapter, parent_rev, meta, check_finite=check_in_process
                    )
                with progress_bar(adapter.layout.data_size, "encoding") as update:
                    return repo.write_revision(
                        adapter, parent_rev, meta, update, check_finite=check_in_process
                    )
        except NonFiniteTensorError as err:
            raise hooks.refusal("pre-commit", f"error: {err}") from None

    def identical_to(commit_id: str, when: str = "") -> NothingToCommit:
        return NothingToCommit(
            f"nothing to commit: the adapter in {source} is identical to "
            f"{'HEAD' if branch is None else branch} ({repo.abbrev(commit_id)}){when}; "
            "use --allow-empty (allow_empty=True) to record it anyway"
        )

    # The revision's objects reach the store only once the commit-msg hook has taken the
    # message and it can be stored: a refusal (the hook's, or the message it leaves) leaves
    # the store as it was.
    with repo.holding_writes():
        tree, manifest = encode(parent_rev)
        if parent_rev is not None and tree == parent_rev.info.tree and not allow_empty:
            raise identical_to(parent_rev.commit)
        if verify:
            message = _run_commit_msg(repo, message, env)
        message = clean_message(message)
        if not message:
            raise MintError("aborting commit due to empty commit message (use -m MSG)")
    summary = subject(message)
    first_line = message.split("\n", 1)[0]  # what git's reflog keeps
    deadline = time.monotonic() + COMMIT_RETRY_SECONDS
    author = signature(repo, "author", strict=True)
    while True:
        # Dated again on each try, as a rebase dates the commits it re-parents: a commit that
        # lost the race lands after the winner, not dated before its parent.
        committer = signature(repo, "committer", strict=True)
        with repo.counting_writes(written):
            commit_id = repo.write_commit(
                tree, [parent] if parent else [], message, author.line(), committer.line()
            )
        kind = "commit" if parent else "commit (initial)"
        try:
            _move_ref(
                repo, target, commit_id, old=parent, message=f"{kind}: {first_line}", by=committer
            )
            break
        except RefConflictError:
            if time.monotonic() > deadline:
                raise
            # Another process moved or holds the branch: re-parent onto its tip. The blobs stay
            # valid while their XOR bases (the old parent's tensors) are in the new history;
            # after a reset or a forced move they may not be: encode against the new tip then,
            # or a git gc, push or squash could drop the bases.
            time.sleep(random.uniform(0.001, 0.01))
            previous, parent = parent, repo.refs.read(target)
            if parent is None and previous is not None and branch is None:
                # `branch -m` renamed HEAD's branch: git's commit updates HEAD through its
                # symref, so it lands on the branch HEAD names now if that is still the parent.
                now = repo.refs.read_symbolic("HEAD")
                if now is not None and now != target and repo.refs.read(now) == previous:
                    target = branch_ref = now
                    parent = previous
                    continue
            if parent is None and previous is not None:
                # As git's "reference is missing but expected": a commit would bring the
                # branch back as a root commit sharing nothing with the history deleted.
                name = target.removeprefix("refs/heads/")
                raise UnknownRevisionError(
                    f"branch '{name}' was deleted while this commit was being made; nothing "
                    "was committed"
                ) from None
            encoded_on = parent_rev.commit if parent_rev is not None else None
            if encoded_on is not None and (
                parent is None or not is_ancestor(repo, encoded_on, parent)
            ):
                parent_rev = _read_revision(repo, parent, show_progress) if parent else None
                tree, manifest = encode(parent_rev)
            if parent is not None and not allow_empty and repo.commit_info(parent).tree == tree:
                # Another process committed this very adapter meanwhile.
                raise identical_to(parent, ", committed meanwhile") from None
    if of_work_tree and branch_ref == repo.refs.read_symbolic("HEAD"):
        # The work tree's weights are this commit's: later status checks may trust a stat,
        # unless the file changed since it was opened (it is mapped, so read lazily).
        def still(path: str, key: tuple[int, ...] | None) -> tuple[int, ...] | None:
            try:
                return key if stat_key(os.stat(source / path)) == key else None
            except OSError:
                return None

        files = {path: still(path, key) for path, key in adapter.extra_stats.items()}
        content = (
            blob_id(adapter.config_bytes),
            {f.path: (f.blob, f.executable) for f in manifest.files},
        )
        weights_key = still(WEIGHTS_FILE, adapter.weights_stat)
        _record_clean(repo, commit_id, content, weights_key, adapter.read_ns, files)
    _run_hook(repo, "post-commit", [], env, may_refuse=False)
    _ref_moved(repo, branch_ref or "HEAD", parent, commit_id)
    return CommitResult(
        commit_id,
        branch_ref.removeprefix("refs/heads/") if branch_ref else None,
        parent,
        len(manifest.tensors),
        written.objects,
        adapter.layout.data_size,
        summary,
    )


def _run_commit_msg(repo: Repository, message: str, env: dict[str, str]) -> str:
    """Let the commit-msg hook read, edit or refuse the message, as git does."""
    if not hooks.is_active(repo.git_dir, "commit-msg", hint=True):
        return message
    # A file of this commit's own (the hook gets its path, as git's gets COMMIT_EDITMSG's):
    # git serializes commits under index.lock, we do not, and two trainers committing at once
    # through one shared file took each other's messages.
    try:
        temp = TempFile(repo.git_dir, "COMMIT_EDITMSG.")
    except OSError as err:  # the directory is named, not a temporary never made
        raise OSError(err.errno, err.strerror, os.fspath(repo.git_dir)) from None
    with temp:  # closed and removed whatever ends the block
        path = Path(temp.path)
        with os.fdopen(temp.fd, "wb", closefd=False) as f:
            f.write(message.encode())
        temp.close()
        _run_hook(repo, "commit-msg", [str(path)], env, may_refuse=True)
        # Bytes, as git reads the file back: a text read would take the locale's encoding and
        # turn a lone "\r" into a line break.
        return decode_message(path.read_bytes(), "message the commit-msg hook left")


# ------------------------------------------------------------ log and show
@accepts_path
def log(
    repo: Repository,
    spec: str | Sequence[str] = (),
    limit: int | None = None,
    *,
    all_refs: bool = False,
) -> list[CommitInfo]:
    """Commits reachable from `spec` (HEAD when none is given), newest first, as `git log
    --first-parent` lists them: a spec, a range (`A..B`, `^A`, `A...B`) or a list of them."""
    return list(revwalk.walk(log_tips(repo, spec, all_refs=all_refs), limit))


def log_tips(
    repo: Repository, spec: str | Sequence[str] = (), *, all_refs: bool = False
) -> revwalk.Revisions:
    """The commits `log` starts from: those `--all` names (every ref, then HEAD, then linked
    worktrees' HEADs), then those `spec` names; HEAD when nothing is named, as in git."""
    # A str is one argument; anything but a list or tuple goes on for tips_of to refuse.
    args: list[Any] = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    tips = _all_ref_tips(repo) if all_refs else []
    return revwalk.tips_of(repo, args if args or all_refs else ["HEAD"], tips)


def _all_ref_tips(repo: Repository) -> list[revwalk.Tip]:
    """The commits `git log --all` starts from, in its order: each ref's, by name (a ref to a
    tree or blob names none), HEAD's, and those of linked worktrees' detached HEADs. As in git
    2.39 (`fatal: bad object REF`), a ref file that does not parse, or a ref to a missing or
    corrupt object, is an error: a listing of "all" that left a branch out would not say so."""
    found: list[str] = []
    # Without on_broken: a ref file that does not parse raises RefFormatError, naming it.
    for name, oid in repo.refs.iter_refs("refs/"):
        try:
            # Only a tag object needs reading to peel; None: the header cannot tell.
            kind = repo.object_kind(oid)
            if kind in ("tag", None):
                oid, kind = repo.peel_object(oid)
        except CorruptObjectError as err:
            raise CorruptObjectError(f"bad object {name}: {err}") from err
        if kind == "commit":
            found.append(oid)
    head = repo.head_commit()
    found += [head] if head is not None else []
    found += [w.head for w in repo.linked_worktrees() if is_object_id(w.head)]
    return [revwalk.Tip(oid, False) for oid in found]


def decorations(repo: Repository, shown: Collection[str]) -> dict[str, list[str]]:
    """Ref names by the commit they point to, as `git log --decorate` shows them, for `shown` commits."""
    index = ref_labels(repo)
    return {commit: index[commit] for commit in shown if commit in index}


# The refs `git log --decorate` shows by default (git 2.38 and later): others, such as notes,
# replace refs or a tool's own namespace, only with log.initialDecorationSet=all.
_DECORATED_PREFIXES = ("refs/heads/", "refs/tags/", "refs/remotes/")
_DECORATED_EXACT = "refs/stash"


def _decoration(name: str) -> str:
    """A ref's label as git's prettify_refname gives it, tags marked `tag: `."""
    if name.startswith("refs/tags/"):
        return "tag: " + name.removeprefix("refs/tags/")
    for prefix in ("refs/heads/", "refs/remotes/"):
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def _labelled_refs(repo: Repository) -> list[tuple[str, str]]:
    """Every ref, for ref_labels; a ref file that does not parse labels nothing, as in git's
    log, which lists the history all the same (`log --all` fails on it)."""
    try:
        return list(repo.refs.iter_refs("refs/"))
    except RefFormatError:
        return list(repo.refs.iter_refs("refs/", on_broken=lambda _name, _err: None))


def ref_labels(repo: Repository, keep: Callable[[str], bool] | None = None) -> dict[str, list[str]]:
    """Every commit a ref names, with its `git log --decorate` labels: one pass over the refs
    (a log of many pages reads them once, not once a page). With `keep`, only the refs whose
    full name it passes (json_safe: `log --json`); HEAD is then `HEAD` alone where its branch
    is left out."""
    names: dict[str, list[str]] = {}
    for name, oid in _labelled_refs(repo):
        if not name.startswith(_DECORATED_PREFIXES) and name != _DECORATED_EXACT:
            continue
        if keep is not None and not keep(name):
            continue
        # Branches name commits; only a tag may name a tag object that has to be read and peeled.
        # Reading an object per branch made `log` take seconds with 10^5 branches.
        target: str | None = oid
        if name.startswith("refs/tags/") and repo.object_kind(oid) in ("tag", None):
            target = None
            with suppress(MintError):
                target = repo.peel(oid)
        if target is None:
            continue
        names.setdefault(target, []).append(name)
    labels: dict[str, list[str]] = {}
    for commit, refs in names.items():
        # git lists a commit's refs in reverse refname order (bytes, as it compares them): it
        # pushes each ref it reads onto the front of the commit's list.
        refs.sort(key=lambda n: n.encode("utf-8", "surrogateescape"), reverse=True)
        labels[commit] = [_decoration(n) for n in refs]
    head = repo.head_commit()
    if head is not None:
        # HEAD comes first, joined with the branch it names (`HEAD -> main`), which then is
        # not listed again; a detached HEAD, or one naming a ref that is not a branch, is `HEAD`.
        head_branch = repo.refs.read_symbolic("HEAD")
        own = names.get(head, [])
        shown = labels.setdefault(head, [])
        if head_branch is not None and head_branch.startswith("refs/heads/") and head_branch in own:
            del shown[own.index(head_branch)]
            shown.insert(0, f"HEAD -> {_decoration(head_branch)}")
        else:
            shown.insert(0, "HEAD")
    return labels


@accepts_path
def show(repo: Repository, spec: str = "HEAD") -> Revision:
    """The revision `spec` names."""
    return _read_revision(repo, repo.resolve(spec))


# --------------------------------------------------------------------- diff
@dataclass(frozen=True)
class TensorDiff:
    """How one tensor changed between two revisions."""

    name: str
    status: str  # "modified", "added", "removed", "unchanged", "reshaped", "retyped"
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    rel_l2: float | None = None  # ||b - a|| / ||a||
    cosine: float | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON form for --json."""
        return {
            "name": self.name,
            "status": self.status,
            "shape_a": list(self.shape_a) if self.shape_a is not None else None,
            "shape_b": list(self.shape_b) if self.shape_b is not None else None,
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            # JSON has no NaN or Infinity: null where the ratio has no finite value (an
            # all-zero old tensor, as PEFT's B starts, or non-finite values).
            "rel_l2": _finite_or_none(self.rel_l2),
            "cosine": _finite_or_none(self.cosine),
        }


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class DiffResult:
    """A revision-to-revision (or revision-to-work-tree) comparison."""

    a: str
    b: str
    tensors: list[TensorDiff]
    config_changed: bool
    files: list[tuple[str, str]] = field(
        default_factory=list
    )  # (status, path): added/removed/modified
    # The safetensors header changed with every tensor's name, dtype and shape the same: its
    # __metadata__ or the tensors' order (checkout writes other bytes).
    header_changed: bool = False

    @property
    def files_changed(self) -> list[str]:
        """Paths of the extra files that differ."""
        return [path for _status, path in self.files]


@dataclass(frozen=True)
class _Side:
    """One tensor of one side of a diff: its bytes are read only if the other side's differ."""

    dtype: str
    shape: tuple[int, ...]
    sha256: str | None  # None: hash what read() gives
    read: Callable[[], bytes | memoryview]

    def digest(self) -> str:
        """The tensor's sha256, as a manifest records it."""
        import hashlib

        return self.sha256 or hashlib.sha256(self.read()).hexdigest()


def _stored_tensors(repo: Repository, rev: Revision) -> dict[str, _Side]:
    return {
        r.name: _Side(r.dtype, r.shape, r.sha256, partial(repo.tensor_bytes, r.blob, r.name, r))
        for r in rev.manifest.tensors
    }


def _work_tensors(adapter: AdapterFiles) -> dict[str, _Side]:
    return {
        e.name: _Side(e.dtype, e.shape, None, partial(adapter.tensor_bytes, i))
        for i, e in enumerate(adapter.layout.tensors)
    }


# numpy's little-endian view of each dtype diff computes statistics for (BF16 apart).
_NUMPY_VIEWS = {
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
}
# Dtypes whose values diff compares (relative L2, cosine); others (bool, float8, complex) say so.
STATISTICS_DTYPES = frozenset({"BF16", *_NUMPY_VIEWS})


def _as_float64(dtype: str, raw: bytes | memoryview) -> Any:
    """Decode raw tensor bytes to float64 numpy for statistics (None for a dtype without them)."""
    import numpy as np

    if dtype == "BF16":
        return (
            (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        )
    if dtype not in _NUMPY_VIEWS:
        return None
    return np.frombuffer(raw, _NUMPY_VIEWS[dtype]).astype(np.float64)


def _compare(name: str, a: _Side | None, b: _Side | None) -> TensorDiff:
    """One tensor's change; its values are read (one tensor at a time) only when they differ."""
    import numpy as np

    if a is None:
        assert b is not None
        return TensorDiff(name, "added", None, b.shape, dtype_b=b.dtype)
    if b is None:
        return TensorDiff(name, "removed", a.shape, None, dtype_a=a.dtype)

    def result(status: str, rel: float | None = None, cos: float | None = None) -> TensorDiff:
        return TensorDiff(name, status, a.shape, b.shape, rel, cos, a.dtype, b.dtype)

    if a.shape != b.shape:
        return result("reshaped")
    if a.dtype == b.dtype and a.digest() == b.digest():
        return result("unchanged", 0.0, 1.0)
    # Same shape: compare values, across a dtype change too (F32 -> BF16 shows its rounding).
    status = "modified" if a.dtype == b.dtype else "retyped"
    va, vb = _as_float64(a.dtype, a.read()), _as_float64(b.dtype, b.read())
    if va is None or vb is None:
        return result(status)
    # A NaN or an infinity in a tensor makes NaNs and overflows: they are values here (rel_l2
    # nan, cosine none), not numpy's RuntimeWarning lines on stderr.
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        norm_a, norm_b = float(np.linalg.norm(va)), float(np.linalg.norm(vb))
        change = float(np.linalg.norm(vb - va))
        dot = float(va @ vb)
    # From an all-zero A (PEFT's B at step 0) a change is infinitely large, and none is none
    # (+0 -> -0, zeros F32 -> BF16); a cosine with a zero vector has no value.
    rel = change / norm_a if norm_a else (float("inf") if change else 0.0)
    cos = None
    if norm_a and norm_b:
        quotient = dot / norm_a / norm_b  # one by one: the product of two tiny norms is 0
        # A NaN in either has no cosine: max(-1.0, nan) is -1.0, "perfectly opposed".
        if math.isfinite(quotient):
            cos = min(1.0, max(-1.0, quotient))  # rounding can pass 1
    return result(status, rel, cos)


@accepts_path
def diff(repo: Repository, spec_a: str, spec_b: str | None = None) -> DiffResult:
    """Per-tensor change from `spec_a` to `spec_b` (default: the work tree)."""
    with collector_paused():  # a side per tensor and revision, and a TensorDiff
        return _diff(repo, spec_a, spec_b)


def _diff(repo: Repository, spec_a: str, spec_b: str | None) -> DiffResult:
    """diff(), its caller having paused the collector."""
    rev_a = _read_revision(repo, repo.resolve(spec_a))
    tensors_a = _stored_tensors(repo, rev_a)
    if spec_b is None:
        if repo.work_tree is None:
            # git's `diff REV` there: 128, after the revision is read (an unknown one is that).
            raise NoWorkTreeError(
                "this repository has no work tree to compare with: give two revisions"
            )
        work = read_adapter(repo.work_tree, repo.excludes)
        tensors_b, label_b = _work_tensors(work), "work tree"
        config_b, header_b = work.config_bytes, work.layout.header
        files_b = {p: (blob_id(c), x) for p, (c, x) in work.extra_files.items()}
    else:
        rev_b = _read_revision(repo, repo.resolve(spec_b))
        tensors_b, label_b = _stored_tensors(repo, rev_b), rev_b.commit
        config_b, files_b = rev_b.config_bytes, _file_ids(rev_b)
        header_b = repo.read_blob(rev_b.manifest.header_blob)
    files_a = _file_ids(rev_a)
    names = sorted(set(tensors_a) | set(tensors_b))
    changed_files = [  # content or executable bit: a mode change is one, as in git and status
        ("added" if p not in files_a else "removed" if p not in files_b else "modified", p)
        for p in sorted(set(files_a) | set(files_b))
        if files_a.get(p) != files_b.get(p)
    ]
    tensors = []
    with progress_bar(len(names), "comparing tensors", unit="tensors") as update:
        for n in names:
            tensors.append(_compare(n, tensors_a.get(n), tensors_b.get(n)))
            update(1)
    same_layout = all(t.status in ("modified", "unchanged") for t in tensors)
    header_a = repo.read_blob(rev_a.manifest.header_blob)
    return DiffResult(
        rev_a.commit,
        label_b,
        tensors,
        rev_a.config_bytes != config_b,
        changed_files,
        same_layout and bytes(header_a) != bytes(header_b),
    )


# ------------------------------------------------------------------- status
@dataclass(frozen=True)
class Status:
    """The work tree against HEAD."""

    branch: str | None
    head: str | None
    changes: list[tuple[str, str]]  # (kind, path): kind is modified/added/removed
    error: str | None = None  # why the work tree could not be read, if it could not
    # The revision the work tree was made to hold, when HEAD has moved since (a `commit --from`
    # onto its branch, a reset by git): its changes are that revision's, not the user's.
    base: str | None = None
    # The revisions a checkout (or reset --hard) that stopped part-way, and could not write the
    # old revision back, left the work tree holding files of, when one is not HEAD.
    mixed: tuple[str, ...] | None = None

    @property
    def clean(self) -> bool:
        """True when the work tree matches HEAD."""
        return not self.changes and self.error is None


@accepts_path
def status(repo: Repository) -> Status:
    """Compare the work tree with HEAD by content hash (the weights by stat when recorded clean)."""
    state = _status(repo)[0]
    if state.clean:
        return state
    mixed = _mixed_instead(repo, state.head)
    return replace(
        state, base=_held_instead(repo, state.head), mixed=tuple(mixed) if mixed else None
    )


def mixed_hint(repo: Repository, mixes: Sequence[str], head: str, branch: str | None) -> str:
    """What to do about a work tree a failed checkout (or reset --hard) left holding files of
    each of `mixes`, while HEAD (`branch`) is at `head`."""
    name, short = branch or "HEAD", repo.abbrev(head)
    held = " and ".join(repo.abbrev(m) for m in mixes)
    return (
        f"a checkout (or reset --hard) stopped part-way and could not write the old revision "
        f"back: the work tree holds files of {held}, and {name} is at {short}: `mintvcs "
        f"checkout --force {branch or short}` takes {short} (discarding what differs), "
        f"`mintvcs reset --soft {branch or short}` keeps the work tree's files as changes to it"
    )


def stale_hint(repo: Repository, base: str, head: str, branch: str | None) -> str:
    """What to do about a work tree left at `base` while HEAD (`branch`) moved to `head`."""
    name, short = branch or "HEAD", repo.abbrev(head)
    return (
        f"the work tree holds revision {repo.abbrev(base)}, but {name} has moved to {short} since "
        f"it was checked out (a `commit --from` onto {name}, or another process): `mintvcs "
        f"checkout --force {branch or short}` takes {short} (discarding what differs), `mintvcs "
        f"reset --soft {branch or short}` keeps the work tree's files as changes to it"
    )


def _status(
    repo: Repository, known: RevisionOf | None = None
) -> tuple[Status, AdapterFiles | None]:
    """status(), and the work tree's adapter files when they were read (for a second comparison).
    `known`: HEAD's revision as the caller holds it (read once, where it has to be)."""
    if repo.work_tree is None:  # kept inline: the checks below rely on mypy's narrowing
        raise NoWorkTreeError("this repository has no work tree")
    branch, head = repo.current_branch(), repo.head_commit()
    head_rev = _revision_of(repo, head, known)

    def head_revision() -> Revision:
        assert head_rev is not None
        return head_rev.read()

    if head_rev is not None and _clean_by_stat(repo, head_rev):
        return Status(branch, head, []), None
    try:
        work = read_adapter(repo.work_tree, repo.excludes)
    except MintError as err:
        gone = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (repo.work_tree / f).is_file()]
        if head is not None and gone:  # as git status: a deleted file is a change
            rev = head_revision()
            changes = [("removed", f) for f in gone]
            config = repo.work_tree / CONFIG_FILE
            if CONFIG_FILE not in gone and config.read_bytes() != rev.config_bytes:
                changes.append(("modified", CONFIG_FILE))
            return Status(
                branch,
                head,
                changes + _file_changes(extra_files(repo.work_tree, repo.excludes), rev),
            ), None
        if head is None and not any(p.name != GIT_DIR for p in repo.work_tree.iterdir()):
            return Status(branch, head, []), None  # no commit yet, and nothing to commit
        return Status(branch, head, [], str(err)), None
    if head is None:
        added = [("added", CONFIG_FILE), ("added", WEIGHTS_FILE)]
        files = sorted((("added", p) for p in work.extra_files), key=_path_order)
        return Status(branch, head, added + files), work
    return Status(branch, head, _changes(repo, work, head_revision())), work


class RevisionOf:
    """A commit's revision, read the first time it is needed: a 37k-tensor one takes a second,
    and what a checkout over a clean work tree asks of HEAD (its config and extra files) the
    work tree's record answers."""

    def __init__(self, repo: Repository, commit: str, known: Revision | None = None) -> None:
        self.repo = repo
        self.commit = commit
        self._revision = known if known is not None and known.commit == commit else None

    def read(self) -> Revision:
        """The revision, read on the first call."""
        if self._revision is None:
            self._revision = _read_revision(self.repo, self.commit)
        return self._revision

    def content_ids(self) -> tuple[str, dict[str, tuple[str, bool]]]:
        """The blob id of its adapter_config.json and _file_ids() of its extra files: from the
        work tree's record when it names this commit, else from the revision."""
        recorded = _recorded_content(self.repo, self.commit)
        if recorded is not None:
            return recorded
        rev = self.read()
        return blob_id(rev.config_bytes), _file_ids(rev)


def _revision_of(
    repo: Repository, commit: str | None, known: RevisionOf | None
) -> RevisionOf | None:
    """`commit`'s revision, read on demand: `known` when it is that one; None for no commit."""
    if commit is None:
        return None
    return known if known is not None and known.commit == commit else RevisionOf(repo, commit)


def _changes(repo: Repository, work: AdapterFiles, rev: Revision) -> list[tuple[str, str]]:
    """(kind, path) for what differs between the adapter files `work` and revision `rev`."""
    import hashlib

    changes: list[tuple[str, str]] = []
    if work.config_bytes != rev.config_bytes:
        changes.append(("modified", CONFIG_FILE))
    committed = {t.name: t for t in rev.manifest.tensors}
    with progress_bar(work.layout.data_size, "checking work tree") as update:
        for index, entry in enumerate(work.layout.tensors):
            record = committed.pop(entry.name, None)
            if record is None:
                changes.append(("added", f"{WEIGHTS_FILE}:{entry.name}"))
            elif (record.dtype, record.shape) != (
                entry.dtype,
                entry.shape,
            ) or record.sha256 != hashlib.sha256(work.tensor_bytes(index)).hexdigest():
                changes.append(("modified", f"{WEIGHTS_FILE}:{entry.name}"))
            update(entry.nbytes)
    changes += [("removed", f"{WEIGHTS_FILE}:{name}") for name in committed]
    if not changes and work.layout.header != repo.read_blob(rev.manifest.header_blob):
        changes.append(("modified", f"{WEIGHTS_FILE} (header)"))
    return changes + _file_changes(work.extra_files, rev)


def _file_ids(rev: Revision) -> dict[str, tuple[str, bool]]:
    """(blob id, executable) of each of `rev`'s extra files, by path: compared, never read."""
    return {f.path: (f.blob, f.executable) for f in rev.manifest.files}


def _file_changes(
    work_files: Mapping[str, tuple[bytes | memoryview, bool]], rev: Revision
) -> list[tuple[str, str]]:
    """(kind, path) for the extra files that differ between the work tree's and revision `rev`'s."""
    changes: list[tuple[str, str]] = []
    committed_files = _file_ids(rev)
    for path, (content, executable) in work_files.items():
        was = committed_files.pop(path, None)
        if was is None:
            changes.append(("added", path))
        elif (blob_id(content), executable) != was:  # a mode change is one, as in git
            changes.append(("modified", path))
    # git's order, that of diff and show: by the path's bytes, not the walk's (a directory's
    # files after the files beside it).
    return sorted(changes + [("removed", p) for p in committed_files], key=_path_order)


def _path_order(change: tuple[str, str]) -> bytes:
    """The sort key of a (kind, path) change: the path's bytes, as git sorts paths."""
    return change[1].encode("utf-8", "surrogateescape")


# ------------------------------------------------------- clean-by-stat record
# `.mint/mint-worktree.json` says "the work tree's weights file, while it has this stat,
# holds the weights of commit C", so that checkout and status need not read and hash 84 MB;
# and the same of each extra file it lists (a trainer's optimizer state can be larger still).
# It is written after a checkout and after a commit of the work tree. A stat is trusted only
# if the file's mtime is at least _RACY_NS older than the moment its content was known: any
# later write gives the file a newer mtime, even within the same clock tick (git's "racily
# clean" rule). Checkout makes its own writes trustworthy at once by dating the files' mtimes
# back by _RACY_NS * 2 before it renames them into place.
# While a checkout (or reset --hard) changes the work tree, the record claims no base and lists
# the revisions whose files the work tree may hold ("mixes"): where the checkout dies, or fails
# and cannot write the old revision back, that stays (see _WorkTreeChanges).
WORKTREE_RECORD = "mint-worktree.json"
_RACY_NS = 100_000_000


def _trusted(key: tuple[int, ...] | None, known_ns: int) -> bool:
    """Whether a file with stat_key() `key` cannot have changed unseen since `known_ns`."""
    return key is not None and key[1] <= known_ns - _RACY_NS


def _record_clean(
    repo: Repository,
    commit_id: str,
    content: tuple[str, Mapping[str, tuple[str, bool]]] | None,
    key: tuple[int, ...] | None,
    known_ns: int,
    files: Mapping[str, tuple[int, ...] | None] | None = None,
    changes: _WorkTreeChanges | None = None,
) -> None:
    """Record that the work tree holds commit `commit_id` (its base), whose `content` is
    RevisionOf.content_ids() (None: not known here), that the weights file whose stat_key() is
    `key` holds its weights, and each extra file in `files` with that stat_key() its committed
    content (None or a fresh stat: not trusted, read next time); after the checkout that made
    it so (`changes`, see _write_record)."""
    trusted = {
        p: list(k) for p, k in (files or {}).items() if k is not None and _trusted(k, known_ns)
    }
    weights = list(key) if key is not None and _trusted(key, known_ns) else None
    record: dict[str, Any] = {
        "commit": commit_id,
        "weights": weights,
        "known_ns": known_ns,
        "files": trusted,
    }
    if content is not None:
        record["config"] = content[0]
        record["committed"] = {p: list(ids) for p, ids in content[1].items()}
    _write_record(repo, record, changes)


def _parse_record(raw: bytes) -> dict[str, Any]:
    """The work-tree record in `raw`; {} where it does not parse as one."""
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _read_record(repo: Repository) -> dict[str, Any]:
    """The work-tree record; {} where there is none or it does not parse."""
    try:
        return _parse_record((repo.git_dir / WORKTREE_RECORD).read_bytes())
    except OSError:
        return {}


def _recorded_content(
    repo: Repository, commit: str
) -> tuple[str, dict[str, tuple[str, bool]]] | None:
    """RevisionOf(commit).content_ids() as the work tree's record lists them, where it names
    `commit` (older records list none: the revision is read instead)."""
    record = _read_record(repo)
    if record.get("commit") != commit:
        return None
    try:
        config = record["config"]
        files = {
            path: (blob, executable) for path, (blob, executable) in record["committed"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    sound = is_object_id(config) and all(
        is_object_id(blob) and isinstance(executable, bool) for blob, executable in files.values()
    )
    return (config, files) if sound else None


def _write_record(
    repo: Repository, record: dict[str, Any], changes: _WorkTreeChanges | None = None
) -> None:
    """Write the work-tree record; one that cannot be written is removed, never left stale.

    After a checkout (`changes`) the record that lists its mix stays instead, made to list only
    the revision now written where it can be: removing it would let a plain commit take the
    work tree's files if the move of HEAD fails next and the old revision cannot be written back.
    """
    path = repo.git_dir / WORKTREE_RECORD
    try:
        _write_atomic(path, json.dumps(record).encode(), shared=repo.shared_perm)
    except OSError:  # a full disk, say: the next status hashes, and no base is claimed
        if changes is not None and changes.marked:
            _mark_in_place(repo, [record["commit"]])
            return
        with suppress(OSError):
            path.unlink(missing_ok=True)


def _mixed_record(mixes: list[str]) -> bytes:
    """A work-tree record that claims no base and lists the revisions the work tree may hold."""
    return json.dumps(
        {"commit": None, "mixes": mixes, "weights": None, "known_ns": 0, "files": {}}
    ).encode()


def _mark_in_place(repo: Repository, mixes: list[str]) -> bool:
    """Overwrite the work-tree record in place with one listing `mixes`, padded with spaces to
    the record's length (JSON allows them): no new block is needed, so this still works on a
    disk too full for a temporary. False where there is no record that long, or it fails."""
    data = _mixed_record(mixes)
    try:
        fd = os.open(repo.git_dir / WORKTREE_RECORD, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        if len(data) > size:
            return False
        os.pwrite(fd, data + b" " * (size - len(data)), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def work_tree_base(repo: Repository) -> str | None:
    """The revision the work tree was last made to hold (by checkout, a commit of it, reset),
    as the record says; None where no record says (an interrupted checkout, an old repository)."""
    record = _read_record(repo)
    # A record without "files" was written by a mintvcs that did not keep it up to date as a
    # base (its reset left it): only a cache of stats, no base.
    commit = record.get("commit") if "files" in record else None
    return commit if is_object_id(commit) else None


def work_tree_mix(repo: Repository) -> list[str]:
    """The revisions whose files the work tree holds a mix of, where a checkout or reset --hard
    stopped part-way and could not write the old revision back; [] where none did."""
    mixes = _read_record(repo).get("mixes")
    return [m for m in mixes if is_object_id(m)] if isinstance(mixes, list) else []


def _held_revisions(repo: Repository) -> list[str]:
    """The revisions whose files the work tree holds, as its record says: its base, or those a
    checkout left a mix of; [] where no record says."""
    base = work_tree_base(repo)
    return [base] if base is not None else work_tree_mix(repo)


def _held_instead(repo: Repository, head: str | None) -> str | None:
    """The revision the work tree holds when it is not `head` (its branch moved under it),
    else None."""
    base = work_tree_base(repo)
    if base is None or head is None or base == head:
        return None
    return None if _switched_unrecorded(repo, base, head) else base


def _switched_unrecorded(repo: Repository, base: str, head: str) -> bool:
    """Whether something that keeps no record (a mintvcs before the record existed, which
    checked out and committed without it) made the work tree hold `head` after the record named
    `base`: the weights file no longer has the stat the record lists, and holds `head`'s tensors
    where `base`'s differ. As git's index, a stat that no longer matches sends us to the content;
    weights that are neither revision's (retrained in place) leave the record believed.

    The answer found by the content is kept in the record ("switched"), with the weights' stat
    and `head`, as git status refreshes its index: while they stay the same, the next status,
    commit or checkout takes it without reading and hashing the weights again."""
    assert repo.work_tree is not None
    import hashlib

    path = repo.work_tree / WEIGHTS_FILE
    try:
        original = (repo.git_dir / WORKTREE_RECORD).read_bytes()
        record = _parse_record(original)
        key = list(stat_key(os.stat(path)))
        if record.get("weights") == key:
            return False  # never rewritten since the record was
        known = record.get("switched")
        if (
            isinstance(known, dict)
            and known.get("head") == head
            and known.get("weights") == key
            and isinstance(known.get("known_ns"), int)
            and _trusted(tuple(key), known["known_ns"])
        ):
            return known.get("holds_head") is True
        was, now = _read_revision(repo, base), _read_revision(repo, head)
    except (OSError, MintError):
        return False

    def tensors(rev: Revision) -> tuple[bytes, dict[str, tuple[str, tuple[int, ...], str]]]:
        return bytes(repo.read_blob(rev.manifest.header_blob)), {
            t.name: (t.dtype, t.shape, t.sha256) for t in rev.manifest.tensors
        }

    held = tensors(now)
    if held == tensors(was):
        return False  # the weights cannot tell the two apart
    known_ns = time.time_ns()
    try:
        weights, read_key = read_stable(path)
        layout = parse_layout(weights, str(path))
    except (OSError, MintError):
        return False
    offset = len(layout.header)
    found = {
        t.name: (
            t.dtype,
            t.shape,
            hashlib.sha256(weights[offset + t.start : offset + t.end]).hexdigest(),
        )
        for t in layout.tensors
    }
    holds_head = (bytes(layout.header), found) == held
    if read_key is not None and _trusted(read_key, known_ns):
        # Not _write_record: a record that cannot be rewritten must stay (it names the base),
        # and one a checkout or commit rewrote meanwhile is newer than this answer.
        verdict = {"head": head, "weights": list(read_key), "known_ns": known_ns}
        with suppress(OSError):
            if (repo.git_dir / WORKTREE_RECORD).read_bytes() == original:
                record["switched"] = {**verdict, "holds_head": holds_head}
                data = json.dumps(record).encode()
                _write_atomic(repo.git_dir / WORKTREE_RECORD, data, shared=repo.shared_perm)
    return holds_head


def _mixed_instead(repo: Repository, head: str | None) -> list[str] | None:
    """The revisions a checkout left the work tree a mix of, when one of them is not `head`."""
    mixes = work_tree_mix(repo)
    return mixes if head is not None and any(m != head for m in mixes) else None


def work_tree_hint(repo: Repository, head: str | None, branch: str | None) -> str | None:
    """Why the work tree's files are not changes to `head` (its branch moved under it, or a
    failed checkout left a mix), and what to do; None when they are."""
    base = _held_instead(repo, head)
    if base is not None:
        assert head is not None
        return stale_hint(repo, base, head, branch)
    mixes = _mixed_instead(repo, head)
    if mixes is not None:
        assert head is not None
        return mixed_hint(repo, mixes, head, branch)
    return None


class _WorkTreeChanges:
    """A checkout's changes to the work tree, and its record around them.

    Before the first change the record is replaced by one that claims no base and lists the
    revisions whose files the work tree may then hold: a checkout killed or failing part-way
    leaves no record naming a base the work tree no longer holds, yet a plain commit of the
    mix is still refused (it would put an older revision's files on top of HEAD). A record
    that cannot be written (a full disk) is overwritten in place, else the checkout fails
    before its first change. Where the write fails before anything changed (a read-only work
    tree), the record is put back as it was, so a work tree left behind by a `commit --from` is
    still known to be.
    """

    def __init__(self, repo: Repository, mixes: list[str]) -> None:
        self.repo = repo
        self.path = repo.git_dir / WORKTREE_RECORD
        try:
            self.original: bytes | None = self.path.read_bytes()
        except OSError:
            self.original = None
        self.mixes = mixes
        self.mixed = _mixed_record(mixes)
        self.marked = False
        self.changed = False

    @contextmanager
    def change(self, *, in_place: bool = False) -> Iterator[None]:
        """Wrap one change to the work tree (a rename into place, a removal): the record is
        marked before it, and it counts as made once the block returns, or at once `in_place`
        (a write in place that fails part-way has changed the file)."""
        if not self.marked:
            try:
                _write_atomic(self.path, self.mixed, shared=self.repo.shared_perm)
            except OSError:
                # A full disk, say: the record's own bytes take the mark. Where they cannot
                # either, the checkout fails here, before anything changed: with no record a
                # plain commit would take a mix left by a later failure.
                if not _mark_in_place(self.repo, self.mixes):
                    raise
            self.marked = True
        self.changed |= in_place
        yield
        self.changed = True

    def put_back(self) -> None:
        """The record as it was, after a write that changed nothing in the work tree."""
        if self.marked:
            # Else the mix stays recorded: it claims no base, and a plain commit still refuses.
            with suppress(OSError):
                if self.original is None:
                    self.path.unlink(missing_ok=True)
                else:
                    _write_atomic(self.path, self.original, shared=self.repo.shared_perm)


def _undo_point(repo: Repository, head: RevisionOf | None) -> RevisionOf | None:
    """What a checkout or reset --hard that fails part-way writes back: the revision the work
    tree holds as its record says, where HEAD moved under it (a `commit --from`), else HEAD's."""
    if head is None:
        base = work_tree_base(repo)
        return RevisionOf(repo, base) if base is not None else None
    held = _held_instead(repo, head.commit)
    return RevisionOf(repo, held) if held is not None else head


def _same_dir(a: Path, b: Path | None) -> bool:
    """Whether `a` and `b` name the same directory (`.`, a symlinked path)."""
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _clean_by_stat(repo: Repository, head: RevisionOf) -> bool:
    """True when the record says the weights are HEAD's and the config and files match too
    (HEAD's revision is read only where the record does not list their ids). An extra file
    the record lists with its current stat is not read."""
    assert repo.work_tree is not None
    try:
        original = (repo.git_dir / WORKTREE_RECORD).read_bytes()
        record = _parse_record(original)
        key = stat_key(os.stat(repo.work_tree / WEIGHTS_FILE))
        if record["commit"] != head.commit or record["weights"] != list(key):
            return False  # another base, a changed file, or a stat not trusted (None)
        if not _trusted(key, int(record["known_ns"])):
            return False
        recorded = record.get("files", {})
        if not isinstance(recorded, dict):
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    config, committed = head.content_ids()
    try:
        # A FIFO put there is no config, and would block a plain read for ever.
        if blob_id(read_regular(repo.work_tree / CONFIG_FILE)) != config:
            return False
        present = extra_file_stats(repo.work_tree, repo.excludes)
        if set(present) != set(committed):
            return False
        refreshed: dict[str, tuple[int, ...] | None] = {}
        for path, (file_key, executable) in present.items():
            if recorded.get(path) == list(file_key):
                continue  # its content is the one committed, and a mode change changes its ctime
            known_ns = time.time_ns()
            content, refreshed[path] = read_stable(repo.work_tree / path, mapped=False)
            if (blob_id(content), executable) != committed[path]:
                return False
            if not _trusted(refreshed[path], known_ns):
                refreshed[path] = None
    except (OSError, MintError):  # a file name that cannot be stored: status says why
        return False
    if any(refreshed.values()):
        # Touched but unchanged (as git status refreshes its index): not read again next time,
        # unless a checkout or commit wrote a record meanwhile (then this one is out of date).
        with suppress(OSError):
            if (repo.git_dir / WORKTREE_RECORD).read_bytes() == original:
                record["files"] = {**recorded, **{p: list(k) for p, k in refreshed.items() if k}}
                _write_record(repo, record)
    return True


# ------------------------------------------------------------ branch and tag
@accepts_path
def branch_create(
    repo: Repository, name: str, start: str | None = None, *, force: bool = False
) -> str:
    """Create (or with force, move) branch `name` at `start` (default HEAD); returns its commit."""
    check_branch_name(name)
    ref = f"refs/heads/{name}"
    oid = repo.resolve("HEAD" if start is None else start)  # "" is no revision, as in git
    if start is None:
        # As git's reflog says it: made from the current branch, by name (HEAD when detached).
        start = repo.current_branch() or "HEAD"
    existing = repo.refs.read(ref)
    if existing is not None and not force:
        raise RefExistsError(f"a branch named '{name}' already exists (use -f to move it)")
    if existing is not None and ref == repo.refs.read_symbolic("HEAD"):
        raise MintError(f"cannot force-update the current branch '{name}'; use 'mintvcs reset'")
    if existing is not None and (where := _worktree_holding(repo, ref)) is not None:
        # As git: moving it would leave that worktree's index and files behind its branch.
        raise CheckedOutElsewhereError(
            f"cannot force update the branch '{name}' checked out at '{where}'"
        )
    message = f"branch: Created from {start}" if existing is None else f"branch: Reset to {start}"
    _move_ref(repo, ref, oid, old=existing, message=message, by=signature(repo))
    _ref_moved(repo, ref, existing, oid)
    return oid


@accepts_path
def branch_delete(repo: Repository, name: str, *, force: bool = False) -> str:
    """Delete branch `name`; returns the commit it pointed to (the branch a symbolic one names). Unless forced, only if HEAD's history holds it."""
    ref = f"refs/heads/{name}"
    # Also one whose name no ref file could hold (git takes such names in packed-refs):
    # deleting is the one thing mintvcs does with it.
    oid = repo.refs.read(ref, long_names=True)
    if oid is None:
        raise UnknownRevisionError(f"branch '{name}' not found")
    alias_of = repo.refs.read_symbolic(ref, long_names=True)
    if alias_of is not None:
        # A symbolic branch (`git symbolic-ref refs/heads/alias refs/heads/main`): as git,
        # delete the link itself; the branch it names keeps its commits.
        repo.refs.delete(ref)
        _ref_moved(repo, ref, oid, None)
        return alias_of.removeprefix("refs/heads/")
    if repo.refs.read_symbolic("HEAD") == ref:
        raise MintError(f"cannot delete branch '{name}': it is checked out")
    if (where := _worktree_holding(repo, ref)) is not None:
        raise MintError(
            f"cannot delete branch '{name}': it is checked out in the git worktree {where}"
        )
    head = repo.head_commit()
    if not force and (head is None or not is_ancestor(repo, oid, head)):
        raise MintError(
            f"the branch '{name}' is not fully merged: its tip {repo.abbrev(oid)} is not in HEAD's "
            f"history, so deleting it would leave that revision reachable only by the reflog; "
            f"use -D to delete it anyway"
        )
    repo.refs.delete(ref, old=oid)
    _ref_moved(repo, ref, oid, None)
    return oid


def _worktree_holding(repo: Repository, ref: str) -> str | None:
    """Where a `git worktree` of the store has `ref` checked out, if one has."""
    for worktree in repo.linked_worktrees():
        if worktree.head == f"ref: {ref}":
            return str(worktree.where)
    return None


@dataclass(frozen=True)
class RenameResult:
    """What `branch -m` did: branch `renamed_from` is now `name`, at `commit` (None: unborn)."""

    name: str
    commit: str | None
    renamed_from: str


@accepts_path
def branch_rename(
    repo: Repository, old: str | None, new: str, *, force: bool = False
) -> RenameResult:
    """Rename branch `old` (None: the current one) to `new` with its reflog, as `git branch -m`
    (`force`: -M, replacing an existing `new`); HEAD and linked worktrees that name it follow."""
    check_name_type(new)
    current = repo.current_branch()
    if old is None:
        if current is None:
            raise MintError(
                "cannot rename the current branch: HEAD is detached; name the branch to rename "
                "(`mintvcs branch -m OLD NEW`)"
            )
        old = current
    check_name_type(old)
    old_ref, new_ref = f"refs/heads/{old}", f"refs/heads/{new}"
    misnamed = False
    try:
        check_branch_name(old)
    except InvalidRefNameError:
        # As git: a branch made under a name it now refuses (by `git update-ref`) can be renamed
        # away, with a warning; a name that is no branch's is refused.
        if repo.refs.read(old_ref) is None:
            raise
        try:  # git takes bytes that are not UTF-8, and renames such a branch without a word
            check_branch_name(old, utf8=False)
        except InvalidRefNameError:
            misnamed = True
    if old != new:  # as git: `-m main main` only checks that the name is valid
        check_branch_name(new)
    if repo.refs.read_symbolic(old_ref) is not None:
        raise MintError(
            f"cannot rename branch '{old}': it is a symbolic ref (`git symbolic-ref`), which git "
            "does not rename either; delete it and make one under the new name"
        )
    oid = repo.refs.read(old_ref)
    if oid is None and old != current:
        raise UnknownRevisionError(f"branch '{old}' not found")
    worktrees = repo.linked_worktrees()
    if old != new and repo.refs.read(new_ref) is not None:
        if not force:
            raise RefExistsError(f"a branch named '{new}' already exists (use -M to replace it)")
        # As git outside a bare repository: a branch checked out anywhere is not overwritten.
        if repo.refs.read_symbolic("HEAD") == new_ref:
            raise MintError(f"cannot replace the current branch '{new}': it is checked out")
        if (where := _worktree_holding(repo, new_ref)) is not None:
            raise MintError(
                f"cannot replace branch '{new}': it is checked out in the git worktree {where}"
            )
    who = signature(repo)
    value, replaced = repo.refs.rename(
        old_ref,
        new_ref,
        force=force,
        message=f"Branch: renamed {old_ref} to {new_ref}",
        identity=who.identity,
        timestamp=who.timestamp,
        tz=who.tz,
        worktrees=[w.admin for w in worktrees],
    )
    if value is not None and old != new:
        # In the order the store changed: servers following refs serve `new` before `old` goes.
        _ref_moved(repo, new_ref, replaced, value)
        _ref_moved(repo, old_ref, value, None)
    if misnamed:
        import sys

        sys.stderr.write(one_line(f"warning: Renamed a misnamed branch '{old}' away") + "\n")
    return RenameResult(new, value if value is not None else replaced, old)


def is_ancestor(repo: Repository, ancestor: str, commit: str) -> bool:
    """True when `ancestor` is `commit` or in its history (every parent, not only first ones)."""
    seen: set[str] = set()
    todo = [commit]
    while todo:
        oid = todo.pop()
        if oid == ancestor:
            return True
        if oid not in seen:
            seen.add(oid)
            todo.extend(repo.commit_info(oid).parents)
    return False


@dataclass(frozen=True)
class Branch:
    """A branch as `branch --list` shows it."""

    name: str
    commit: str
    current: bool
    alias_of: str | None = None  # the branch a symbolic branch names (git shows `alias -> main`)


def warn_ignored_ref(name: str, err: MintError) -> None:
    """As git's `warning: ignoring broken ref`: a listing leaves `name` out, and says why on stderr."""
    import sys

    reason = err.rule if isinstance(err, InvalidRefNameError) else str(err)
    if not fits_files(name):
        kind = "branch -D" if name.startswith("refs/heads/") else "tag -d"
        reason += f"; mintvcs only deletes such a ref (`mintvcs {kind} NAME`)"
    # C1 controls and bidi overrides escaped, as in every line that names a ref.
    sys.stderr.write(one_line(f"warning: ignoring ref {name}: {reason}") + "\n")


def json_safe(name: str) -> bool:
    """Whether a --json output can carry ref `name` (a full one); if not, a warning says it is
    left out. JSON text is Unicode: a name that is not UTF-8 would come out as a lone surrogate
    escape, which strict readers refuse and no client can send back. The text listings show it,
    as git does."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        import sys

        sys.stderr.write(
            f"warning: ignoring ref {quote_path(name)}: it is not UTF-8, which JSON cannot carry\n"
        )
        return False
    return True


@accepts_path
def branches(
    repo: Repository, *, on_broken: Callable[[str, MintError], None] = warn_ignored_ref
) -> list[Branch]:
    """Every branch, sorted by name; one that cannot be read or used is left out and passed to
    `on_broken` (by default, warned about on stderr), as git's listings do."""
    current = repo.refs.read_symbolic("HEAD")
    rows = []
    for name, oid in repo.refs.iter_refs("refs/heads/", on_broken=on_broken):
        target = repo.refs.read_symbolic(name)
        alias_of = target.removeprefix("refs/heads/") if target is not None else None
        rows.append(Branch(name.removeprefix("refs/heads/"), oid, name == current, alias_of))
    return rows


@accepts_path
def tag_create(
    repo: Repository,
    name: str,
    rev: str = "HEAD",
    *,
    message: str | None = None,
    force: bool = False,
) -> str:
    """Create a lightweight tag, or an annotated one with `message`; returns the tag's ref value."""
    check_name_type(name)
    if message is not None:
        if not isinstance(message, str):
            raise TypeError(f"a tag message is a str, not {type(message).__name__}")
        check_message(message, "tag")
    check_ref_name(f"refs/tags/{name}")
    check_utf8_name(name)
    if name.startswith("-"):
        raise InvalidRefNameError(name, "a tag name cannot begin with '-'")
    ref = f"refs/tags/{name}"
    existing = repo.refs.read(ref)
    if existing is not None and not force:
        raise RefExistsError(f"tag '{name}' already exists (use -f to replace it)")
    # As git: what REV names, so the name of an annotated tag gives its tag object (a
    # lightweight tag then names that object, an annotated one nests it); `REV^{}` the commit.
    target = repo.resolve_object(rev)
    value = target
    tagger = signature(repo, strict=message is not None)  # a reflog line alone is never refused
    who = tagger.identity
    if message is not None:
        from dulwich.objects import Tag, parse_timezone

        tag = Tag()
        tag.name = name.encode()
        # Its type as git records it: "tag" for a tag object's id, a nested tag.
        tag.object = (type(repo.get_object(target)), target.encode())
        tag.tagger = who.encode()
        tag.tag_time = tagger.timestamp
        tag.tag_timezone = parse_timezone(tagger.tz.encode())[0]
        # git tag's default cleanup drops comment lines too, unlike commit -m's.
        tag.message = clean_message(message, comment_char(repo)).encode()
        repo.add_object(tag)
        value = tag.id.decode()
    _move_ref(repo, ref, value, old=existing, message=f"tag: {name}", by=tagger)
    _ref_moved(repo, ref, existing, value)
    return value


@accepts_path
def tag_delete(repo: Repository, name: str) -> str:
    """Delete tag `name`; returns its value."""
    ref = f"refs/tags/{name}"
    oid = repo.refs.read(ref, long_names=True)  # as branch_delete
    if oid is None:
        raise UnknownRevisionError(f"tag '{name}' not found")
    repo.refs.delete(ref, old=oid)
    _ref_moved(repo, ref, oid, None)
    return oid


@dataclass(frozen=True)
class TagRef:
    """A tag as `tag --list --json` shows it."""

    name: str
    value: str  # what the ref holds: the tag object of an annotated tag
    annotated: bool  # `value` is a tag object
    object: str  # what the tag names once tag objects are followed: mostly a commit
    type: str  # `object`'s type: git can tag a tree or a blob


@accepts_path
def tag_refs(
    repo: Repository,
    *,
    match: Callable[[str], bool] | None = None,
    on_broken: Callable[[str, MintError], None] = warn_ignored_ref,
) -> list[TagRef]:
    """Every tag whose name `match` takes (default: all), sorted. One that cannot be read or used
    (a missing or corrupt object, its own or one its tag objects name) is left out and passed to
    `on_broken`, as in branches(); a tag `match` refuses is not read."""
    listed = []
    for ref, oid in repo.refs.iter_refs("refs/tags/", on_broken=on_broken):
        name = ref.removeprefix("refs/tags/")
        if match is not None and not match(name):
            continue
        kind = repo.object_kind(oid)  # a lightweight tag: its object's type, nothing read
        try:
            if kind is None:  # the header did not tell (a deltified or borrowed object): read it
                kind = repo.get_object(oid).type_name.decode()
            target, target_kind = repo.peel_object(oid) if kind == "tag" else (oid, kind)
        except CorruptObjectError as err:
            on_broken(ref, err)
            continue
        listed.append(TagRef(name, oid, kind == "tag", target, target_kind))
    return listed


@accepts_path
def tags(
    repo: Repository, *, on_broken: Callable[[str, MintError], None] = warn_ignored_ref
) -> list[tuple[str, str, str]]:
    """(name, object, type) for every tag, peeled, sorted: mostly commits, but git can tag a tree
    or blob. One that cannot be read or used is left out, as in branches(); tag_refs() also
    tells the ref's own value."""
    return [(t.name, t.object, t.type) for t in tag_refs(repo, on_broken=on_broken)]


# ---------------------------------------------------------- checkout, reset
def write_work_tree(
    repo: Repository,
    rev: Revision,
    old: RevisionOf | None,
    show_progress: bool = True,
    *,
    undo: RevisionOf | None,
) -> None:
    """Make the work tree hold `rev` exactly, removing files that only `old` (HEAD's revision)
    had, or the revisions the work tree's record says it holds instead.

    If writing fails part-way (a full disk, Ctrl-C), `undo` (_undo_point) is written back: the
    work tree never holds one revision's config beside another's weights. If it fails before
    anything in the work tree changed (a read-only one), nothing is written back and the
    work tree's record is left as it was.
    """
    work = _work_tree_of(repo)
    files = rev.files()  # refuses a revision holding a file no checkout writes, before any work
    # Unchanged small tensors are taken from the weights file replaced, not decoded.
    if show_progress:
        with progress_bar(rev.manifest.nbytes, "decoding") as update:
            weights = rev.safetensors_buffer(update, work / WEIGHTS_FILE)
    else:
        weights = rev.safetensors_buffer(replacing=work / WEIGHTS_FILE)
    held = _held_revisions(repo)
    # A file of HEAD's that no checkout writes (an earlier mintvcs committed it) never reached
    # the work tree from one: it is not removed either (`.GIT/config` may be `.git`'s).
    gone = (
        []
        if old is None
        else [
            path
            for path in old.content_ids()[1]
            if path not in files and unsafe_path_reason(path) is None
        ]
    )
    gone += _left_behind_files(repo, old, files, gone, held)
    # Another repository's work tree inside this one holds its own files (an older commit may
    # have taken them): they are never removed, nor written over, as git leaves an embedded
    # repository's files alone.
    gone = [path for path in gone if _inside_repository(work, path) is None]
    files = {path: v for path, v in files.items() if _inside_repository(work, path) is None}
    for path in [*files, *gone]:  # before anything is written or removed
        _refuse_symlinked_parent(work, path)
    for path in files:
        _refuse_file_in_the_way(work, path, set(gone))
    # No record: the work tree holds HEAD's files, and perhaps edits the checkout may lose.
    was = held or ([old.commit] if old is not None else [])
    changes = _WorkTreeChanges(repo, list(dict.fromkeys([*was, rev.commit])))
    temps = _work_temporaries(repo)
    known_ns = time.time_ns()
    with _restore_on_failure(repo, rev, undo, changes):
        # Files only `old` had go first: one of them may be where `rev` has a directory.
        for path in gone:
            with suppress(FileNotFoundError), changes.change():
                (work / path).unlink()
            _remove_empty_parents(work, work / path)
        _write_atomic(work / CONFIG_FILE, rev.config_bytes, temp_dir=temps, changes=changes)
        # mtime dated back (see WORKTREE_RECORD): a write after this one always changes it.
        mtime_ns = known_ns - 2 * _RACY_NS
        _write_weights(work / WEIGHTS_FILE, weights.data, mtime_ns, temps, changes)
        for path, (content, executable) in files.items():
            _write_atomic(work / path, content, executable, mtime_ns, temps, changes=changes)
    written: dict[str, tuple[int, ...] | None] = {
        path: stat_key(os.stat(work / path)) for path in files
    }
    collided = _collided(written)
    if collided:
        import sys

        # Not recorded as clean: status reads them, and shows the ones overwritten as modified.
        written.update(dict.fromkeys(collided))
        names = ", ".join(quote_path(p) for p in collided)
        sys.stderr.write(
            one_line(
                f"warning: this file system opens some of the revision's files as one file (it "
                f"ignores case or Unicode normalization), which holds the last one written: "
                f"{names}; status shows the others as modified"
            )
            + "\n"
        )
    ids = (blob_id(rev.config_bytes), _file_ids(rev))
    weights_key = stat_key(os.stat(work / WEIGHTS_FILE))
    _record_clean(repo, rev.commit, ids, weights_key, known_ns, written, changes)


def _collided(written: Mapping[str, tuple[int, ...] | None]) -> list[str]:
    """The paths of `written` (by stat_key()) that are one file with another: a file system
    that ignores case (macOS, Windows) wrote the second of two such names over the first."""
    by_file: dict[tuple[int, int], list[str]] = {}
    for path, key in written.items():
        if key is not None:
            by_file.setdefault((key[3], key[4]), []).append(path)
    return [path for paths in by_file.values() if len(paths) > 1 for path in paths]


def _left_behind_files(
    repo: Repository,
    old: RevisionOf | None,
    files: Collection[str],
    gone: Collection[str],
    held: Collection[str],
) -> list[str]:
    """Extra files of the revisions the work tree holds (`held`) when HEAD moved under it (a
    `commit --from`) or a failed checkout left a mix, which neither `old` (HEAD's) nor the
    revision written has: removed as `old`'s are, when they still hold that revision's content
    (an edited one stays, as untracked)."""
    left: list[str] = []
    for commit in held:
        if (old is not None and commit == old.commit) or repo.work_tree is None:
            continue
        try:
            kept = RevisionOf(repo, commit).content_ids()[1]
        except MintError:
            continue  # pruned since, or unreadable: nothing is known of its files
        for path, (blob, _) in kept.items():
            if path in files or path in gone or path in left or unsafe_path_reason(path):
                continue
            with suppress(OSError):
                if blob_id(read_stable(repo.work_tree / path, mapped=False)[0]) == blob:
                    left.append(path)
    return left


def _work_temporaries(repo: Repository) -> Path | None:
    """Where checkout makes its temporaries: in the git directory, when it shares the work tree's
    file system (a temporary a killed checkout left there is no file of the revision's, and gc
    sweeps it); else None, beside each file."""
    assert repo.work_tree is not None
    try:
        same = os.stat(repo.git_dir).st_dev == os.stat(repo.work_tree).st_dev
    except OSError:
        return None
    # A user who may write the work tree but not `.mint/` (another's repository) writes beside.
    return repo.git_dir if same and os.access(repo.git_dir, os.W_OK) else None


def _inside_repository(work: Path, path: str) -> str | None:
    """The directory above `path` in the work tree that is another repository's (holds_repository), if any."""
    parts = path.split("/")
    for depth in range(1, len(parts)):
        folder = "/".join(parts[:depth])
        if holds_repository(work / folder):
            return folder
    return None


def _refuse_symlinked_parent(work: Path, path: str) -> None:
    """Refuse to write or remove `path` through a symlinked directory of the work tree (it could lead anywhere)."""
    parent = work
    for part in path.split("/")[:-1]:
        parent = parent / part
        if parent.is_symlink():
            raise MintError(
                f"{quote_path(str(parent))} is a symlink: checkout will not write or remove "
                f"{quote_path(path)} through it; "
                "remove the link (or make it a directory) and retry"
            )


def _refuse_file_in_the_way(work: Path, path: str, gone: set[str]) -> None:
    """Refuse to write `path` where the work tree has a file as one of its directories, or a directory as it.

    As git's "untracked working tree files would be overwritten": checked before anything is
    written, so a refused checkout leaves the work tree as it was.
    """
    parts = path.split("/")
    for depth in range(1, len(parts)):
        parent = work.joinpath(*parts[:depth])
        if parent.exists() and not parent.is_dir() and "/".join(parts[:depth]) not in gone:
            raise MintError(
                f"{quote_path(str(parent))} is a file, but the revision has {quote_path(path)} "
                "inside it; "
                "move the file away and retry"
            )
    target = work / path
    if target.is_dir() and not target.is_symlink():
        # Fine when it holds only files the checkout removes (the old revision's): it goes with them.
        inside = (
            f.relative_to(work).as_posix()
            for f in target.rglob("*")
            if f.is_symlink() or not f.is_dir()
        )
        if not all(name in gone for name in inside):
            raise MintError(
                f"{target} is a directory holding files of its own, but the revision has a "
                "file there; move the directory away and retry"
            )


def _remove_empty_parents(root: Path, path: Path) -> None:
    """Remove the directories above `path` that are left empty, up to (not including) `root`,
    sparing the current directory (and those above it), as git 2.36+ does: a shell left in a
    deleted directory fails every later command."""
    try:
        cwd: Path | None = Path(os.getcwd())
    except OSError:
        cwd = None
    parent = path.parent
    while parent != root and root in parent.parents:
        if cwd is not None and (parent == cwd or parent in cwd.parents):
            return
        try:
            parent.rmdir()
        except OSError:  # not empty (or not ours to remove): stop here
            return
        parent = parent.parent


def _write_weights(
    path: Path,
    data: memoryview,
    mtime_ns: int,
    temp_dir: Path | None = None,
    changes: _WorkTreeChanges | None = None,
) -> None:
    """Write the weights file: in place when a same-size, singly linked file is there.

    Overwriting the file's own pages is several times faster than filling a new file and
    renaming it over the old one (which also frees the old pages). It is safe because
    checkout only replaces a work tree that is clean (its content is in the store) or that
    --force gave up: a crash mid-write leaves a file that `status` reports as modified and
    `checkout --force` rewrites. A file of another size is replaced atomically instead,
    so a reader that maps it never sees it shrink under it; a hard-linked one is too, so
    its other names keep their content.
    """
    try:
        # O_NONBLOCK: a FIFO where the file goes fails (ENXIO) instead of waiting for a reader
        # for ever, and is replaced as anything else that is no regular file is.
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            st = os.fstat(fd)
            # Only a file of our own: dating another user's back is refused (only its owner may).
            mine = st.st_uid == os.geteuid()
            if mine and stat.S_ISREG(st.st_mode) and st.st_size == len(data) and st.st_nlink == 1:
                view = memoryview(data)
                done = 0
                with changes.change(in_place=True) if changes is not None else nullcontext():
                    while done < len(view):
                        done += os.pwrite(fd, view[done:], done)
                os.utime(fd, ns=(time.time_ns(), mtime_ns))
                return
        finally:
            os.close(fd)
    _write_atomic(path, data, mtime_ns=mtime_ns, temp_dir=temp_dir, changes=changes)


@dataclass(frozen=True)
class CheckoutResult:
    """What `checkout` did."""

    commit: str | None  # None: `-b` on an unborn branch, which moves HEAD to another unborn one
    branch: str | None  # None: detached HEAD
    created: bool
    # Commits the detached HEAD held that no ref (nor the new HEAD) reaches, newest first.
    left_behind: tuple[str, ...] = ()


def _ignored_edit_kept(
    repo: Repository, path: str, head: RevisionOf | None, target: Revision
) -> bool:
    """Whether checking out `target` loses nothing of extra file `path`, which status lists as
    removed: gone, or there but ignored (a committed file a pattern matches since), in which
    case its content must be HEAD's or the target's (checkout writes or removes it)."""
    assert repo.work_tree is not None
    try:
        content = read_stable(repo.work_tree / path, mapped=False)[0]
    except FileNotFoundError:
        return True
    except OSError:
        return False  # unreadable: never safe
    blob = blob_id(content)
    committed = head.content_ids()[1] if head is not None else {}
    return blob in {committed.get(path, ("",))[0], _file_ids(target).get(path, ("",))[0]}


def _refuse_if_changes_lost(
    repo: Repository, target: Revision, verb: str, head: RevisionOf | None = None
) -> None:
    """Refuse to write `target` over local changes it would lose, as git does.

    A change is safe when the work tree already holds the target's version of that file, or
    when it is a file HEAD does not have and the target does not write (it stays, as an
    untracked file does in git). A work tree that cannot be read is never safe.
    """
    state, work = _status(repo, head)
    if state.clean:
        return
    lost: list[str] = []
    if state.error is not None:
        lost.append(state.error)
    elif work is not None:  # None with no error: an emptied work tree, nothing there to lose
        # The files read for status are compared with the target too: no second read and hash.
        against_target = {path for _kind, path in _changes(repo, work, target)}
        target_files = {f.path for f in target.manifest.files}
        for kind, path in state.changes:
            if kind == "removed" and not path.startswith(WEIGHTS_FILE):
                if repo.work_tree is not None and _inside_repository(repo.work_tree, path):
                    continue  # another repository's file now: the checkout leaves it be
                if _ignored_edit_kept(repo, path, _revision_of(repo, state.head, head), target):
                    continue  # nothing of the user's to lose: the target's version comes back
                lost.append(quote_path(path))
                continue
            if (
                kind == "added"
                and path not in target_files
                and not path.startswith((WEIGHTS_FILE, CONFIG_FILE))
            ):
                continue  # untracked: left alone
            if path in against_target or (
                path.startswith(WEIGHTS_FILE)
                and any(p.startswith(WEIGHTS_FILE) for p in against_target)
            ):
                lost.append(quote_path(path))
    if lost:
        more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        advice = work_tree_hint(repo, state.head, state.branch) or "commit them or use --force"
        raise DirtyWorkTreeError(
            f"your local changes would be overwritten by {verb} ({', '.join(lost[:3])}{more}); "
            + advice
        )


def _refuse_if_locked(repo: Repository, *names: str | None) -> None:
    """Fail before the work tree is touched when a ref the command will move is locked."""
    for name in ("HEAD", repo.refs.read_symbolic("HEAD"), *names):
        if name is not None:
            repo.refs.check_unlocked(name)


def _check_lockable(repo: Repository, *names: str | None) -> None:
    """Fail before the work tree is written when a ref the command then moves cannot be locked:
    another process holds it, or the user may not write `.mint/` (the lock is taken and let go).

    git takes index.lock first and holds it over the checkout; a ref lock held over a write
    that takes seconds would be left behind by a kill and block every later move of HEAD (and a
    trainer's commits onto a branch meanwhile), so it is only tried here. A process that takes
    it between here and the move makes the move fail and the work tree is written back.
    """
    for name in names:
        if name is not None:
            repo.refs.check_lockable(name)


@contextmanager
def _restore_on_failure(
    repo: Repository,
    written: Revision,
    old: RevisionOf | None,
    changes: _WorkTreeChanges | None = None,
    moved: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """Put `old` back in the work tree if the block fails once `written` is (being) written:
    writing it part-way, or moving the refs after it. Where the writing (`changes`) failed
    before anything changed, nothing is written: the record is put back instead. Where
    `moved()` says the refs moved all the same (a Ctrl-C just after the rename that moved
    them), the work tree keeps `written`: it is what HEAD names now."""
    try:
        yield
    except BaseException:
        if moved is not None and _says_moved(moved):
            raise
        if changes is not None and not changes.changed:
            changes.put_back()
        elif old is not None:
            # Where this fails too, the record lists the mix (_WorkTreeChanges).
            try:
                back = RevisionOf(repo, written.commit, written)
                write_work_tree(repo, old.read(), back, show_progress=False, undo=None)
            except (MintError, OSError):
                # Failing before its first change, it left the record naming `written` as the
                # base, which status would explain as HEAD moved under the work tree. HEAD
                # never moved: the record lists it as a failed checkout's instead.
                if work_tree_base(repo) == written.commit:
                    _mark_in_place(repo, [written.commit])
        raise


def _says_moved(moved: Callable[[], bool]) -> bool:
    """moved(), False where the refs cannot be read: the old revision is written back then."""
    try:
        return moved()
    except (MintError, OSError):
        return False


def _branch_value(repo: Repository, spec: str) -> str | None:
    """The value of branch `spec` when `spec` is exactly a branch name (not `main~2` or an id), else None."""
    try:
        return repo.refs.read(f"refs/heads/{spec}")
    except InvalidRefNameError:
        return None


@accepts_path
def checkout(
    repo: Repository, spec: str, *, new_branch: str | None = None, force: bool = False
) -> CheckoutResult:
    """Write revision `spec` into the work tree and move HEAD (to a branch, or detached)."""
    # git refuses even a switch that would write no file, before it reads the revision.
    _work_tree_of(repo)
    # As git: `-` is `@{-1}`, and `@{-N}` is the name it stands for, so that it switches back
    # to that branch (and the reflog names it) rather than detaching at its commit.
    spec = repo.expand_previous("@{-1}" if spec == "-" else spec)
    if new_branch is not None and spec in ("HEAD", "@") and repo.head_commit() is None:
        return _new_unborn_branch(repo, new_branch)
    # A branch name switches to that branch even where a tag of the same name exists (as git
    # checkout does), although a plain spec resolves to the tag first.
    oid = _branch_value(repo, spec)
    if oid is not None and new_branch is None:
        # A branch git made under a name that is not UTF-8: HEAD would name it, which status
        # --json and the server cannot carry. Refused before anything is written; git checks
        # it out, and `branch -m` renames it (with its reflog), as git does.
        try:
            check_utf8_name(spec)
        except InvalidRefNameError as err:
            add_note(
                err, "rename that branch first, keeping its reflog: `mintvcs branch -m OLD NEW`"
            )
            raise
        branch_ref = f"refs/heads/{spec}"
        # As git: two work trees on one branch leave the other's index and files stale.
        where = _worktree_holding(repo, branch_ref)
        if where is not None and repo.refs.read_symbolic("HEAD") != branch_ref:
            raise CheckedOutElsewhereError(f"'{spec}' is already checked out at '{where}'")
    target = repo.peel(oid) if oid is not None else repo.resolve(spec)
    if new_branch is not None:
        check_branch_name(new_branch)
        if repo.refs.read(f"refs/heads/{new_branch}") is not None:
            raise RefExistsError(f"a branch named '{new_branch}' already exists")
    head = repo.head_commit()
    new_ref = f"refs/heads/{new_branch}" if new_branch else None
    _refuse_if_locked(repo, new_ref)
    target_rev = _read_revision(repo, target)
    head_rev = _revision_of(repo, head, RevisionOf(repo, target, target_rev))
    # As in git, switching to the commit already checked out keeps local changes.
    written = force or target != head
    undo = _undo_point(repo, head_rev) if written else None
    if written:
        if not force:
            _refuse_if_changes_lost(repo, target_rev, "checkout", head_rev)
        _check_lockable(repo, "HEAD", new_ref)
        write_work_tree(repo, target_rev, head_rev, undo=undo)
    detached = repo.current_branch() is None
    branch_after = new_branch or (spec if oid is not None else None)

    def head_moved() -> bool:
        return repo.current_branch() == branch_after and repo.head_commit() == target

    with _restore_on_failure(repo, target_rev, undo, moved=head_moved):
        result = _move_head(repo, spec, target, head, new_branch, is_branch=oid is not None)
    if detached and head is not None and head != target:
        # HEAD has moved: a history that cannot be read must not turn that into a failure.
        with suppress(MintError):
            result = replace(result, left_behind=tuple(_left_behind(repo, head, target)))
    return result


def _new_unborn_branch(repo: Repository, name: str) -> CheckoutResult:
    """`checkout -b NAME` before the first commit: HEAD names the unborn branch NAME, as in git,
    so that the first commit starts that branch instead of the default one."""
    check_branch_name(name)
    ref = f"refs/heads/{name}"
    if repo.refs.read(ref) is not None:
        raise RefExistsError(f"a branch named '{name}' already exists")
    _refuse_if_locked(repo)
    # No reflog line: git logs a move of HEAD only to a ref that points to a commit.
    repo.refs.set_symbolic("HEAD", ref)
    return CheckoutResult(None, name, True)


# Commits walked once only reachable ones are queued, in case commit times are skewed (git's SLOP).
_SLOP = 5


def _reaches(repo: Repository, start: str, target: str) -> bool:
    """Whether `target` is an ancestor of `start`, looked for cheaply: from `start` newest
    commit first, giving up _SLOP commits after the walk is older than `target` (as git's
    date-bounded walks; a clock skewed further hides it). False only says it was not found so."""
    try:
        floor = repo.commit_info(target).date
        parents: dict[str, tuple[str, ...]] = {}
        queue: list[tuple[int, str]] = []

        def push(oid: str) -> None:
            info = repo.commit_info(oid)
            parents[oid] = info.parents
            heapq.heappush(queue, (-info.date, oid))

        push(start)
        slop = _SLOP
        while queue:
            age, oid = heapq.heappop(queue)
            if oid == target:
                return True
            if -age < floor:
                if not slop:
                    return False
                slop -= 1
            for parent in parents[oid]:
                if parent not in parents:
                    push(parent)
    except MintError:
        pass  # a commit missing or damaged: the full walk says what it can
    return False


def _left_behind(repo: Repository, old: str, new: str) -> list[str]:
    """Commits reachable from `old` but from no ref and not from `new`, newest first.

    What `git checkout` warns about when it leaves a detached HEAD. As git, both sides are
    walked together, newest commit first, and the walk stops once every queued commit is
    reachable from a ref or `new`, instead of reading the whole history.
    """
    tips = {oid for _name, oid in repo.refs.iter_refs("refs/")}
    if old == new or old in tips:  # the common case: HEAD was detached at a branch or tag
        return []
    if _reaches(repo, new, old):  # and back from `main~20` to main: no ref tip need be read
        return []
    reached: dict[str, bool] = {}  # each commit seen -> whether a ref or `new` reaches it
    parents: dict[str, tuple[str, ...]] = {}
    # (-commit time, not from a ref, order seen, id): newest first; of commits made in the same
    # second, those a ref reaches first, so that fewer are walked twice.
    queue: list[tuple[int, bool, int, str]] = []
    queued: set[str] = set()
    live = 0  # queued commits that no ref is yet known to reach

    def mark(oid: str) -> None:
        """Record that a ref reaches `oid`, and so every commit behind it already walked."""
        nonlocal live
        todo = [oid]
        while todo:
            one = todo.pop()
            if reached.get(one, True):
                continue
            reached[one] = True
            if one in queued:
                live -= 1  # its parents learn it when it is walked
            else:
                todo.extend(parents[one])

    def push(oid: str, from_ref: bool) -> None:
        nonlocal live
        if oid in reached:
            if from_ref:
                mark(oid)
            return
        info = repo.commit_info(oid)
        reached[oid] = from_ref
        parents[oid] = info.parents
        live += not from_ref
        queued.add(oid)
        heapq.heappush(queue, (-info.date, not from_ref, len(reached), oid))

    push(old, False)
    # Each distinct commit once: 10^6 per-user branches made from main name a handful.
    for oid in {new, *tips}:
        with suppress(MintError):  # a ref to a tree or a blob has no history to hold
            # Only a tag object needs reading to peel; None: the header cannot tell.
            push(repo.peel(oid) if repo.object_kind(oid) in ("tag", None) else oid, True)
    walked: list[str] = []
    slop = _SLOP
    while queue:
        if live:
            slop = _SLOP
        elif slop:
            slop -= 1
        else:
            break
        *_key, oid = heapq.heappop(queue)
        queued.discard(oid)
        if not reached[oid]:
            live -= 1
            walked.append(oid)
        for parent in parents[oid]:
            push(parent, reached[oid])
    return [oid for oid in walked if not reached[oid]]


def _move_head(
    repo: Repository,
    spec: str,
    target: str,
    head: str | None,
    new_branch: str | None,
    *,
    is_branch: bool,
) -> CheckoutResult:
    # As git: a reflog line's time is the committer's, GIT_COMMITTER_DATE included.
    who = signature(repo)
    # git writes a detached HEAD's full id here (`@{-1}` reads it back).
    previous = repo.current_branch() or (head if head else "nothing")
    if new_branch is not None:
        _move_ref(
            repo,
            f"refs/heads/{new_branch}",
            target,
            old=None,
            message=f"branch: Created from {spec}",
            by=who,
        )
        branch: str | None = new_branch
    elif spec in ("HEAD", "@"):
        branch = repo.current_branch()
        if branch is not None:
            # As git: checking out what is checked out moves no ref, so it logs nothing.
            return CheckoutResult(target, branch, False)
    else:
        branch = spec if is_branch else None
    message = f"checkout: moving from {previous} to {branch or spec}"
    try:
        if branch is not None:
            repo.refs.set_symbolic(
                "HEAD",
                f"refs/heads/{branch}",
                message=message,
                identity=who.identity,
                timestamp=who.timestamp,
                tz=who.tz,
            )
        else:
            _move_ref(repo, "HEAD", target, old=ANY, message=message, by=who, deref=False)
    except BaseException as err:
        if new_branch is not None:
            # HEAD could not follow (a full disk): the branch `-b` made goes too, so that the
            # failed command leaves nothing its retry would be refused for; not where another
            # process has checked it out (or moved it) meanwhile, nor where HEAD did follow (a
            # Ctrl-C just after its rename): take_back leaves a branch a HEAD names.
            ref = f"refs/heads/{new_branch}"
            if not repo.refs.take_back(ref, target):
                add_note(err, f"{ref} was left: another process has checked it out or set it")
        raise
    if new_branch is not None:
        _ref_moved(repo, f"refs/heads/{new_branch}", None, target)
    return CheckoutResult(target, branch, new_branch is not None)


@accepts_path
def reset(repo: Repository, spec: str, *, hard: bool = False) -> str:
    """Move the current branch (or detached HEAD) to `spec`; with hard, rewrite the work tree too."""
    target = repo.resolve(spec)
    head = repo.head_commit()
    _refuse_if_locked(repo)
    restore: AbstractContextManager[None] = nullcontext()
    if hard:  # a soft reset moves a ref only: no revision need be read
        target_rev = _read_revision(repo, target)
        head_rev = _revision_of(repo, head, RevisionOf(repo, target, target_rev))
        undo = _undo_point(repo, head_rev)
        _check_lockable(repo, "HEAD", repo.refs.read_symbolic("HEAD"))
        write_work_tree(repo, target_rev, head_rev, undo=undo)
        restore = _restore_on_failure(
            repo, target_rev, undo, moved=lambda: repo.head_commit() == target
        )
    with restore:
        message = f"reset: moving to {spec}"
        _move_ref(repo, "HEAD", target, old=head, message=message, by=signature(repo))
    if not hard and repo.work_tree is not None:
        # The work tree's files are now changes to `target`, as after git's soft reset: a
        # commit of them goes on top of it. No stat is trusted: they are not its content.
        _record_clean(repo, target, None, None, 0)
    _ref_moved(repo, repo.refs.read_symbolic("HEAD") or "HEAD", head, target)
    return target
