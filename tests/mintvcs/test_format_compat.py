"""Format compatibility: git's repository format (core.repositoryformatversion, extensions.*)
checked against real git, mint.formatVersion, and manifests and blobs of a newer mintvcs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mintvcs.store import Repository
from tests.mintvcs.storekit import (
    ENV,
    WEIGHTS,
    commit_with_manifest_files,
    copy_adapter,
    edit_blob_header,
    git,
    mint,
    mint_fails,
    mutate,
)


def _newer_blob(work: Path, change: Any) -> str:
    """Branch `hostile`: HEAD with its first tensor's blob changed by `change` (bytes -> bytes)."""
    repo = Repository.open(work)

    def edit(records: list[dict[str, Any]]) -> None:
        records[0]["blob"] = repo.add_blob(change(repo.read_blob(records[0]["blob"])))

    return commit_with_manifest_files(work, [], edit)


def _encoding(header: dict[str, Any]) -> None:
    header["encoding"] = "fp8block"


def _codec(header: dict[str, Any]) -> None:
    header["segments"][0][0] = "lz4"


def _garbage_codec(header: dict[str, Any]) -> None:
    header["segments"][0][0] = ["zstd"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda blob: edit_blob_header(blob, version=2), "format version 2; this mintvcs reads 1"),
        (lambda blob: edit_blob_header(blob, _encoding), "encoding 'fp8block'"),
        (lambda blob: edit_blob_header(blob, _codec), "segment codec 'lz4'"),
    ],
)
def test_a_blob_of_a_newer_mintvcs_says_upgrade_not_restore(
    work: Path, change: Any, says: str
) -> None:
    _newer_blob(work, change)
    head = (work / ".mint" / "HEAD").read_text()
    weights = (work / WEIGHTS).read_bytes()
    line = mint_fails(work, "checkout", "-f", "hostile")
    # It said "stored blob is corrupt (...); run mintvcs fsck and restore the object from a
    # clone or backup": nothing is damaged, and a backup holds the same bytes.
    assert says in line and "written by a newer mintvcs" in line, line
    assert line.endswith("upgrade mintvcs to read it") and "corrupt" not in line, line
    assert (work / ".mint" / "HEAD").read_text() == head
    assert (work / WEIGHTS).read_bytes() == weights
    problems = json.loads(mint(work, "fsck", "--json", ok=False).stdout)["problems"]
    assert len(problems) == 1 and "upgrade mintvcs" in problems[0], problems


def test_a_damaged_blob_header_is_still_corrupt(work: Path) -> None:
    _newer_blob(work, lambda blob: edit_blob_header(blob, _garbage_codec))
    line = mint_fails(work, "checkout", "-f", "hostile")
    assert "stored blob is corrupt" in line and "newer" not in line, line


def test_unknown_manifest_keys_are_ignored_in_records_as_at_the_top_level(work: Path) -> None:
    repo = Repository.open(work)
    notes = repo.add_blob(b"notes\n")

    def add_keys(manifest: dict[str, Any]) -> None:
        manifest["compression_hint"] = "fp8"
        manifest["base"]["revision"] = "main"
        for record in manifest["tensors"]:
            record["quant"] = "none"

    extra = {"path": "NOTES.txt", "blob": notes, "executable": False, "mode": "0644"}
    commit_with_manifest_files(work, [extra], edit_manifest=add_keys, in_tree=True)
    weights = (work / WEIGHTS).read_bytes()
    # A tensor or file record's extra key was "corrupt manifest (TensorRecord.__init__() got an
    # unexpected keyword argument 'quant')", while one at the top level was read silently.
    mint(work, "checkout", "-f", "hostile")
    assert (work / WEIGHTS).read_bytes() == weights
    assert (work / "NOTES.txt").read_bytes() == b"notes\n"
    mint(work, "show", "hostile")
    assert json.loads(mint(work, "fsck", "--json").stdout)["problems"] == []


