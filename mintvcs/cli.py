"""The `mintvcs` command line: parses arguments and formats output; the verbs live in porcelain."""

from __future__ import annotations

import atexit
import codecs
import contextlib
import dataclasses
import fnmatch
import functools
import gc as pygc  # `gc` is the name of a command below
import io
import itertools
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from mintvcs.console import Terminated, die_of
from mintvcs.errors import MintError, OptionsError

F = TypeVar("F", bound=Callable[..., Any])


class _NoWorkingDirectoryError(MintError):
    exit_code = 128  # git's `fatal: Unable to read current working directory`


def _open_repo() -> Any:
    from mintvcs.store import Repository, check_ownership

    try:
        cwd = Path.cwd()
    except OSError as err:
        # A directory an earlier step removed (a cron job's, a CI step's): the OSError names
        # no file, and said only "No such file or directory".
        raise _NoWorkingDirectoryError(
            f"unable to read current working directory: {err.strerror or err} (was it "
            "removed? cd to the repository, or give mintvcs -C PATH)"
        ) from None
    repo = Repository.open(cwd)
    check_ownership(repo)
    return repo


def _emit_json(data: Any) -> None:
    click.echo(_json_text(data))


def _json_text(data: Any) -> str:
    """`data` as every --json output writes it, strict JSON, or an error where it is not.

    allow_nan=False: NaN and Infinity are not JSON (strict parsers reject them); a value that
    can be non-finite must be mapped to null before it gets here. A lone surrogate (a name's
    bytes that are not UTF-8, a JSON escape read from a revision) would come out as an escape
    that strict readers (jq) refuse, the whole output with it: each source leaves it out or
    replaces it, and this is the backstop, one error line in place of output no one can read.
    """
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    if "\\ud" in text:  # a surrogate escape: a pair (a character past U+FFFF), or a lone one
        try:
            json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise MintError(
                f"cannot print {err.object[max(0, err.start - 40) : err.end]!a} as JSON: it "
                "holds a lone surrogate, which no UTF-8 text holds and strict JSON readers refuse"
            ) from None
    return text


def _json_config(config: dict[str, Any], commit: str) -> object:
    """A revision's adapter_config.json for --json output: a lone surrogate escape (which an
    earlier mintvcs committed, or another tool) as U+FFFD, with a warning, since strict JSON
    readers refuse the whole output that holds one."""
    from mintvcs.messages import lone_surrogate_in, without_lone_surrogates

    odd = lone_surrogate_in(config)
    if odd is None:
        return config
    click.echo(
        f"warning: adapter_config.json of {commit[:12]}: {odd!a:.80} holds a lone surrogate "
        "escape; shown as U+FFFD",
        err=True,
    )
    return without_lone_surrogates(config)


def _subject(message: str) -> str:
    """A commit's subject as git shows it: its first paragraph, lines joined by a space."""
    from mintvcs.messages import subject

    return subject(message)


def _format_date(seconds: int, offset: int, zone: str) -> str:
    """git log's default date: the wall clock `offset` seconds east of UTC, then `zone`, the
    zone's text as the commit holds it (git prints `+0060`, not `+0100`)."""
    try:
        when = time.gmtime(seconds + offset)
        # git's default date format does not pad the day of the month (`Thu Jan 1 ...`).
        stamp = time.strftime(f"%a %b {when.tm_mday} %H:%M:%S %Y", when)
    except (OverflowError, OSError, ValueError):  # a commit may claim any time (git prints it raw)
        stamp = f"@{seconds}"
    return f"{stamp} {zone}"


def _parse_meta(pairs: tuple[str, ...]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"'{pair}' is not KEY=VALUE", param_hint="--meta")
        if key.strip() in meta:
            raise click.BadParameter(f"key '{key.strip()}' given twice", param_hint="--meta")
        meta[key.strip()] = value
    return meta


class DirectoryPath(click.Path):
    """A directory argument, refused when empty: `init "$DIR"` with DIR unset must not take the
    current directory (git refuses `git init ""`), nor `serve --repo "$REPO"` serve it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(file_okay=False, path_type=Path, **kwargs)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("empty; give a directory ('.' for the current one)", param, ctx)
        return super().convert(value, param, ctx)


def _discard(fd: int) -> None:
    """Point descriptor `fd` at /dev/null: what is still buffered for it is dropped there, not
    failed again (into a traceback) as Python exits."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def _complain(line: str) -> None:
    """Write one line to stderr; where stderr cannot take it (a full disk, a reader gone), the
    exit status still tells, and what is unwritten goes to /dev/null, not into a traceback at exit."""
    from mintvcs.messages import one_line

    try:
        # Escaped: a value the line names (a file name, an argument) must neither break it in
        # two nor drive the terminal.
        click.echo(one_line(line), err=True)  # click flushes: a failure shows here
    except OSError:
        _discard(2)


def _usage_error(err: click.UsageError, command: str) -> NoReturn:
    """One `error:` line naming the help to read, and click's exit status for a usage error (2)."""
    _complain(f"error: {err.format_message()} (see '{command} --help')")
    sys.exit(err.exit_code)


def _exit_for(err: MintError | OSError | MemoryError | KeyboardInterrupt | Terminated) -> NoReturn:
    """Report a failure in one line, and exit with the status git gives it."""
    if isinstance(err, Terminated):
        # Cleaned up on the way here; quiet and dead of the signal, as git.
        die_of(err.signum)
    if isinstance(err, KeyboardInterrupt):
        _complain("interrupted")
        # Die of the signal, as git does, not exit 130: a shell running a loop of commands stops
        # at Ctrl-C only when the command it waited for was killed by SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        sys.exit(130)  # only if the signal is blocked
    if isinstance(err, BrokenPipeError):
        # As git: die of SIGPIPE, quietly; nothing more can reach the reader. What is left in
        # stdout's buffer goes to /dev/null, should the signal be blocked and Python exit.
        _discard(1)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
        sys.exit(141)  # only if the signal is blocked
    if isinstance(err, _StdoutWriteError):
        # git's words and status; the unwritten rest goes to /dev/null.
        _discard(1)
        _complain(f"error: write failure on 'stdout': {err.strerror}")
        sys.exit(128)
    # What the command printed before it failed (log's commits before an unreadable one) is
    # written first; a reader gone meanwhile still hears of the failure, then SIGPIPE ends it.
    try:
        _flush_stdout()
        unwritten: OSError | None = None
    except OSError as write_err:
        _discard(1)
        unwritten = write_err
    if isinstance(err, MintError):
        _complain(f"error: {err}")
        status = err.exit_code
    elif isinstance(err, MemoryError):
        _complain("error: out of memory (this process's limit, or the machine's)")
        status = 1
    else:
        # The system refused a read or write (a full disk, a file size limit, permissions): one
        # line, as git says it.
        where = f": {err.filename}" if err.filename else ""
        _complain(f"error: {err.strerror or err}{where}")
        status = 1
    if isinstance(unwritten, BrokenPipeError):
        _exit_for(unwritten)
    sys.exit(status)


def _open_closed_standard_streams() -> None:
    """Open /dev/null where fd 0, 1 or 2 is closed (`mintvcs branch x >&-`), as git does: else
    Python has no sys.stdout, and the first print fails after the command's work is done."""
    for fd, mode, name in (
        (0, os.O_RDONLY, "stdin"),
        (1, os.O_WRONLY, "stdout"),
        (2, os.O_WRONLY, "stderr"),
    ):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, mode)  # the lowest free descriptor: this one
        if getattr(sys, name) is None:
            # Lives as long as the process, as the stream it stands in for.
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


