"""git config files read with dulwich's reader, plus what git does around it: includeIf
gitdir:/gitdir/i:/onbranch: matched against the repository, the global and system files,
`git -c` settings handed down, errors that name the file and line, and the few lines dulwich
would read differently from git mended or refused, never misread."""

from __future__ import annotations

import ast
import io
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from dulwich.config import (
    ConfigFile,
    StackedConfig,
    _parse_section_header_line,
    _strip_comments,
    env_config,
)

from mintvcs.adapter import open_small_file
from mintvcs.errors import MintError, cannot_read

# (section lower-cased, subsections..., name lower-cased): where a key was written without `=`.
_Key = tuple[bytes, ...]


class BadConfigError(MintError):
    """A git config file git refuses too (or one dulwich would read otherwise than git)."""

    exit_code = 128  # git's `fatal: bad config line N in file F`


class GitConfigFile(ConfigFile):
    """A dulwich ConfigFile that also knows which keys its files (includes too) wrote without a
    value: dulwich reads those as "true", which is no string (git: "missing value")."""

    valueless: dict[_Key, tuple[str, int]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.valueless = {}


def read_config(
    path: Path, *, git_dir: Path | None = None, includes: bool = True, trusted: bool = False
) -> Any:
    """`path` as a GitConfigFile, includes followed unless `includes` is False, includeIf
    gitdir:/onbranch: matched against `git_dir` (none match without one).

    Unless `trusted` (the user's own files: GIT_CONFIG_GLOBAL=/dev/null is common), the file and
    its includes must be regular files under 1 MiB (open_small_file), as a received repository
    may name any file; an include that is not, or is missing, is skipped, as git skips a
    missing one. OSError or ValueError
    when `path` itself cannot be opened; BadConfigError naming the file at fault (an included
    one, maybe) and its line when git would refuse it or dulwich would misread it.
    """
    reader = _Reader(_open if trusted else open_small_file)
    matchers = _matchers(reader, git_dir)
    try:
        config: Any = GitConfigFile.from_path(
            path, file_opener=reader.open, condition_matchers=matchers, expand_includes=includes
        )
    except ValueError as err:  # dulwich's parse errors, of the file they passed through first
        if reader.failed is None:
            raise
        where, data = reader.failed
        line = _first_refused_line(data)
        at = f"bad config line {line} ({_plain(err)})" if line else _plain(err)
        raise BadConfigError(f"{where} cannot be read: {at}; fix it") from None
    config.valueless = reader.valueless
    return config


def user_configs(git_dir: Path | None = None) -> list[Any]:
    """The global and system git config files that exist, in git's order of precedence
    (GIT_CONFIG_GLOBAL, else ~/.gitconfig then $XDG_CONFIG_HOME/git/config; then
    GIT_CONFIG_SYSTEM or /etc/gitconfig unless GIT_CONFIG_NOSYSTEM), includeIf matched against
    `git_dir`. BadConfigError for one git would refuse or cannot read."""
    paths = []
    if "GIT_CONFIG_GLOBAL" in os.environ:
        paths.append(os.environ["GIT_CONFIG_GLOBAL"])
    else:
        # An empty XDG_CONFIG_HOME is unset, as git reads it (not `git/config` under the cwd).
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        paths += [os.path.expanduser("~/.gitconfig"), os.path.join(xdg, "git", "config")]
    if os.environ.get("GIT_CONFIG_NOSYSTEM", "").lower() in ("", "0", "false", "no", "off"):
        paths.append(os.environ.get("GIT_CONFIG_SYSTEM", "/etc/gitconfig"))
    configs = []
    for path in paths:
        if not path:
            continue
        try:
            configs.append(read_config(Path(path), git_dir=git_dir, trusted=True))
        except FileNotFoundError:
            continue
        except OSError as err:
            raise BadConfigError(f"{cannot_read(path, err)}; fix it") from None
        except ValueError as err:  # open_small_file's: not a regular file under 1 MiB
            raise BadConfigError(f"{path} cannot be read ({err}); fix it") from None
    return configs


def env_overrides() -> list[Any]:
    """The `git -c` settings git hands down (GIT_CONFIG_PARAMETERS over GIT_CONFIG_COUNT with
    GIT_CONFIG_KEY_n/VALUE_n), most precedent first, as git reads them over every file."""
    found: list[Any] = []
    text = os.environ.get("GIT_CONFIG_PARAMETERS")
    if text:
        found.append(_parameters(text))
    try:
        counted = env_config(os.environ)
    except (KeyError, ValueError) as err:
        message = err.args[0] if err.args else str(err)
        raise BadConfigError(f"{message} (git: unable to parse command-line config)") from None
    if counted is not None:
        found.append(counted)
    return found


def refuse_valueless(config: Any, section: tuple[bytes, ...], name: bytes) -> None:
    """BadConfigError if a file `config` read wrote `section.name` with no value: git refuses
    such a key wherever it wants a string, even when a later line sets it."""
    found = valueless_at(config, section, name)
    if found is not None:
        where, line = found
        dotted = b".".join((*section, name)).decode(errors="replace")
        at = f"{where} line {line}" if line else where
        raise BadConfigError(
            f"missing value for '{dotted}' in {at}: git refuses it too; "
            f"give it one (`{name.decode(errors='replace')} = VALUE`)"
        )


def valueless_at(config: Any, section: tuple[bytes, ...], name: bytes) -> tuple[str, int] | None:
    """(file, line) where a file `config` read first wrote `section.name` with no value (line
    0: a `git -c` setting), None if none did."""
    key = _key(section, name)
    for part in _files(config):
        if key in part.valueless:
            return part.valueless[key]
    return None


def _files(config: Any) -> Iterator[GitConfigFile]:
    if isinstance(config, StackedConfig):
        for backend in config.backends:
            yield from _files(backend)
    elif isinstance(config, GitConfigFile):
        yield config


def _key(section: tuple[bytes, ...], name: bytes) -> _Key:
    return (section[0].lower(), *section[1:], name.lower())


def _open(path: str) -> IO[bytes]:
    return open(path, "rb")


class _Reader:
    """Opens each file dulwich reads (the config, then its includes), checks its bytes first
    (_scan), and knows which file a parse error came out of."""

    def __init__(self, opener: Callable[[str], IO[bytes]]) -> None:
        self.opener = opener
        self.stack: list[str] = []  # the files being read, innermost last
        self.failed: tuple[str, bytes] | None = None
        self.valueless: dict[_Key, tuple[str, int]] = {}

    def open(self, path: str | os.PathLike[str]) -> _Opened:
        where = os.fspath(path)
        with self.opener(where) as handle:
            data = handle.read()
        # Not a ValueError: dulwich skips an include whose opener raises one, silently.
        data = _scan(data, where, self.valueless)
        return _Opened(self, where, data)


class _Opened(io.BytesIO):
    """One file's bytes, for dulwich's `with opener(path) as f: f.readlines()`: the reader
    knows which file is being read (`./` in includeIf) and which one an error came out of."""

    def __init__(self, reader: _Reader, path: str, data: bytes) -> None:
        super().__init__(data)
        self.reader, self.path, self.data = reader, path, data

    def __enter__(self) -> _Opened:
        self.reader.stack.append(self.path)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.reader.stack.pop()
        if err is not None and self.reader.failed is None:
            self.reader.failed = (self.path, self.data)  # the innermost file it passed through
        self.close()


def _first_refused_line(data: bytes) -> int | None:
    """The number of the first line dulwich refuses in `data` (includes unread), None if it
    takes the file alone. dulwich reads line by line, so a prefix is refused from that line on:
    a binary search over prefixes finds it."""
    lines = io.BytesIO(data).readlines()

    def refused(count: int) -> bool:
        try:
            ConfigFile.from_file(io.BytesIO(b"".join(lines[:count])), expand_includes=False)
        except ValueError:
            return True
        return False

    if not refused(len(lines)):
        return None
    good, bad = 0, len(lines)
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (good, middle) if refused(middle) else (middle, bad)
    return bad


_BYTES_REPR = re.compile(rb"""b('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""".decode())


def _plain(err: Exception) -> str:
    """dulwich's message with its Python bytes reprs (b'foo_bar') shown as text ('foo_bar')."""

    def text(match: re.Match[str]) -> str:
        try:
            return repr(ast.literal_eval(match.group(0)).decode(errors="replace"))
        except (ValueError, SyntaxError):
            return match.group(0)

    return _BYTES_REPR.sub(text, str(err))


def _scan(data: bytes, path: str, valueless: dict[_Key, tuple[str, int]]) -> bytes:
    """`data` with the lines dulwich would read otherwise than git mended where git's reading
    is plain (a backslash ending a comment dropped, a continuation at the end of the file
    ended), the others refused (BadConfigError); the keys written without a value noted. Not
    a parser: dulwich parses; this follows only what decides where a value ends, and stops at
    the first line dulwich refuses anyway.

    dulwich continues a value onto the next line when the raw line ends in an odd number of
    backslashes, git when that backslash is part of the value: after `; comment \\` git starts
    a new key on the next line, dulwich swallows it; a continuation on a `[section] key = v\\`
    line dulwich ends there; one at the end of the file git ends (`a\\` is "a"), dulwich drops
    the key or keeps the backslash. Also refused as git refuses them, where dulwich reads
    them silently: an unknown escape (`\\q`), a name not starting with a letter, and a name
    followed by neither `=` nor the end of its line (`[core] bare ; comment`).
    """
    section: tuple[bytes, ...] | None = None
    quoted = continued = False  # inside a value continued from the line before
    bom = data[:3] if data.startswith(b"\xef\xbb\xbf") else b""
    lines = io.BytesIO(data[len(bom) :]).readlines()
    mended = False
    for number, raw in enumerate(lines, 1):
        body = raw.removesuffix(b"\n").removesuffix(b"\r")
        ends = raw.endswith(b"\n")
        rest, on_header = body, False
        if not continued:
            rest = body.lstrip(b" \t\v\f\r")
            if rest[:1] == b"[":
                try:
                    section, after = _parse_section_header_line(rest)
                except ValueError:
                    break  # dulwich refuses the line
                # dulwich reads what follows `]` with its comment cut off, git as a line.
                kept = _strip_comments(rest).rstrip()
                rest, on_header = rest[len(kept) - len(after) :].lstrip(b" \t"), True
            if not rest or rest[:1] in (b"#", b";"):
                continue
            match = re.match(rb"([^=\s;#]*)[ \t]*(=?)", rest)
            assert match is not None
            name, equals = match.group(1), match.group(2)
            if section is None:
                break  # dulwich refuses a key before any section
            after = rest[match.end() :].strip()
            # What dulwich takes and git refuses: a name not starting with a letter (dulwich
            # checks only its characters), one followed by a comment and no `=`.
            refused = (
                "a name starts with a letter"
                if re.fullmatch(rb"[A-Za-z0-9-]*", name) and not name[:1].isalpha()
                else "a name with no '=' after it and more on its line"
                if not equals and after
                else ""
            )
            if refused:
                raise BadConfigError(
                    f"{path} cannot be read: bad config line {number} ({refused}: "
                    f"{rest.decode(errors='replace')!r}); fix it"
                )
            if not equals:
                valueless.setdefault(_key(section, name), (path, number))
                continue
            rest, quoted = rest[match.end() :], False
        git_continues, at = _value_end(rest, quoted)
        if at == "escape":
            raise BadConfigError(
                f"{path} cannot be read: bad config line {number} (an unknown escape: only "
                '\\\\, \\", \\n, \\t and \\b are); fix it'
            )
        if at == "open quote":
            break  # both refuse it
        quoted = at == "quoted"
        trailing = len(body) - len(body.rstrip(b"\\"))
        dulwich_continues = ends and trailing % 2 == 1 and not on_header
        if git_continues and number == len(lines):
            # git ends the value at the end of the file; dulwich would drop or keep the `\`.
            lines[-1], mended, git_continues = body[:-1] + raw[len(body) :], True, False
        elif dulwich_continues and not git_continues:
            # A backslash ending a comment: git ignores it, dulwich would join the next line.
            lines[number - 1], mended = body[:-1] + raw[len(body) :], True
        elif git_continues != dulwich_continues:
            raise BadConfigError(
                f"{path} cannot be read: bad config line {number} (a value continued on a "
                "section header's line; mintvcs's config reader would read another value "
                "there than git); fix it"
            )
        continued = git_continues
    return bom + b"".join(lines) if mended else data


def _value_end(text: bytes, quoted: bool) -> tuple[bool, str]:
    """Walk one line of a value as git does: (whether a backslash continues it onto the next
    line, and "quoted" when it does inside quotes, "escape" for an unknown escape, "open quote"
    for a quote left open, else "")."""
    i = 0
    while i < len(text):
        c = text[i : i + 1]
        if c == b"\\":
            if i + 1 == len(text):
                return True, "quoted" if quoted else ""
            if text[i + 1 : i + 2] not in (b"\\", b'"', b"n", b"t", b"b"):
                return False, "escape"
            i += 2
            continue
        if c == b'"':
            quoted = not quoted
        elif not quoted and c in (b";", b"#"):
            return False, ""  # the comment runs to the end of the line, backslash and all
        i += 1
    return False, "open quote" if quoted else ""


def _matchers(reader: _Reader, git_dir: Path | None) -> dict[str, Callable[[str], bool]]:
    """includeIf conditions as git evaluates them (dulwich itself knows only hasconfig:)."""

    def gitdir(pattern: str, icase: bool) -> bool:
        if git_dir is None:
            return False
        pattern = os.path.expanduser(pattern)
        prefix = ""
        if pattern.startswith("./"):  # relative to the file that holds the condition
            prefix = os.path.dirname(os.path.realpath(reader.stack[-1])) + "/"
            pattern = pattern[2:]
        elif not os.path.isabs(pattern):
            pattern = "**/" + pattern
        if pattern.endswith("/"):
            pattern += "**"
        # git tries the real path first, then the one the shell took ($PWD through a symbolic
        # link: os.getcwd() has resolved it already).
        absolute = os.path.abspath(git_dir)
        for text in dict.fromkeys((os.path.realpath(git_dir), absolute, _logical(absolute))):
            head, tail = text[: len(prefix)], text[len(prefix) :]
            if (head.lower() != prefix.lower()) if icase else (head != prefix):
                continue
            if _wildmatch(pattern, tail, icase):
                return True
        return False

    def onbranch(pattern: str) -> bool:
        if git_dir is None:
            return False
        try:
            with open_small_file(git_dir / "HEAD") as handle:
                head = handle.read()
        except (OSError, ValueError):
            return False
        if not head.startswith(b"ref: refs/heads/"):
            return False  # detached, or not a branch
        branch = head[len(b"ref: refs/heads/") :].strip().decode(errors="replace")
        return _wildmatch(pattern + "**" if pattern.endswith("/") else pattern, branch, False)

    return {
        "gitdir:": lambda pattern: gitdir(pattern, False),
        "gitdir/i:": lambda pattern: gitdir(pattern, True),
        "onbranch:": onbranch,
    }


def _logical(path: str) -> str:
    """`path` as the shell names it when the working directory was reached through a symbolic
    link: under $PWD instead of the resolved working directory, as git's absolute paths are."""
    pwd, cwd = os.environ.get("PWD", ""), os.getcwd()
    if not os.path.isabs(pwd) or pwd == cwd:
        return path
    try:
        if not os.path.samefile(pwd, cwd):
            return path
    except OSError:
        return path
    base = cwd.rstrip("/")
    if path == cwd or path.startswith(base + "/"):
        return pwd.rstrip("/") + path[len(base) :]
    return path


def _wildmatch(pattern: str, text: str, icase: bool) -> bool:
    """git's wildmatch(WM_PATHNAME) of the whole `text`, by dulwich's translation of it."""
    from dulwich.wildmatch import MalformedPattern, translate

    try:
        regex = translate(os.fsencode(pattern))
    except MalformedPattern:
        return False  # wildmatch gives up on it: no match
    flags = re.DOTALL | (re.IGNORECASE if icase else 0)
    return re.fullmatch(regex, os.fsencode(text), flags) is not None


def _parameters(text: str) -> GitConfigFile:
    """GIT_CONFIG_PARAMETERS (`'key'='value' 'key=value' 'key'`, shell single quotes, as
    `git -c` writes it) as a config, the last of a key winning."""
    config = GitConfigFile()
    entries: list[list[str | None]] = []  # [key, value or None]
    current: list[str | None] | None = None
    i = 0
    while i < len(text):
        c = text[i]
        if c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise BadConfigError("GIT_CONFIG_PARAMETERS does not parse (an open quote)")
            part = text[i + 1 : end]
            if current is None:
                current = [part, None]
                entries.append(current)
            else:
                slot = 1 if current[1] is not None else 0
                current[slot] = (current[slot] or "") + part
            i = end + 1
        elif c == "\\" and i + 1 < len(text) and current is not None:
            slot = 1 if current[1] is not None else 0
            current[slot] = (current[slot] or "") + text[i + 1]  # git's '\'' quoting
            i += 2
        elif c == "=" and current is not None and current[1] is None:
            current[1] = ""
            i += 1
        elif c.isspace():
            current = None
            i += 1
        else:
            raise BadConfigError(f"GIT_CONFIG_PARAMETERS does not parse (at {text[i:]!r})")
    for key, value in entries:
        assert key is not None
        if value is None and "=" in key:  # the older form: 'key=value' in one quote
            key, value = key.split("=", 1)
        section_name, dot, name = key.rpartition(".")
        base, _, sub = section_name.partition(".")
        if not dot or not base:
            raise BadConfigError(f"GIT_CONFIG_PARAMETERS: key does not contain a section: {key}")
        section = (base.encode(), sub.encode()) if sub else (base.encode(),)
        config.set(section, name.encode(), b"true" if value is None else value.encode())
        if value is None:
            config.valueless[_key(section, name.encode())] = ("GIT_CONFIG_PARAMETERS", 0)
    return config
