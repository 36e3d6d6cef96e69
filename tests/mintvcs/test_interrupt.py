"""The CLI under Ctrl-C, closed or full output, and writes the system refuses: as git behaves."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.mintvcs.storekit import (
    CONFIG,
    ENV,
    WEIGHTS,
    handmade_adapter,
    mint,
    mint_fsck_ok,
    random_f32,
)

MINT = [sys.executable, "-m", "mintvcs.cli"]


def _two_sizes(tmp_path: Path) -> Path:
    """A work tree on `main` (a small adapter) with a branch `big` of another config and larger weights."""
    rng = np.random.default_rng(11)
    work = handmade_adapter(
        tmp_path / "work", {"q.lora_A.weight": ("F32", [4, 256], random_f32(rng, [4, 256]))}
    )
    mint(tmp_path, "init", str(work), "--no-hooks")
    mint(work, "commit", "-m", "small")
    mint(work, "branch", "big")
    mint(work, "checkout", "big")
    handmade_adapter(work, {"q.lora_A.weight": ("F32", [64, 256], random_f32(rng, [64, 256]))})
    mint(work, "commit", "-m", "big")
    mint(work, "checkout", "main")
    return work


def _files(work: Path) -> dict[str, bytes]:
    return {name: (work / name).read_bytes() for name in (CONFIG, WEIGHTS)}


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a bash script in `cwd`, its output captured."""
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=ENV, capture_output=True, text=True, check=True
    )


def _clean(work: Path) -> bool:
    return json.loads(mint(work, "status", "--json").stdout)["changes"] == []