def test_a_manifest_record_without_a_key_names_it(work: Path) -> None:
    def drop(records: list[dict[str, Any]]) -> None:
        del records[0]["depth"]

    commit_with_manifest_files(work, [], drop)
    line = mint_fails(work, "show", "hostile")
    assert "a tensor record lacks depth" in line and "__init__" not in line, line


def test_log_json_lists_a_revision_whose_manifest_is_newer(work: Path) -> None:
    newer = commit_with_manifest_files(work, [], edit_manifest=lambda m: m.update(version=2))
    assert len(mint(work, "log", "--oneline", "hostile").stdout.splitlines()) == 4
    # It printed nothing and exited 1: one newer manifest hid the whole history.
    items = json.loads(mint(work, "log", "--json", "hostile").stdout)
    assert items[0]["commit"] == newer and len(items) == 4
    assert items[0]["meta"] is None
    assert "manifest version 2 is newer than this mintvcs reads (1)" in items[0]["meta_error"]
    assert all("meta_error" not in item and item["meta"] is not None for item in items[1:])


def _set(work: Path, *settings: tuple[str, str]) -> None:
    """Write config keys straight into `.mint/config` (`git config -f`: git's own checks of the
    repository would stop `git --git-dir` at the first setting it refuses)."""
    for key, value in settings:
        subprocess.run(
            ["git", "config", "-f", str(work / ".mint" / "config"), key, value],
            env=ENV,
            check=True,
        )


def _store_state(work: Path) -> dict[str, str]:
    """Every file of `.mint/` by its content's hash: what a refused command must leave alone."""
    git_dir = work / ".mint"
    return {
        p.relative_to(git_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(git_dir.rglob("*"))
        if p.is_file()
    }


def _age_objects(work: Path, seconds: float = 7200) -> None:
    """Make every object file look `seconds` old, past gc's grace period for unreachable ones."""
    old = time.time() - seconds
    for path in (work / ".mint" / "objects").rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))


# (settings, what mintvcs's one error line names; None: opened as usual), each as git 2.39 has it.
FORMATS = [
    ([("core.repositoryformatversion", "2")], "core.repositoryformatversion = 2"),
    ([("core.repositoryformatversion", "1k")], "core.repositoryformatversion = 1024"),
    (
        [("core.repositoryformatversion", "banana")],
        "bad numeric config value 'banana' for 'core.repositoryformatversion'",
    ),
    (
        [("core.repositoryformatversion", "1"), ("extensions.frobnicate", "true")],
        "unknown repository extension extensions.frobnicate",
    ),
    (
        [("core.repositoryformatversion", "1"), ("extensions.refStorage", "reftable")],
        "extensions.refStorage = 'reftable'",
    ),
    ([("extensions.objectFormat", "sha1")], "extensions.objectFormat is set"),
    ([("extensions.noop-v1", "true")], "extensions.noop-v1 is set"),
    (
        [("core.repositoryformatversion", "1"), ("extensions.preciousObjects", "banana")],
        "extensions.preciousObjects = 'banana' is not a boolean",
    ),
    ([("extensions.worktreeConfig", "maybe")], "is not a boolean"),
    ([("extensions.frobnicate", "true")], None),  # version 0 predates the rule: ignored
    (
        [
            ("core.repositoryformatversion", "1"),
            ("extensions.noop", "true"),
            ("extensions.noop-v1", "true"),
            ("extensions.objectFormat", "sha1"),
            ("extensions.partialClone", "origin"),
            ("extensions.worktreeConfig", "true"),
        ],
        None,
    ),
    ([("core.repositoryformatversion", "0x1"), ("extensions.Noop", "yes")], None),
]