def _unencodable(err: UnicodeError) -> tuple[str | bytes, int]:
    """Output's encoding error handler: a name's bytes that are not UTF-8 (surrogate escapes)
    go out as they are, as git writes them; a character the terminal's encoding cannot carry
    (a Japanese name on a Latin-1 locale) is backslash-escaped. Either raised a traceback."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    try:
        return codecs.lookup_error("surrogateescape")(err)
    except UnicodeEncodeError:
        return codecs.backslashreplace_errors(err)


codecs.register_error("mintvcs-output", _unencodable)


def _print_anything() -> None:
    """Standard error never fails to encode a message (see _unencodable); stdout is made so by
    _name_stdout_failures."""
    with contextlib.suppress(AttributeError, ValueError):  # not a file's stream
        # backslashreplace, Python's own for stderr, wrote a name's byte 0xff as `\udcff`.
        if sys.stderr.errors in ("strict", "surrogateescape", "backslashreplace"):
            sys.stderr.reconfigure(errors="mintvcs-output")  # type: ignore[union-attr]


class _StdoutWriteError(OSError):
    """A write to standard output failed for a reason other than a reader gone (a full disk)."""


class _StandardOutput(io.FileIO):
    """Descriptor 1, whose failed writes say they were stdout's: a full disk there must not
    read as the repository's (a commit whose `--json` could not be written was still made)."""

    def write(self, data: Any, /) -> int:
        try:
            return super().write(data)
        except BrokenPipeError:
            raise
        except OSError as err:
            raise _StdoutWriteError(err.errno, err.strerror) from None


class _HeldOutput(io.BufferedWriter):
    """stdout's buffer, which can hold what is written until the command ends: click.echo flushes
    every line, and a reader that goes after the first (`| head -1`) then kills a command of a few
    lines by SIGPIPE, where git's stdio writes an output that fits its buffer in one write."""

    hold = False

    def flush(self) -> None:
        if not self.hold:
            super().flush()

    def push(self) -> None:
        """Write what is buffered now, held or not (a page of log)."""
        super().flush()


def _hold_stdout() -> None:
    """Write stdout as git's stdio does: in blocks when it is not a terminal (one write for a
    small output), line by line on a terminal."""
    buffer = getattr(sys.stdout, "buffer", None)
    if isinstance(buffer, _HeldOutput) and not sys.stdout.line_buffering:
        buffer.hold = True
        atexit.register(_release_stdout)  # a sys.exit() past invoke still writes what is held


def _release_stdout() -> None:
    """Let stdout's flushes through again; the next one writes what was held."""
    buffer = getattr(sys.stdout, "buffer", None)
    if isinstance(buffer, _HeldOutput):
        buffer.hold = False


def _flush_stdout() -> None:
    """Write everything held for stdout now; a failure raises, for _exit_for."""
    _release_stdout()
    sys.stdout.flush()


def _push_stdout() -> None:
    """Write what stdout holds so far, and hold on (a long output shows as it is made)."""
    sys.stdout.flush()  # the text layer's pending characters, into the buffer
    buffer = getattr(sys.stdout, "buffer", None)
    if isinstance(buffer, _HeldOutput):
        buffer.push()


def _name_stdout_failures() -> None:
    """Put sys.stdout on a _StandardOutput, with the same encoding and buffering."""
    stream = sys.stdout
    try:
        if stream.fileno() != 1:
            return
    except (AttributeError, OSError, ValueError):  # not a file's stream (a test's capture)
        return
    stream.flush()
    errors = stream.errors or "strict"
    sys.stdout = io.TextIOWrapper(
        _HeldOutput(_StandardOutput(1, "w", closefd=False)),
        encoding=stream.encoding,
        errors="mintvcs-output" if errors in ("strict", "surrogateescape") else errors,
        line_buffering=bool(stream.line_buffering),  # a terminal's: line by line
        write_through=bool(getattr(stream, "write_through", False)),  # PYTHONUNBUFFERED's
    )


def _invoked(ctx: click.Context) -> str:
    """The command line's command (`mintvcs init`), whose --help a usage error names."""
    if ctx.invoked_subcommand is None:
        return ctx.command_path
    return f"{ctx.command_path} {ctx.invoked_subcommand}"


class MintGroup(click.Group):
    """Turns MintError and usage errors into one `error:` line and an exit code instead of a traceback or a usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        _open_closed_standard_streams()
        _print_anything()
        _name_stdout_failures()
        return super().main(*args, **kwargs)

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:  # `mintvcs --bogus`: one line, as for a command's
            _usage_error(err, info_name or "mintvcs")
        except (
            OSError,
            KeyboardInterrupt,
            Terminated,
        ) as err:  # `--help` or `--version` into a full output
            _exit_for(err)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                result = super().invoke(ctx)
            except (SystemExit, click.exceptions.Exit):
                # A command's own exit status (fsck, `branch -d` of a missing one), or its
                # --help: what it printed goes out now, where a closed pipe can be answered.
                _flush_stdout()
                raise
            _flush_stdout()  # a reader gone (`| head`) shows here, not at interpreter exit
            return result
        except click.UsageError as err:
            # click's parser raises an option's missing value (`commit -m`) without a context:
            # the help to name is still the command's.
            _usage_error(err, err.ctx.command_path if err.ctx is not None else _invoked(ctx))
        except OptionsError as err:
            # Found past click's parsing (porcelain's checks): reported as its usage errors are.
            _usage_error(click.UsageError(str(err)), _invoked(ctx))
        except Terminated as err:
            # serve's clean stop (docs/http.md), also while it is still importing torch.
            if ctx.invoked_subcommand == "serve" and err.signum != signal.SIGQUIT:
                _complain("mintvcs serve: stopped before it was listening")
                sys.exit(0)
            _exit_for(err)
        except (MintError, OSError, MemoryError, KeyboardInterrupt) as err:
            _exit_for(err)


def _on(repo: Any, section: bytes, name: bytes) -> bool:
    """Whether git's SECTION.NAME flag, on by default (advice.*, core.quotePath), is on: a
    value git would refuse leaves it on."""
    from mintvcs.repoformat import config_bool

    try:
        return config_bool(repo.config_with_user, (section,), name, True)
    except ValueError:
        return True


class _BadColorSetting(MintError):
    exit_code = 128  # git's `fatal: bad boolean config value`


# The color.* keys git 2.39 reads for each command beside color.ui: the first decides the
# command's colour (status's, branch's; log, show and diff go by color.diff), the others are
# read all the same (git status and commit load the diff config), so a value git refuses in
# any of them stops the command there. commit and tag colour nothing here.
_COLOR_KEYS = {
    "log": ("diff",),
    "show": ("diff",),
    "diff": ("diff",),
    "status": ("status", "diff"),
    "branch": ("branch",),
    "commit": ("status", "diff"),
    "tag": (),
}


def _color_setting(repo: Any, command: str) -> str:
    """The colour git's want_color gives `command`: `always`, `never` or `auto`, from its
    color.COMMAND key, else color.ui, else `auto`. As git, every value of each key git reads
    for the command (_COLOR_KEYS), in every config file, must be `always`, `never`, `auto`
    (any case) or a git boolean (false is `never`, true `auto`): _BadColorSetting in git's
    words and status for another, before the command does anything, even where a later file
    sets the key again."""
    from mintvcs.repoformat import _git_bool

    def setting(value: bytes | None, name: str) -> str:
        # A key without `=` is true, as git's config_bool reads it.
        raw = "true" if value is None else value.decode(errors="replace")
        if raw.lower() in ("always", "never", "auto"):
            return raw.lower()
        flag = _git_bool(raw)
        if flag is None:
            raise _BadColorSetting(f"bad boolean config value '{raw}' for 'color.{name}'")
        return "auto" if flag else "never"

    config = repo.config_with_user
    for name in (*_COLOR_KEYS[command], "ui"):
        for value in config.get_multivar((b"color",), name.encode()):
            setting(value, name)
    own = _COLOR_KEYS[command][:1] if command not in ("commit", "tag") else ()
    for name in (*own, "ui"):
        try:
            return setting(config.get((b"color",), name.encode()), name)  # the value that wins
        except KeyError:
            continue
    return "auto"


def _use_color(repo: Any, command: str) -> None:
    """Colour this command's output or not as git decides (_color_setting): `always` colours
    even into a pipe, `never` never, `auto` only a terminal whose TERM is set and not `dumb`."""
    setting = _color_setting(repo, command)
    if setting == "auto":
        try:
            tty = sys.stdout.isatty()
        except (AttributeError, ValueError):  # not a file's stream (a test's capture)
            tty = False
        setting = "always" if tty and os.environ.get("TERM", "dumb") != "dumb" else "never"
    # click.echo reads it for every line: the styles go out, or are stripped.
    click.get_current_context().color = setting == "always"


def _printable(text: str) -> str:
    """`text` with control characters escaped: a revision's metadata must not drive the terminal."""
    from mintvcs.messages import printable

    return printable(text)


