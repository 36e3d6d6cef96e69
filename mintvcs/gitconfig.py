"""git config files read with dulwich's reader, plus what git does around it: includeIf
gitdir:/gitdir/i:/onbranch: matched against the repository, the global and system files,
`git -c` settings handed down, errors that name the file and line, and the few lines dulwich
would read differently from git mended or refused, never misread."""

from __future__ import annotations

import ast
import errno
import io
import os
import re
import sys
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

    def _resolve_include_path(self, path: str, config_dir: str | None) -> str | None:
        # `~` from $HOME alone, as git: dulwich's expanduser took the password database's home
        # without HOME, and kept a relative `~/x` where there was none.
        expanded = home_path(path)
        if expanded is None:
            raise ValueError(f"could not expand include path '{path}' (HOME is not set)")
        return super()._resolve_include_path(expanded, config_dir)


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


def home_path(text: str) -> str | None:
    """`text` with a leading `~/` or `~USER/` expanded as git's interpolate_path does it: `~`
    from $HOME only, None when HOME is unset (git then reads no such file) or USER has no
    account; any other text as it is."""
    if not text.startswith("~"):
        return text
    head, sep, rest = text[1:].partition("/")
    if head:
        import pwd

        try:
            home = pwd.getpwnam(head).pw_dir
        except KeyError:
            return None
    else:
        found = os.environ.get("HOME")
        if found is None:
            return None
        home = found
    return home.rstrip("/") + sep + rest if sep else (home or "/")


