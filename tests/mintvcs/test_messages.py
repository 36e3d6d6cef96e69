"""Commit and tag messages: stored, refused and shown as git 2.39 stores, refuses and shows them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.mintvcs.storekit import ENV, git, mint, mint_fails, mutate

DATES = {"GIT_AUTHOR_DATE": "1767225600 +0000", "GIT_COMMITTER_DATE": "1767225600 +0000"}


def run_git(cwd: Path, *args: str, env: dict[str, str] | None = None, data: bytes = b"") -> str:
    """Real git in `cwd` with fixed identities and dates; its stdout, decoded as UTF-8."""
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**ENV, **DATES, **(env or {})},
        input=data,
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, f"git {args} failed:\n{result.stderr.decode(errors='replace')}"
    return result.stdout.decode("utf-8", "surrogateescape")


def git_twin(work: Path, tmp_path: Path, base: str) -> Path:
    """A git repository sharing `work`'s objects whose index holds `base`'s tree and whose HEAD
    is detached at `base`: `git commit --allow-empty` there makes the commit mintvcs makes."""
    twin = tmp_path / "twin"
    run_git(tmp_path, "init", "-q", str(twin))
    (twin / ".git" / "objects" / "info" / "alternates").write_text(
        f"{work / '.mint' / 'objects'}\n"
    )
    run_git(twin, "read-tree", base)
    return twin


def objects(work: Path) -> set[str]:
    """Every file of the object store: loose objects and packs."""
    root = work / ".mint" / "objects"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# Each a list of -m values. git's cleanup splits on "\n" only and strips " \t\n\r" alone.
COMMIT_GRID = [
    ["a\rb"],
    ["x\x0cy\x0bz"],
    ["nel\u0085next"],
    ["ls\u2028sep\u2029par"],
    ["trail\u00a0"],
    ["ideo\u3000"],
    ["\u00a0"],  # not blank for git: stored, not refused as empty
    ["crlf\r\nline \r\n\r\n"],
    ["\n\n  lead kept\n\n\n\nbody \t\n \n"],
    ["# not a comment with -m\nsubject"],
    ["tab\tinside\t"],
    ["para one", "para two"],
    ["subject", "", "body\n\n"],
    ["a\n", "  ", "b\r"],
    ["", "only the second"],
]


def test_commit_m_is_stored_byte_for_byte_as_git_commit_m_stores_it(
    work: Path, tmp_path: Path
) -> None:
    base = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    twin = git_twin(work, tmp_path, base)
    for i, parts in enumerate(COMMIT_GRID):
        mint(work, "branch", f"m{i}", base)
        args = [arg for part in parts for arg in ("-m", part)]
        out = mint(work, "commit", "--allow-empty", "--branch", f"m{i}", *args, "--json", env=DATES)
        ours = json.loads(out.stdout)["commit"]
        run_git(twin, "update-ref", "--no-deref", "HEAD", base)
        run_git(twin, "commit", "-q", "--allow-empty", "--no-verify", *args)
        theirs = run_git(twin, "rev-parse", "HEAD").strip()
        assert ours == theirs, (
            parts,
            run_git(twin, "cat-file", "commit", ours),
            run_git(twin, "cat-file", "commit", theirs),
        )
    git(work / ".mint", "fsck", "--strict", "--no-dangling")


TAG_GRID = [
    ["#comment\nreal\n# another"],  # git tag's cleanup drops comment lines, unlike commit's
    ["one", "two"],
    ["a\rb \n\n\n"],
    ["x\x0cy\u00a0"],
    ["#only a comment"],
    [""],
]


def test_tag_m_is_stored_byte_for_byte_as_git_tag_m_stores_it(work: Path, tmp_path: Path) -> None:
    base = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    twin = git_twin(work, tmp_path, base)
    run_git(twin, "update-ref", "--no-deref", "HEAD", base)
    for i, parts in enumerate([*TAG_GRID, [";semicolon\n#hash"]]):
        if i == len(TAG_GRID):  # the last one with another comment character
            for config in (work / ".mint" / "config", twin / ".git" / "config"):
                config.write_text(config.read_text() + '[core]\n\tcommentChar = ";"\n')
        args = [arg for part in parts for arg in ("-m", part)]
        mint(work, "tag", *args, f"t{i}", base, env=DATES)
        run_git(twin, "tag", *args, f"t{i}", base)
        ours = git(work / ".mint", "rev-parse", f"t{i}").stdout.strip()
        theirs = run_git(twin, "rev-parse", f"t{i}").strip()
        assert ours == theirs, (parts, run_git(twin, "cat-file", "tag", ours))
    git(work / ".mint", "fsck", "--strict", "--no-dangling")


def test_a_comment_char_that_is_one_byte_not_ascii_is_taken_as_git_tag_takes_it(
    work: Path, tmp_path: Path
) -> None:
    # git 2.39 takes any one byte and drops the lines whose first byte it is: 0xe9 leads the
    # UTF-8 of U+9000 to U+9FFF, so a line starting with one of those is a comment. It was
    # refused as "one ASCII character".
    base = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    twin = git_twin(work, tmp_path, base)
    for config in (work / ".mint" / "config", twin / ".git" / "config"):
        config.write_bytes(config.read_bytes() + b"[core]\n\tcommentChar = \xe9\n")
    message = "subject\n\u9023 dropped\n\u00e9 kept (0xc3 0xa9)\n\u9fff dropped too\nend"
    mint(work, "tag", "-m", message, "t", base, env=DATES)
    run_git(twin, "tag", "-m", message, "t", base)
    ours = git(work / ".mint", "rev-parse", "t").stdout.strip()
    assert ours == run_git(twin, "rev-parse", "t").strip()
    assert "dropped" not in git(work / ".mint", "cat-file", "tag", "t").stdout
    # More than one byte, or none, is refused by both, as git says it.
    for value in (b"ab", b"\xc3\xa9", b""):
        for config in (work / ".mint" / "config", twin / ".git" / "config"):
            text = config.read_bytes().rsplit(b"\tcommentChar = ", 1)[0]
            config.write_bytes(text + b"\tcommentChar = " + value + b"\n")
        by_git = subprocess.run(
            ["git", "tag", "-m", "m", "u", base], cwd=twin, env=ENV, capture_output=True
        )
        assert by_git.returncode == 128
        assert b"core.commentChar should only be one character" in by_git.stderr
        result = mint(work, "tag", "-m", "m", "u", base, ok=False)
        assert result.returncode == 128, result.stderr
        assert "core.commentChar should only be one character" in result.stderr


def test_a_message_that_is_not_utf8_is_refused_before_anything_is_stored(work: Path) -> None:
    # argv passes bytes that are not UTF-8 on as surrogate escapes; git would store them
    # reinterpreted as Latin-1, with a warning. mintvcs refuses them, as it refuses a file
    # name that is not UTF-8: what is stored is never a guess at what was meant.
    mutate(work, seed=31)  # a commit would store new tensors
    before, head = objects(work), git(work / ".mint", "rev-parse", "HEAD").stdout
    line = mint_fails(work, "commit", "-m", "bad\udcff\udcfebytes")
    assert "not valid UTF-8" in line and "0xff" in line and "'bad'" in line, line
    line = mint_fails(work, "commit", "-m", "subject", "-m", "\udce9t\udce9")
    assert "not valid UTF-8" in line and "0xe9" in line, line
    line = mint_fails(work, "tag", "-m", "t\udcff", "badtag")
    assert "tag message is not valid UTF-8" in line, line
    assert objects(work) == before
    assert git(work / ".mint", "rev-parse", "HEAD").stdout == head
    assert git(work / ".mint", "tag", "-l").stdout.strip() == ""


def test_a_commit_msg_hook_leaving_bytes_that_are_not_utf8_or_nul_is_one_error(
    work: Path,
) -> None:
    hook = work / ".mint" / "hooks" / "commit-msg"
    head = git(work / ".mint", "rev-parse", "HEAD").stdout
    for written, expected in (
        (r"hooked \377\n", "not valid UTF-8 text: the byte 0xff after 'hooked '"),
        (r"nul\000inside\n", "a NUL byte"),
    ):
        hook.write_text(f'#!/bin/sh\nprintf "{written}" > "$1"\n')
        hook.chmod(0o755)
        line = mint_fails(work, "commit", "--allow-empty", "-m", "fine")
        assert expected in line and "commit-msg hook" in line, line
        assert git(work / ".mint", "rev-parse", "HEAD").stdout == head
    # The hook reads what git gives its hook (the -m values joined and cleaned) and its file is
    # read back as bytes: a lone CR stays in its line, as in git.
    seen = work / "seen"
    hook.write_text(f'#!/bin/sh\ncp "$1" {seen}\nprintf "a\\rb  \\n\\n\\n" > "$1"\n')
    mint(work, "commit", "--allow-empty", "-m", "one  ", "-m", "\n\ntwo\n\n")
    assert seen.read_bytes() == b"one\n\ntwo\n"
    body = run_git(work, "--git-dir", ".mint", "cat-file", "commit", "HEAD").split("\n\n", 1)[1]
    assert body == "a\rb\n"


@pytest.mark.parametrize(
    "script",
    [
        'printf "hooked \\377\\n" > "$1"\n',  # a message that is not UTF-8
        'printf "\\n\\n" > "$1"\n',  # an empty one
        "exit 1\n",  # refused by the hook itself
    ],
)
@pytest.mark.parametrize("many", [False, True])
def test_a_commit_the_commit_msg_hook_refuses_stores_nothing(
    work: Path, tmp_path: Path, script: str, many: bool
) -> None:
    # The tensors were encoded into the store before the hook ran, and stayed there, unreached,
    # until a gc an hour later. Now they reach the store only once the hook took the message.
    hook = work / ".mint" / "hooks" / "commit-msg"
    if many:  # enough tensors that they go into a pack: a repository of them
        from tests.mintvcs.test_store_fastpaths import _many_tensors, _repository_of

        (tmp_path / "m").mkdir()
        work = _repository_of(tmp_path / "m", _many_tensors(tmp_path / "many", seed=3))
        mint(work, "commit", "-m", "first")
        _many_tensors(work, seed=4)
        hook = work / ".mint" / "hooks" / "commit-msg"
    else:
        mutate(work, seed=33)
    hook.write_text("#!/bin/sh\n" + script)
    hook.chmod(0o755)
    before, head = objects(work), git(work / ".mint", "rev-parse", "HEAD").stdout
    result = mint(work, "commit", "-m", "fine", ok=False)
    assert result.returncode != 0
    assert "commit-msg" in result.stderr or "empty commit message" in result.stderr
    assert objects(work) == before
    assert git(work / ".mint", "rev-parse", "HEAD").stdout == head
    fsck = git(work / ".mint", "fsck", "--strict", "--unreachable", "--no-progress")
    assert fsck.stdout == "" and fsck.stderr == "", fsck
    # And taken, the same commit is stored whole.
    hook.unlink()
    mint(work, "commit", "-m", "fine")
    assert git(work / ".mint", "fsck", "--strict", "--unreachable", "--no-progress").stdout == ""
    assert objects(work) > before


def test_the_python_api_refuses_a_lone_surrogate_or_nul_writing_nothing(work: Path) -> None:
    from mintvcs import porcelain
    from mintvcs.errors import MintError
    from mintvcs.store import Repository

    mutate(work, seed=32)
    before = objects(work)
    with Repository.open(work) as repo:
        for message, expected in (
            ("lone \ud800 surrogate", "lone surrogate, U+D800 after 'lone '"),
            ("nul\x00inside", "a NUL byte in the commit message"),
        ):
            with pytest.raises(MintError, match=re.escape(expected)):
                porcelain.commit(repo, message, verify=False, show_progress=False)
            with pytest.raises(MintError, match=re.escape(expected.replace("commit", "tag"))):
                porcelain.tag_create(repo, "t", message=message)
        with pytest.raises(MintError, match="a NUL byte"):
            repo.write_commit(repo.commit_info(repo.head_commit() or "").tree, [], "x\0", "", "")
    assert objects(work) == before
    assert git(work / ".mint", "tag", "-l").stdout.strip() == ""


def test_meta_keys_and_values_that_are_not_utf8_are_refused_naming_the_key(work: Path) -> None:
    from mintvcs import porcelain
    from mintvcs.errors import MintError
    from mintvcs.store import Repository

    mutate(work, seed=33)
    before = objects(work)
    line = mint_fails(work, "commit", "-m", "m", "--meta", "step=1", "--meta", "k=\udcff")
    assert "metadata 'k': its value is not valid UTF-8" in line, line
    line = mint_fails(work, "commit", "-m", "m", "--meta", "k\udcff=v")
    assert "metadata 'k\\udcff': its key is not valid UTF-8" in line, line
    with Repository.open(work) as repo, pytest.raises(MintError, match="'run': its value"):
        porcelain.commit(repo, "m", meta={"run": "a\ud800"}, verify=False, show_progress=False)
    assert objects(work) == before
    # Text that is UTF-8 is stored as given.
    mint(work, "commit", "-m", "m", "--meta", "note=naïve — 1\u202f000")
    assert json.loads(mint(work, "show", "--json").stdout)["meta"] == {"note": "naïve — 1\u202f000"}


# Messages as other tools write them (git commit-tree keeps them verbatim).
RAW_MESSAGES = [
    b"line one\nline two\n\nbody here\n",
    b"\n\n  subj  \n\n\n\nbody\n  \n\n",
    b"a\rb c\nd\x0ce \n",
    b"na\xc3\xafve\xc2\xa0baseline \xe2\x80\x94 1\xe2\x80\xaf000 steps\n",
    b"family \xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9 run\n\n\xc2\xa0body\n",
    b"   \n",
    b"subj\twith tab\n\nbody\tline\n\tindented\n12345678\tx\nna\xc3\xafve\tz\n",
]


def test_subjects_and_bodies_are_shown_as_git_log_shows_them(work: Path) -> None:
    git_dir = work / ".mint"
    tree = git(git_dir, "rev-parse", "HEAD^{tree}").stdout.strip()
    main = git(git_dir, "rev-parse", "main").stdout.strip()
    for raw in RAW_MESSAGES:
        oid = run_git(work, "--git-dir", str(git_dir), "commit-tree", tree, "-p", main, data=raw)
        oid = oid.strip()
        theirs = run_git(work, "--git-dir", str(git_dir), "log", "-1", "--format=%s", oid)
        expected = theirs.rstrip("\n").replace("\r", "\\r").replace("\x0c", "\\x0c")
        # The id as long as the other commands print it, then the subject.
        tail = rf"{oid[:7]}[0-9a-f]* {re.escape(expected)}$"
        oneline = mint(work, "log", "--oneline", "-1", oid).stdout
        assert re.match(tail, oneline, re.M), (raw, oneline)
        # Author, date and message as git prints them (the commit line may be decorated).
        full = mint(work, "log", "-1", oid).stdout.split("\n", 1)[1]
        git_full = run_git(work, "--git-dir", str(git_dir), "log", "-1", oid).split("\n", 1)[1]
        assert full == git_full.replace("\r", "\\r").replace("\x0c", "\\x0c"), (raw, full)
        shown = mint(work, "show", oid).stdout.split("\n", 1)[1]
        assert shown.startswith(full), (raw, shown)
        # The other one-line subjects: reset's and a detached HEAD's left-behind list.
        if expected.strip():
            reset = mint(work, "reset", "--hard", oid).stdout
            assert re.search("^HEAD is now at " + tail, reset, re.M), reset
            mint(work, "reset", "--hard", main)
            mint(work, "checkout", oid)
            left = mint(work, "checkout", "main").stderr
            assert re.search("^  " + tail, left, re.M), left


def test_commit_summary_is_git_s_subject_and_the_reflog_keeps_the_first_line(work: Path) -> None:
    mutate(work, seed=34)
    out = mint(work, "commit", "-m", "line one\nline two  \n\nbody here").stdout
    subject = git(work / ".mint", "log", "-1", "--format=%s").stdout.rstrip("\n")
    assert subject == "line one line two"
    assert out.startswith("[main ") and out.split("\n")[0].endswith(f"] {subject}"), out
    reflog = git(work / ".mint", "reflog", "-1", "--format=%gs").stdout.rstrip("\n")
    assert reflog == "commit: line one"


def test_only_control_characters_are_escaped_each_on_its_own(work: Path) -> None:
    # NBSP, a narrow NBSP and joiners are text: git prints them, and so does mintvcs; an
    # escape sequence or a bidi override is escaped alone, not the line around it.
    raw = "naïve\u00a0baseline — 1\u202f000 👨\u200d👩 \u202eevil\u202c\x1b[2J\x85 \\ done"
    mint(work, "commit", "--allow-empty", "-m", raw, "--meta", "k=é\u00a0\x1b")
    expected = "naïve\u00a0baseline — 1\u202f000 👨\u200d👩 \\u202eevil\\u202c\\x1b[2J\\x85 \\ done"
    assert mint(work, "log", "--oneline", "-1").stdout.split(") ", 1)[1] == expected + "\n"
    assert f"    {expected}\n" in mint(work, "log", "-1").stdout
    assert 'meta k: "é\u00a0\\033"\n' in mint(work, "show").stdout
    # Line and paragraph separators end a line for Python's splitlines(): a script splitting
    # show's output would read a forged `meta` or `Author:` line.
    mint(work, "commit", "--allow-empty", "-m", "x", "--meta", "k=a\u2028Author: m\u2029meta b: c")
    shown = mint(work, "show").stdout
    assert 'meta k: "a\\342\\200\\250Author: m\\342\\200\\251meta b: c"\n' in shown, shown
    assert not [line for line in shown.splitlines() if line.startswith("Author: m")]


def _quoted_prefix(text: str) -> tuple[str, str]:
    """`text`, which starts with a C-quoted string, split after that string's closing quote."""
    at = 1
    while text[at] != '"':
        at += 2 if text[at] == "\\" else 1  # an escape's first two characters hold no quote
    return text[: at + 1], text[at + 1 :]