@pytest.mark.parametrize(("settings", "refused"), FORMATS)
def test_repository_format_is_refused_exactly_where_git_refuses_it(
    work: Path, settings: list[tuple[str, str]], refused: str | None
) -> None:
    _set(work, *settings)
    by_git = git(work / ".mint", "log", "--oneline", ok=False)
    if refused is None:
        assert by_git.returncode == 0, by_git.stderr
        assert len(mint(work, "log", "--oneline").stdout.splitlines()) == 3
        mint(work, "status")
        return
    assert by_git.returncode == 128, by_git.stderr  # git's `fatal:`
    mutate(work, seed=5)
    before = _store_state(work)
    # Each used to run, commit and gc included, writing into a repository git cannot read.
    for args in (["log"], ["status"], ["commit", "-m", "x", "--no-verify"], ["gc"], ["fsck"]):
        result = mint(work, *args, ok=False)
        assert result.returncode == 128, result.stderr
        assert result.stderr.count("error:") == 1 and refused in result.stderr, result.stderr
    assert _store_state(work) == before


@pytest.mark.parametrize(
    "lines",
    [
        "\trepositoryformatversion\n",  # no value: it said "'true' is not a number"
        "\trepositoryformatversion =\n",
        "\trepositoryformatversion = 4294967297\n",  # no C int: it said "newer"
        "\trepositoryformatversion = -2147483648\n",
        "\trepositoryformatversion = 2g\n",
        # git reads every value the key is given; a later good one does not hide a bad one.
        "\trepositoryformatversion = banana\n\trepositoryformatversion = 0\n",
    ],
)
def test_a_format_version_git_cannot_read_is_refused_in_git_s_words(work: Path, lines: str) -> None:
    config = work / ".mint" / "config"
    config.write_text(config.read_text() + "[core]\n" + lines)
    by_git = git(work / ".mint", "log", "--oneline", ok=False)
    assert by_git.returncode == 128, by_git.stderr
    said = by_git.stderr.strip().removeprefix("fatal: ")
    head, _, tail = said.partition(" in file ")
    reason = tail.rsplit(": ", 1)[1]  # invalid unit, out of range
    line = mint_fails(work, "log", "--oneline")
    assert f"{head} in file {config}: {reason} (git refuses it too)" in line, (line, said)


@pytest.mark.parametrize("version", ["0", "1"])
@pytest.mark.parametrize(
    "name", ["objectFormat", "partialClone", "refStorage", "compatObjectFormat"]
)
def test_a_string_extension_without_a_value_is_refused_in_git_s_words(
    work: Path, version: str, name: str
) -> None:
    # A bare objectFormat was "'true' is not an object format" (v1) or "v1-only" (v0); a bare
    # partialClone was taken. git wants a string of each: "missing value", whatever the version,
    # and even where a later line gives one.
    config = work / ".mint" / "config"
    text = f"[core]\n\trepositoryformatversion = {version}\n[extensions]\n\t{name}\n"
    config.write_text(config.read_text() + text + f"\t{name} = sha1\n")
    number = len(config.read_text().splitlines()) - 1
    by_git = git(work / ".mint", "log", "--oneline", ok=False)
    if name == "objectFormat":
        assert by_git.stderr.splitlines() == [
            f"error: missing value for 'extensions.{name.lower()}'",
            f"fatal: bad config line {number} in file {config}",
        ]
    elif name == "partialClone":
        assert by_git.returncode < 0  # git 2.39 crashes on it; later ones say "missing value"
    # refStorage and compatObjectFormat are later git's (2.45+), which says "missing value".
    line = mint_fails(work, "log", "--oneline")
    assert line == (
        f"error: missing value for 'extensions.{name}' in {config} line {number}: git refuses "
        f"it too; give it one (`{name} = VALUE`)"
    )


def test_a_sha256_repository_is_refused_before_anything_is_written(
    tmp_path: Path, peft_adapter: Path
) -> None:
    work = tmp_path / "r"
    git_dir = work / ".mint"
    subprocess.run(
        ["git", "init", "-q", "--bare", "--object-format=sha256", "-b", "main", str(git_dir)],
        env=ENV,
        check=True,
    )
    copy_adapter(peft_adapter, work)
    before = _store_state(work)
    # It committed SHA-1 objects into it, which git then called broken, every one of them.
    for args in (["status"], ["commit", "-m", "one", "--no-verify"], ["log"]):
        line = mint_fails(work, *args)
        assert "extensions.objectFormat = sha256" in line and "SHA-1" in line, line
    assert _store_state(work) == before
    git(git_dir, "fsck", "--strict")