def _ref(name: str) -> str:
    """A ref name (a branch, a tag, a decoration) as text output shows it: C1 controls and bidi
    overrides or isolates escaped (`\\x9b`, `\\u202e`), which git prints raw, so a branch made
    by anyone cannot drive the terminal or reorder the line; the bytes of a name that is not
    UTF-8 go out as they are, as git writes them. git's check-ref-format refuses C0 controls,
    DEL and backslashes in a name, so an escape cannot be read as part of one. --json gives the
    name as it is."""
    from mintvcs.messages import one_line

    return one_line(name)


def _json_branch(name: str | None) -> str | None:
    """Branch `name` as --json gives it: None for one git named in bytes that are not UTF-8,
    which JSON cannot carry, with porcelain.json_safe's warning (HEAD may be on one: git checks
    it out)."""
    from mintvcs.porcelain import json_safe

    return name if name is None or json_safe(f"refs/heads/{name}") else None


def _json_alias_safe(branch: Any) -> bool:
    """Whether `branch --json` can carry a branch's `alias_of` (porcelain.Branch): a symbolic
    branch to one named in bytes that are not UTF-8 is left out, warning about it, as that
    branch is; a null `alias_of` would say it is no alias."""
    from mintvcs.messages import quote_path

    if branch.alias_of is None:
        return True
    try:
        branch.alias_of.encode("utf-8")
    except UnicodeEncodeError:
        click.echo(
            f"warning: ignoring ref {quote_path(f'refs/heads/{branch.name}')}: it points to "
            f"{quote_path(f'refs/heads/{branch.alias_of}')}, a name that is not UTF-8, which JSON "
            "cannot carry",
            err=True,
        )
        return False
    return True


def _json_head(branch: str | None) -> dict[str, Any]:
    """`branch` and `detached` as --json gives where HEAD is: a branch that JSON cannot carry
    (_json_branch) is null too, and `detached` tells it from a detached HEAD."""
    return {"branch": _json_branch(branch), "detached": branch is None}


def _path_quoter(repo: Any) -> Callable[[str], str]:
    """How this command lists a file name, as git: C-quoted where it does not print, and where
    it is not ASCII unless core.quotePath is off (read once, not per name)."""
    from mintvcs.messages import quote_path

    return functools.partial(quote_path, non_ascii=_on(repo, b"core", b"quotePath"))


def _echo_commit_text(info: Any) -> None:
    """Author, date and message as git log prints them, with control characters escaped."""
    click.echo("\n".join(_commit_text_lines(info)))


def _commit_text_lines(info: Any) -> list[str]:
    """The lines of _echo_commit_text."""
    from mintvcs.messages import body_lines

    # git's Date is the author's: it differs from the committer's after a rebase or with
    # GIT_AUTHOR_DATE.
    date = _format_date(info.author_time, info.author_timezone, info.author_zone)
    out = [f"Author: {_printable(info.author)}", f"Date:   {date}"]
    lines = body_lines(info.message)
    if lines:  # git prints no blank line for an empty message
        out.append("")
    # git's medium format expands tabs to every 8 columns of the message's own line.
    out += [f"    {_printable(line.expandtabs(8))}" for line in lines]
    return out


def _warn_if_ambiguous(repo: Any, *specs: str | None, checkout: bool = False) -> None:
    """git's warning for a name that means two things: a tag and a branch (the tag wins), a ref
    and an abbreviated object id (the ref wins), a ref and a full object id (the object wins).
    For `checkout`, a branch of exactly the name given wins over all of them, as in git's."""
    for spec in specs:
        found = repo.ambiguity(spec) if spec else None
        if found is None:
            continue
        name, refs = found.name, " and ".join(map(_ref, found.refs))
        branch = f"refs/heads/{name}"
        takes_branch = checkout and spec == name and branch in found.refs
        if found.object == name.lower():
            if takes_branch:
                # git's checkout reads refs/heads/NAME before the name as a revision.
                click.echo(
                    f"warning: refname '{_ref(name)}' is ambiguous ({refs}); checkout takes the "
                    "branch, as git's does (other commands read the object)",
                    err=True,
                )
            else:
                click.echo(
                    f"warning: refname '{_ref(name)}' is ambiguous ({refs}); 40 hex digits name the "
                    f"object {name}, never a ref",
                    err=True,
                )
            if _on(repo, b"advice", b"objectNameWarning"):
                reached = (
                    "hint: Only checkout takes it for the branch: other commands read the object,\n"
                    "hint: and reach it by its full name (refs/heads/...). Delete it\n"
                    if takes_branch
                    else "hint: It is reached by its full name (refs/heads/...) only; delete it\n"
                )
                click.echo(
                    "hint: A ref named by 40 hex digits is usually made by mistake:\n"
                    "hint: `mintvcs checkout -b $NAME ID` with NAME unset names a branch ID.\n"
                    f"{reached}"
                    "hint: with `mintvcs branch -D` or `mintvcs tag -d` if it is such a one.\n"
                    "hint: `git --git-dir .mint config advice.objectNameWarning false` turns this\n"
                    "hint: hint off.",
                    err=True,
                )
        elif found.object is None:
            click.echo(
                f"warning: refname '{_ref(name)}' is ambiguous ({refs}); using "
                f"{_ref(branch if takes_branch else found.refs[0])}",
                err=True,
            )
        else:
            click.echo(
                f"warning: refname '{_ref(name)}' is ambiguous (a ref, and the abbreviated id of "
                f"{repo.abbrev(found.object)}); using the ref",
                err=True,
            )


def _quiet_for_json(ctx: click.Context, _param: click.Parameter, as_json: bool) -> bool:
    """No progress bar under --json: its reader is a script (bars are on stderr, yet a
    terminal shows them among the JSON)."""
    if as_json:
        from mintvcs import progress

        ctx.with_resource(progress.quiet())
    return as_json