def test_show_prints_each_meta_line_so_that_it_reads_back_one_way(work: Path) -> None:
    from mintvcs.messages import unquote_c_style

    # Pairs that printed alike: a newline and a backslash before an n; a key holding ": " and
    # a value holding it. Each is C-quoted where it needs to be, as git quotes a file name.
    meta = {
        "newline": "a\nb",
        "backslash": "a\\nb",
        "a: b": "c",
        "a": "b: c",
        "tab": "x\ty",
        "quote": 'say "hi"',
        "padded": " 1 ",
        "empty": "",
        "plain": "0.71 naïve 👍",
        'k"ey: x': "\x1b[2J\u202e",
    }
    args = [arg for key, value in meta.items() for arg in ("--meta", f"{key}={value}")]
    mint(work, "commit", "--allow-empty", "-m", "x", *args)
    shown = [line for line in mint(work, "show").stdout.split("\n") if line.startswith("meta ")]
    assert sorted(shown) == sorted([
        'meta newline: "a\\nb"',
        'meta backslash: "a\\\\nb"',
        'meta "a: b": c',
        "meta a: b: c",
        'meta tab: "x\\ty"',
        'meta quote: "say \\"hi\\""',
        'meta padded: " 1 "',
        'meta empty: ""',
        "meta plain: 0.71 naïve 👍",
        'meta "k\\"ey: x": "\\033[2J\\342\\200\\256"',
    ])  # fmt: skip
    # Read back as a script would: a quoted key ends at its closing quote, a plain one at the
    # first ": "; a quoted value is unquoted. Every key and value comes back as stored.
    read: dict[str, str | None] = {}
    for line in shown:
        rest = line.removeprefix("meta ")
        if rest.startswith('"'):
            quoted_key, rest = _quoted_prefix(rest)
            key = unquote_c_style(quoted_key)
            rest = rest.removeprefix(": ")
        else:
            key, rest = rest.split(": ", 1)
        assert key is not None, line
        read[key] = unquote_c_style(rest) if rest.startswith('"') else rest
    assert read == meta
    # --json gives each as it is.
    assert json.loads(mint(work, "show", "--json").stdout)["meta"] == meta