def user_configs(git_dir: Path | None = None) -> list[Any]:
    """The global and system git config files that exist, in git's order of precedence
    (GIT_CONFIG_GLOBAL, else ~/.gitconfig then $XDG_CONFIG_HOME/git/config; then
    GIT_CONFIG_SYSTEM or /etc/gitconfig unless GIT_CONFIG_NOSYSTEM), includeIf matched against
    `git_dir`. BadConfigError for one git would refuse or cannot read."""
    # (path, whether it is a global one): git skips a global file it may not read (access_or_die
    # with ACCESS_EACCES_OK), so a HOME it cannot enter (sudo -u, a container run as another
    # uid) stops nothing; an unreadable system file stays fatal, as in git.
    paths: list[tuple[str, bool]] = []
    if "GIT_CONFIG_GLOBAL" in os.environ:
        paths.append((os.environ["GIT_CONFIG_GLOBAL"], True))
    else:
        # From $HOME alone, as git: without it no ~/.gitconfig is read (not the password
        # database's home, nor a relative `~/.gitconfig` from the cwd, which a revision's files
        # can hold), and the XDG file only from XDG_CONFIG_HOME. An empty XDG_CONFIG_HOME is
        # unset, as git reads it (not `git/config` under the cwd).
        gitconfig, dot_config = home_path("~/.gitconfig"), home_path("~/.config")
        xdg = os.environ.get("XDG_CONFIG_HOME") or dot_config
        if gitconfig is not None:
            paths.append((gitconfig, True))
        if xdg is not None:
            paths.append((os.path.join(xdg, "git", "config"), True))
    if os.environ.get("GIT_CONFIG_NOSYSTEM", "").lower() in ("", "0", "false", "no", "off"):
        paths.append((os.environ.get("GIT_CONFIG_SYSTEM", "/etc/gitconfig"), False))
    configs = []
    for path, is_global in paths:
        if not path:
            continue
        try:
            configs.append(read_config(Path(path), git_dir=git_dir, trusted=True))
        except OSError as err:
            # git's access_error_is_ok: a missing file, or one behind a path component that is
            # a file, is not there; EACCES too for the global ones. EISDIR, ELOOP... stay fatal.
            if err.errno in (errno.ENOENT, errno.ENOTDIR) or (
                is_global and err.errno == errno.EACCES
            ):
                continue
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
    is plain, the others refused (BadConfigError); the keys written without a value noted.
    Not a parser: dulwich parses; this follows only what decides where a value ends, and
    stops at the first line dulwich refuses anyway. Lines are rewritten, never added or
    removed, so that a line number still names the line written.

    Mended: a backslash ending a comment, which git ignores and dulwich takes for a
    continuation, is dropped; one ending the file, which git ends the value at, too. A value
    git reads otherwise than dulwich (each unquoted blank a space, a tab too; the blanks
    leading a continued line kept; `a ""` keeping its space; a value continued on a section
    header's line) is written quoted in git's reading, its continued lines left blank, and
    checked to read back so. Several headers on one line (`[a][b] k = v`) keep the last, as
    git's is; an old-style `[a.B]` is written `[a "b"]`, the subsection lower-cased as git
    does. A key before any section is dropped with git's `error: key does not contain a
    section` on stderr. Refused as git refuses them, where dulwich reads them silently: an
    unknown escape (`\\q`), a name not starting with a letter, and a name followed by
    neither `=` nor the end of its line (`[core] bare ; comment`).
    """
    section: tuple[bytes, ...] | None = None
    quoted = continued = False  # inside a value continued from the line before
    bom = data[:3] if data.startswith(b"\xef\xbb\xbf") else b""
    lines = io.BytesIO(data[len(bom) :]).readlines()
    mended = False
    # The value being read: its first line's number, where it starts on that line, and
    # whether it is to be rewritten whatever dulwich reads (continued on a header's line).
    value: tuple[int, int, bool] | None = None
    orphan = False  # the value read is a key's before any section: dropped
    for number, raw in enumerate(lines, 1):
        body = raw.removesuffix(b"\n").removesuffix(b"\r")
        ends = raw.endswith(b"\n")
        rest, on_header = body, False
        if not continued:
            rest = body.lstrip(b" \t\v\f\r")
            if body.lstrip(b" \t\r")[:1] in (b"\v", b"\f"):
                # Not blanks to git (dulwich strips them): the line is no key, nor a comment.
                raise BadConfigError(
                    f"{path} cannot be read: bad config line {number} (a line starting with "
                    "a vertical tab or form feed); fix it"
                )
            if rest[:1] == b"[":
                header = _headers(rest)
                if header is None:
                    break  # dulwich refuses the line
                section, text, after = header
                if not section[0]:  # `[]`: dulwich takes it
                    raise BadConfigError(
                        f"{path} cannot be read: bad config line {number} (a section header "
                        "with no name); fix it"
                    )
                if text != rest[: len(rest) - len(after)]:
                    # `[a][b]` or `[a.B]`: only what git reads is left for dulwich.
                    ending = raw[len(body) :]
                    body = body[: len(body) - len(rest)] + text + after
                    raw = body + ending
                    lines[number - 1], mended = raw, True
                rest, on_header = after.lstrip(b" \t"), True
            if not rest or rest[:1] in (b"#", b";"):
                continue
            match = re.match(rb"([^=\s;#]*)[ \t]*(=?)", rest)
            assert match is not None
            name, equals = match.group(1), match.group(2)
            after = rest[match.end() :]  # git: only blanks (space, tab), then `=` or the end
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
            orphan = section is None
            if orphan:
                # git reads it, says so, and has no use for it; dulwich would refuse the file.
                _orphan_key(path, number, name)
            if not equals:
                if section is None:
                    lines[number - 1], mended, orphan = _ending(raw), True, False
                else:
                    valueless.setdefault(_key(section, name), (path, number))
                continue
            rest, quoted = rest[match.end() :], False
            value = (number, len(body) - len(rest), False)
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
            # Rewritten whole below: the blanks before the `\` are the value's in git.
            git_continues = False
            if value is not None:
                value = (value[0], value[1], True)
        elif dulwich_continues and not git_continues:
            # A backslash ending a comment: git ignores it, dulwich would join the next line.
            lines[number - 1], mended = body[:-1] + raw[len(body) :], True
        elif git_continues and on_header and value is not None:
            # dulwich ends the value at a header's line: it is rewritten whole below.
            value = (value[0], value[1], True)
        continued = git_continues
        if orphan:  # each of its lines left blank
            lines[number - 1], mended = _ending(raw), True
        elif not continued and value is not None:
            mended = _mend_value(lines, value, number, section, path) or mended
        if not continued:
            value, orphan = None, False
    return bom + b"".join(lines) if mended else data


# What a value may hold for git and dulwich to read it alike on one line: no blank but the
# space, no quote, no backslash.
_PLAIN_VALUE = re.compile(rb'[^\t\r\v\f"\\]*')


def _mend_value(
    lines: list[bytes],
    value: tuple[int, int, bool],
    last: int,
    section: tuple[bytes, ...] | None,
    path: str,
) -> bool:
    """Rewrite the value on `lines` from line value[0] (at offset value[1]) to line `last` as
    one quoted value on its first line, the others left blank, if dulwich would read it
    otherwise than git (or value[2] says it must be); True if it did. BadConfigError if dulwich
    would not read the rewritten one as git reads it either."""
    first, offset, forced = value
    line = lines[first - 1]
    text = line[offset : len(line) - len(_ending(line))]
    if first == last and not forced and _PLAIN_VALUE.fullmatch(text):
        return False
    joined = line[offset:] + b"".join(lines[first:last])
    wanted = _git_value(joined)
    if wanted is None:  # the end of the file ends a quote or an escape: git refuses it
        raise BadConfigError(
            f"{path} cannot be read: bad config line {last} (a value git refuses: an unknown escape, or a quote the end of the file "
            "leaves open); fix it"
        )
    on_header = line.lstrip()[:1] == b"["
    if not forced and _dulwich_value(line, offset, lines[first:last], on_header) == wanted:
        return False
    escaped = (
        wanted.replace(b"\\", b"\\\\")
        .replace(b'"', b'\\"')
        .replace(b"\n", b"\\n")
        .replace(b"\t", b"\\t")
        .replace(b"\b", b"\\b")
    )
    rewritten = line[:offset] + b' "' + escaped + b'"' + _ending(line)
    if _dulwich_value(rewritten, offset, [], on_header) != wanted:
        raise BadConfigError(
            f"{path} cannot be read: bad config line {first} (a value mintvcs's config reader "
            "would read otherwise than git); fix it"
        )
    lines[first - 1] = rewritten
    for number in range(first, last):
        lines[number] = _ending(lines[number])
    return True


def _ending(line: bytes) -> bytes:
    """The line break ending `line` (CRLF, LF or none)."""
    return b"\r\n" if line.endswith(b"\r\n") else b"\n" if line.endswith(b"\n") else b""


def _dulwich_value(line: bytes, offset: int, more: list[bytes], on_header: bool) -> bytes | None:
    """What dulwich reads for the value starting at `offset` of `line` and continued on
    `more`, None where it refuses it."""
    if on_header:
        text, key = line + b"".join(more), None  # its own section header, its own name
    else:
        text, key = b"[x]\n\tk =" + line[offset:] + b"".join(more), ((b"x",), b"k")
    try:
        parsed = ConfigFile.from_file(io.BytesIO(text), expand_includes=False)
        if key is None:
            (section,) = [s for s in parsed.sections() if parsed.items(s)]
            ((_, found),) = list(parsed.items(section))
            return bytes(found)
        return bytes(parsed.get(*key))
    except (ValueError, KeyError):
        return None


def _git_value(text: bytes) -> bytes | None:
    """A value as git's parse_value reads it from `text` (what follows the `=`, its
    continued lines too), None where git refuses it: unquoted blanks before the first byte
    dropped, each later one a space (a tab too), those at the end dropped; a comment cut off;
    escapes and quotes undone; a backslash ending a line continues it."""
    text = text.replace(b"\r\n", b"\n")  # git's reader turns CRLF into LF
    out = bytearray()
    quote = comment = False
    space = i = 0
    while True:
        c = text[i : i + 1]
        i += 1
        if c in (b"", b"\n"):  # the end of the file reads as a newline
            return None if quote else bytes(out)
        if comment:
            continue
        if not quote and c in (b" ", b"\t", b"\r"):  # git's isspace, less the newline
            space += 1 if out else 0
            continue
        if not quote and c in (b";", b"#"):
            comment = True
            continue
        out += b" " * space
        space = 0
        if c == b"\\":
            escape = text[i : i + 1]
            i += 1
            if escape in (b"", b"\n"):
                continue
            unescaped = {b"t": b"\t", b"b": b"\b", b"n": b"\n", b"\\": b"\\", b'"': b'"'}.get(
                escape
            )
            if unescaped is None:
                return None
            out += unescaped
        elif c == b'"':
            quote = not quote
        else:
            out += c


def _headers(rest: bytes) -> tuple[tuple[bytes, ...], bytes, bytes] | None:
    """The section headers starting `rest` (git reads several on one line, the last one
    counting) as (the section, the header dulwich is to read, what follows it), an old-style
    `[a.B]` written `[a "b"]`; None when dulwich refuses one."""
    found: tuple[tuple[bytes, ...], bytes, bytes] | None = None
    while rest[:1] == b"[":
        try:
            section, after = _parse_section_header_line(rest)
        except ValueError:
            return None
        # dulwich reads what follows `]` with its comment cut off, git as a line.
        kept = _strip_comments(rest).rstrip()
        text, rest = rest[: len(kept) - len(after)], rest[len(kept) - len(after) :]
        if len(section) == 2 and not re.search(rb'[ \t"]', text):  # `[a.B]`: git lower-cases it
            section = (section[0], section[1].lower())
            if text[1:-1].lower() != text[1:-1]:
                text = b"[" + section[0] + b' "' + section[1] + b'"]'
        found = (section, text, rest)
        rest = rest.lstrip(b" \t")
    return found


def _orphan_key(path: str, number: int, name: bytes) -> None:
    """git's error line for a key before any section, once a process for each."""
    if (path, number) not in _ORPHANS_SAID:
        _ORPHANS_SAID.add((path, number))
        said = name.lower().decode(errors="replace")
        sys.stderr.write(f"error: key does not contain a section: {said}\n")


_ORPHANS_SAID: set[tuple[str, int]] = set()


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
        pattern = home_path(pattern) or pattern  # git leaves a `~` it cannot expand as it is
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
