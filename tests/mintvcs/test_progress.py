"""Counters for long work: shown on a terminal once the command has run a second; fsck, gc,
status, show, diff and checkout report theirs; never under --json or off a terminal. And what
else keeps a large adapter's commands quick: no cyclic collections mid-read, lines written at once."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest

from mintvcs import adapter, maintenance, objects, porcelain, store
from mintvcs.store import Repository
from tests.mintvcs.storekit import ENV, WEIGHTS, handmade_adapter, random_f32, run_on_terminal

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from mintvcs.progress import phase_counter
with phase_counter("job") as step:
    for phase, seconds in (("quick", 0.3), ("slow", 1.6)):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            step(phase, 1)
            time.sleep(0.002)
print("done")
"""


def _on_a_terminal(code: str, *args: str, cwd: Path | None = None) -> bytes:
    """Everything `code` (run with `args`, in `cwd`) writes to a pseudo-terminal 100 columns wide."""
    return run_on_terminal(sys.executable, [sys.executable, "-c", code, *args], ENV, cwd)


def test_phase_counter_shows_a_phase_only_after_a_second() -> None:
    out = _on_a_terminal(_SCRIPT.format(root=str(ROOT))).decode(errors="replace")
    assert "job: slow: " in out and "done" in out, out
    assert "job: quick" not in out, out  # over in 0.3 s: never drawn


def test_fsck_and_gc_report_their_phases(tmp_path: Path) -> None:
    repo = porcelain.init(tmp_path / "work", install_hooks=False)
    rng = np.random.default_rng(0)
    src = handmade_adapter(
        tmp_path / "src",
        {f"w{i}.lora_A.weight": ("F32", [4, 64], random_f32(rng, [4, 64])) for i in range(3)},
    )
    porcelain.commit(repo, "r0", source=src, show_progress=False)
    heard: dict[str, int] = {}

    def hear(phase: str, n: int) -> None:
        heard[phase] = heard.get(phase, 0) + n

    report = maintenance.fsck(repo, progress=hear)
    assert report.ok and report.tensors == 3
    assert heard == {"objects": report.objects, "tensors": 3}
    heard.clear()
    result = maintenance.gc(repo, progress=hear)
    assert heard["checking objects"] == report.objects and result.packed == report.objects
    repo.close()


_SLOW_DIFF = """
import sys, time
sys.path.insert(0, {root!r})
from mintvcs import porcelain
from mintvcs.store import Repository

compare = porcelain._compare

def slow(*args):
    time.sleep(0.25)  # as a large tensor takes
    return compare(*args)

porcelain._compare = slow
result = porcelain.diff(Repository.open({work!r}), "HEAD")
print("done", len(result.tensors))
"""


def test_diff_shows_its_progress_on_a_terminal(tmp_path: Path) -> None:
    # diff of a 2 GB adapter was silent for 10-15 s.
    repo = porcelain.init(tmp_path / "work", install_hooks=False)
    rng = np.random.default_rng(1)
    tensors = {f"w{i}.lora_A.weight": ("F32", [4, 64], random_f32(rng, [4, 64])) for i in range(8)}
    handmade_adapter(tmp_path / "work", tensors)
    porcelain.commit(repo, "r0", show_progress=False)
    code = _SLOW_DIFF.format(root=str(ROOT), work=str(tmp_path / "work"))
    out = _on_a_terminal(code).decode(errors="replace")
    assert "comparing tensors" in out and "done 8" in out, out


_LATE_PHASE = """
import sys, time
sys.path.insert(0, {root!r})
from mintvcs import progress
with progress.command():
    time.sleep(1.2)
    with progress.progress_bar(None, "late", unit=" steps") as step:
        step(1)
        time.sleep(0.05)
    with progress.quiet(), progress.progress_bar(None, "hushed", unit=" steps") as step:
        step(1)
        time.sleep(0.05)
print("done")
"""


def test_a_phase_begun_after_the_commands_first_second_shows_at_once() -> None:
    # A 37k-tensor status read, checked and hashed in phases of under a second each, and a
    # second of silence per phase added up to several before any bar.
    out = _on_a_terminal(_LATE_PHASE.format(root=str(ROOT))).decode(errors="replace")
    assert "late: " in out and "done" in out, out
    assert "hushed" not in out, out


# The CLI with bars drawn at once (a small adapter's reads take milliseconds, a 37k-tensor
# one's seconds), optionally with each tensor comparison slowed down as a large tensor's is.
_CLI = """
import sys, time
sys.path.insert(0, {root!r})
from mintvcs import porcelain, progress
progress.SHOW_AFTER_SECONDS = 0.0
if {slow!r}:
    compare = porcelain._compare

    def slow(*args):
        time.sleep(0.25)
        return compare(*args)

    porcelain._compare = slow
from mintvcs.cli import main
sys.argv[0] = "mintvcs"
main()
"""


def _cli(*args: str, work: Path, slow: bool = False, terminal: bool = True) -> str:
    """What `mintvcs ARGS` writes to a terminal (or, `terminal` False, to pipes: both streams)."""
    code = _CLI.format(root=str(ROOT), slow=slow)
    if terminal:
        return _on_a_terminal(code, *args, cwd=work).decode(errors="replace")
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout + done.stderr


