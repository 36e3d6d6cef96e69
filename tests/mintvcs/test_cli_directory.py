"""`mintvcs -C PATH`, through the installed console script, against git's -C on the same
directories: where each sequence of -C lands, what a path argument is taken from, the errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mintvcs import porcelain
from tests.mintvcs.storekit import ENV, console_script, copy_adapter


def _mintvcs(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mintvcs ARGS` run by the console script in `cwd`; never a traceback."""
    done = subprocess.run(
        [console_script(), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, env=ENV, capture_output=True, text=True)


def _dash_c(paths: list[str]) -> list[str]:
    return [arg for path in paths for arg in ("-C", path)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, peft_adapter: Path) -> Path:
    """top/ (no repository) holding a, a/b and c, each a mintvcs and a git repository whose one
    commit is named after it; a/plain, a directory of a's; link -> a/b; and a file."""
    top = tmp_path_factory.mktemp("dash-c")
    for name in ("a", "a/b", "c"):
        (top / name).mkdir()
        repo = porcelain.init(top / name, None)
        # Not verified: a/b lies in a's work trees, where its pre-commit hook would not run.
        porcelain.commit(repo, name, source=peft_adapter, verify=False, show_progress=False)
        repo.close()
        for git_args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", name]):
            assert _git(top / name, *git_args).returncode == 0
    (top / "a" / "plain").mkdir()
    (top / "link").symlink_to("a/b")
    (top / "file").write_text("not a directory\n")
    return top


@pytest.mark.parametrize(
    ("paths", "repository"),
    [
        (["a"], "a"),
        (["a", "b"], "a/b"),
        (["a", "", "b"], "a/b"),  # an empty one is a no-op (git 2.39)
        (["", "c"], "c"),
        (["a", "{top}/c"], "c"),  # an absolute one starts afresh
        (["c", "../a/b"], "a/b"),
        (["a", "plain"], "a"),  # a directory in a work tree: its repository is found upward
        (["a/b", "..", "plain"], "a"),
        (["link", ".."], "a"),  # each step is a chdir: `..` of link is a/b's parent, not top
    ],
)
def test_each_sequence_lands_where_gits_does(tree: Path, paths: list[str], repository: str) -> None:
    args = _dash_c([path.format(top=tree) for path in paths])
    theirs = _git(tree, *args, "log", "-1", "--format=%s")
    assert theirs.returncode == 0 and theirs.stdout == f"{repository}\n", theirs.stderr
    ours = _mintvcs(tree, *args, "log", "--json")
    assert ours.returncode == 0, ours.stderr
    assert [c["message"] for c in json.loads(ours.stdout)] == [f"{repository}\n"]
    # status too (the task's own example), from a directory where no repository is
    status = _mintvcs(tree, *args, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["clean"] is False, status.stderr


@pytest.mark.parametrize(
    "paths",
    [["nope"], ["a", "nope"], ["file"], ["a", "b", "/nonexistent"], ["a", "", "plain", "file"]],
)
def test_a_path_it_cannot_change_to_is_gits_error_and_status(tree: Path, paths: list[str]) -> None:
    theirs = _git(tree, *_dash_c(paths), "status")
    assert theirs.returncode == 128 and theirs.stderr.startswith("fatal: cannot change to ")
    ours = _mintvcs(tree, *_dash_c(paths), "status")
    assert (ours.returncode, ours.stdout) == (128, "")
    assert ours.stderr == theirs.stderr.replace("fatal: ", "error: ", 1)


def test_a_missing_value_is_a_usage_error_and_an_empty_one_changes_nothing(tree: Path) -> None:
    missing = _mintvcs(tree, "-C")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("error: Option '-C' requires an argument")
    # In top, which no repository holds, `-C ''` is plain `status`: the same refusal.
    plain, empty = _mintvcs(tree, "status"), _mintvcs(tree, "-C", "", "status")
    assert plain.returncode == 1 and "not a mintvcs repository" in plain.stderr
    assert (empty.returncode, empty.stdout, empty.stderr) == (1, plain.stdout, plain.stderr)


def test_dash_c_without_a_command_is_mintvcs_alone_after_the_change(tree: Path) -> None:
    # It said "error: Missing command." on stderr, where git prints its usage on stdout, the
    # same as git alone, and a -C it cannot change to fails first (exit 128, its line).
    # mintvcs alone prints its help on stdout with its usage status, 2 (git's is 1).
    alone = _mintvcs(tree)
    assert alone.returncode == 2 and alone.stdout.startswith("Usage: ") and not alone.stderr
    for paths in (["a"], ["a", "b"], [""]):
        theirs, git_alone = _git(tree, *_dash_c(paths)), _git(tree)
        assert (theirs.returncode, theirs.stdout, theirs.stderr) == (1, git_alone.stdout, "")
        ours = _mintvcs(tree, *_dash_c(paths))
        assert (ours.returncode, ours.stdout, ours.stderr) == (2, alone.stdout, ""), paths
    for paths in (["nope"], ["a", "file"]):
        theirs = _git(tree, *_dash_c(paths))
        assert theirs.returncode == 128 and theirs.stderr.startswith("fatal: cannot change to ")
        ours = _mintvcs(tree, *_dash_c(paths))
        assert (ours.returncode, ours.stdout) == (128, "")
        assert ours.stderr == theirs.stderr.replace("fatal: ", "error: ", 1)


def test_init_and_its_base_model_are_taken_from_the_directory(
    tmp_path: Path, tiny_base: Path
) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "base").symlink_to(tiny_base)
    made = _mintvcs(tmp_path, "-C", "a", "-C", "sub", "init", "new", "--base-model", "../base")
    assert made.returncode == 0, made.stderr
    git_dir = tmp_path / "a" / "sub" / "new" / ".mint"
    # The path printed is absolute, as git's: relative, it would be relative to -C's directory.
    assert made.stdout.splitlines()[0] == f"Initialized empty mintvcs repository in {git_dir}"
    assert json.loads((git_dir / "mint-base.json").read_text())["fingerprint"]
    theirs = _git(tmp_path, "-C", "a", "-C", "sub", "init", "new")
    assert theirs.stdout.strip().endswith(f" {git_dir.parent}/.git/"), theirs.stdout
    # `init` alone makes the -C directory itself the repository, as `git -C DIR init` does.
    assert _mintvcs(tmp_path, "-C", "a", "init").returncode == 0
    assert (tmp_path / "a" / ".mint" / "HEAD").is_file()
    assert not (tmp_path / ".mint").exists()


def test_commit_from_takes_its_directory_from_the_last_dash_c(
    tmp_path: Path, peft_adapter: Path
) -> None:
    work = tmp_path / "work"
    assert _mintvcs(tmp_path, "init", "work").returncode == 0
    copy_adapter(peft_adapter, work / "adapter")
    # As git takes a pathspec after -C: `adapter` is work/adapter; tmp_path holds none.
    done = _mintvcs(tmp_path, "-C", "work", "commit", "-m", "from", "--from", "adapter", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["branch"] == "main"
    log = _mintvcs(tmp_path / "work" / "adapter", "log", "--json")
    assert [c["message"] for c in json.loads(log.stdout)] == ["from\n"]
    # One that is not there is named as given, in one usage line.
    missing = _mintvcs(tmp_path, "-C", "work", "commit", "-m", "x", "--from", "../work/nope")
    assert missing.returncode == 2 and "'../work/nope' does not exist" in missing.stderr


def test_an_in_process_call_keeps_its_working_directory(
    tree: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # main() changes directory for the command only: a test or script calling it in-process
    # is back where it was afterwards, also when a later -C fails.
    from mintvcs import cli

    monkeypatch.chdir(tree)
    cli.main(["-C", "a", "-C", "b", "log", "--json"], standalone_mode=False)
    assert [c["message"] for c in json.loads(capsys.readouterr().out)] == ["a/b\n"]
    assert os.getcwd() == str(tree)
    with pytest.raises(SystemExit) as refused:
        cli.main(["-C", "a", "-C", "nope", "status"], standalone_mode=False)
    assert refused.value.code == 128
    assert os.getcwd() == str(tree)
    assert capsys.readouterr().err == "error: cannot change to 'nope': No such file or directory\n"


def test_discovery_stops_at_git_ceiling_directories_as_gits_does(tmp_path: Path) -> None:
    # mintvcs looked for .mint up to / whatever GIT_CEILING_DIRECTORIES said (a CI job's
    # checkout under another repository then committed into that one).
    top = (tmp_path / "top").resolve()
    deep = top / "r" / "sub" / "deep"
    deep.mkdir(parents=True)
    porcelain.init(top / "r", install_hooks=False).close()
    subprocess.run(["git", "init", "-q", str(top / "r")], env=ENV, check=True)  # the oracle
    (top / "link").symlink_to(top / "r")
    r = str(top / "r")
    ceilings = [
        r, r + "/", r + "/sub", r + "/sub/deep", r + "/sub/deep/", str(top), "", "/",
        f"{r}/sub:/nowhere", f"/nowhere:{r}", f"relative/x:{r}/sub", f"{top}/link/sub",
        f":{top}/link/sub", f"{top}/link/sub:", f":{r}/sub/",
    ]  # fmt: skip
    found = []
    for ceiling in ceilings:
        env = {**ENV, "GIT_CEILING_DIRECTORIES": ceiling}
        by_git = subprocess.run(
            ["git", "rev-parse", "--git-dir"], cwd=deep, env=env, capture_output=True, text=True
        )
        ours = subprocess.run(
            [console_script(), "branch"], cwd=deep, env=env, capture_output=True, text=True
        )
        assert "Traceback" not in ours.stderr, ours.stderr
        missing = "not a mintvcs repository" in ours.stderr
        assert missing == (by_git.returncode != 0), (ceiling, ours.stderr, by_git.stderr)
        if missing:
            assert "GIT_CEILING_DIRECTORIES" in ours.stderr, ours.stderr
        found.append(not missing)
    assert found == [False, False, False, True, True, True, True, True] + [False] * 4 + [
        True,
        False,
        False,
    ]