def test_ctrl_c_stops_a_shell_loop_of_commands(tmp_path: Path) -> None:
    # mintvcs exited 130 on Ctrl-C, which bash takes for a command that handled the signal:
    # a script's loop went on to its next command. git dies of SIGINT, and the loop stops.
    rng = np.random.default_rng(3)
    work = handmade_adapter(
        tmp_path / "work", {"q.lora_A.weight": ("F32", [4, 64], random_f32(rng, [4, 64]))}
    )
    mint(tmp_path, "init", str(work), "--no-hooks")
    hook = work / ".mint" / "hooks" / "pre-commit"
    hook.parent.mkdir(exist_ok=True)
    marker = tmp_path / "in-hook"
    hook.write_text(f"#!/bin/sh\ntouch '{marker}'\nsleep 30\n")
    hook.chmod(0o755)
    mint_cmd = " ".join(MINT)
    loop = f"for i in 1 2; do {mint_cmd} commit -m x; echo after $i; done; echo finished"
    proc = subprocess.Popen(
        ["bash", "-c", loop],
        cwd=work,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which Ctrl-C signals as a whole
        # As from a terminal: a test run started in the background (`make test &` in a script)
        # ignores SIGINT, and an ignored signal stays ignored in every child.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert out == ""  # the loop stopped: no "after 1", no second commit, no "finished"
    assert "interrupted" in err and "Traceback" not in err
    assert proc.returncode == 128 + signal.SIGINT or proc.returncode == -signal.SIGINT
    assert not list((work / ".mint").rglob("*.lock"))
    mint_fsck_ok(work)


def test_a_closed_stdout_is_no_failure(tmp_path: Path) -> None:
    # Python has no sys.stdout then: the branch was created, then a traceback and exit 1.
    work = _two_sizes(tmp_path)
    done = _bash(" ".join(MINT) + " branch feat >&-; echo rc=$?", work)
    assert done.stdout == "rc=0\n" and "Traceback" not in done.stderr
    assert "feat" in mint(work, "branch").stdout


def test_version_into_a_full_or_closed_output(tmp_path: Path) -> None:
    with open("/dev/full", "w") as output:
        full = subprocess.run(
            [*MINT, "--version"], stdout=output, stderr=subprocess.PIPE, env=ENV, text=True
        )
    assert full.returncode == 128
    assert full.stderr == "error: write failure on 'stdout': No space left on device\n"
    gone = _bash(" ".join(MINT) + " --help | (exec 0<&-; sleep 1); echo ${PIPESTATUS[0]}", tmp_path)
    assert gone.stdout == "141\n" and gone.stderr == ""


def test_a_full_stdout_or_stderr_is_handled_as_git_handles_it(tmp_path: Path) -> None:
    # "error: No space left on device", exit 1: a commit whose --json went to a full disk read
    # as a commit that failed on one, though it was made. git: "write failure on 'stdout'", 128.
    work = _two_sizes(tmp_path)
    handmade_adapter(
        work, {"q.lora_A.weight": ("F32", [4, 256], np.ones([4, 256], "<f4").tobytes())}
    )
    for args in (("commit", "-m", "ones", "--json"), ("log",), ("log", "--json"), ("branch",)):
        with open("/dev/full", "w") as output:
            full = subprocess.run(
                [*MINT, *args], cwd=work, stdout=output, stderr=subprocess.PIPE, env=ENV, text=True
            )
        assert full.returncode == 128, (args, full.stderr)
        assert full.stderr == "error: write failure on 'stdout': No space left on device\n", args
    assert mint(work, "log", "--oneline", "-1").stdout.endswith(" ones\n")
    assert _clean(work)
    # An error that a full stderr cannot take still exits with its status (a traceback that
    # went nowhere made it 1).
    with open("/dev/full", "w") as errors:
        lost = subprocess.run(
            [*MINT, "show", "nonexist"], cwd=work, capture_output=False, stderr=errors, env=ENV
        )
    assert lost.returncode == 128


def test_a_checkout_that_fails_part_way_writes_the_old_revision_back(tmp_path: Path) -> None:
    # The new config was in place when the weights could not be written: the work tree held
    # big's config beside main's weights, and `checkout main` said "Already on 'main'".
    work = _two_sizes(tmp_path)
    before = _files(work)
    limit = (len(before[WEIGHTS]) + 64 * 256 * 4) // 2  # over main's weights, under big's

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = subprocess.run(
        [*MINT, "checkout", "big"],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        check=False,
    )
    assert failed.returncode == 1 and failed.stderr == "error: File too large\n"
    assert _files(work) == before
    assert _clean(work)
    assert json.loads(mint(work, "status", "--json").stdout)["branch"] == "main"
    mint(work, "checkout", "big")  # with room, it works
    assert json.loads((work / CONFIG).read_bytes())["r"] == 64


def test_a_read_only_work_tree_is_named_in_the_error(tmp_path: Path) -> None:
    # The error named the temporary in .mint (writable), not the work tree that refused.
    work = _two_sizes(tmp_path)
    before = _files(work)
    command = [*MINT, "checkout", "big"]
    if os.geteuid() == 0:  # root writes anywhere unless it gives up that capability
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root's capabilities")
        drop = "--bounding-set=-dac_override,-dac_read_search,-fowner"
        command = ["setpriv", "--inh-caps=-all", drop, "--", *command]
    for path in (work, work / CONFIG, work / WEIGHTS):
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        failed = subprocess.run(
            command, cwd=work, env=ENV, capture_output=True, text=True, check=False
        )
    finally:
        for path in (work, work / CONFIG, work / WEIGHTS):
            path.chmod(path.stat().st_mode | 0o200)
    assert failed.returncode == 1
    assert failed.stderr == f"error: Permission denied: {work / CONFIG}\n"
    assert _files(work) == before
    assert not [p for p in (work / ".mint").iterdir() if p.name.endswith(".tmp")]


# `mintvcs gc` with the address space it has once loaded, plus argv[1] bytes.
GC_WITH_LITTLE_MEMORY = textwrap.dedent(
    """
    import resource, sys
    import dulwich.pack, numpy, zstandard
    from mintvcs import cli, maintenance, store

    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    room = size * 1024 + int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (room, room))
    cli.main(["gc"])
    """
)


def test_gc_short_of_memory_says_so_not_that_the_store_is_corrupt(tmp_path: Path) -> None:
    # A pack that did not fit in a process's address space was reported as every object in
    # it corrupt, with "restore the object from a clone or backup".
    rng = np.random.default_rng(13)
    work = handmade_adapter(
        tmp_path / "work",
        {"q.lora_A.weight": ("F32", [2048, 4096], random_f32(rng, [2048, 4096]))},
    )
    mint(tmp_path, "init", str(work), "--no-hooks")
    mint(work, "commit", "-m", "big")
    mint(work, "gc")
    packs = sorted((work / ".mint" / "objects" / "pack").glob("*.pack"))
    assert packs and packs[-1].stat().st_size > 16 << 20
    short = subprocess.run(
        [sys.executable, "-c", GC_WITH_LITTLE_MEMORY, str(4 << 20)],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    assert short.returncode != 0 and "Traceback" not in short.stderr
    assert len(short.stderr.splitlines()) == 1 and "corrupt" not in short.stderr
    assert "memory" in short.stderr
    assert sorted((work / ".mint" / "objects" / "pack").glob("*.pack")) == packs
    mint_fsck_ok(work)