def test_a_commit_s_encoding_header_is_honoured_as_git_log_honours_it(work: Path) -> None:
    git_dir = work / ".mint"
    tree = git(git_dir, "rev-parse", "HEAD^{tree}").stdout.strip()
    env = {k.encode(): v.encode() for k, v in {**ENV, **DATES}.items()}
    for encoding, name, raw in (
        ("ISO-8859-1", "René".encode("latin-1"), "café latin\n\nbody à la\n".encode("latin-1")),
        ("SHIFT_JIS", "山田".encode("shift_jis"), "日本語の件名\n".encode("shift_jis")),
        # A name that is not Shift_JIS: git shows the whole commit's bytes as they are.
        ("SHIFT_JIS", b"Ren\xe9", "日本語の件名\n".encode("shift_jis")),
        ("no-such-charset", "René".encode(), "café utf8\n".encode()),  # kept as UTF-8
        ("unicode_escape", b"Eve", b"not \\x1b an escape\n"),  # no charset: git's iconv lacks it
    ):
        made = subprocess.run(
            [
                "git",
                "--git-dir",
                str(git_dir),
                "-c",
                f"i18n.commitEncoding={encoding}",
                "commit-tree",
                tree,
            ],
            input=raw,
            env={**env, b"GIT_AUTHOR_NAME": name},
            capture_output=True,
            check=True,
        )
        oid = made.stdout.decode().strip()
        assert f"\nencoding {encoding}\n" in run_git(
            work, "--git-dir", ".mint", "cat-file", "-p", oid
        )
        # git prints what it cannot re-encode as its bytes; mintvcs as U+FFFD.
        theirs = subprocess.run(
            ["git", "--git-dir", str(git_dir), "log", "-1", "--format=%an%x00%s%x00%B", oid],
            capture_output=True,
            check=True,
        ).stdout.decode("utf-8", "replace")
        author, subject, message = theirs.split("\0")
        oneline = mint(work, "log", "--oneline", "-1", oid).stdout
        assert oneline == f"{oid[:7]} {subject}\n", (encoding, oneline, theirs)
        (listed,) = json.loads(mint(work, "log", "--json", "-1", oid).stdout)
        assert listed["author"].startswith(author + " <"), (listed, theirs)
        assert listed["message"] == message.removesuffix("\n"), (listed, theirs)
        assert json.loads(mint(work, "show", "--json", oid).stdout)["message"] == listed["message"]
        assert f"Author: {author} <" in mint(work, "show", oid).stdout
