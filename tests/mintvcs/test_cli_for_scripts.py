"""The command line as a shell script meets it: pipes, exit statuses, empty arguments, JSON keys."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.mintvcs.storekit import (
    ENV,
    commit_with_manifest_files,
    copy_adapter,
    count_reads,
    git,
    hostile_commit,
    loose_path,
    mint,
    mint_fails,
)

MINT = f"'{sys.executable}' -m mintvcs.cli"


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory, peft_adapter: Path) -> Path:
    """A repository of 40 revisions, 80 branches and 80 tags: listings of many short lines,
    each under 4 kB, and a tip whose message has 80 lines."""
    from mintvcs import porcelain

    work = copy_adapter(peft_adapter, tmp_path_factory.mktemp("listed") / "work")
    repo = porcelain.init(work, None, install_hooks=False)
    for i in range(39):
        porcelain.commit(repo, f"r{i}", verify=False, show_progress=False, allow_empty=True)
    lines = "\n".join(f"line {i}" for i in range(80))
    porcelain.commit(repo, f"tip\n\n{lines}", verify=False, show_progress=False, allow_empty=True)
    for i in range(80):
        porcelain.branch_create(repo, f"b{i:02}", f"HEAD~{i % 40}")
        porcelain.tag_create(repo, f"t{i:02}", f"HEAD~{i % 40}")
    repo.close()
    return work


@pytest.mark.slow
def test_a_small_output_into_a_reader_of_one_line_exits_0(listed: Path) -> None:
    # click.echo wrote each line with a write() of its own: `| head -1` took the first and went,
    # and the next write died of SIGPIPE (141), about two runs in three; under `set -o pipefail`
    # `latest=$(mintvcs log --oneline | head -1)` failed at random. git writes an output that
    # fits its stdio buffer in one write, before the reader can go.
    commands = ["branch", "tag", "log --oneline", "log --json -n 6", "show"]
    for command in commands:
        out = subprocess.run(
            f"{MINT} {command}", shell=True, cwd=listed, env=ENV, capture_output=True, check=True
        ).stdout
        assert out.count(b"\n") >= 40 and len(out) < 4096, (command, out)
    script = "set -o pipefail\nfor i in $(seq 10); do\n" + "".join(
        f"  {MINT} {command} | head -1 >/dev/null || echo '{command}' $?\n" for command in commands
    )
    done = subprocess.run(
        ["bash", "-c", script + "done\n"], cwd=listed, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done


def test_output_printed_before_a_failure_still_reaches_the_pipe(
    listed: Path, tmp_path: Path
) -> None:
    # stdout is held until the command ends: what it printed before an error (show's lines
    # before an extra file whose blob is gone), or before its own exit status (fsck's report,
    # `branch -d` of a name not there), must still be written, and a reader gone by then must
    # end it by SIGPIPE, quietly, not with Python's "Exception ignored" and status 120.
    work = tmp_path / "work"
    shutil.copytree(listed, work)
    (work / "zz-notes.txt").write_text(f"{work}\n")
    mint(work, "commit", "-m", "notes", "--no-verify")
    loose_path(
        work, git(work / ".mint", "rev-parse", "HEAD:files/zz-notes.txt").stdout.strip()
    ).unlink()
    shown = mint(work, "show", ok=False)
    assert shown.returncode == 1 and shown.stderr.endswith("is missing from the store\n")
    assert shown.stdout.startswith("commit ") and "file README.md" in shown.stdout
    deleted = mint(work, "branch", "-d", "b00", "nope", ok=False)
    assert deleted.returncode == 1 and deleted.stdout.startswith("Deleted branch b00 (was ")
    report = mint(work, "fsck", ok=False)
    assert report.returncode == 1 and report.stdout.startswith("checked ")
    for args in (("show",), ("fsck",), ("branch", "-d", "b01", "nope")):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader went before anything was written
        done = subprocess.run(
            [sys.executable, "-m", "mintvcs.cli", *args],
            cwd=work,
            env=ENV,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(write_end)
        assert done.returncode == -signal.SIGPIPE, (args, done)
        assert done.stderr.startswith("error: ") and "Exception" not in done.stderr, done.stderr


def test_tag_listing_leaves_a_broken_tag_out_and_lists_the_others(
    listed: Path, tmp_path: Path
) -> None:
    # One tag whose object is missing made every listing fail (exit 1, nothing on stdout, the
    # tag unnamed), `tag -l t01` and `tag --json` too; branch listings went on past such a ref.
    work = tmp_path / "work"
    shutil.copytree(listed, work)
    mint(work, "tag", "-m", "annotated", "ann", "HEAD~2")
    (work / ".mint" / "refs" / "tags" / "bad").write_text("11" * 20 + "\n")
    listed_text = mint(work, "tag")
    assert listed_text.stdout.split() == ["ann", *(f"t{i:02}" for i in range(80))]
    assert "warning: ignoring ref refs/tags/bad: object 1111" in listed_text.stderr
    rows = json.loads(mint(work, "tag", "--json").stdout)
    assert "bad" not in {row["name"] for row in rows} and len(rows) == 81
    # A pattern that leaves the broken tag out does not read it: no warning.
    assert mint(work, "tag", "-l", "t01").stdout == "t01\n"
    assert mint(work, "tag", "-l", "t01", "--json").stderr == ""
    # An annotated tag whose commit is gone is left out the same way, named.
    commit = json.loads(mint(work, "tag", "-l", "ann", "--json").stdout)[0]["commit"]
    loose_path(work, commit).unlink()
    # (t02, a lightweight tag of the same commit, too).
    gone = mint(work, "tag", "-l", "ann", "t0*")
    assert gone.stdout.split() == [f"t{i:02}" for i in range(10) if i != 2]
    warned = [line.split(":")[1] for line in gone.stderr.splitlines()]
    assert warned == [" ignoring ref refs/tags/ann", " ignoring ref refs/tags/t02"]


def test_tag_json_says_which_tags_are_annotated_with_the_same_keys_listed_and_made(
    listed: Path, tmp_path: Path
) -> None:
    # The listing gave only what an annotated tag names (`object` equal to `commit`), so a
    # script could not tell it from a lightweight one nor get the tag object `tag -m --json`
    # printed as `value`; the two reports had different keys.
    work = tmp_path / "work"
    shutil.copytree(listed, work)
    made = json.loads(mint(work, "tag", "--json", "-m", "msg", "ann", "HEAD~1").stdout)
    light = json.loads(mint(work, "tag", "--json", "light", "HEAD~1").stdout)
    target = git(work / ".mint", "rev-parse", "HEAD~1").stdout.strip()
    tag_object = git(work / ".mint", "rev-parse", "refs/tags/ann").stdout.strip()
    assert git(work / ".mint", "cat-file", "-t", tag_object).stdout == "tag\n"
    assert made == {
        "name": "ann",
        "value": tag_object,
        "annotated": True,
        "commit": target,
        "object": target,
        "type": "commit",
    }
    assert light == made | {"name": "light", "value": target, "annotated": False}
    rows = {row["name"]: row for row in json.loads(mint(work, "tag", "--json").stdout)}
    assert rows["ann"] == made and rows["light"] == light


@pytest.mark.parametrize(
    "args",
    [
        ("init", ""),
        ("init", "", "--base-model", "org/model"),
        ("serve", "--repo", "", "--base-model", "."),
        ("demo", "--workdir", ""),
        ("demo", "--cache-dir", ""),
    ],
)
def test_an_empty_directory_argument_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    # `init "$DIR"` with DIR unset made the current directory a repository (and so every
    # directory below it part of one); `serve --repo "$REPO"` served the current directory.
    # git refuses `git init ""`.
    refused = mint(tmp_path, *args, ok=False)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: Invalid value for ") and "empty" in refused.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (("commit", "-m"), "commit"),
        (("log", "-n"), "log"),
        (("checkout", "-b"), "checkout"),
        (("show", "--json=1"), "show"),
        (("serve", "--port"), "serve"),
    ],
)
def test_an_option_without_its_value_names_the_commands_help(
    tmp_path: Path, args: tuple[str, ...], command: str
) -> None:
    # click raises these without a context, and the error named `mintvcs --help`.
    refused = mint(tmp_path, *args, ok=False)
    assert refused.returncode == 2
    assert refused.stderr.endswith(f"mintvcs.cli {command} --help')\n"), refused.stderr


def test_ctrl_c_while_the_command_line_loads_prints_no_traceback(listed: Path) -> None:
    # The console script imported mintvcs.cli (click, json, ...) before any handler was in
    # place: Ctrl-C in its first ~50 ms printed a traceback. The interrupt arrives here while
    # click is being imported, as the installed `mintvcs` script loads it.
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    entry = pyproject["project"]["scripts"]["mintvcs"]
    module, _, function = entry.partition(":")
    script = textwrap.dedent(
        f"""
        import builtins, os, signal, sys
        real_import = builtins.__import__
        def interrupting_import(name, *args, **kwargs):
            if name == "click":
                builtins.__import__ = real_import
                os.kill(os.getpid(), signal.SIGINT)
            return real_import(name, *args, **kwargs)
        builtins.__import__ = interrupting_import
        sys.argv[0] = "mintvcs"
        from {module} import {function}
        sys.exit({function}())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "status"],
        cwd=listed,
        env=ENV,
        capture_output=True,
        text=True,
        # As from a terminal: an ignored SIGINT (a test run in the background) stays ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert done.stderr == "interrupted\n" and done.stdout == ""
    assert done.returncode == -signal.SIGINT
    # The script runs a command as before.
    ran = subprocess.run(
        [sys.executable, "-c", script.replace('"click"', '"no such module"'), "branch"],
        cwd=listed,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0 and "* main" in ran.stdout


def test_checkout_says_where_it_went_on_stderr(listed: Path, tmp_path: Path) -> None:
    # As git's: stdout is for data, and a checkout prints none.
    work = tmp_path / "work"
    shutil.copytree(listed, work)
    for args, said in [
        (("b05",), "Switched to branch 'b05'\n"),
        (("b05",), "Already on 'b05'\n"),
        (("-b", "fresh", "HEAD~1"), "Switched to a new branch 'fresh'\n"),
        (
            ("t03",),
            f"HEAD is now at {git(work / '.mint', 'rev-parse', 't03').stdout[:7]} (detached)\n",
        ),
    ]:
        done = mint(work, "checkout", "--force", *args)
        assert (done.stdout, done.stderr) == ("", said)


def test_json_reports_name_the_revision_and_the_author_date_as_the_others_do(
    listed: Path, tmp_path: Path
) -> None:
    # status named HEAD's revision `head` where every other command says `commit`; commit gave
    # `parent` where log and show give `parents`; JSON had no author date, which the text shows.
    work = tmp_path / "work"
    shutil.copytree(listed, work)
    state = json.loads(mint(work, "status", "--json").stdout)
    assert (
        state["commit"] == state["head"] == git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    )
    date = {"GIT_AUTHOR_DATE": "1767225600 +0130"}
    made = json.loads(mint(work, "commit", "-m", "x", "--allow-empty", "--json", env=date).stdout)
    assert made["parents"] == [made["parent"]] == [state["head"]]
    logged = json.loads(mint(work, "log", "--json", "-n", "1").stdout)[0]
    shown = json.loads(mint(work, "show", "--json").stdout)
    for item in (logged, shown):
        assert (item["author_time"], item["author_timezone"]) == (1767225600, 5400)
    assert "Date:   Thu Jan 1 01:30:00 2026 +0130" in mint(work, "show").stdout


def test_init_no_hooks_says_it_installs_none(tmp_path: Path) -> None:
    # Its help named only the pre-commit hook; the update hook and the samples go too.
    mint(tmp_path, "init", "r", "--no-hooks")
    assert list((tmp_path / "r" / ".mint" / "hooks").glob("*")) == []
    helped = " ".join(mint(tmp_path, "init", "--help").stdout.split())
    assert (
        "--no-hooks Install no hooks: not the validating pre-commit, not the update hook" in helped
    )


def test_help_into_a_closed_pipe_or_a_full_disk_is_answered_as_other_output(listed: Path) -> None:
    # --help's output was held and written at interpreter exit, past the handling of a closed
    # reader: "Exception ignored ... BrokenPipeError" and exit 120, where 141 (SIGPIPE) was.
    piped = subprocess.run(
        ["bash", "-c", f"{MINT} log --help | true; echo ${{PIPESTATUS[0]}}"],
        cwd=listed,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert piped.stdout.strip() in ("0", "141") and piped.stderr == "", piped
    with open("/dev/full", "w") as full:
        ran = subprocess.run(
            [sys.executable, "-m", "mintvcs.cli", "log", "--help"],
            cwd=listed,
            env=ENV,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert ran.returncode == 128, ran.stderr
    assert ran.stderr == "error: write failure on 'stdout': No space left on device\n"


def test_mintvcs_alone_prints_its_help_on_stdout(tmp_path: Path) -> None:
    # It went to stderr: `mintvcs > out.txt` left out.txt empty, `mintvcs | less` showed
    # nothing. git alone prints its usage on stdout too (exit 1; mintvcs's usage status is 2).
    alone = mint(tmp_path, ok=False)
    assert (alone.returncode, alone.stderr) == (2, ""), alone
    assert alone.stdout.startswith("Usage: ") and "Commands:" in alone.stdout, alone.stdout
    assert alone.stdout == mint(tmp_path, "--help").stdout
    git_alone = subprocess.run(["git"], env=ENV, capture_output=True, text=True)
    assert git_alone.stdout.startswith("usage: git") and git_alone.stderr == "", git_alone
    with open("/dev/full", "w") as full:
        ran = subprocess.run(
            [sys.executable, "-m", "mintvcs.cli"],
            env=ENV,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert ran.returncode == 128, ran.stderr
    assert ran.stderr == "error: write failure on 'stdout': No space left on device\n"


def test_a_removed_working_directory_is_named_as_git_names_it(tmp_path: Path) -> None:
    # A cron job or CI step whose directory an earlier step removed got "error: No such file
    # or directory", exit 1, naming nothing; git says why and exits 128.
    gone = tmp_path / "gone"
    script = f'mkdir {gone} && cd {gone} && rmdir {gone} && exec "$@"'
    for argv in (["git", "status"], [sys.executable, "-m", "mintvcs.cli", "status"]):
        done = subprocess.run(
            ["sh", "-c", script, "sh", *argv], env=ENV, capture_output=True, text=True
        )
        assert done.returncode == 128, done.stderr
        assert "nable to read current working directory: No such file or directory" in done.stderr


def strict_json(text: str) -> Any:
    """`text` parsed as a strict JSON reader (jq, Go, Rust) parses it: Python's reader takes a
    lone surrogate escape (`"\\ud800"`), which they refuse."""
    parsed = json.loads(text)
    json.dumps(parsed, ensure_ascii=False).encode("utf-8")  # a lone surrogate: UnicodeEncodeError
    return parsed


def test_meta_holding_a_lone_surrogate_is_refused_as_a_tensor_name_is(work: Path) -> None:
    # Another tool's manifest may spell a lone surrogate in its meta: log --json repeated the
    # escape, and jq refused the whole listing of any history holding it; fsck said ok.
    bad = commit_with_manifest_files(
        work, [], edit_manifest=lambda m: m.update(meta={"k\udcff": "v\ud800"})
    )
    listed = strict_json(mint(work, "log", "--json", "-n", "2", "hostile").stdout)
    assert listed[0]["commit"] == bad and listed[0]["meta"] is None
    assert "lone surrogate" in listed[0]["meta_error"]
    assert listed[1]["meta"] == {}
    assert "lone surrogate" in mint_fails(work, "show", "--json", bad)
    fsck = mint(work, "fsck", ok=False)
    assert fsck.returncode == 1 and "lone surrogate" in fsck.stderr


def test_meta_values_other_tools_wrote_as_other_json_read_as_their_json_text(work: Path) -> None:
    # {"a": null, "b": 1, "c": [1]} came out as Python spells them: "None", "1", "[1]".
    meta = {"a": None, "b": 1.5, "c": [1, "\u00e9"], "d": True, "e": "text"}
    bad = commit_with_manifest_files(work, [], edit_manifest=lambda m: m.update(meta=meta))
    expected = {"a": "null", "b": "1.5", "c": '[1, "\u00e9"]', "d": "true", "e": "text"}
    assert strict_json(mint(work, "log", "--json", "-n", "1", bad).stdout)[0]["meta"] == expected
    assert strict_json(mint(work, "show", "--json", bad).stdout)["meta"] == expected
    assert "meta d: true" in mint(work, "show", bad).stdout


def test_a_config_holding_a_lone_surrogate_is_refused_and_shown_as_strict_json(work: Path) -> None:
    # Python and PEFT load "\ud800" in adapter_config.json: commit stored it, and show --json
    # repeated the escape, which strict JSON readers refuse.
    config_path = work / "adapter_config.json"
    config = json.loads(config_path.read_bytes())
    config_path.write_text(json.dumps({**config, "note": "x\ud800"}))
    line = mint_fails(work, "commit", "-m", "odd config", "--no-verify")
    assert "lone surrogate" in line and "adapter_config.json" in line, line
    # A revision holding one (an earlier mintvcs's, another tool's) shows it as U+FFFD.
    from mintvcs.store import Repository

    repo = Repository.open(work)
    blob = repo.add_blob(config_path.read_bytes())
    repo.close()
    odd = hostile_commit(work, {"adapter_config.json": blob})
    shown = mint(work, "show", "--json", odd)
    assert strict_json(shown.stdout)["config"]["note"] == "x\ufffd"
    assert "lone surrogate" in shown.stderr


def test_log_pages_stop_doubling_at_their_cap(
    listed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each page was twice the last without end: a long history's log held half of it at once
    # (~1 KB a commit, 178 MB for 10^5 commits). Scaled down: pages of 2, 4, then 8 at most.
    from mintvcs import cli, porcelain
    from mintvcs.store import Repository

    monkeypatch.setattr(cli, "LOG_FIRST_PAGE", 2)
    monkeypatch.setattr(cli, "LOG_MAX_PAGE", 8)
    with Repository.open(listed) as repo:
        start = porcelain.log_tips(repo, (), all_refs=False)
        pages = [page for page, _labels in cli._log_pages(repo, start, None)]
    assert [len(page) for page in pages] == [2, 4, 8, 8, 8, 8, 2]
    listed_ids = [c.id for page in pages for c in page]
    assert listed_ids == git(listed / ".mint", "log", "--format=%H").stdout.split()


def test_log_json_reads_each_commit_once_and_parses_no_tensor_records(
    listed: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # For each commit's meta, log --json read the commit again (the walk had it) and parsed
    # the whole manifest (6 MB for 20k tensors, 0.15-0.3 s a revision), though `meta` is
    # near its start: 36 s for 10^5 commits where log --oneline takes 4.
    from mintvcs import cli, porcelain
    from mintvcs.store import Repository

    parsed: list[bytes | str] = []
    loads = json.loads

    def spying(data: bytes | str, *args: Any, **kwargs: Any) -> Any:
        parsed.append(data)
        return loads(data, *args, **kwargs)

    with Repository.open(listed) as repo:
        head = repo.head_commit() or ""
        tree = repo.commit_info(head).tree
        manifest = repo.read_revision(head).manifest.to_bytes()
        start = porcelain.log_tips(repo, (), all_refs=False)
        reads = count_reads(repo, monkeypatch)
        monkeypatch.setattr(json, "loads", spying)
        cli._log_json(repo, start, None)
        monkeypatch.undo()
    items = json.loads(capsys.readouterr().out)
    commits = [item["commit"] for item in items]
    assert commits == git(listed / ".mint", "log", "--format=%H").stdout.split()
    assert all(reads.count(commit) == 1 for commit in commits), reads
    assert reads.count(tree) == 1  # the 40 revisions share their tree: one read for all
    assert parsed and manifest not in parsed
    assert all(item["meta"] == {} for item in items)


def test_meta_is_read_from_any_layout_as_a_whole_parse_reads_it(work: Path) -> None:
    # The tensor records are skipped only in the layout mintvcs writes; another writer's
    # manifest (indented, its keys in another order, `meta` twice) reads as json.loads reads it.
    from mintvcs.objects import Manifest
    from mintvcs.store import Repository

    with Repository.open(work) as repo:
        ours = repo.read_revision(repo.head_commit() or "").manifest.to_bytes()
    whole = json.loads(ours)
    whole["meta"] = {"step": "7"}
    twice = ours.replace(b'"meta": {}', b'"meta": {"a": "first"}')
    twice = twice[: twice.rindex(b"]") + 1] + b', "meta": {"a": "last"}}\n'
    layouts = [
        json.dumps(whole).encode(),
        json.dumps(whole, indent=2).encode(),
        json.dumps({"tensors": whole.pop("tensors"), **whole}, indent=1).encode(),
        twice,
    ]
    for data in layouts:
        assert Manifest.meta_from_bytes(data) == json.loads(data)["meta"], data[:200]
    assert Manifest.meta_from_bytes(twice) == {"a": "last"}


def test_json_output_holding_a_lone_surrogate_is_an_error_not_invalid_json() -> None:
    # The backstop behind each source's own check: output with a lone surrogate escape is
    # refused whole by jq, so one error line is printed in its place.
    from mintvcs import cli
    from mintvcs.errors import MintError

    assert json.loads(cli._json_text({"emoji": "\U0001f600"})) == {"emoji": "\U0001f600"}
    assert json.loads(cli._json_text({"text": "\\ud800"})) == {"text": "\\ud800"}
    with pytest.raises(MintError, match="lone surrogate"):
        cli._json_text({"meta": {"k": "v\ud800"}})
