"""The command line as a shell script meets it: pipes, exit statuses, empty arguments, JSON keys."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mintvcs.storekit import ENV, copy_adapter, git, loose_path, mint

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