def _committed(tmp_path: Path, count: int = 8) -> tuple[Path, str]:
    """A work tree holding one commit of `count` small tensors, and that commit."""
    repo = porcelain.init(tmp_path / "work", install_hooks=False)
    rng = np.random.default_rng(3)
    tensors = {
        f"w{i}.lora_A.weight": ("F32", [4, 64], random_f32(rng, [4, 64])) for i in range(count)
    }
    handmade_adapter(tmp_path / "work", tensors)
    commit = porcelain.commit(repo, "r0", show_progress=False).commit
    repo.close()
    return tmp_path / "work", commit


def test_status_and_show_report_reading_and_checking_on_a_terminal(tmp_path: Path) -> None:
    # On a 74k-tensor adapter status sat silent for 2.5 s and show for 2.9 s: neither had a bar.
    work, commit = _committed(tmp_path)
    os.utime(work / WEIGHTS)  # not known clean by its stat: status hashes the tensors
    out = _cli("status", work=work)
    assert f"reading {commit[:7]}" in out and "checking work tree" in out, out
    assert "nothing to commit, work tree clean" in out, out
    out = _cli("show", work=work)
    assert f"reading {commit[:7]}" in out and "8 tensors" in out, out


def test_no_bar_under_json_or_off_a_terminal(tmp_path: Path) -> None:
    work, commit = _committed(tmp_path)
    os.utime(work / WEIGHTS)
    for args in (("status", "--json"), ("show", "--json")):
        out = _cli(*args, work=work)
        assert "reading" not in out and "checking" not in out, out
        json.loads(out)  # nothing but the JSON, even on a terminal
        piped = _cli(*args[:1], work=work, terminal=False)
        assert "reading" not in piped and "checking" not in piped, piped
    # Work that takes seconds (diff of large tensors) draws no bar under --json either.
    out = _cli("diff", "HEAD", "--json", work=work, slow=True)
    assert "comparing" not in out and json.loads(out)["a"] == commit, out
    assert "comparing tensors" in _cli("diff", "HEAD", work=work, slow=True)


def test_reading_and_decoding_report_progress_as_they_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 16 MiB steps of 3 kB tensors decoded 5,000 between two reports; a manifest's records
    # were made all before one report.
    monkeypatch.setattr(objects, "_RECORDS_PER_STEP", 3)
    monkeypatch.setattr(store, "_DECODE_CHUNK_TENSORS", 3)
    work, commit = _committed(tmp_path, count=8)
    repo = Repository.open(work)
    made: list[int] = []
    rev = repo.read_revision(commit, made.append)
    assert made == [3, 3, 2, 0, 0]  # then a zero step before each check of the records
    batches: list[int] = []
    into = repo.tensors_into

    def counted(items: list[Any]) -> None:
        batches.append(len(items))
        into(items)

    monkeypatch.setattr(repo, "tensors_into", counted)
    decoded: list[int] = []
    buffer = rev.safetensors_buffer(decoded.append)
    assert batches == [3, 3, 2] and decoded == [3 * 1024, 3 * 1024, 2 * 1024]
    assert bytes(buffer) == (work / WEIGHTS).read_bytes()
    repo.close()


def test_bulk_work_runs_with_the_cyclic_collector_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CPython's collector walked every live object again and again while a 37k-tensor revision
    # was read (25-50% of the read) and decoded (10-20%); diff spent 2.1 s of 6.8 in it.
    work, commit = _committed(tmp_path)
    repo = Repository.open(work)
    seen: dict[str, bool] = {}

    def noting(what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            seen[what] = gc.isenabled()
            return fn(*args, **kwargs)

        return wrapped

    rev = repo.read_revision(commit, lambda _n: seen.setdefault("records", gc.isenabled()))
    rev.safetensors_buffer(lambda _n: seen.setdefault("decoding", gc.isenabled()))
    monkeypatch.setattr(adapter, "parse_layout", noting("layout", adapter.parse_layout))
    monkeypatch.setattr(porcelain, "_compare", noting("diff", porcelain._compare))
    monkeypatch.setattr(repo, "write_revision", noting("encoding", repo.write_revision))
    porcelain.diff(repo, commit)
    porcelain.commit(repo, "again", allow_empty=True, show_progress=False)
    assert seen == dict.fromkeys(("records", "decoding", "layout", "diff", "encoding"), False)
    assert gc.isenabled()
    repo.close()


def test_show_and_diff_write_a_line_per_tensor_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # click.echo flushes each line: 0.5 s of `show` for 37k tensors.
    from mintvcs import cli

    echoed: list[str] = []
    echo = click.echo

    def counted(message: Any = None, *args: Any, **kwargs: Any) -> None:
        echoed.append(str(message))
        echo(message, *args, **kwargs)

    monkeypatch.setattr(click, "echo", counted)
    calls = {}
    for count in (4, 12):
        work, _commit = _committed(tmp_path / str(count), count)
        monkeypatch.chdir(work)
        for args in (["show"], ["diff", "HEAD", "--all"]):
            echoed.clear()
            cli.main(args, standalone_mode=False)
            calls[(args[0], count)] = len(echoed)
            lines = capsys.readouterr().out.splitlines()
            assert sum(" w0.lora_A.weight " in line for line in lines) == 1, lines
            assert sum(".lora_A.weight " in line for line in lines) == count, lines
    assert calls[("show", 4)] == calls[("show", 12)], calls
    assert calls[("diff", 4)] == calls[("diff", 12)], calls
