"""Path names in the work tree: unreadable and long directories, names that need quoting,
repository discovery, ref names, and the order status lists files in (git 2.39 the oracle)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.mintvcs.storekit import git, mint, mint_fails, mint_unprivileged


def _show_files(work: Path) -> list[str]:
    """The extra files of HEAD, as `show --json` lists them."""
    return json.loads(mint(work, "show", "--json").stdout)["files"]


def test_an_unreadable_directory_is_never_read_as_an_empty_one(work: Path) -> None:
    # As root, through setpriv without the capabilities that read any file: a directory of mode
    # 000 was skipped without a word, so status listed its tracked file as removed and commit
    # recorded it deleted; git warns "could not open directory 'secret2/'" and keeps it.
    (work / "secret2").mkdir()
    (work / "secret2" / "a.txt").write_text("q\n")
    mint(work, "commit", "-m", "s2", "--no-verify")
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    (work / "new").mkdir()
    (work / "new" / "tok.json").write_text("{}\n")
    try:
        for folder in ("secret2", "new"):  # a tracked file's directory, then a new one
            (work / "secret2").chmod(0 if folder == "secret2" else 0o755)
            (work / "new").chmod(0 if folder == "new" else 0o755)
            status = mint_unprivileged(work, "status")
            said = status.stdout + status.stderr
            assert f"could not open directory '{folder}/'" in said, said
            assert "removed" not in said and "work tree clean" not in said, said
            commit = mint_unprivileged(work, "commit", "-m", "oops", "--no-verify")
            assert commit.returncode == 1, commit.stderr
            lines = commit.stderr.splitlines()
            assert len(lines) == 1 and f"could not open directory '{folder}/'" in lines[0], lines
            assert "Permission denied" in lines[0], lines
            checkout = mint_unprivileged(work, "checkout", "HEAD~1")
            assert checkout.returncode == 1 and "could not open directory" in checkout.stderr
            assert git(work / ".mint", "rev-parse", "HEAD").stdout.strip() == head
        # An ignored directory is not entered, as git does not: nothing to read there.
        (work / ".mintignore").write_text("new/\n")
        commit = mint_unprivileged(work, "commit", "-m", "ignored", "--no-verify")
        assert commit.returncode == 0, commit.stderr
    finally:
        for folder in ("secret2", "new"):
            (work / folder).chmod(0o755)
    assert "secret2/a.txt" in _show_files(work)


def test_a_file_past_path_max_is_refused_as_checkout_could_not_write_it_back(work: Path) -> None:
    # The work tree's own path is long, and the file 7 directories further down is past
    # PATH_MAX as an absolute path (4,096 bytes), not as a path relative to the work tree.
    # The walk by absolute paths skipped it (status said clean); the walk by directory
    # descriptors committed it, and then no checkout could write or remove it (File name too
    # long), so the work tree could not leave that revision, even with --force.
    part = "d" * 200
    deep = work.parent / "long"
    while len(os.fsencode(deep)) < 2800:
        deep = deep / part
    deep.mkdir(parents=True)
    long_work = deep / "w"
    work.rename(long_work)
    mint(long_work, "status")  # the repository works at such a path
    rel = "/".join(["e" * 200] * 7) + "/notes.txt"
    assert len(os.fsencode(long_work / rel)) > 4096
    fd = os.open(long_work, os.O_RDONLY)
    try:
        where = fd
        for name in rel.split("/")[:-1]:
            os.mkdir(name, dir_fd=where)
            inner = os.open(name, os.O_RDONLY, dir_fd=where)
            if where != fd:
                os.close(where)
            where = inner
        with open(os.open("notes.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=where), "w") as f:
            f.write("deep\n")
    finally:
        if where != fd:
            os.close(where)
        os.close(fd)
    status = json.loads(mint(long_work, "status", "--json").stdout)
    assert not status["clean"] and "past the system's limit (4095)" in status["error"], status
    error = mint_fails(long_work, "commit", "-m", "deep", "--no-verify")
    assert "the full path is" in error and "a checkout could not write it back" in error, error
    assert "notes.txt" not in git(long_work / ".mint", "ls-tree", "-r", "HEAD").stdout


def test_status_says_why_a_name_cannot_be_stored_also_with_a_work_tree_record(work: Path) -> None:
    # docs/cli.md: a work tree that is not a readable adapter is status 0 and the reason in
    # `error`. With .mint/mint-worktree.json present (after any commit or checkout) the check
    # by stat raised first: exit 1 and no JSON for a script to read.
    (work / "secret").mkdir()
    (work / "secret" / "a.txt").write_text("q\n")
    mint(work, "commit", "-m", "secret", "--no-verify")  # records the work tree's stat
    assert json.loads(mint(work, "status", "--json").stdout)["clean"]
    (work / "Icon\r").write_text("x")  # what macOS Finder writes for a folder icon
    result = mint(work, "status", "--json")
    state = json.loads(result.stdout)
    assert not state["clean"] and "this file name cannot be stored" in state["error"], state
    assert "this file name cannot be stored" in mint(work, "status").stdout
    (work / "Icon\r").unlink()
    (work / "secret").chmod(0)
    try:
        result = mint_unprivileged(work, "status", "--json")
    finally:
        (work / "secret").chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert "could not open directory 'secret/'" in json.loads(result.stdout)["error"]


def test_error_lines_quote_a_file_name_as_git_does(work: Path) -> None:
    # The name went into the error raw: a newline split the one line in two, and an escape
    # sequence reached the terminal (git add quotes it: "esc\033]0;...").
    for name, quoted in (
        ("new\nline.txt", '"new\\nline.txt"'),
        ("esc\x1b]0;pwned\aX.txt", '"esc\\033]0;pwned\\aX.txt"'),
        ("Icon\r", '"Icon\\r"'),
    ):
        (work / name).write_text("x")
        result = mint(work, "commit", "-m", "x", "--no-verify", ok=False)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr, result.stderr
        assert f"{quoted[1:]}: this file name cannot be stored" in result.stderr, result.stderr
        status = json.loads(mint(work, "status", "--json").stdout)
        assert quoted[1:-1] in status["error"]  # JSON holds the line as printed
        text = mint(work, "status").stdout
        assert "\x1b" not in text and "\r" not in text and quoted[1:-1] in text, text
        (work / name).unlink()


def test_file_names_print_quoted_as_git_ls_tree_prints_them(work: Path) -> None:
    # Bidi overrides, C1 controls and non-ASCII printed raw in status, diff and show: the
    # `evil\u202etxt.exe` line displayed as `evilexe.txt`, and the NFD spelling of a committed
    # NFC name looked like it. git quotes them all (core.quotePath), and so must we, alike.
    # The NFD name is another than the NFC one: macOS would open the two as one (refused).
    names = ["evil\u202etxt.exe", "c1\u009b31mred", "nel\u0085x", "caf\u00e9.md", "cafe\u0301s.md"]
    names += ['q"x', "sp ace", "plain.txt"]
    for name in names:
        (work / name).write_text(name)
    added = [line for line in mint(work, "status").stdout.splitlines() if "added:" in line]
    mint(work, "commit", "-m", "names", "--no-verify")
    listed = git(work / ".mint", "ls-tree", "--name-only", "HEAD", "files/").stdout.splitlines()
    # git's lines, less the `files/` our tree keeps them under: "files/x" -> "x", files/y -> y.
    want = sorted('"' + n[7:] if n.startswith('"') else n[6:] for n in listed)
    want = [w for w in want if w.strip('"') != "README.md"]
    assert len(want) == len(names)
    assert sorted(line.split(None, 1)[1] for line in added) == want, added
    shown = mint(work, "show").stdout.splitlines()
    files = [line[7:].rsplit("  ", 1)[0] for line in shown if line.startswith("  file ")]
    assert sorted(f for f in files if f != "README.md") == want
    diffed = mint(work, "diff", "HEAD~1", "HEAD").stdout.splitlines()
    files = [line[7:].rsplit(" ", 1)[0] for line in diffed if line.startswith("  file ")]
    assert sorted(files) == want
    output = mint(work, "show").stdout + mint(work, "diff", "HEAD~1", "HEAD").stdout
    assert not any(c in output for c in "\u202e\u009b\u0085\u00e9\u0301")
    # --json keeps every name as it is.
    assert sorted(names) == sorted(set(_show_files(work)) - {"README.md"})


def test_core_quote_path_off_prints_non_ascii_names_as_git_does(work: Path) -> None:
    # With core.quotePath off git lists non-ASCII names as they are; so do we, but for names
    # that do not print (bidi overrides, C1), which stay quoted where git prints them raw.
    names = [
        "caf\u00e9.md",
        "cafe\u0301s.md",
        "日本語.txt",
        'q"x',
        "sp ace",
        "a\u00a0b",
        "c\u3000d",
    ]
    names += ["g\U0001fae8.txt"]  # a Unicode 15 character, unknown to Python 3.11's tables
    for name in names:
        (work / name).write_text(name)
    mint(work, "commit", "-m", "names", "--no-verify")
    git(work / ".mint", "config", "core.quotePath", "false")
    listed = git(work / ".mint", "ls-tree", "--name-only", "HEAD", "files/").stdout.splitlines()
    want = sorted('"' + n[7:] if n.startswith('"') else n[6:] for n in listed)
    want = [w for w in want if w != "README.md"]
    assert "caf\u00e9.md" in want and "日本語.txt" in want  # git's own listing, unquoted
    shown = mint(work, "show").stdout.splitlines()
    files = [line[7:].rsplit("  ", 1)[0] for line in shown if line.startswith("  file ")]
    assert sorted(f for f in files if f != "README.md") == want
    (work / "evil\u202etxt").write_text("x")
    (work / "caf\u00e9.md").write_text("changed")
    status = mint(work, "status").stdout
    assert '"evil\\342\\200\\256txt"' in status and "\u202e" not in status, status
    assert "modified: caf\u00e9.md" in status.replace("\t", " ").replace("  ", " "), status
    git(work / ".mint", "config", "core.quotePath", "true")
    assert '"caf\\303\\251.md"' in mint(work, "status").stdout


def test_an_error_line_names_a_non_ascii_path_as_it_is(work: Path) -> None:
    # git's error lines print a path as it is; only what does not print is escaped.
    (work / "naïve\x1b.txt").write_text("x")
    result = mint(work, "commit", "-m", "x", "--no-verify", ok=False)
    assert 'naïve\\033.txt": this file name cannot be stored' in result.stderr, result.stderr


def test_a_directory_of_the_adapter_holding_head_and_objects_is_not_the_repository(
    work: Path,
) -> None:
    # Any directory with a file HEAD and a directory objects/ was taken as a git directory:
    # in data/, status said "no work tree" and log read the notes as a corrupt ref. git takes
    # a directory as one only with objects/, refs/ and a HEAD that is a ref or an id.
    data = work / "data"
    (data / "objects").mkdir(parents=True)
    (data / "HEAD").write_text("some notes\n")
    (data / "objects" / "a.txt").write_text("x\n")
    mint(work, "commit", "-m", "data", "--no-verify")
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    assert json.loads(mint(data, "status", "--json").stdout)["clean"]
    assert json.loads(mint(data, "log", "-n1", "--json").stdout)[0]["commit"] == head
    (data / "HEAD").write_text("ref: refs/heads/main\n")  # a valid HEAD, still no refs/
    mint(data, "branch", "foo")
    mint(data, "tag", "v1", head[:7])
    assert git(work / ".mint", "rev-parse", "foo", "v1").stdout.split() == [head, head]
    # The .mint directory itself, and a bare clone, are still repositories to open.
    assert json.loads(mint(work / ".mint", "log", "-n1", "--json").stdout)[0]["commit"] == head
    git(work / ".mint", "clone", "-q", "--bare", str(work / ".mint"), str(work.parent / "b.git"))
    assert (
        json.loads(mint(work.parent / "b.git", "log", "-n1", "--json").stdout)[0]["commit"] == head
    )


def test_status_lists_files_in_git_order(work: Path) -> None:
    # status followed the walk (a directory's files after the files beside it: C.txt, b.txt,
    # a/z.txt); git status, and our diff and show, sort by the path's bytes.
    (work / "a").mkdir()
    for name in ("a/z.txt", "b.txt", "C.txt", "a.txt", "a-b.txt"):
        (work / name).write_text(name)
    want = ["C.txt", "a-b.txt", "a.txt", "a/z.txt", "b.txt"]
    # git's own order, of these files untracked by its (empty) index:
    listed = git(work / ".mint", "--work-tree", str(work), "ls-files", "-o").stdout.split()
    assert [n for n in listed if n in want] == want
    paths = [c["path"] for c in json.loads(mint(work, "status", "--json").stdout)["changes"]]
    assert paths == want, paths
    mint(work, "commit", "-m", "o", "--no-verify")
    for name in want:
        (work / name).unlink()
    paths = [c["path"] for c in json.loads(mint(work, "status", "--json").stdout)["changes"]]
    assert paths == want, paths


def _strict(text: str) -> object:
    """`text` parsed as JSON, every string in it valid Unicode (no lone surrogate escape)."""
    data = json.loads(text)
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone surrogate fails here
    return data


def test_ref_names_that_are_not_utf8_are_refused_and_left_out_of_json(work: Path) -> None:
    # git takes any bytes in a ref name, and mintvcs made them too: --json then printed
    # "mb\udcfe", which jq reads as U+FFFD (no ref of that name) and strict readers refuse.
    bad = os.fsdecode(b"mb\xfe")
    for args in (("branch", bad), ("tag", bad), ("checkout", "-b", bad), ("branch", "-m", bad)):
        result = mint(work, *args, ok=False)
        assert result.returncode == 1 and "0xfe is not UTF-8" in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        # Named by its bytes, as git names it ('mb\376'), not by Python's repr ('mb\udcfe').
        assert "name 'mb\udcfe':" in result.stderr and "\\udcfe" not in result.stderr
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    git(work / ".mint", "update-ref", os.fsdecode(b"refs/heads/p/q\xfe"), head)
    line = mint_fails(work, "branch", "p")
    assert "cannot create ref 'refs/heads/p': ref 'refs/heads/p/q\udcfe' exists" in line, line
    git(work / ".mint", "update-ref", "-d", os.fsdecode(b"refs/heads/p/q\xfe"))
    git(work / ".mint", "update-ref", os.fsdecode(b"refs/heads/mb\xfe"), head)
    git(work / ".mint", "update-ref", os.fsdecode(b"refs/tags/tbad\xfe"), head)
    for args, key in ((("branch",), "name"), (("tag",), "name")):
        result = mint(work, *args, "--json")
        assert all(row[key].isascii() for row in _strict(result.stdout)), result.stdout
        assert 'warning: ignoring ref "refs/' in result.stderr, result.stderr
    result = mint(work, "log", "-n1", "--json")
    assert not any("bad" in r for r in _strict(result.stdout)[0]["refs"]), result.stdout
    assert "tbad" in result.stderr
    # The text listing shows it as its bytes, as git's does, and it can still be deleted.
    assert "mb\udcfe" in mint(work, "branch").stdout
    mint(work, "branch", "-D", bad)
    # init --json of a path that is not UTF-8 is refused before anything is made.
    where = work.parent / os.fsdecode(b"\xff\xfe")
    result = mint(work.parent, "init", "--json", str(where), ok=False)
    assert result.returncode == 1 and "is not UTF-8, which --json cannot carry" in result.stderr
    assert not where.exists()
    mint(work.parent, "init", str(where))


def test_json_leaves_out_refs_that_are_not_utf8_by_their_full_names(work: Path) -> None:
    # log --json warned of the label ("tag: tb\376"), not the ref, and with HEAD on such a
    # branch dropped "HEAD -> mb\376" whole, so no entry said where HEAD is; branch --json gave
    # an alias of such a branch as `alias_of` "mb\udcfe", a lone surrogate escape.
    git_dir = work / ".mint"
    head = git(git_dir, "rev-parse", "HEAD").stdout.strip()
    git(git_dir, "update-ref", os.fsdecode(b"refs/tags/tb\xfe"), head)
    git(git_dir, "update-ref", os.fsdecode(b"refs/heads/mb\xfe"), head)
    git(git_dir, "symbolic-ref", "HEAD", os.fsdecode(b"refs/heads/mb\xfe"))
    result = mint(work, "log", "-n1", "--json")
    assert _strict(result.stdout)[0]["refs"][0] == "HEAD", result.stdout
    warned = sorted(line for line in result.stderr.splitlines() if "ignoring ref" in line)
    assert warned == [
        'warning: ignoring ref "refs/heads/mb\\376": it is not UTF-8, which JSON cannot carry',
        'warning: ignoring ref "refs/tags/tb\\376": it is not UTF-8, which JSON cannot carry',
    ], result.stderr
    git(git_dir, "symbolic-ref", "refs/heads/alias", os.fsdecode(b"refs/heads/mb\xfe"))
    result = mint(work, "branch", "--json")
    rows = _strict(result.stdout)
    assert isinstance(rows, list)
    listed = {row["name"]: row for row in rows}
    assert "alias" not in listed and all(row["alias_of"] is None for row in listed.values())
    assert 'ignoring ref refs/heads/alias: it points to "refs/heads/mb\\376"' in result.stderr


def test_output_the_terminal_cannot_encode_never_raises(work: Path) -> None:
    # A name's bytes that are not UTF-8 raised under a strict UTF-8 stdout (any UTF-8 locale
    # but C), and a Japanese name or message under a Latin-1 one: a traceback, the listing cut.
    git(work / ".mint", "update-ref", "refs/heads/mb\udcfe", "HEAD")
    (work / "日本.txt").write_text("x")
    mint(work, "commit", "-m", "日本 msg", "--no-verify")
    git(work / ".mint", "config", "core.quotePath", "false")
    (work / "日本.txt").write_text("y")
    strict = {"PYTHONIOENCODING": "utf-8"}
    assert "  mb\udcfe " in mint(work, "branch", env=strict).stdout  # its bytes, as git's
    assert "mb\udcfe" in mint(work, "log", "--oneline", env=strict).stdout
    latin = {"PYTHONIOENCODING": "latin-1"}
    assert "    \\u65e5\\u672c msg" in mint(work, "log", env=latin).stdout
    assert "modified:  \\u65e5\\u672c.txt" in mint(work, "status", env=latin).stdout
    missing = mint(work, "branch", "-d", "x日", ok=False, env=latin)
    assert "error: branch 'x\\u65e5' not found" in missing.stderr, missing.stderr


def test_status_of_an_adapter_directory_that_cannot_be_listed_says_why(work: Path) -> None:
    # docs/cli.md: status of a work tree that is not a readable adapter exits 0 and says why
    # (`error` in --json). The top of the adapter, unlike a directory inside it, raised a bare
    # PermissionError: `error: Permission denied: <dir>`, exit 1, no JSON. git status warns
    # "could not open directory '.': Permission denied" and exits 0.
    (work / "notes.txt").write_text("n\n")
    mint(work, "commit", "-m", "notes", "--no-verify")
    work.chmod(0o311)  # enterable, its files readable by name, not listable
    try:
        result = mint_unprivileged(work, "status", "--json")
        text = mint_unprivileged(work, "status")
        commit = mint_unprivileged(work, "commit", "-m", "oops", "--no-verify")
    finally:
        work.chmod(0o755)
    assert result.returncode == 0, result.stderr
    error = json.loads(result.stdout)["error"]
    assert "could not open directory '.' of the adapter: Permission denied" in error, error
    assert text.returncode == 0 and "could not open directory '.'" in text.stdout, text
    assert "removed" not in text.stdout, text.stdout
    assert commit.returncode == 1 and "could not open directory '.'" in commit.stderr
    assert "notes.txt" in _show_files(work)


def test_a_branch_git_named_in_bytes_that_are_not_utf8_is_reset_to_renamed_or_refused(
    work: Path,
) -> None:
    # checkout, reset --hard and branch -m of such a branch (git update-ref made it) raised a
    # UnicodeEncodeError traceback writing the reflog line that names it.
    bad = os.fsdecode(b"mb\xfe")
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    git(work / ".mint", "update-ref", f"refs/heads/{bad}", head)
    # HEAD would name it, which --json cannot carry: one line, before anything is written.
    error = mint_fails(work, "checkout", bad)
    assert "0xfe is not UTF-8" in error and "mintvcs branch -m OLD NEW" in error, error
    assert (work / ".mint" / "HEAD").read_text() == "ref: refs/heads/main\n"
    # As git: the reflog line names it in its bytes.
    mint(work, "reset", "--hard", bad)
    assert (work / ".mint" / "logs" / "HEAD").read_bytes().endswith(b"\treset: moving to mb\xfe\n")
    mint(work, "checkout", "-b", "made", bad)
    mint(work, "branch", "-m", bad, "fixed")
    log = (work / ".mint" / "logs" / "refs" / "heads" / "fixed").read_bytes()
    assert log.endswith(b"\tBranch: renamed refs/heads/mb\xfe to refs/heads/fixed\n"), log
    assert git(work / ".mint", "rev-parse", "fixed").stdout.strip() == head
    mint(work, "checkout", "fixed")
    git(work / ".mint", "fsck", "--strict")


def test_ref_names_holding_c1_controls_or_bidi_overrides_print_escaped(work: Path) -> None:
    # git's check-ref-format takes C1 controls and bidi overrides or isolates, and git prints
    # them raw: a branch named with the 8-bit CSI (U+009B) made the rest of `branch`'s line red,
    # one with U+202E reversed it. Every text line naming a ref escapes them; --json keeps them.
    csi, rlo, lri = "mk\u009b31mX", "bi\u202eX", "t\u2066X"
    mint(work, "branch", csi)
    git(work / ".mint", "update-ref", f"refs/heads/{rlo}", "HEAD")  # as a clone brings it
    git(work / ".mint", "update-ref", f"refs/tags/{lri}", "HEAD")
    raw = git(work / ".mint", "branch").stdout
    assert f"  {csi}\n" in raw and f"  {rlo}\n" in raw  # git's, as it is
    shown = {r"mk\x9b31mX", r"bi\u202eX", r"t\u2066X"}
    branch = mint(work, "branch").stdout
    assert r"  bi\u202eX  " in branch and r"  mk\x9b31mX  " in branch, branch
    assert mint(work, "tag").stdout == "t\\u2066X\n"
    oneline = mint(work, "log", "--oneline", "-n1").stdout
    assert all(name in oneline for name in shown), oneline
    assert all(name in mint(work, "log", "-n1").stdout.splitlines()[0] for name in shown)
    switched = mint(work, "checkout", rlo).stderr
    assert switched == "Switched to branch 'bi\\u202eX'\n", switched
    assert mint(work, "status").stdout.startswith("On branch bi\\u202eX\n")
    committed = mint(work, "commit", "--allow-empty", "-m", "e", "--no-verify").stdout
    assert committed.startswith("[bi\\u202eX "), committed
    mint(work, "tag", csi)  # a tag and a branch of one name: git's warning names both
    ambiguous = mint(work, "log", "-n1", csi).stderr
    assert r"refname 'mk\x9b31mX' is ambiguous (refs/tags/mk\x9b31mX and " in ambiguous
    deleted = mint(work, "branch", "-D", csi).stdout
    assert deleted.startswith("Deleted branch mk\\x9b31mX (was "), deleted
    assert mint(work, "tag", "-d", csi).stdout.startswith("Deleted tag 'mk\\x9b31mX' (was ")
    texts = [mint(work, *args).stdout for args in (("branch",), ("log",), ("status",), ("tag",))]
    assert not any(char in text for text in texts for char in "\u009b\u202e\u2066"), texts
    # --json gives each name as it is.
    assert {row["name"] for row in json.loads(mint(work, "branch", "--json").stdout)} == {
        "main",
        "side",
        rlo,
    }
    assert json.loads(mint(work, "status", "--json").stdout)["branch"] == rlo
    assert [row["name"] for row in json.loads(mint(work, "tag", "--json").stdout)] == [lri]
    refs = json.loads(mint(work, "log", "-n1", "--json", "side").stdout)[0]["refs"]
    assert refs == ["side"], refs
    refs = json.loads(mint(work, "log", "-n1", "--json", "main").stdout)[0]["refs"]
    assert refs == [f"tag: {lri}", "main"], refs


def test_head_on_a_branch_git_named_in_bytes_that_are_not_utf8_is_that_branch(
    work: Path, tmp_path: Path
) -> None:
    # HEAD's target was read with U+FFFD for such bytes, so it named another branch: status
    # said "No commits yet", commit made a root commit on a new branch `mb\xef\xbf\xbd`, and
    # `branch -m` renamed that one (not there) and left HEAD on the old name, which git moves.
    bad, raw = os.fsdecode(b"mb\xfe"), b"mb\xfe"
    git_dir = work / ".mint"
    head = git(git_dir, "rev-parse", "HEAD").stdout.strip()
    git(git_dir, "update-ref", f"refs/heads/{bad}", head)
    git(git_dir, "symbolic-ref", "HEAD", f"refs/heads/{bad}")  # as `git checkout` puts it
    status = mint(work, "status")
    assert status.stdout == f"On branch {bad}\nnothing to commit, work tree clean\n", status.stdout
    listed = mint(work, "status", "--json")
    assert json.loads(listed.stdout)["head"] == head  # its branch is left out of JSON, and said
    assert json.loads(listed.stdout)["branch"] is None and "JSON cannot carry" in listed.stderr
    assert json.loads(listed.stdout)["detached"] is False  # on a branch: no detached HEAD
    assert f"* {bad}  " in mint(work, "branch").stdout
    assert mint(work, "log", "--oneline", "-n1").stdout.startswith(f"{head[:7]} (HEAD -> {bad}, ")
    heads = sorted(os.listdir(os.fsencode(git_dir / "refs" / "heads")))  # all loose here
    made = mint(work, "commit", "--allow-empty", "--no-verify", "-m", "on it").stdout
    assert made.startswith(f"[{bad} "), made
    assert git(git_dir, "rev-parse", f"{bad}~1").stdout.strip() == head  # onto it, no other
    assert sorted(os.listdir(os.fsencode(git_dir / "refs" / "heads"))) == heads
    # branch -m moves HEAD with it, as git's does (git 2.39 on a copy the oracle).
    theirs = tmp_path / "theirs"
    shutil.copytree(work, theirs)
    git(theirs / ".mint", "branch", "-m", bad, "fixed")
    plain = tmp_path / "plain"
    shutil.copytree(work, plain)
    quiet = mint(plain, "branch", "-m", bad, "fixed")  # git says nothing: a name it takes
    assert (quiet.stdout, quiet.stderr) == ("", ""), quiet
    renamed = mint(work, "branch", "-m", bad, "fixed", "--json")
    assert json.loads(renamed.stdout)["renamed_from"] is None, renamed.stdout
    for repo in (work, theirs):
        assert (repo / ".mint" / "HEAD").read_bytes() == b"ref: refs/heads/fixed\n", repo
        line = (repo / ".mint" / "logs" / "HEAD").read_bytes().splitlines()[-1]
        assert line.endswith(b"\tBranch: renamed refs/heads/" + raw + b" to refs/heads/fixed")
    mint(work, "branch", "-m", "again")  # the current branch, named or not
    mint(work, "checkout", head)
    assert json.loads(mint(work, "status", "--json").stdout)["detached"] is True
    mint(work, "checkout", "again")
    assert (work / ".mint" / "HEAD").read_bytes() == b"ref: refs/heads/again\n"
    # A git worktree's HEAD likewise: its branch is not deleted under it (git refuses too).
    git(git_dir, "branch", bad, "again")
    git(git_dir, "worktree", "add", "-q", str(tmp_path / "wt"), bad)
    refused = mint(work, "branch", "-D", bad, ok=False)
    assert refused.returncode == 1 and "it is checked out in the git worktree" in refused.stderr
    assert git(git_dir, "rev-parse", "--verify", "-q", f"refs/heads/{bad}").returncode == 0
    git(git_dir, "fsck", "--strict")