@pytest.mark.parametrize("version", ["0", "1"])
def test_gc_refuses_a_precious_objects_store_whose_objects_a_clone_borrows(
    work: Path, tmp_path: Path, version: str
) -> None:
    git_dir = work / ".mint"
    mutate(work, seed=3)
    mint(work, "commit", "-m", "rev 3", "--no-verify")
    borrower = tmp_path / "B.mint"  # borrows the store's objects: its main is "rev 3"
    subprocess.run(
        ["git", "clone", "-q", "--bare", "--shared", str(git_dir), str(borrower)],
        env=ENV,
        check=True,
    )
    mint(work, "reset", "--hard", "HEAD~1")  # rev 3 now unreachable here
    git(git_dir, "reflog", "expire", "--expire=now", "--all")
    _age_objects(work)
    _set(
        work,
        ("core.repositoryformatversion", version),
        ("extensions.preciousObjects", "true"),
        ("gc.auto", "1"),
    )
    assert git(git_dir, "prune", ok=False).returncode == 128  # git refuses, in either version
    before = _store_state(work)
    for args in (["gc"], ["gc", "--no-prune"]):
        result = mint(work, *args, ok=False)
        assert result.returncode == 128, result.stdout  # it packed and pruned rev 3's objects
        assert "extensions.preciousObjects" in result.stderr and "nothing was changed" in (
            result.stderr
        )
    assert "preciousObjects" in mint(work, "gc", "--auto").stdout  # as git's gc: no repack
    assert _store_state(work) == before
    git(borrower, "fsck", "--strict")
    assert git(borrower, "log", "-1", "--format=%s", "main").stdout.strip() == "rev 3"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (
            "2",
            "mint.formatVersion = 2: the repository's format is newer than this mintvcs reads (1); upgrade mintvcs",
        ),
        ("banana", "mint.formatVersion = 'banana' is not a mintvcs repository format"),
        ("0", "mint.formatVersion = '0' is not a mintvcs repository format"),
    ],
)
def test_mint_format_version_newer_or_garbage_is_refused(work: Path, value: str, says: str) -> None:
    _set(work, ("mint.formatVersion", value))
    mutate(work, seed=5)
    before = _store_state(work)
    # It was written at init and never read: a v1 mintvcs committed into a v2 repository.
    for args in (["log"], ["commit", "-m", "x", "--no-verify"], ["gc"]):
        assert says in mint_fails(work, *args)
    assert _store_state(work) == before


def test_a_repository_without_mint_format_version_opens_as_version_1(work: Path) -> None:
    git(work / ".mint", "config", "--unset", "mint.formatVersion")  # as `git clone` leaves it
    assert len(mint(work, "log", "--oneline").stdout.splitlines()) == 3


def test_worktree_config_is_read_as_git_reads_it(work: Path) -> None:
    git_dir = work / ".mint"
    _set(
        work,
        ("core.repositoryformatversion", "1"),
        ("extensions.worktreeConfig", "true"),
        ("user.name", "Local Person"),
        ("user.email", "local@example.com"),
    )
    git(git_dir, "config", "--worktree", "user.name", "Worktree Person")
    git(git_dir, "config", "--worktree", "user.email", "wt@example.com")
    env = {k: v for k, v in ENV.items() if not k.startswith(("GIT_AUTHOR_", "GIT_COMMITTER_"))}
    ident = subprocess.run(
        ["git", "--git-dir", str(git_dir), "var", "GIT_AUTHOR_IDENT"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ident.startswith("Worktree Person <wt@example.com> ")
    mutate(work, seed=5)
    subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", "commit", "-m", "by the worktree", "--no-verify"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
    )
    # It was "Local Person <local@example.com>": config.worktree was not read.
    author = git(git_dir, "log", "-1", "--format=%an <%ae>").stdout.strip()
    assert author == "Worktree Person <wt@example.com>"
