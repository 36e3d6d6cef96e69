"""git config as mintvcs reads it, checked against real git: values in git's own forms, the
global config, hooks, includes and the parser's corner cases."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mintvcs.storekit import ENV, copy_adapter, git, mint, mutate


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment whose global git config is `HOME/.gitconfig` in a fresh HOME (no system
    config), for both git and mintvcs; the identity comes from config, not GIT_AUTHOR_*."""
    place = tmp_path / "home"
    place.mkdir()
    env = {**ENV, "HOME": str(place), "XDG_CONFIG_HOME": str(place / ".config")}
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    for name in ("GIT_CONFIG_GLOBAL", "EMAIL", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT"):
        env.pop(name, None)
    for role in ("AUTHOR", "COMMITTER"):
        env.pop(f"GIT_{role}_NAME")
        env.pop(f"GIT_{role}_EMAIL")
    return env


def _git(git_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Real git on `git_dir` under `env`; its exit status is the caller's to check."""
    return subprocess.run(
        ["git", "--git-dir", str(git_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def _mint(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`mintvcs ARGS` as a real process under exactly `env` (storekit's mint() puts its own
    identity and GIT_CONFIG_GLOBAL back); never a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _set(work: Path, key: str, value: str) -> None:
    """Set `key` in `.mint/config` with git itself."""
    git(work / ".mint", "config", key, value)


# Every key dulwich's object store used to read with int() or its true/false-only boolean, each
# set to a value in a form git documents and reads.
GIT_FORM_VALUES = [
    ("core.packedGitLimit", "512m"),
    ("core.packedGitWindowSize", "1m"),
    ("core.deltaBaseCacheLimit", "96m"),
    ("core.bigFileThreshold", "512m"),
    ("core.compression", "0x0"),
    ("core.looseCompression", "0x0"),
    ("pack.windowMemory", "100m"),
    ("pack.deltaCacheSize", "256m"),
    ("pack.bigFileThreshold", "512m"),
    ("pack.threads", "0x2"),
    ("pack.depth", "0x32"),
    ("pack.indexVersion", "0x2"),
    ("core.commitGraph", "yes"),
    ("core.multiPackIndex", "on"),
]


def test_git_size_and_boolean_forms_in_pack_and_core_keys_leave_the_store_readable(
    work: Path,
) -> None:
    mint(work, "gc")  # every revision now in a pack
    assert not [p for p in (work / ".mint" / "objects").glob("??") if any(p.iterdir())]
    for key, value in GIT_FORM_VALUES:
        _set(work, key, value)
    assert len(git(work / ".mint", "log", "--oneline").stdout.splitlines()) == 3
    # Each read as a corrupt object ("invalid literal for int()"), fsck and gc as a traceback.
    assert len(mint(work, "log", "--oneline").stdout.splitlines()) == 3
    mint(work, "show", "HEAD~1")
    mint(work, "checkout", "side")
    mint(work, "checkout", "main")
    mutate(work, seed=7)
    mint(work, "commit", "-m", "four", "--no-verify")
    mint(work, "fsck")
    mint(work, "gc")
    assert len(git(work / ".mint", "log", "--oneline").stdout.splitlines()) == 4


def _loose(work: Path) -> list[Path]:
    return sorted((work / ".mint" / "objects").glob("??/*"))


def _wait_for_gc(work: Path) -> None:
    """Until a detached gc is done: no gc.pid lock and no loose object."""
    import time

    deadline = time.monotonic() + 120
    while _loose(work) or (work / ".mint" / "gc.pid").exists():
        assert time.monotonic() < deadline, _loose(work)
        time.sleep(0.1)


def test_gc_auto_detach_is_read_as_a_git_boolean(work: Path) -> None:
    _set(work, "gc.auto", "1")
    # Only true and false were read: the others raised inside the commit's gc, which was
    # silently skipped, so the store never merged again.
    for seed, (value, detach) in enumerate(
        [("no", False), ("Off", False), ("0", False), ("yes", True), ("ON", True), ("1", True)]
    ):
        _set(work, "gc.autoDetach", value)
        by_git = git(work / ".mint", "config", "--bool", "gc.autoDetach").stdout.strip()
        assert by_git == str(detach).lower()
        mutate(work, seed=10 + seed)
        committed = mint(work, "commit", "-m", value, "--no-verify")
        assert "Auto packing the repository" in committed.stderr, committed.stderr
        assert ("in the background" in committed.stderr) == detach
        if not detach:
            assert not _loose(work)  # packed by the commit itself
        _wait_for_gc(work)
    assert len(git(work / ".mint", "log", "--oneline").stdout.splitlines()) == 9


@pytest.mark.parametrize(
    ("key", "value", "git_says"),
    [
        ("gc.autoDetach", "maybe", "bad boolean config value 'maybe' for 'gc.autodetach'"),
        ("gc.auto", "lots", "bad numeric config value 'lots' for 'gc.auto'"),
    ],
)
def test_a_gc_setting_git_refuses_is_named_after_each_commit(
    work: Path, key: str, value: str, git_says: str
) -> None:
    _set(work, key, value)
    assert (
        git_says
        in git(
            work / ".mint", "config", "--type=bool" if "Detach" in key else "--int", key, ok=False
        ).stderr
    )
    mutate(work, seed=5)
    committed = mint(work, "commit", "-m", "four", "--no-verify")
    warnings = [line for line in committed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no automatic gc" in warnings[0], committed.stderr
    assert f"{key} = {value!r}" in warnings[0], warnings


@pytest.mark.parametrize(
    ("value", "limit"), [("010", 8), ("0x10", 16), ("1k", 1024), ("-1", None), ("0", None)]
)
def test_gc_limits_are_read_as_git_reads_integers(
    work: Path, value: str, limit: int | None
) -> None:
    _set(work, "gc.autoPackLimit", value)
    assert int(git(work / ".mint", "config", "--int", "gc.autoPackLimit").stdout) == (
        limit or int(value)
    )
    from mintvcs.maintenance import auto_limits
    from mintvcs.store import Repository

    with Repository.open(work) as repo:
        assert auto_limits(repo)[0] == limit


def test_a_gc_limit_with_a_blank_git_refuses_is_refused(work: Path) -> None:
    (work / ".mint" / "config").write_text(
        (work / ".mint" / "config").read_text() + '[gc]\n\tautoPackLimit = "5 "\n'
    )
    assert (
        "bad numeric config value"
        in git(work / ".mint", "config", "--int", "gc.autoPackLimit", ok=False).stderr
    )
    line = mint(work, "gc", "--auto", ok=False).stderr
    assert "gc.autoPackLimit = '5 ' is not an integer" in line, line


@pytest.mark.parametrize("header", ['[mint "notify"]', '[Mint "notify"]', '[MINT "notify"]'])
def test_the_ref_update_sample_reads_its_section_in_any_case_as_git_does(
    work: Path, header: str
) -> None:
    config = work / ".mint" / "config"
    config.write_text(config.read_text() + f"{header}\n\turl = http://127.0.0.1:9\n")
    assert git(work / ".mint", "config", "--get", "mint.notify.url").stdout.strip()
    ran = _run_ref_update_sample(work)
    assert ran.returncode == 0
    # Nothing at all was said for the capitalised sections: no server was told, silently.
    assert "cannot notify http://127.0.0.1:9" in ran.stderr, ran.stderr


def _append(work: Path, text: str, name: str = "config") -> None:
    path = work / ".mint" / name
    path.write_bytes((path.read_bytes() if path.exists() else b"") + text.encode())


def _append_to(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_malformed_global_config_is_named_with_its_line_as_git_names_it(
    work: Path, home: dict[str, str]
) -> None:
    gitconfig = Path(home["HOME"]) / ".gitconfig"
    gitconfig.write_text("[user]\n\tname = N\n[user\n")
    by_git = _git(work / ".mint", home, "log", "-1")
    assert by_git.returncode == 128
    assert f"bad config line 3 in file {gitconfig}" in by_git.stderr
    mutate(work, seed=4)
    for args in (["commit", "-m", "four", "--no-verify"], ["branch", "newb"], ["tag", "t"]):
        result = _mint(work, home, *args)  # a traceback before, naming no file
        assert result.returncode == 128, result.stderr
        line = _error_line(result)
        assert f"{gitconfig} cannot be read: bad config line 3 (" in line, line


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        # A backslash ends the comment, not the value: git reads the next line as a key of its
        # own; dulwich continued the value there and lost core.sharedRepository.
        (
            "[core]\n\tlogAllRefUpdates = true   ; reflogs \\\n\tsharedRepository = group\n",
            "core.sharedRepository",
            "group",
        ),
        ("[mint]\n\tfoo = a ; c \\\n\tbar = b\n", "mint.bar", "b"),
        ('[mint]\n\tfoo = "x\\"y" # c\\\r\n\tbar = b\r\n', "mint.bar", "b"),
        # A continuation at the end of the file ends the value: dulwich dropped the key, or
        # kept the backslash when no newline followed.
        ("[mint]\n\tfoo = a\\\n", "mint.foo", "a"),
        ("[mint]\n\tfoo = a\\", "mint.foo", "a"),
        ("[mint]\n\tfoo = a\\\n\\\n", "mint.foo", "a"),
    ],
)
def test_a_line_dulwich_would_misread_is_read_as_git_reads_it(
    work: Path, text: str, key: str, value: str
) -> None:
    # Refusing them (the first answer) stopped every command, the server too, on files git
    # reads: the backslash is mended away before dulwich reads the file.
    from mintvcs.store import Repository

    _append(work, text)
    assert git(work / ".mint", "config", "--get", key).stdout.removesuffix("\n") == value
    assert mint(work, "log", "--oneline").returncode == 0
    section, _, name = key.rpartition(".")
    with Repository.open(work) as repo:
        assert (
            repo.config.get(tuple(part.encode() for part in section.split(".")), name.encode())
            == value.encode()
        )


def _as_git_reads(work: Path, key: str) -> bytes | None:
    """`git config --get KEY` on the repository's config: the value's bytes, None when unset."""
    result = subprocess.run(
        ["git", "--git-dir", str(work / ".mint"), "config", "--get", key],
        env=ENV,
        capture_output=True,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.stdout.removesuffix(b"\n") if result.returncode == 0 else None


def _as_mintvcs_reads(work: Path, key: str) -> bytes | None:
    """The same key as the repository's config reads it in mintvcs (None when unset)."""
    from mintvcs.store import Repository

    *section, name = key.split(".")
    with Repository.open(work) as repo:
        try:
            return bytes(repo.config.get(tuple(p.encode() for p in section), name.encode()))
        except KeyError:
            return None


# Values whose blanks dulwich read otherwise than git: git makes each unquoted blank inside a
# value a space (a tab too) and keeps the ones a continued line starts with; dulwich kept the
# tab and dropped those. Each is written after `foo =`, with `bar = b` on the next line.
SPACINGS = [
    "x\ty",
    "Ann \\\n   Lee",
    '"Ann \\\n   Lee"',
    "Ann\\\n\tLee",
    "a  \t b",
    '"q\t" x \t"y"',
    'a ""',
    '"" a',
    "a\\\n\tb\\\n\t c",
    "a  b\\\n  ",
    "a\\\r\n  b",
    "a\rb",
    '"a\rb"',
    "trail \t ",
    "\u00e9 \t \u00e9 ; comment",
]


@pytest.mark.parametrize("header", [False, True])
@pytest.mark.parametrize("value", SPACINGS)
def test_blanks_in_a_value_are_read_as_git_reads_them(work: Path, value: str, header: bool) -> None:
    _append(work, ("[mint] foo = " if header else "[mint]\n\tfoo = ") + value + "\n\tbar = b\n")
    for key in ("mint.foo", "mint.bar"):
        assert _as_mintvcs_reads(work, key) == _as_git_reads(work, key), key
    assert mint(work, "log", "--oneline").returncode == 0


@pytest.mark.parametrize("value", [r"a\bc", r'"x\by"', r"a\t\n\"\\\b"])
def test_escapes_in_a_value_are_read_as_git_reads_them(work: Path, value: str) -> None:
    # git takes \b (a backspace) beside \\, \", \n and \t; any other escape is refused.
    _append(work, "[mint]\n\tfoo = " + value + "\n\tbar = b\n")
    assert b"\b" in (_as_git_reads(work, "mint.foo") or b"")
    for key in ("mint.foo", "mint.bar"):
        assert _as_mintvcs_reads(work, key) == _as_git_reads(work, key), key
    assert mint(work, "log", "--oneline").returncode == 0


def test_a_value_continued_on_a_section_header_s_line_is_read_as_git_reads_it(
    work: Path,
) -> None:
    # On a header's line dulwich ended the value and read the next line as a key: refused
    # until the value was rewritten as git reads it.
    _append(work, "[mint] foo = a\\\n\tb\n")
    assert _as_git_reads(work, "mint.foo") == b"a b"
    assert _as_mintvcs_reads(work, "mint.foo") == b"a b"
    assert _as_mintvcs_reads(work, "mint.b") is None


def test_a_key_before_any_section_is_skipped_with_git_s_error(work: Path) -> None:
    # git says so and reads on; mintvcs refused every command ("setting without section").
    config = work / ".mint" / "config"
    config.write_text("Name = Orphan \\\n   continued\n" + config.read_text())
    by_git = git(work / ".mint", "log", "--oneline")
    said = "error: key does not contain a section: name"
    assert said in by_git.stderr
    ours = mint(work, "log", "--oneline")
    assert _ids(ours.stdout) == _ids(by_git.stdout)
    assert said in ours.stderr.splitlines()
    assert _as_mintvcs_reads(work, "core.bare") == _as_git_reads(work, "core.bare") is not None


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        # git reads headers one after another on a line, the last one counting.
        ("[mint][sub]\n\tk = one\n", ["sub.k", "mint.k"]),
        ("[mint] [sub] k = one\n", ["sub.k", "mint.k"]),
        ('[mint "x"][sub] k = one ; c\n', ["sub.k", "mint.x.k"]),
        # An old-style subsection is lower-cased by git; dulwich kept its case.
        ("[mint.Sub]\n\tk = one\n", ["mint.sub.k", "mint.Sub.k"]),
        ("[Mint.A.B][mint.C] k = one\n", ["mint.c.k", "mint.a.b.k"]),
        ('[mint "Quoted"]\n\tk = one\n', ["mint.Quoted.k", "mint.quoted.k"]),
    ],
)
def test_section_headers_are_read_as_git_reads_them(work: Path, text: str, keys: list[str]) -> None:
    _append(work, text)
    for key in keys:
        assert _as_mintvcs_reads(work, key) == _as_git_reads(work, key), key
    assert _as_git_reads(work, keys[0]) == b"one"


def test_core_keys_after_two_headers_on_a_line_count_as_in_git(work: Path) -> None:
    # `[mint][core] abbrev = 12` refused every command; git reads core.abbrev there.
    _append(work, "[mint][core] abbrev = 12\n")
    by_git = _ids(git(work / ".mint", "log", "--oneline").stdout)
    assert {len(i) for i in by_git} == {12}
    assert _ids(mint(work, "log", "--oneline").stdout) == by_git


def _ids(oneline: str) -> list[str]:
    """The abbreviated ids `log --oneline` printed."""
    return [line.split()[0] for line in oneline.splitlines()]


def test_the_format_check_reads_config_without_its_includes_as_git_does(work: Path) -> None:
    (work / ".mint" / "inc").write_text(
        "[extensions]\n\tfrobnicate = yes\n\tobjectFormat = sha256\n"
    )
    _set(work, "core.repositoryformatversion", "1")
    _append(work, "[include]\n\tpath = inc\n")
    assert git(work / ".mint", "log", "--oneline").returncode == 0
    assert len(mint(work, "log", "--oneline").stdout.splitlines()) == 3
    # The other way round: version 1 only in the include, an unknown extension in config.
    (work / ".mint" / "inc").write_text("[core]\n\trepositoryformatversion = 1\n")
    _set(work, "core.repositoryformatversion", "0")
    _set(work, "extensions.frobnicate", "yes")
    assert git(work / ".mint", "log", "--oneline").returncode == 0
    assert len(mint(work, "log", "--oneline").stdout.splitlines()) == 3
    # What the include sets still counts for everything else.
    (work / ".mint" / "inc").write_text("[user]\n\tname = Included\n")
    from mintvcs.store import Repository

    with Repository.open(work) as repo:
        assert repo.config.get((b"user",), b"name") == b"Included"


@pytest.mark.parametrize(
    ("line", "included"),
    [
        ("[core\n", False),
        ("[mint]\n\tfoo_bar = a\n", False),
        ("[mint]\n\tfoo = a\\q\n", False),
        ("[mint]\n\t1foo = a\n", False),
        ("[mint]\n\t-foo = a\n", False),
        ("[mint]\n\t= a\n", False),
        ('[mint]\n\tfoo = "a\n', False),
        ("[mint] foo ; c\n", False),
        # What dulwich strips or takes and git refuses: a vertical tab or form feed leading a
        # line, or after a name; a section header with no name.
        ("[mint]\n\t\x0bfoo = a\n", False),
        ("[mint]\n\tfoo = a ; c \\\n\x0c\n", False),
        ("[mint]\n\tfoo\x0b\n", False),
        ("[]\n\tfoo = a\n", False),
        ('[mint]\n\tok = 1\n\tbad"\n', True),
        ("[mint]\n\tok = 1\n\tfoo = a\\q\n", True),
    ],
)
def test_a_bad_config_line_is_named_as_git_names_it(work: Path, line: str, included: bool) -> None:
    bad = work / ".mint" / ("bad.inc" if included else "config")
    if included:
        bad.write_text(line)
        _append(work, "[include]\n\tpath = bad.inc\n")
    else:
        _append(work, line)
    by_git = git(work / ".mint", "log", ok=False)
    assert by_git.returncode == 128
    said = by_git.stderr.split("bad config line ")[1].split()[0]  # the line number
    assert (
        f" in file {bad.relative_to(work)}" in by_git.stderr or f" in file {bad}" in by_git.stderr
    )
    result = mint(work, "log", ok=False)
    assert result.returncode == 128, result.stderr
    line_said = _error_line(result)
    assert f"{bad} cannot be read: bad config line {said} (" in line_said, line_said
    assert not re.search(r"\bb['\"]", line_said)  # no bytes reprs


def _ident(work: Path, env: dict[str, str], role: str) -> str:
    """`NAME <EMAIL>` as git would sign as `role` in this repository, the date cut off."""
    result = _git(work / ".mint", env, "var", f"GIT_{role.upper()}_IDENT")
    assert result.returncode == 0, result.stderr
    return result.stdout.rsplit(" ", 2)[0]


def _committed_idents(work: Path, env: dict[str, str]) -> tuple[str, str]:
    mutate(work, seed=len(list((work / ".mint" / "logs").rglob("*"))) + 20)
    result = _mint(work, env, "commit", "-m", "next", "--no-verify")
    assert result.returncode == 0, result.stderr
    shown = git(work / ".mint", "log", "-1", "--format=%an <%ae>|%cn <%ce>").stdout.strip()
    author, committer = shown.split("|")
    return author, committer


@pytest.mark.parametrize(
    "setup",
    [
        "includeif-gitdir",
        "includeif-gitdir-i",
        "includeif-onbranch",
        "includeif-relative",
        "includeif-dot-relative",
        "author-committer-keys",
        "email-variable",
        "config-count",
        "config-parameters",
        "parameters-over-count",
        "two-headers-one-line",
        "old-style-subsection",
        "orphan-key",
        "tab-in-name",
    ],
)
def test_the_commit_identity_is_the_one_git_would_use(
    work: Path, home: dict[str, str], tmp_path: Path, setup: str
) -> None:
    gitconfig = Path(home["HOME"]) / ".gitconfig"
    gitconfig.write_text("[user]\n\tname = Personal\n\temail = me@personal.example\n")
    identity = tmp_path / "work.gitconfig"
    identity.write_text("[user]\n\temail = me@work.example\n")
    env = dict(home)
    if setup == "includeif-gitdir":
        _append_to(gitconfig, f'[includeIf "gitdir:{work.parent}/"]\n\tpath = {identity}\n')
    elif setup == "includeif-gitdir-i":
        _append_to(gitconfig, f'[includeIf "gitdir/i:{str(work).upper()}/"]\n\tpath = {identity}\n')
    elif setup == "includeif-onbranch":
        _append(work, f'[includeIf "onbranch:main"]\n\tpath = {identity}\n')
    elif setup == "includeif-relative":
        (Path(home["HOME"]) / "work.gitconfig").write_text(identity.read_text())
        _append_to(gitconfig, f'[includeIf "gitdir:{work.name}/.mint"]\n\tpath = work.gitconfig\n')
    elif setup == "includeif-dot-relative":  # relative to the file that holds it
        elsewhere = work.parent / "global.gitconfig"
        elsewhere.write_text(gitconfig.read_text())
        _append_to(elsewhere, f'[includeIf "gitdir:./{work.name}/"]\n\tpath = {identity}\n')
        env["GIT_CONFIG_GLOBAL"] = str(elsewhere)
    elif setup == "author-committer-keys":
        _set(work, "author.email", "author@x.example")
        _set(work, "committer.name", "Committer")
    elif setup == "email-variable":
        gitconfig.write_text("[user]\n\tname = n\n")
        env["EMAIL"] = "env@x.example"
    elif setup == "config-count":
        _set(work, "user.email", "local@x.example")
        env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="user.email")
        env["GIT_CONFIG_VALUE_0"] = "ci@x.example"
    elif setup == "config-parameters":
        _set(work, "user.email", "local@x.example")
        env["GIT_CONFIG_PARAMETERS"] = "'user.email'='it'\\''s@x.example' 'user.Name=P Q'"
    elif setup == "two-headers-one-line":
        _append_to(gitconfig, "[core] [user] email = both@x.example\n")
    elif setup == "old-style-subsection":  # user.Name.email is no user.email, in either case
        _append_to(gitconfig, "[User.Name]\n\temail = old@x.example\n[user]\n\tname=N\n")
    elif setup == "orphan-key":
        gitconfig.write_text(
            "email = orphan@x.example\n[user]\n\tname = O\n\temail = o@x.example\n"
        )
    elif setup == "tab-in-name":
        _append_to(gitconfig, "[user]\n\tname = Ann\tLee \\\n   Jr\n")
    else:
        env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="user.email")
        env["GIT_CONFIG_VALUE_0"] = "ci@x.example"
        env["GIT_CONFIG_PARAMETERS"] = "'user.email'='param@x.example'"
    author, committer = _ident(work, env, "author"), _ident(work, env, "committer")
    assert author != "Personal <me@personal.example>" or committer != author  # a case of its own
    assert _committed_idents(work, env) == (author, committer)


def _includeif_patterns(work: Path) -> list[str]:
    """includeIf conditions that git's wildmatch takes or refuses for `work`'s `.mint`."""
    up = work.parent
    return [
        f"gitdir:{work}/.mint",
        f"gitdir:{work}/",
        f"gitdir:{work}",  # the work tree, not the git dir: no
        f"gitdir:{up}/*/.mint",
        f"gitdir:{up.parent}/*/.mint",  # `*` stops at a slash: no
        f"gitdir:{up.parent}/**/.mint",
        f"gitdir:{up}/{work.name[0]}?{work.name[2:]}/",
        f"gitdir:{up}/[a-z]ork/",
        f"gitdir:{work.name}/.mint",  # relative: below any directory
        f"gitdir:{work.name[1:]}/.mint",  # but a whole name: no
        f"gitdir:{str(work).upper()}/",  # case counts: no
        f"gitdir/i:{str(work).upper()}/",
        "onbranch:main",
        "onbranch:ma",
        "onbranch:m*",
        "onbranch:mai?",
    ]


def test_includeif_conditions_match_as_git_matches_them(
    work: Path, home: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mintvcs.porcelain import signature
    from mintvcs.store import Repository

    assert work.name == "work"  # the ?, [a-z] patterns are made for it
    identity = tmp_path / "work.gitconfig"
    identity.write_text("[user]\n\temail = me@work.example\n")
    for name in ("GIT_AUTHOR_EMAIL", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_PARAMETERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", home["HOME"])
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    gitconfig = Path(home["HOME"]) / ".gitconfig"
    matched = []
    for condition in _includeif_patterns(work):
        gitconfig.write_text(
            f'[user]\n\temail = me@personal.example\n[includeIf "{condition}"]\n'
            f"\tpath = {identity}\n"
        )
        by_git = _git(work / ".mint", home, "config", "--get", "user.email").stdout.strip()
        with Repository.open(work) as repo:
            ours = signature(repo, "author").identity.split("<")[1].rstrip(">")
        assert ours == by_git, condition
        matched.append(by_git == "me@work.example")
    assert 0 < sum(matched) < len(matched)  # both kinds


def test_an_onbranch_pattern_ending_in_a_slash_matches_the_branches_under_it_as_git(
    work: Path, home: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # git adds `**` to a pattern ending in `/`, as for gitdir: `onbranch:user/` is every
    # branch under user/.
    from mintvcs.porcelain import signature
    from mintvcs.store import Repository

    for name in ("GIT_AUTHOR_EMAIL", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_PARAMETERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", home["HOME"])
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    git(work / ".mint", "symbolic-ref", "HEAD", "refs/heads/user/topic")
    identity = tmp_path / "work.gitconfig"
    identity.write_text("[user]\n\temail = me@work.example\n")
    config = work / ".mint" / "config"
    original = config.read_text() + "[user]\n\temail = me@personal.example\n"
    matched = []
    for condition in ("onbranch:user/", "onbranch:use/", "onbranch:user", "onbranch:user/*"):
        config.write_text(original + f'[includeIf "{condition}"]\n\tpath = {identity}\n')
        by_git = _git(work / ".mint", home, "config", "--get", "user.email").stdout.strip()
        with Repository.open(work) as repo:
            ours = signature(repo, "author").identity.split("<")[1].rstrip(">")
        assert ours == by_git, condition
        matched.append(by_git == "me@work.example")
    assert matched == [True, False, False, True]


def test_includeif_gitdir_matches_the_path_taken_through_a_symbolic_link_as_git(
    work: Path, home: dict[str, str], tmp_path: Path
) -> None:
    # git builds the repository's path from $PWD, the path the shell took; os.getcwd() had
    # resolved the link, and a rule for ~/work/ never matched a repository reached through it.
    alias = tmp_path / "alias"
    alias.symlink_to(work)
    identity = tmp_path / "work.gitconfig"
    identity.write_text("[user]\n\temail = me@work.example\n")
    (Path(home["HOME"]) / ".gitconfig").write_text(
        f'[user]\n\tname = P\n\temail = me@home.example\n[includeIf "gitdir:{alias}/"]\n'
        f"\tpath = {identity}\n"
    )
    env = {**home, "PWD": str(alias)}
    by_git = subprocess.run(
        ["git", "--git-dir", ".mint", "var", "GIT_AUTHOR_IDENT"],
        cwd=alias,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "<me@work.example>" in by_git.stdout
    mutate(work, seed=41)
    result = _mint(alias, env, "commit", "-m", "via the link", "--no-verify")
    assert result.returncode == 0, result.stderr
    assert git(work / ".mint", "log", "-1", "--format=%ae").stdout.strip() == "me@work.example"


def test_an_empty_xdg_config_home_is_unset_as_git_reads_it(
    work: Path, home: dict[str, str]
) -> None:
    # dulwich joined "" and git/config: a `git/config` under the working directory was read.
    xdg = Path(home["HOME"]) / ".config" / "git"
    xdg.mkdir(parents=True)
    (xdg / "config").write_text("[user]\n\tname = X\n\temail = xdg@x.example\n")
    (work / "git").mkdir()
    (work / "git" / "config").write_text("[user\n")
    env = {**home, "XDG_CONFIG_HOME": ""}
    assert _ident(work, env, "author") == "X <xdg@x.example>"
    assert _committed_idents(work, env) == ("X <xdg@x.example>", "X <xdg@x.example>")


@pytest.mark.parametrize("value", ["1", "true", "Yes", "on", "0", "false", "no", "off", ""])
def test_git_config_nosystem_is_read_as_git_reads_a_boolean(
    tmp_path: Path, home: dict[str, str], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from mintvcs.gitconfig import user_configs

    system = tmp_path / "system-config"
    system.write_text("[user]\n\tname = System\n")
    env = {**home, "GIT_CONFIG_SYSTEM": str(system), "GIT_CONFIG_NOSYSTEM": value}
    by_git = subprocess.run(
        ["git", "config", "--get", "user.name"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout.strip()
    for name in ("GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM", "GIT_CONFIG_NOSYSTEM"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HOME", "XDG_CONFIG_HOME", "GIT_CONFIG_SYSTEM", "GIT_CONFIG_NOSYSTEM"):
        monkeypatch.setenv(name, env[name])
    names = [c.get((b"user",), b"name") for c in user_configs() if c.has_section((b"user",))]
    assert [n.decode() for n in names] == ([by_git] if by_git else [])
    assert by_git == ("" if value.lower() in ("1", "true", "yes", "on") else "System")


def test_home_gitconfig_wins_over_the_xdg_one_as_in_git(
    tmp_path: Path, home: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mintvcs.gitconfig import user_configs

    xdg = Path(home["XDG_CONFIG_HOME"]) / "git"
    xdg.mkdir(parents=True)
    (xdg / "config").write_text("[user]\n\tname = Xdg\n")
    (Path(home["HOME"]) / ".gitconfig").write_text("[user]\n\tname = Home\n")
    by_git = subprocess.run(
        ["git", "config", "--get", "user.name"],
        env=home,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout.strip()
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    for name in ("HOME", "XDG_CONFIG_HOME", "GIT_CONFIG_NOSYSTEM"):
        monkeypatch.setenv(name, home[name])
    first = next(c for c in user_configs() if c.has_section((b"user",)))  # most precedent first
    assert first.get((b"user",), b"name").decode() == by_git == "Home"


def test_the_refused_line_is_numbered_as_git_numbers_it_wherever_it_is(tmp_path: Path) -> None:
    from mintvcs.gitconfig import BadConfigError, read_config

    for bad in range(1, 12):
        lines = ["[mint]\n", *(f"\tk{i} = v\n" for i in range(2, 12))]
        lines[bad - 1] = "[mint\n"  # a header dulwich and git both refuse
        path = tmp_path / f"config{bad}"
        path.write_text("".join(lines))
        said = subprocess.run(
            ["git", "config", "--file", str(path), "--list"], capture_output=True, text=True
        ).stderr
        line = int(re.search(r"bad config line (\d+)", said)[1])  # type: ignore[index]
        with pytest.raises(BadConfigError, match=rf"bad config line {line} "):
            read_config(path)
        assert line == bad


def test_abbrev_and_advice_set_in_the_global_config_count_as_in_git(
    work: Path, home: dict[str, str]
) -> None:
    # Only .mint/config was read for them: ids of 7 digits where git printed 12.
    (Path(home["HOME"]) / ".gitconfig").write_text(
        "[user]\n\tname = U\n\temail = u@x.example\n[core]\n\tabbrev = 12\n"
        "[advice]\n\tobjectNameWarning = false\n"
    )
    by_git = _git(work / ".mint", home, "log", "--oneline", "-1").stdout.split()[0]
    ours = _mint(work, home, "log", "--oneline", "-1").stdout.split()[0]
    assert len(by_git) == 12 and ours == by_git
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    first = git(work / ".mint", "rev-parse", "HEAD~1").stdout.strip()
    assert _mint(work, home, "branch", head, first).returncode == 0
    shown = _mint(work, home, "show", head).stderr
    assert "is ambiguous" in shown and "hint:" not in shown, shown


def test_a_key_without_a_value_is_no_identity(work: Path, home: dict[str, str]) -> None:
    _append(work, "[user]\n\tname = N\n\temail\n")
    by_git = _git(work / ".mint", home, "var", "GIT_AUTHOR_IDENT")
    assert by_git.returncode == 128 and "missing value for 'user.email'" in by_git.stderr
    mutate(work, seed=4)
    result = _mint(work, home, "commit", "-m", "four", "--no-verify")
    assert result.returncode == 128  # it committed as `N <true>`
    line = _error_line(result)
    assert "missing value for 'user.email'" in line and f"{work / '.mint' / 'config'}" in line
    # git refuses it even when a later line sets it.
    _append(work, "[user]\n\temail = e@x.example\n")
    assert _git(work / ".mint", home, "var", "GIT_AUTHOR_IDENT").returncode == 128
    assert _mint(work, home, "commit", "-m", "four", "--no-verify").returncode == 128
    # A boolean so written is git's true, and no error.
    config = work / ".mint" / "config"
    config.write_text(config.read_text().replace("\temail\n", "\tuseConfigOnly\n"))
    assert _mint(work, home, "commit", "-m", "four", "--no-verify").returncode == 0


def test_a_key_without_a_value_in_git_config_parameters_is_no_identity(
    work: Path, home: dict[str, str]
) -> None:
    # `git -c user.email` passes the key alone: git refuses it as it refuses one in a file.
    env = {**home, "GIT_CONFIG_PARAMETERS": "'user.email'"}
    (Path(home["HOME"]) / ".gitconfig").write_text("[user]\n\tname = N\n\temail = e@x.example\n")
    by_git = _git(work / ".mint", env, "var", "GIT_AUTHOR_IDENT")
    assert by_git.returncode == 128 and "missing value for 'user.email'" in by_git.stderr
    mutate(work, seed=5)
    result = _mint(work, env, "commit", "-m", "five", "--no-verify")
    assert result.returncode == 128  # not a commit as `N <true>`
    assert "missing value for 'user.email'" in _error_line(result)


def test_a_notify_url_without_a_value_is_refused_by_the_ref_update_sample(work: Path) -> None:
    _append(work, '[mint "notify"]\n\turl\n')
    assert git(work / ".mint", "config", "--get", "mint.notify.url").stdout == "\n"
    ran = _run_ref_update_sample(work)
    assert ran.returncode == 0
    # It posted to "true/v1/refs/notify".
    assert "cannot notify true" not in ran.stderr, ran.stderr
    assert "missing value for 'mint.notify.url'" in ran.stderr, ran.stderr


def test_init_warns_of_a_global_hooks_path_and_its_remedy_keeps_the_push_guard(
    tmp_path: Path, home: dict[str, str], peft_adapter: Path
) -> None:
    elsewhere = Path(home["HOME"]) / "hk"
    elsewhere.mkdir()
    (Path(home["HOME"]) / ".gitconfig").write_text(
        f"[user]\n\tname = U\n\temail = u@x.example\n[core]\n\thooksPath = {elsewhere}\n"
    )
    work = tmp_path / "my adapter"  # the remedy is pasted into a shell: quoted
    made = _mint(tmp_path, home, "init", str(work))
    assert made.returncode == 0, made.stderr
    warning = [line for line in made.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "core.hooksPath" in warning[0], made.stderr
    copy_adapter(peft_adapter, work)
    assert _mint(work, home, "commit", "-m", "one", "--no-verify").returncode == 0
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(work / ".mint"), str(clone)], env=home, check=True)
    subprocess.run(
        ["git", "-C", str(clone), "commit", "-q", "--allow-empty", "-m", "x"], env=home, check=True
    )
    head = git(work / ".mint", "rev-parse", "main").stdout

    def push() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(clone), "push", "-q", "origin", "HEAD:main"],
            env=home,
            capture_output=True,
            text=True,
            check=False,
        )

    # The global hooksPath: git runs no .mint/hooks/update, and the push moves the checked-out
    # branch.
    pushed = push()
    assert pushed.returncode == 0, pushed.stderr
    git(work / ".mint", "update-ref", "refs/heads/main", head.strip())  # undo
    # The remedy the warning gives, run from elsewhere: the push is refused again.
    subprocess.run(warning[0].split("run: ")[1], shell=True, env=home, check=True, cwd=tmp_path)
    pushed = push()
    assert pushed.returncode != 0 and "hook declined" in pushed.stderr, pushed.stderr
    assert git(work / ".mint", "rev-parse", "main").stdout == head
    # No global hooksPath, no warning.
    (Path(home["HOME"]) / ".gitconfig").write_text("[user]\n\tname = U\n\temail = u@x.example\n")
    quiet = _mint(tmp_path, home, "init", str(tmp_path / "r2"))
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


def _run_ref_update_sample(work: Path) -> subprocess.CompletedProcess[str]:
    """The ref-update sample hook as git runs it for `main`, with no notify URL in the env."""
    sample = Path(__file__).resolve().parents[2] / "hooks" / "ref-update"
    env = {**ENV, "MINT_DIR": str(work / ".mint"), "MINT_PYTHON": sys.executable}
    env.pop("MINT_NOTIFY_URL", None)
    return subprocess.run(
        ["sh", str(sample), "refs/heads/main", "0" * 40, "1" * 40],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_global_config_that_cannot_be_reached_is_skipped_as_git_skips_it(
    work: Path, home: dict[str, str], tmp_path: Path
) -> None:
    # A HOME the process may not enter (a container run as another uid keeps HOME=/root; sudo
    # -u keeps the caller's), or XDG_CONFIG_HOME / GIT_CONFIG_GLOBAL through a file: git reads
    # no global config and goes on; mintvcs stopped every command with exit 128.
    from tests.mintvcs.storekit import without_root_reads

    def both(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], ...]:
        by_git = subprocess.run(
            without_root_reads(["git", "--git-dir", str(work / ".mint"), *args]),
            env=env,
            capture_output=True,
            text=True,
        )
        by_mint = subprocess.run(
            without_root_reads([sys.executable, "-m", "mintvcs.cli", *args]),
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        assert "Traceback" not in by_mint.stderr, by_mint.stderr
        return by_git, by_mint

    closed = Path(home["HOME"])
    (closed / ".gitconfig").write_text("[user]\n\tname = Hidden\n\temail = h@x.example\n")
    afile = tmp_path / "afile"
    afile.write_text("hi\n")
    cases = {
        "home": {},
        "xdg": {"XDG_CONFIG_HOME": str(afile)},
        "global": {"GIT_CONFIG_GLOBAL": str(afile / "x")},
    }
    closed.chmod(0o000)
    try:
        for name, extra in cases.items():
            env = {**home, **extra, "GIT_AUTHOR_NAME": "A", "GIT_AUTHOR_EMAIL": "a@x.example"}
            env.update(GIT_COMMITTER_NAME="A", GIT_COMMITTER_EMAIL="a@x.example")
            by_git, by_mint = both(env, "log", "-n1", "--oneline")
            assert by_git.returncode == 0, (name, by_git.stderr)
            assert by_mint.returncode == 0, (name, by_mint.stderr)
            assert by_mint.stderr == by_git.stderr == "", name  # silently, as git
            committed = both(env, "commit", "--allow-empty", "-m", name, "--no-verify")[1]
            assert committed.returncode == 0, (name, committed.stderr)
        # The system file stays fatal when it cannot be read, in git too; so does a directory.
        system = tmp_path / "system"
        system.write_text("[core]\n")
        system.chmod(0o000)
        env = {**home, "GIT_CONFIG_NOSYSTEM": "0", "GIT_CONFIG_SYSTEM": str(system)}
        by_git, by_mint = both(env, "log", "-n1")
        assert by_git.returncode == by_mint.returncode == 128, (by_git.stderr, by_mint.stderr)
        assert f"{system} cannot be read: permission denied" in by_mint.stderr, by_mint.stderr
        env = {**home, "GIT_CONFIG_GLOBAL": str(tmp_path)}
        by_mint = both(env, "log", "-n1")[1]
        assert by_mint.returncode == 128, by_mint.stderr
    finally:
        closed.chmod(0o700)


@pytest.mark.parametrize(
    "case",
    [
        *("nothing", "empty-name", "empty-config-name", "email-variable", "empty-email"),
        *("blank-email", "crud-name", "blank-name", "crud-ends", "crud-config", "brackets-inside"),
    ],
)
def test_an_identity_git_would_not_make_up_is_refused_or_cleaned_as_git_does(
    work: Path, home: dict[str, str], case: str
) -> None:
    # mintvcs made up LOGIN@HOST where git refuses a host name without a domain ("unable to
    # auto-detect email address (got 'root@vm.(none)')"), and read an empty GIT_AUTHOR_NAME
    # as unset. git var GIT_AUTHOR_IDENT applies git commit's rule (IDENT_STRICT).
    env = dict(home)
    if case == "empty-name":
        env.update(GIT_AUTHOR_NAME="", GIT_AUTHOR_EMAIL="a@x.example")
    elif case == "empty-config-name":
        (Path(home["HOME"]) / ".gitconfig").write_text("[user]\n\tname =\n\temail = e@x.example\n")
    elif case == "email-variable":
        env["EMAIL"] = "env@x.example"  # the name made up from the password database
    elif case == "blank-email":  # taken, then trimmed to empty: git commits `A <>`
        env.update(GIT_AUTHOR_NAME="A", GIT_COMMITTER_NAME="C", EMAIL="   ")
    elif case == "empty-email":
        env.update(GIT_AUTHOR_NAME="A", GIT_AUTHOR_EMAIL="")
        env.update(GIT_COMMITTER_NAME="C", GIT_COMMITTER_EMAIL="")
    # git trims its "crud" (controls, space, `.,:;<>"\'`) off both ends of a name and an email,
    # drops `<`, `>` and newlines inside, and refuses a name of crud alone; mintvcs kept them
    # (`"Dr. A Jr." <<a@x>>`), or refused `<a@x>`.
    elif case == "crud-name":
        env.update(GIT_AUTHOR_NAME=".", GIT_AUTHOR_EMAIL="a@x.example")
    elif case == "blank-name":
        env.update(GIT_AUTHOR_NAME=" ", GIT_AUTHOR_EMAIL="a@x.example")
    elif case == "crud-ends":
        env.update(GIT_AUTHOR_NAME=' "Dr. A Jr." ', GIT_AUTHOR_EMAIL="<a@x.example>")
        env.update(GIT_COMMITTER_NAME=",;:C\\'", GIT_COMMITTER_EMAIL=" .c@x.example;\t")
    elif case == "crud-config":
        (Path(home["HOME"]) / ".gitconfig").write_text(
            "[user]\n\tname = \"'Q. '\"\n\temail = <e@x.example>.\n"
        )
    elif case == "brackets-inside":
        env.update(GIT_AUTHOR_NAME="Eve <evil@x> 0 +0000", GIT_AUTHOR_EMAIL="e<v>e@x")
        env.update(GIT_COMMITTER_NAME="Eve\nparent " + "0" * 40, GIT_COMMITTER_EMAIL="eve@x>")
    by_git = {
        role: _git(work / ".mint", env, "var", f"GIT_{role}_IDENT")
        for role in ("AUTHOR", "COMMITTER")
    }
    head = git(work / ".mint", "rev-parse", "HEAD").stdout
    mutate(work, seed=31)
    by_mint = _mint(work, env, "commit", "-m", "who", "--no-verify")
    if all(r.returncode == 0 for r in by_git.values()):
        assert by_mint.returncode == 0, by_mint.stderr
        shown = git(work / ".mint", "log", "-1", "--format=%an <%ae>|%cn <%ce>").stdout.strip()
        idents = tuple(r.stdout.rsplit(" ", 2)[0] for r in by_git.values())
        assert tuple(shown.split("|")) == idents
        return
    refused = next(r for r in by_git.values() if r.returncode != 0)
    assert refused.returncode == by_mint.returncode == 128, (refused.stderr, by_mint.stderr)
    reason = refused.stderr.strip().splitlines()[-1].removeprefix("fatal: ")
    assert reason in _error_line(by_mint), (reason, by_mint.stderr)
    assert git(work / ".mint", "rev-parse", "HEAD").stdout == head


def test_without_home_no_global_config_is_read_but_the_xdg_one_as_in_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mintvcs took ~ from the password database without HOME (git: "$HOME not set", no file).
    from mintvcs.gitconfig import user_configs

    for name in ("HOME", "GIT_CONFIG_GLOBAL", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.chdir(tmp_path)
    by_git = subprocess.run(["git", "config", "--global", "-l"], capture_output=True, text=True)
    assert by_git.returncode == 128 and "$HOME not set" in by_git.stderr
    assert user_configs() == []
    xdg = tmp_path / "xdg"
    (xdg / "git").mkdir(parents=True)
    (xdg / "git" / "config").write_text("[user]\n\tname = Xdg\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    by_git = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True)
    found = [c.get((b"user",), b"name").decode() for c in user_configs()]
    assert found == [by_git.stdout.strip()] == ["Xdg"]


def test_a_tilde_folder_in_the_work_tree_is_no_global_config(work: Path) -> None:
    # HOME unset and a user id with no account: os.path.expanduser left `~/.gitconfig` as it
    # was, read from the cwd, the work tree, whose files any revision may carry (so anyone who
    # could push set core.abbrev, the identity, mint.safeHooks). git reads no such file.
    from tests.mintvcs.userkit import ALICE, other_users

    with other_users() as users:
        repo = users.place / "repo"
        shutil.copytree(work, repo)
        (repo / "~").mkdir()
        (repo / "~" / ".gitconfig").write_text("[core]\n\tabbrev = 12\n")
        subprocess.run(["chmod", "-R", "a+rwX", str(repo)], check=True)
        # No HOME, and no GIT_CONFIG_GLOBAL (storekit.ENV's) to stand in for the global file.
        unset = ["env", "-u", "HOME", "-u", "GIT_CONFIG_GLOBAL", "-u", "XDG_CONFIG_HOME"]
        log = ["log", "-n1", "--oneline"]
        by_mint = users.run(ALICE, 0o022, repo, [*unset, sys.executable, "-m", "mintvcs.cli", *log])
        by_git = users.run(ALICE, 0o022, repo, [*unset, "git", "--git-dir", ".mint", *log])
        assert by_mint.stdout.split()[0] == by_git.stdout.split()[0]
        assert len(by_git.stdout.split()[0]) == 7


def test_a_user_id_without_an_account_gets_gits_stand_in_identity(work: Path) -> None:
    # `docker run -u 12345`: no password entry. mintvcs refused every reflog line (branch,
    # checkout, reset) with exit 1 where git writes "Unknown <unknown@HOST...>", and refused a
    # commit in its own words where git says "unable to auto-detect ..." with exit 128.
    from tests.mintvcs.userkit import ALICE, other_users

    with other_users() as users:
        repo = users.place / "repo"
        shutil.copytree(work, repo)
        mutate(repo, seed=37)
        subprocess.run(["chmod", "-R", "a+rwX", str(repo)], check=True)
        unset = ["env", "-u", "GIT_AUTHOR_NAME", "-u", "GIT_COMMITTER_NAME", "-u", "EMAIL"]
        unset += ["-u", "GIT_AUTHOR_EMAIL", "-u", "GIT_COMMITTER_EMAIL", "LOGNAME=builder"]
        mint = [*unset, sys.executable, "-m", "mintvcs.cli"]
        git_ = [*unset, "git", "--git-dir", ".mint"]
        users.run(ALICE, 0o022, repo, [*git_, "branch", "bygit"])
        users.run(ALICE, 0o022, repo, [*mint, "branch", "bymint"])
        users.run(ALICE, 0o022, repo, [*mint, "checkout", "bymint"])
        shown = "--format=%gn <%ge>"
        lines = {
            ref: users.run(ALICE, 0o022, repo, [*git_, "log", "-g", "-1", shown, ref]).stdout
            for ref in ("refs/heads/bygit", "refs/heads/bymint", "HEAD")
        }
        assert len(set(lines.values())) == 1, lines
        assert lines["HEAD"].startswith("Unknown <unknown@"), lines
        head = git(repo / ".mint", "rev-parse", "HEAD").stdout
        for extra in ([], ["EMAIL=e@x.example"]):
            var = [*unset, *extra, *git_[len(unset) :], "var", "GIT_AUTHOR_IDENT"]
            by_git = users.run(ALICE, 0o022, repo, var, ok=False)
            argv = [*unset, *extra, *mint[len(unset) :], "commit", "-m", "who", "--no-verify"]
            by_mint = users.run(ALICE, 0o022, repo, argv, ok=False)
            assert by_git.returncode == by_mint.returncode == 128, (by_git, by_mint.stderr)
            reason = by_git.stderr.strip().splitlines()[-1].removeprefix("fatal: ")
            assert reason in _error_line(by_mint), (reason, by_mint.stderr)
        assert git(repo / ".mint", "rev-parse", "HEAD").stdout == head


def test_a_made_up_email_is_trimmed_as_git_trims_it(work: Path, home: dict[str, str]) -> None:
    # /etc/mailname " example.com \n": git commits as `root@ example.com`, trimmed as a whole;
    # mintvcs kept the trailing space. /etc is overlaid in a mount namespace of the command's.
    import os

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("an /etc/mailname of the test's own needs root and unshare")
    upper, workdir = work.parent / "etc-upper", work.parent / "etc-work"
    upper.mkdir()
    workdir.mkdir()
    (upper / "mailname").write_text(" example.com \n")
    overlay = f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={workdir} /etc"
    env = {**home, "GIT_AUTHOR_NAME": "A", "GIT_COMMITTER_NAME": "C"}

    def inside(*argv: str) -> subprocess.CompletedProcess[str]:
        command = ["unshare", "--mount", "--propagation", "private", "--"]
        command += ["sh", "-c", f'{overlay} && exec "$@"', "sh", *argv]
        return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)

    by_git = inside("git", "--git-dir", ".mint", "var", "GIT_AUTHOR_IDENT")
    if by_git.returncode != 0 and "mount" in by_git.stderr:
        pytest.skip(f"no overlay mount here: {by_git.stderr.strip()}")
    assert by_git.returncode == 0, by_git.stderr
    mutate(work, seed=41)
    by_mint = inside(sys.executable, "-m", "mintvcs.cli", "commit", "-m", "who", "--no-verify")
    assert by_mint.returncode == 0, by_mint.stderr
    shown = git(work / ".mint", "log", "-1", "--format=%an <%ae>").stdout.strip()
    assert shown == by_git.stdout.rsplit(" ", 2)[0]
    assert shown.endswith("@ example.com>"), shown