def json_option(func: F) -> F:
    """Add --json to a command."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        callback=_quiet_for_json,
        help="Machine-readable output.",
    )(func)


class _CannotChangeDirectory(MintError):
    exit_code = 128  # git's `fatal: cannot change to 'PATH'`


@contextlib.contextmanager
def _working_directory(paths: tuple[str, ...]) -> Iterator[None]:
    """git's -C: change to each PATH in turn, so a relative one is taken from the one before and
    an absolute one starts afresh (an empty one changes nothing, as in git 2.39); the directory
    the process was in is its own again afterwards, so a caller of main() in-process keeps it."""
    # By descriptor, not by name: it comes back even if renamed or removed meanwhile, and
    # O_PATH (Linux) opens one the user may search but not read.
    back = os.open(".", getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY)
    try:
        for path in paths:
            if path:
                try:
                    os.chdir(path)
                except OSError as err:
                    raise _CannotChangeDirectory(
                        f"cannot change to '{path}': {err.strerror}"
                    ) from None
        yield
    finally:
        os.fchdir(back)
        os.close(back)


# invoke_without_command: `mintvcs` alone, or with -C only, runs main(), which prints the help.
@click.group(
    cls=MintGroup,
    invoke_without_command=True,
    subcommand_metavar="COMMAND [ARGS]...",  # a command is still needed (click's: [COMMAND])
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="mintvcs")
@click.option(
    "-C",
    "directories",
    metavar="PATH",
    multiple=True,
    help="Run as if started in PATH (as git -C); several are taken in turn, each from the one "
    "before.",
)
def main(directories: tuple[str, ...]) -> None:
    """mintvcs: git for LoRA adapters, and a server that serves any revision by ref."""
    ctx = click.get_current_context()
    if any(directories):
        # Before anything reads a path: the repository, and every path argument, is found from
        # there, as git resolves pathspecs after -C.
        ctx.with_resource(_working_directory(directories))
    if ctx.invoked_subcommand is None:
        # `mintvcs` alone, or with -C only (a -C it cannot change to failed above, as git's):
        # the help on stdout, as git prints its usage (click wrote it to stderr: `mintvcs |
        # less` showed nothing, `mintvcs -C DIR` said "Missing command"); exit 2, a usage
        # error's status. A full stdout is git's write failure (MintGroup.invoke).
        click.echo(ctx.get_help())
        sys.exit(2)
    if ctx.invoked_subcommand in _MODEL_COMMANDS:
        return
    if "numpy" not in sys.modules:
        # numpy's OpenBLAS starts a thread (and its buffers) per core on import: ~50 ms of a
        # half-second commit here. The version-control verbs do no linear algebra.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from mintvcs import progress

    # A bar shows once the command has run for a second, whichever phase it is in then (a
    # server's bars keep a second of their own: it runs for hours).
    ctx.with_resource(progress.command())
    _hold_stdout()


def _freeze_before_exit() -> None:
    # At exit, the interpreter's last collections walk every object (numpy's and ours):
    # ~25 ms of a half-second commit. Frozen objects are skipped; the process is ending and
    # its memory goes back to the OS anyway. Everything we write is closed by then. Not once
    # torch is loaded (serve, demo, tests): its extensions (triton's) report what was not freed.
    if "torch" not in sys.modules:
        pygc.freeze()


atexit.register(_freeze_before_exit)


_MODEL_COMMANDS = ("serve", "demo")  # they load models: BLAS keeps its threads


class _InitCommand(click.Command):
    """`init`, whose `--shared` takes its value after `=` only, as git's: `--shared` alone is
    `--shared=group`, and a word after it is the directory (`init --shared r`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        for arg in args:
            if "--" in rewritten or rewritten[-1:] in (["--base-model"], ["--base-model-id"]):
                rewritten.append(arg)  # a value or an operand: no option to rewrite
            else:
                rewritten.append("--shared=group" if arg == "--shared" else arg)
        return super().parse_args(ctx, rewritten)


def _model_id_value(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse an empty --base-model-id, or one with control characters, as a usage error: it is
    printed in messages one line each."""
    if value is not None and (
        not value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise click.BadParameter("empty, or holds control characters", param_hint="--base-model-id")
    return value


def _shared_value(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a --shared value git refuses, as a usage error (exit 2)."""
    from mintvcs.repoformat import parse_shared

    if value is not None:
        try:
            parse_shared(value)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--shared") from None
    return value


@main.command(cls=_InitCommand)
@click.argument("directory", type=DirectoryPath(), default=".")
@click.option(
    "--base-model", help="Base model: a local checkpoint directory (fingerprinted) or an id."
)
@click.option(
    "--base-model-id",
    metavar="ID",
    callback=_model_id_value,
    help="The id a --base-model directory is recorded under [default: org/name for a Hugging "
    "Face hub cache snapshot, else the directory's name].",
)
@click.option(
    "--no-hooks",
    is_flag=True,
    help="Install no hooks: not the validating pre-commit, not the update hook that refuses a "
    "push into the checked-out branch, no samples.",
)
@click.option(
    "--shared",
    metavar="[=PERM]",
    callback=_shared_value,
    help="Let a group of users write the repository (core.sharedRepository): group (alone), "
    "all, umask, or an octal mode such as 0660.",
)
@json_option
def init(
    directory: Path,
    base_model: str | None,
    base_model_id: str | None,
    no_hooks: bool,
    shared: str | None,
    as_json: bool,
) -> None:
    """Create an empty repository (.mint/) in DIRECTORY."""
    from mintvcs import porcelain
    from mintvcs.hooks import hooks_path_warning

    if as_json:
        porcelain.check_json_path(directory)
    repo = porcelain.init(
        directory,
        base_model,
        install_hooks=not no_hooks,
        shared=shared,
        base_model_id=base_model_id,
    )
    if not no_hooks and (warning := hooks_path_warning(repo.git_dir)):
        click.echo(warning, err=True)
    base = repo.base
    if as_json:
        _emit_json(
            {
                "git_dir": str(repo.git_dir.resolve()),
                "base_model": base.model_id if base else None,
                "base_fingerprint": base.fingerprint if base else None,
            }
        )
        return
    # Absolute, as git prints it: a relative one would be relative to -C's directory.
    click.echo(f"Initialized empty mintvcs repository in {repo.git_dir.resolve()}")
    if base is not None:
        click.echo(
            f"base model: {base.model_id}"
            + (f" ({base.fingerprint[:19]})" if base.fingerprint else "")
        )


@main.command()
@click.option(
    "-m",
    "--message",
    "messages",
    required=True,
    multiple=True,
    help="Commit message; several make one paragraph each (-m SUBJECT -m BODY).",
)
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Commit this PEFT directory instead of the work tree.",
)
@click.option(
    "--meta", multiple=True, help="Metadata KEY=VALUE (step, metrics, run id); repeatable."
)
@click.option("--no-verify", is_flag=True, help="Skip the pre-commit and commit-msg hooks.")
@click.option("--allow-empty", is_flag=True, help="Commit even if the adapter equals HEAD's.")
@click.option(
    "--branch",
    metavar="NAME",
    help="Commit onto existing branch NAME instead of HEAD's; HEAD and the work tree stay as they are.",
)
@json_option
def commit(
    messages: tuple[str, ...],
    source: Path | None,
    meta: tuple[str, ...],
    no_verify: bool,
    allow_empty: bool,
    branch: str | None,
    as_json: bool,
) -> None:
    """Record the adapter as a new revision on the current branch."""
    from mintvcs import porcelain
    from mintvcs.messages import join_paragraphs

    repo = _open_repo()
    _color_setting(repo, "commit")  # a value git refuses stops it here, as git
    result = porcelain.commit(
        repo,
        join_paragraphs(messages),
        source=source,
        meta=_parse_meta(meta),
        verify=not no_verify,
        allow_empty=allow_empty,
        branch=branch,
    )
    if as_json:
        _emit_json(
            {
                "commit": result.commit,
                **_json_head(result.branch),
                "parent": result.parent,
                "parents": [result.parent] if result.parent else [],  # as log and show name them
                "tensors": result.tensors,
                "new_objects": result.new_objects,
                "nbytes": result.nbytes,
            }
        )
    else:
        where = _ref(result.branch) if result.branch else "detached HEAD"
        root = "" if result.parent else " (root-commit)"
        summary = _printable(result.summary)
        click.echo(f"[{where}{root} {repo.abbrev(result.commit)}] {summary}")
        click.echo(
            f" {result.tensors} tensors, {result.nbytes:,} bytes, {result.new_objects} new "
            f"object{'s' if result.new_objects != 1 else ''}"
        )
    _auto_gc_after_commit(repo)  # its notices go to stderr: --json output stays parseable


def _auto_gc_after_commit(repo: Any) -> None:
    """As git after a commit: past gc.autoPackLimit packs (each commit of a large adapter writes
    one) or gc.auto loose objects, run `gc --auto`, detached unless gc.autoDetach is false."""
    from mintvcs import maintenance
    from mintvcs.repoformat import config_bool

    with contextlib.suppress(OSError, MintError, ValueError):
        try:
            due = maintenance.auto_gc_due(repo)
            detach = config_bool(repo.config, (b"gc",), b"autoDetach", True)
        except maintenance.GcRefusedError as err:
            # A setting git refuses: git's gc --auto dies naming it after every commit. Said, not
            # swallowed with the gc: the store would grow by a pack per commit, never merged.
            click.echo(f"warning: no automatic gc: {err}", err=True)
            return
        except ValueError as err:
            click.echo(
                f"warning: no automatic gc: {err} (git's booleans: true/false, yes/no, on/off, "
                "1/0); fix it in .mint/config",
                err=True,
            )
            return
        if not due:
            return
        packs = maintenance.pack_count(repo)
        if not detach:
            click.echo(f"Auto packing the repository ({packs} packs)...", err=True)
            maintenance.auto_gc(repo)
            return
        click.echo(
            f"Auto packing the repository in the background ({packs} packs); "
            "`mintvcs gc --auto` does it by hand",
            err=True,
        )
        maintenance.start_auto_gc(repo)  # due: checked above


class _LogCommand(click.Command):
    """`log`, which also takes git's `-N` for `-n N` (click has no options named by a number)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        for arg in args:
            if "--" in rewritten or rewritten[-1:] in (["-n"], ["--max-count"]):
                rewritten.append(arg)  # a value or an operand: no option to rewrite
            elif len(arg) > 1 and arg[0] == "-" and arg[1:].isascii() and arg[1:].isdigit():
                rewritten.append(f"--max-count={arg[1:]}")
            else:
                rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


@main.command(cls=_LogCommand)
@click.argument("revisions", nargs=-1, metavar="[REVISION]...")
@click.option("--all", "all_refs", is_flag=True, help="Start from every ref and HEAD as well.")
@click.option("--oneline", is_flag=True, help="One line per commit.")
@click.option(
    "-n",
    "--max-count",
    type=int,
    help="Show at most N commits (or -N); a negative N sets no limit, as in git.",
)
@json_option
def log(
    revisions: tuple[str, ...], all_refs: bool, oneline: bool, max_count: int | None, as_json: bool
) -> None:
    """Show the revisions reachable from REVISIONs (default HEAD), newest first.

    As git log: several REVISIONs list their union; ^A or A..B leaves out what A reaches
    (main..product-b: what product-b has that main lacks); A...B, what only one of them reaches.
    """
    from mintvcs import porcelain, revwalk

    if max_count is not None and max_count < 0:
        max_count = None  # git's reading: scripts pass `-n "${LIMIT:--1}"` for "all"
    repo = _open_repo()
    _color_setting(repo, "log")  # a value git refuses stops it here, as git
    _warn_if_ambiguous(repo, *(spec for arg in revisions for spec in revwalk.named_specs(arg)))
    start = porcelain.log_tips(repo, revisions, all_refs=all_refs)
    if as_json:
        _log_json(repo, start, max_count)
    else:
        _log_text(repo, start, max_count, oneline)


# The first page of `log` is printed after this many commits are read, and each next page is
# twice as long, up to LOG_MAX_PAGE: a long history starts printing at once (and `| head` stops
# it early), while the abbreviations and ref labels are looked up a few times per thousand
# commits, not once per commit. The cap bounds what a page holds (~1 KB a commit): doubling
# without one held half of a 10^6-commit history at once.
LOG_FIRST_PAGE = 64
LOG_MAX_PAGE = 4096


def _log_pages(
    repo: Any, start: Any, max_count: int | None, *, for_json: bool = False
) -> Iterator[tuple[list[Any], dict[str, list[str]]]]:
    """The history from `start` (revwalk.Revisions) in pages of growing size, each with the ref
    labels of its commits (`for_json`: of the refs JSON can carry, porcelain.json_safe)."""
    from mintvcs import porcelain, revwalk

    commits = revwalk.walk(start, max_count)
    size = LOG_FIRST_PAGE
    index: dict[str, list[str]] | None = None
    while page := list(itertools.islice(commits, size)):
        if index is None:  # after the first read
            index = porcelain.ref_labels(repo, porcelain.json_safe if for_json else None)
        yield page, {c.id: index[c.id] for c in page if c.id in index}
        if len(page) == size:  # more may follow: what is printed goes out while it is read
            _push_stdout()
        size = min(size * 2, LOG_MAX_PAGE)


def _log_json(repo: Any, start: Any, max_count: int | None) -> None:
    """Print `log --json`, one JSON array written as the history is read (what _emit_json writes)."""
    from mintvcs.objects import CorruptManifestError
    from mintvcs.store import CorruptObjectError

    opened = False
    for page, labels in _log_pages(repo, start, max_count, for_json=True):
        for c in page:
            item = {
                "commit": c.id,
                "parents": list(c.parents),
                "author": c.author,
                "author_time": c.author_time,
                "author_timezone": c.author_timezone,
                "time": c.time,
                "message": c.message,
                "refs": labels.get(c.id, []),
            }
            # Plain log reads no manifest: a commit whose manifest this mintvcs cannot read (a
            # newer version, damage) is listed all the same, and says why it has no meta.
            try:
                item["meta"] = repo.revision_meta(c.id, c.tree)
            except (CorruptManifestError, CorruptObjectError) as err:
                item["meta"], item["meta_error"] = None, str(err)
            text = textwrap.indent(_json_text(item), "  ")
            click.echo((",\n" if opened else "[\n") + text, nl=False)
            opened = True
    click.echo("\n]" if opened else "[]")


def _log_text(repo: Any, start: Any, max_count: int | None, oneline: bool) -> None:
    """Print `log` as git does, page by page as the history is read."""
    _use_color(repo, "diff")
    # The yellow of the ids, made once: click.style costs ~2 us a call.
    yellow, plain = click.style("\0", fg="yellow").split("\0")
    index = 0
    for page, labels in _log_pages(repo, start, max_count):
        short = repo.abbrev_many([info.id for info in page] if oneline else [])  # one search
        lines: list[str] = []  # one click.echo a page: one a line cost ~4 us each
        for info in page:
            deco = f" ({', '.join(map(_ref, labels[info.id]))})" if info.id in labels else ""
            if oneline:
                subject = _printable(_subject(info.message))
                lines.append(f"{yellow}{short[info.id]}{plain}{deco} {subject}")
                continue
            if index:
                lines.append("")
            lines.append(f"{yellow}commit {info.id}{plain}{deco}")
            lines += _commit_text_lines(info)
            index += 1
        click.echo("\n".join(lines))


@main.command()
@click.argument("rev", default="HEAD")
@json_option
def show(rev: str, as_json: bool) -> None:
    """Show a revision: commit, base model, metadata and tensors."""
    from mintvcs import porcelain
    from mintvcs.messages import quote_meta

    repo = _open_repo()
    _color_setting(repo, "show")  # a value git refuses stops it here, as git
    _warn_if_ambiguous(repo, rev)
    revision = porcelain.show(repo, rev)
    info, manifest = revision.info, revision.manifest
    if as_json:
        _emit_json({
            "commit": info.id, "parents": list(info.parents), "author": info.author, "time": info.time,
            "author_time": info.author_time, "author_timezone": info.author_timezone,
            "message": info.message, "meta": manifest.meta,
            "base": {"id": manifest.base_id, "fingerprint": manifest.base_fingerprint},
            "config": _json_config(revision.config, info.id),
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "blob": t.blob, "sha256": t.sha256, "encoding": t.encoding, "depth": t.depth} for t in manifest.tensors],
            "files": [f.path for f in manifest.files],
            "file_bytes": {f.path: repo.blob_size(f.blob, what=f.path) for f in manifest.files},
        })  # fmt: skip
        return
    _use_color(repo, "diff")
    click.echo(click.style(f"commit {info.id}", fg="yellow"))
    _echo_commit_text(info)
    click.echo()
    if manifest.base_id:
        click.echo(
            f"base model: {manifest.base_id}"
            + (f" ({manifest.base_fingerprint})" if manifest.base_fingerprint else "")
        )
    for key, value in manifest.meta.items():
        # C-quoted where needed (quote_meta), so that each line reads back one way only: a
        # newline does not look like a backslash and an n, nor a key holding ": " like a value.
        click.echo(f"meta {quote_meta(key, key=True)}: {quote_meta(value)}")
    config = revision.config
    click.echo(
        _printable(
            f"lora: r={config.get('r')} alpha={config.get('lora_alpha')} targets={config.get('target_modules')}"
        )
    )
    click.echo(f"{len(manifest.tensors)} tensors, {manifest.nbytes:,} bytes")
    _echo_lines(
        f"  {t.name}  {t.dtype} {list(t.shape)}  {t.encoding}{f' (depth {t.depth})' if t.depth else ''}"
        for t in manifest.tensors
    )
    quoted = _path_quoter(repo)
    for f in manifest.files:
        click.echo(f"  file {quoted(f.path)}  {repo.blob_size(f.blob, what=f.path):,} bytes")


def _echo_lines(lines: Iterable[str]) -> None:
    """Echo each line, in one write: click.echo flushes each call, 0.5 s for 37k tensors' lines."""
    text = "\n".join(lines)
    if text:
        click.echo(text)


@main.command()
@click.argument("rev_a")
@click.argument("rev_b", required=False)
@click.option("--all", "show_all", is_flag=True, help="List unchanged tensors too.")
@json_option
def diff(rev_a: str, rev_b: str | None, show_all: bool, as_json: bool) -> None:
    """Per-tensor change from REV_A to REV_B (default: the work tree)."""
    from mintvcs import porcelain

    repo = _open_repo()
    _color_setting(repo, "diff")  # a value git refuses stops it here, as git
    _warn_if_ambiguous(repo, rev_a, rev_b)
    result = porcelain.diff(repo, rev_a, rev_b)
    if as_json:
        _emit_json(
            {
                "a": result.a,
                "b": result.b,
                "config_changed": result.config_changed,
                "header_changed": result.header_changed,
                "files_changed": result.files_changed,
                "files": [{"path": p, "status": st} for st, p in result.files],
                "tensors": [t.to_json() for t in result.tensors],
            }
        )
        return
    _use_color(repo, "diff")
    from mintvcs.objects import WEIGHTS_FILE
    from mintvcs.porcelain import STATISTICS_DTYPES

    b_label = repo.abbrev(result.b) if len(result.b) == 40 else result.b
    click.echo(f"diff {repo.abbrev(result.a)}..{b_label}")
    if result.config_changed:
        click.echo("  adapter_config.json changed")
    if result.header_changed:
        click.echo(f"  {WEIGHTS_FILE} header changed (its __metadata__ or tensor order)")
    quoted = _path_quoter(repo)
    for file_status, path in result.files:
        click.echo(f"  file {quoted(path)} {file_status}")
    changed = 0
    lines = []
    for t in result.tensors:
        if t.status == "unchanged" and not show_all:
            continue
        changed += t.status != "unchanged"
        retyped = f"  {t.dtype_a} -> {t.dtype_b}" if t.status == "retyped" else ""
        if t.status in ("modified", "unchanged", "retyped") and t.rel_l2 is not None:
            cosine = "n/a" if t.cosine is None else f"{t.cosine:.6f}"
            lines.append(
                f"  {t.status:9} {t.name}  {list(t.shape_b or ())}{retyped}  rel_l2={t.rel_l2:.3e}  cos={cosine}"
            )
        elif t.status == "added":
            lines.append(click.style(f"  added     {t.name}  {list(t.shape_b or ())}", fg="green"))
        elif t.status == "removed":
            lines.append(click.style(f"  removed   {t.name}  {list(t.shape_a or ())}", fg="red"))
        elif t.shape_a == t.shape_b:  # a dtype without statistics (bool, float8, complex)
            lacking = " and ".join(
                dict.fromkeys(d for d in (t.dtype_a, t.dtype_b) if d and d not in STATISTICS_DTYPES)
            )
            lines.append(
                f"  {t.status:9} {t.name}  {list(t.shape_b or ())}{retyped}  "
                f"(no statistics for {lacking})"
            )
        else:
            lines.append(
                f"  {t.status:9} {t.name}  {list(t.shape_a or ())} -> {list(t.shape_b or ())}"
                f"{retyped}"
            )
    _echo_lines(lines)
    click.echo(f"{changed} of {len(result.tensors)} tensors changed")


@main.command()
@json_option
def status(as_json: bool) -> None:
    """Show the branch and how the work tree differs from HEAD."""
    from mintvcs import porcelain

    repo = _open_repo()
    _color_setting(repo, "status")  # a value git refuses stops it here, as git
    state = porcelain.status(repo)
    if as_json:
        _emit_json(
            {
                **_json_head(state.branch),
                "head": state.head,
                "commit": state.head,  # the name every other command gives HEAD's revision
                "clean": state.clean,
                "changes": [{"status": k, "path": p} for k, p in state.changes],
                "error": state.error,
                "base": state.base,
                "mixed": list(state.mixed) if state.mixed is not None else None,
            }
        )
        return
    _use_color(repo, "status")
    click.echo(
        f"On branch {_ref(state.branch)}"
        if state.branch
        else f"HEAD detached at {repo.abbrev(state.head) if state.head else '?'}"
    )
    if state.head is None:
        click.echo("\nNo commits yet")
    if state.error:
        from mintvcs.messages import one_line

        click.echo(f"\nwork tree is not a readable adapter: {one_line(state.error)}")
    elif state.clean:
        click.echo("nothing to commit, work tree clean")
    else:
        if state.base is not None and state.head is not None:
            behind = porcelain.stale_hint(repo, state.base, state.head, state.branch)
            click.echo(f"\nNote: {_ref(behind)}.")
        elif state.mixed is not None and state.head is not None:
            mixed = porcelain.mixed_hint(repo, state.mixed, state.head, state.branch)
            click.echo(f"\nNote: {_ref(mixed)}.")
        click.echo("\nChanges not committed:")
        quoted = _path_quoter(repo)
        for kind, path in state.changes:
            color = {"added": "green", "removed": "red"}.get(kind, "yellow")
            click.echo(click.style(f"\t{kind + ':':10} {quoted(path)}", fg=color))


def _each(
    repo: Any, names: tuple[str, ...], delete: Callable[[str], str], shown: str, as_json: bool
) -> None:
    """Delete every name given, as git does: one that fails is reported and the rest still go
    (exit 1 then). `shown` formats a deletion's line from the name and the short id it had;
    --json prints [{"name", "was"}] of those deleted."""
    failed = False
    deleted = []
    for name in names:
        try:
            oid = delete(name)
        except MintError as err:
            _complain(f"error: {err}")
            failed = True
            continue
        deleted.append({"name": name, "was": oid})
        if not as_json:
            click.echo(shown.format(_ref(name), repo.abbrev(oid)))
    if as_json:
        _emit_json(deleted)
    if failed:
        sys.exit(1)


def _name_and_start(names: tuple[str, ...], what: str) -> tuple[str, str | None]:
    """NAME [START] of a create (None: no START given): at most two names (`-d` takes any number)."""
    if len(names) > 2:
        raise click.UsageError(f"too many arguments: give NAME and at most one {what}")
    return names[0], names[1] if len(names) == 2 else None


@main.command()
@click.argument("names", nargs=-1, metavar="[NAME [START]]")
@click.option("-d", "--delete", is_flag=True, help="Delete branch NAME if HEAD's history holds it.")
@click.option("-D", "force_delete", is_flag=True, help="Delete branch NAME even if not merged.")
@click.option(
    "-m", "--move", is_flag=True, help="Rename branch OLD (default: the current one): [OLD] NEW."
)
@click.option("-M", "force_move", is_flag=True, help="Rename even if NEW exists (replacing it).")
@click.option(
    "-f", "--force", is_flag=True, help="Move NAME to START even if it exists (with -m: as -M)."
)
@click.option("-l", "--list", "list_", is_flag=True, help="List branches (matching NAMEs).")
@json_option
def branch(
    names: tuple[str, ...],
    delete: bool,
    force_delete: bool,
    move: bool,
    force_move: bool,
    force: bool,
    list_: bool,
    as_json: bool,
) -> None:
    """List, create, rename or delete branches."""
    from mintvcs import porcelain

    if (move or force_move) and (delete or force_delete or list_):
        raise click.UsageError("-m renames a branch: it takes no -d, -D or -l")
    repo = _open_repo()
    _color_setting(repo, "branch")  # a value git refuses stops it here, as git
    if move or force_move:
        # As git: `-m NEW` renames the current branch, `-m OLD NEW` another one; silent on success.
        if not names:
            raise click.UsageError("branch name required")
        if len(names) > 2:
            raise click.UsageError("too many arguments for a rename operation")
        old, new = (None, names[0]) if len(names) == 1 else names
        result = porcelain.branch_rename(repo, old, new, force=force_move or force)
        if as_json:
            _emit_json(
                {
                    "name": result.name,
                    "commit": result.commit,
                    "renamed_from": _json_branch(result.renamed_from),
                }
            )
        return
    if delete or force_delete:
        if not names:
            raise click.UsageError("branch name required")
        _each(
            repo,
            names,
            lambda name: porcelain.branch_delete(repo, name, force=force_delete or force),
            "Deleted branch {} (was {}).",
            as_json,
        )
        return
    if not names and force:
        raise click.UsageError("branch name required: -f moves NAME to START")
    if not names or list_:
        # As git: with --list, the names are patterns the listed branches must match.
        rows = [
            b
            for b in porcelain.branches(repo)
            if not names or any(fnmatch.fnmatchcase(b.name, pattern) for pattern in names)
        ]
        if as_json:
            _emit_json(
                [
                    {
                        "name": b.name,
                        "commit": b.commit,
                        "current": b.current,
                        "alias_of": b.alias_of,
                    }
                    for b in rows
                    if porcelain.json_safe(f"refs/heads/{b.name}") and _json_alias_safe(b)
                ]
            )
            return
        _use_color(repo, "branch")
        head = repo.head_commit()
        if not names and head is not None and repo.refs.read_symbolic("HEAD") is None:
            # As git lists it: a detached HEAD is where the next commit goes.
            click.echo(f"* {click.style(f'(HEAD detached at {repo.abbrev(head)})', fg='green')}")
        # All at once, as log does: 10^4 branches abbreviated one by one took a second more.
        short = repo.abbrev_many([b.commit for b in rows])
        for b in rows:
            shown = click.style(_ref(b.name), fg="green") if b.current else _ref(b.name)
            where = f"-> {_ref(b.alias_of)}" if b.alias_of is not None else short[b.commit]
            click.echo(f"{'*' if b.current else ' '} {shown}  {where}")
        return
    name, start = _name_and_start(names, "START")
    _warn_if_ambiguous(repo, start)
    oid = porcelain.branch_create(repo, name, start, force=force)
    if as_json:
        _emit_json({"name": name, "commit": oid})


@main.command()
@click.argument("names", nargs=-1, metavar="[NAME [REV]]")
@click.option(
    "-m",
    "--message",
    "messages",
    multiple=True,
    help="Create an annotated tag with this message; several make one paragraph each.",
)
@click.option(
    "-a", "--annotate", is_flag=True, help="Create an annotated tag (needs -m: no editor opens)."
)
@click.option("-d", "--delete", is_flag=True, help="Delete tag NAME.")
@click.option("-f", "--force", is_flag=True, help="Replace an existing tag.")
@click.option("-l", "--list", "list_", is_flag=True, help="List tags (matching NAMEs).")
@json_option
def tag(
    names: tuple[str, ...],
    messages: tuple[str, ...],
    annotate: bool,
    delete: bool,
    force: bool,
    list_: bool,
    as_json: bool,
) -> None:
    """List, create or delete tags."""
    from mintvcs import porcelain
    from mintvcs.messages import join_paragraphs

    message = join_paragraphs(messages) if messages else None
    if list_ and (delete or message is not None or force or annotate):
        raise click.UsageError("-l lists tags: it takes no -d, -a, -m or -f")
    if delete and (message is not None or force or annotate):
        raise click.UsageError("-d deletes tags: it takes no -a, -m or -f")
    if annotate and message is None:
        # git would open an editor for the message; a command run by a training script must not wait on one.
        raise click.UsageError("-a needs -m MSG: the annotated tag's message")
    repo = _open_repo()
    _color_setting(repo, "tag")  # a value git refuses stops it here, as git
    if delete:
        if not names:
            raise click.UsageError("tag name required")
        _each(
            repo,
            names,
            lambda name: porcelain.tag_delete(repo, name),
            "Deleted tag '{}' (was {})",
            as_json,
        )
        return
    if not names and (message is not None or force):
        # As git: without a name these would list the tags, and a forgotten name would look
        # like a tag made.
        raise click.UsageError("tag name required: -m and -f create or replace tag NAME")
    if not names or list_:
        # As git: with --list, the names are patterns the listed tags must match.
        rows = porcelain.tag_refs(
            repo,
            match=lambda n: not names or any(fnmatch.fnmatchcase(n, pattern) for pattern in names),
        )
        if as_json:
            _emit_json([_tag_json(r) for r in rows if porcelain.json_safe(f"refs/tags/{r.name}")])
            return
        _echo_lines(_ref(row.name) for row in rows)
        return
    name, rev = _name_and_start(names, "REV")
    _warn_if_ambiguous(repo, rev)
    was = None
    if force:
        with contextlib.suppress(MintError):  # a bad name: tag_create says why
            was = repo.refs.read(f"refs/tags/{name}")
    # An empty REV (an unset variable in a script) is refused, as git does, not read as HEAD.
    value = porcelain.tag_create(
        repo, name, "HEAD" if rev is None else rev, message=message, force=force
    )
    if message is not None and _is_nested_tag(repo, value):
        # git's advice: tagging a tag's name tags the tag object, which is rarely what was meant.
        click.echo(
            "hint: You have created a nested tag. The object referred to by your new tag is\n"
            "hint: already a tag. If you meant to tag the object that it points to, use:\n"
            "hint:\n"
            f"hint: \tmintvcs tag -f -m MSG {_ref(name)} {_ref(str(rev))}^{{}}",
            err=True,
        )
    if as_json:
        target, kind = repo.peel_object(value)  # git can tag a tree or a blob
        # A tag object is never its own target: the value differs from it once one was followed.
        _emit_json(_tag_json(porcelain.TagRef(name, value, value != target, target, kind)))
    elif was is not None and was != value:
        click.echo(f"Updated tag '{_ref(name)}' (was {repo.abbrev(was)})")


def _tag_json(row: Any) -> dict[str, Any]:
    """A tag in `tag --json`, listed or made: `value` the ref's own (the tag object of an
    annotated one), `object`/`type` what it names once tag objects are followed."""
    return {
        "name": row.name,
        "value": row.value,
        "annotated": row.annotated,
        "commit": row.object if row.type == "commit" else None,
        "object": row.object,
        "type": row.type,
    }


def _is_nested_tag(repo: Any, oid: str) -> bool:
    """Whether `oid` is a tag object that names another tag object."""
    from dulwich.objects import Tag

    obj = repo.get_object(oid)
    return isinstance(obj, Tag) and obj.object[0] is Tag


@main.command()
@click.argument("ref", required=False)
@click.option("-b", "new_branch", help="Create branch NEW at REF (default HEAD) and switch to it.")
@click.option("-f", "--force", is_flag=True, help="Overwrite uncommitted changes in the work tree.")
@json_option
def checkout(ref: str | None, new_branch: str | None, force: bool, as_json: bool) -> None:
    """Write revision REF into the work tree as a PEFT adapter directory."""
    from mintvcs import porcelain

    if ref is None and new_branch is None:
        raise click.UsageError("give a REF to check out, or -b NEW to branch from HEAD")
    ref = "HEAD" if ref is None else ref  # an empty REF is refused, as git does

    repo = _open_repo()
    was_on = repo.current_branch()
    _warn_if_ambiguous(repo, ref, checkout=True)
    result = porcelain.checkout(repo, ref, new_branch=new_branch, force=force)
    if result.left_behind:
        _warn_left_behind(repo, result.left_behind)
    if as_json:  # a deploy script learns which revision it got without a second command
        _emit_json(
            {
                "commit": result.commit,
                **_json_head(result.branch),
                "created": result.created,
                "left_behind": list(result.left_behind),
            }
        )
        return
    # On stderr, as git's: stdout is for data (reset's "HEAD is now at" is on stdout in git too).
    if result.created:
        click.echo(f"Switched to a new branch '{_ref(str(result.branch))}'", err=True)
    elif result.branch and result.branch == was_on:
        click.echo(f"Already on '{_ref(result.branch)}'", err=True)
    elif result.branch:
        click.echo(f"Switched to branch '{_ref(result.branch)}'", err=True)
    else:
        assert result.commit is not None  # only `-b` on an unborn branch has none
        click.echo(f"HEAD is now at {repo.abbrev(result.commit)} (detached)", err=True)


def _warn_left_behind(repo: Any, commits: tuple[str, ...]) -> None:
    """git's warning on leaving a detached HEAD's own commits: the newest four, and how to keep them."""
    shown = 4
    them = "them" if len(commits) > 1 else "it"
    lines = [
        f"warning: you are leaving {len(commits)} commit{'s' if len(commits) > 1 else ''} "
        "behind, not connected to any of your branches or tags:",
        *(
            f"  {repo.abbrev(oid)} {_printable(_subject(repo.commit_info(oid).message))}"
            for oid in commits[:shown]
        ),
    ]
    if len(commits) > shown:
        lines.append(f" ... and {len(commits) - shown} more.")
    lines += [
        f"If you want to keep {them} by creating a new branch, this may be a good time to do so with:",
        f"  mintvcs branch <new-branch-name> {repo.abbrev(commits[0])}",
    ]
    click.echo("\n".join(lines), err=True)


@main.command()
@click.argument("rev", default="HEAD")
@click.option("--hard", is_flag=True, help="Also rewrite the work tree.")
# git's other modes differ in what they do to its index; with none, both are the plain reset.
@click.option("--soft", is_flag=True, help="Move the branch only (the default: there is no index).")
@click.option(
    "--mixed", is_flag=True, help="Move the branch only (the default: there is no index)."
)
@json_option
def reset(rev: str, hard: bool, soft: bool, mixed: bool, as_json: bool) -> None:
    """Move the current branch to REV (default HEAD)."""
    from mintvcs import porcelain

    if hard + soft + mixed > 1:
        raise click.UsageError("--soft, --mixed and --hard exclude each other")
    repo = _open_repo()
    _warn_if_ambiguous(repo, rev)
    oid = porcelain.reset(repo, rev, hard=hard)
    if as_json:
        _emit_json({"commit": oid, **_json_head(repo.current_branch()), "hard": hard})
        return
    click.echo(
        f"HEAD is now at {repo.abbrev(oid)} {_printable(_subject(repo.commit_info(oid).message))}"
    )


@main.command()
@json_option
def fsck(as_json: bool) -> None:
    """Verify every object, every ref's history and every reachable tensor."""
    from mintvcs import maintenance
    from mintvcs.progress import phase_counter

    with phase_counter("fsck") as progress:
        report = maintenance.fsck(_open_repo(), progress=progress)
    if as_json:
        _emit_json(
            {
                "ok": report.ok,
                "objects": report.objects,
                "revisions": report.revisions,
                "tensors": report.tensors,
                "problems": report.problems,
                "warnings": report.warnings,
            }
        )
    else:
        for warning in report.warnings:
            _complain(f"warning: {warning}")
        for problem in report.problems:
            _complain(f"error: {problem}")
        click.echo(
            f"checked {report.objects} objects, {report.revisions} revisions, {report.tensors} tensors: {'ok' if report.ok else f'{len(report.problems)} problem(s)'}"
        )
    if not report.ok:
        sys.exit(1)


@main.command()
@json_option
@click.option("--no-prune", is_flag=True, help="Keep unreachable objects.")
@click.option(
    "--auto",
    is_flag=True,
    help="Only past gc.autoPackLimit packs (32) or gc.auto loose objects (6700): merge the "
    "small packs and loose objects into one, geometrically, pruning nothing (cheap enough to "
    "run after every commit).",
)
def gc(no_prune: bool, auto: bool, as_json: bool) -> None:
    """Pack reachable objects and refs; prune unreachable objects older than an hour."""
    from mintvcs import maintenance
    from mintvcs.progress import phase_counter

    if auto:
        with phase_counter("gc") as progress:
            rolled = maintenance.auto_gc(_open_repo(), progress=progress)
        if as_json:
            _emit_json({**dataclasses.asdict(rolled), "rewritten": rolled.rewritten})
        elif rolled.busy:
            click.echo("nothing to do: another gc is running")
        elif not rolled.rewritten:
            repo = _open_repo()
            if repo.repo_format.precious_objects:
                click.echo(
                    "nothing to do: extensions.preciousObjects is set (other repositories may "
                    "borrow these objects), so gc repacks nothing, as git's gc does"
                )
                return
            packs, loose = maintenance.auto_limits(repo)
            if loose is None:
                click.echo("nothing to do: gc.auto is 0, which turns gc --auto off, as in git")
                return
            click.echo(
                f"nothing to do: {rolled.packs_after} packs (gc.autoPackLimit "
                f"{packs or 'off'}), loose objects within gc.auto ({loose or 'off'})"
            )
        else:
            click.echo(
                f"merged {rolled.packs_merged} packs and {rolled.loose_packed} loose objects into "
                f"one pack of {rolled.objects} objects; {rolled.packs_after} packs now; store "
                f"{rolled.bytes_before:,} -> {rolled.bytes_after:,} bytes"
            )
        return
    with phase_counter("gc") as progress:
        repo = _open_repo()
        result = maintenance.gc(repo, prune=not no_prune, progress=progress)
    if result.absent_bases:
        n = result.absent_bases
        _complain(
            f"warning: {n} XOR base{'s' * (n != 1)} that reachable tensor blobs build on "
            f"{'is' if n == 1 else 'are'} not in the store{repo.missing_objects_hint()}; gc kept "
            "the blobs built on them, which cannot be decoded or checked here"
        )
    if as_json:
        _emit_json(
            {
                "packed": result.packed,
                "pruned": result.pruned,
                "bytes_before": result.bytes_before,
                "bytes_after": result.bytes_after,
                "rewritten": result.rewritten,
                "refs_packed": result.refs_packed,
                "absent_bases": result.absent_bases,
            }
        )
        return
    if not result.rewritten:
        # Said of the objects; loose refs (a branch made since, a gc that failed at
        # packed-refs) are packed all the same, and said so.
        refs = result.refs_packed
        done = f"packed {refs} ref{'s' * (refs != 1)}; " if refs else "nothing to do: "
        click.echo(
            f"{done}{result.packed} objects checked, already packed; store {result.bytes_after:,} bytes"
        )
        return
    click.echo(
        f"packed {result.packed} objects, pruned {result.pruned}; store {result.bytes_before:,} -> {result.bytes_after:,} bytes"
    )


def _lazy(module: str, attr: str, help_text: str) -> click.Command:
    """Load a command from the serving side only when it is invoked, so VCS commands start fast."""

    class Lazy(click.Command):
        def _real(self) -> click.Command:
            import importlib

            command: click.Command = getattr(importlib.import_module(module), attr)
            return command

        def get_params(self, ctx: click.Context) -> list[click.Parameter]:
            return self._real().get_params(ctx)

        def invoke(self, ctx: click.Context) -> Any:
            return self._real().invoke(ctx)

        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            return self._real().parse_args(ctx, args)

    return Lazy(attr, help=help_text)


main.add_command(
    _lazy(
        "mintvcs.serve.cli",
        "serve",
        "Serve adapter revisions by ref over HTTP with one resident base.",
    )
)
main.add_command(
    _lazy("mintvcs.serve.cli", "demo", "Tell the whole story on an embedded tiny base model.")
)

if __name__ == "__main__":
    # `python -m mintvcs.cli` runs as the `mintvcs` script does: in Python's UTF-8 mode whatever
    # the locale (it stored `commit -m café` under Latin-1 as double-encoded UTF-8), Ctrl-C while
    # it loads as in a command. This module is mintvcs.cli to whoever imports it (console.main,
    # serve's commands), not run a second time as another copy.
    sys.modules.setdefault("mintvcs.cli", sys.modules[__name__])
    from mintvcs.console import main as console_main

    console_main(module="mintvcs.cli")
