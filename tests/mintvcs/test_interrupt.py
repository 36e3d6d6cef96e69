"""The CLI under Ctrl-C, closed or full output, and writes the system refuses: as git behaves."""

from __future__ import annotations

import dis
import itertools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

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


def _with_file_size_limit(work: Path, limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`mintvcs ARGS` in `work` with no file written past `limit` bytes (a full disk, nearly)."""

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [*MINT, *args],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        check=False,
    )


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

    failed = _with_file_size_limit(work, limit, "checkout", "big")
    assert failed.returncode == 1
    assert failed.stderr == f"error: unable to write: File too large: {work / WEIGHTS}\n"
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


# --------------------------------------------- a work tree or repository it may not write
def _left_behind(tmp_path: Path) -> tuple[Path, str, str]:
    """A work tree at r0 (with sub/notes.txt) whose branch main a trainer's `commit --from`
    has moved on to r1 since: the work tree is left behind, and says so."""
    rng = np.random.default_rng(21)
    work = handmade_adapter(
        tmp_path / "work", {"q.lora_A.weight": ("F32", [4, 64], random_f32(rng, [4, 64]))}
    )
    (work / "sub").mkdir()
    (work / "sub" / "notes.txt").write_text("r0\n")
    mint(tmp_path, "init", str(work), "--no-hooks")
    mint(work, "commit", "-m", "r0")
    checkpoint = shutil.copytree(
        work, tmp_path / "checkpoint", ignore=shutil.ignore_patterns(".mint")
    )
    handmade_adapter(checkpoint, {"q.lora_A.weight": ("F32", [4, 64], random_f32(rng, [4, 64]))})
    (checkpoint / "sub" / "notes.txt").write_text("r1\n")
    mint(work, "commit", "-m", "r1", "--from", str(checkpoint))
    state = json.loads(mint(work, "status", "--json").stdout)
    assert state["base"] is not None and state["base"] != state["head"]
    return work, state["base"], state["head"]


def _record(work: Path) -> bytes:
    return (work / ".mint" / "mint-worktree.json").read_bytes()


def _in_read_only_view(
    tmp_path: Path, work: Path, commands: list[list[str]], *, mint_writable: bool
) -> list[tuple[int, str]]:
    """Run each `mintvcs` command in tmp_path/view, a read-only bind mount of `work` (with its
    `.mint` bound writable over it when `mint_writable`), in a mount namespace of its own: the
    mounts end with it. (exit status, stderr) of each."""
    view = tmp_path / "view"
    view.mkdir()
    lines = [
        "set -e",
        f"mount --bind '{work}' '{view}'",
        f"mount -o remount,bind,ro '{view}'",
    ]
    if mint_writable:
        lines.append(f"mount --bind '{work / '.mint'}' '{view / '.mint'}'")
    lines += ["set +e", f"cd '{view}'"]
    for n, args in enumerate(commands):
        quoted = " ".join(f"'{a}'" for a in args)
        lines.append(
            f"{sys.executable} -m mintvcs.cli {quoted} 2>'{tmp_path}/err{n}'; "
            f"echo $? >'{tmp_path}/rc{n}'"
        )
    ran = subprocess.run(
        ["unshare", "-m", "bash", "-c", "\n".join(lines)],
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    if ran.returncode != 0 or not (tmp_path / "rc0").exists():
        pytest.skip(f"needs a read-only bind mount (root, unshare): {ran.stderr.strip()}")
    return [
        (int((tmp_path / f"rc{n}").read_text()), (tmp_path / f"err{n}").read_text())
        for n in range(len(commands))
    ]


def test_a_checkout_that_cannot_write_the_work_tree_keeps_its_record(tmp_path: Path) -> None:
    # A read-only work tree (a read-only volume), `.mint` writable: checkout, checkout --force
    # and reset --hard failed having changed nothing, but had removed the work-tree record
    # first. The work tree left behind by a trainer's `commit --from` was then no longer known
    # to be: a plain commit put its old weights back on top of main. And the error named a
    # temporary that never existed (`view/.adapter_config.json.tdrs5t13.tmp`).
    work, r0, r1 = _left_behind(tmp_path)
    record, before = _record(work), _files(work)
    commands = [["checkout", "HEAD~1"], ["checkout", "--force", "main"], ["reset", "--hard", r0]]
    results = _in_read_only_view(tmp_path, work, commands, mint_writable=True)
    for rc, stderr in results:
        assert (rc, stderr) == (1, f"error: Read-only file system: {tmp_path / 'view' / CONFIG}\n")
    assert _record(work) == record and _files(work) == before
    state = json.loads(mint(work, "status", "--json").stdout)
    assert (state["base"], state["head"], state["mixed"]) == (r0, r1, None)
    failed = mint(work, "commit", "-m", "plain", ok=False)
    assert failed.returncode == 1 and f"holds revision {r0[:7]}, but main" in failed.stderr
    assert json.loads(mint(work, "status", "--json").stdout)["head"] == r1


def test_a_repository_on_a_read_only_volume_names_what_it_cannot_write(tmp_path: Path) -> None:
    # Object writers named a random temporary (`.mint/objects/1c/tmp_obj_kftr4cvl`,
    # `.mint/objects/pack/tmp_pack_4pszwcca`) where the directory could not be written.
    work, _r0, _r1 = _left_behind(tmp_path)
    mint(work, "branch", "side")
    objects = work / ".mint" / "objects"
    for i in range(256):  # every fan-out directory there: the object's temporary is refused
        (objects / f"{i:02x}").mkdir(exist_ok=True)
    rng = np.random.default_rng(5)
    many = {
        f"layers.{i}.q.lora_{ab}.weight": ("F32", shape, random_f32(rng, shape))
        for i in range(60)
        for ab, shape in (("A", [4, 8]), ("B", [8, 4]))
    }
    big = handmade_adapter(tmp_path / "big", many)  # a pack's worth of tensors
    commands = [
        ["tag", "-m", "m", "nt"],
        ["commit", "-m", "m", "--from", str(big), "--branch", "side", "--no-verify"],
        ["gc"],
    ]
    (tag, tag_err), (pack, pack_err), (gc, gc_err) = _in_read_only_view(
        tmp_path, work, commands, mint_writable=False
    )
    view = tmp_path / "view" / ".mint"
    prefix = "error: Read-only file system: "
    assert tag == 1 and tag_err.startswith(prefix), tag_err
    named = Path(tag_err.strip().removeprefix(prefix))
    assert named.parent == view / "objects" and len(named.name) == 2, tag_err
    assert (pack, pack_err) == (1, f"{prefix}{view / 'objects' / 'pack'}\n")
    assert (gc, gc_err) == (1, f"{prefix}{view}\n")


def _unprivileged(command: list[str]) -> list[str]:
    """`command` so that file modes bind it: as root, through setpriv without the capabilities
    that let root write anything (skipped where there is no setpriv)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop root's capabilities")
    drop = "--bounding-set=-dac_override,-dac_read_search,-fowner"
    return ["setpriv", "--inh-caps=-all", drop, "--", *command]


def _mint_unprivileged(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _unprivileged([*MINT, *args]), cwd=work, env=ENV, capture_output=True, text=True
    )


def test_a_checkout_that_fails_part_way_and_cannot_undo_it_claims_no_base(
    tmp_path: Path,
) -> None:
    # A directory of the work tree it may not write: the config and weights are replaced,
    # sub/notes.txt is refused, and writing the old revision back is refused there too. No
    # record may then claim a base the work tree no longer holds, and a plain commit of the
    # mix (which may hold the trainer's older files) is still refused.
    work, r0, r1 = _left_behind(tmp_path)
    (work / "sub").chmod(0o555)
    try:
        failed = _mint_unprivileged(work, "checkout", "--force", "main")
    finally:
        (work / "sub").chmod(0o755)
    assert failed.returncode == 1
    assert failed.stderr == f"error: Permission denied: {work / 'sub' / 'notes.txt'}\n"
    record = json.loads(_record(work))
    assert record["commit"] is None and sorted(record["mixes"]) == sorted([r0, r1])
    state = json.loads(mint(work, "status", "--json").stdout)
    assert state["base"] is None and sorted(state["mixed"]) == sorted([r0, r1])
    assert (
        "stopped part-way and could not write the old revision back" in mint(work, "status").stdout
    )
    line = mint(work, "commit", "-m", "plain", ok=False).stderr
    assert "stopped part-way" in line and "nothing was committed" in line
    assert json.loads(mint(work, "status", "--json").stdout)["head"] == r1
    mint(work, "checkout", "--force", "main")  # writable again: it works, and says so
    state = json.loads(mint(work, "status", "--json").stdout)
    assert state["clean"] and state["mixed"] is None and state["base"] is None


def test_a_checkout_that_fails_part_way_writes_back_what_the_work_tree_held(
    tmp_path: Path,
) -> None:
    # The work tree was left at r0 by `commit --from`s; a checkout of main (r2, larger) that
    # failed part-way wrote main's revision "back", which failed for the same reason, and
    # the record was gone: the trainer's r0 files were then committable on top of r2.
    work, r0, _r1 = _left_behind(tmp_path)
    rng = np.random.default_rng(8)
    larger = shutil.copytree(work, tmp_path / "larger", ignore=shutil.ignore_patterns(".mint"))
    handmade_adapter(larger, {"q.lora_A.weight": ("F32", [64, 64], random_f32(rng, [64, 64]))})
    r2 = mint(work, "commit", "-m", "r2", "--from", str(larger), "--json").stdout
    r2 = json.loads(r2)["commit"]
    before = _files(work)
    limit = (len(before[WEIGHTS]) + 64 * 64 * 4) // 2  # over r0's weights, under r2's

    failed = _with_file_size_limit(work, limit, "checkout", "--force", "main")
    assert failed.returncode == 1
    assert failed.stderr == f"error: unable to write: File too large: {work / WEIGHTS}\n"
    assert _files(work) == before and (work / "sub" / "notes.txt").read_text() == "r0\n"
    state = json.loads(mint(work, "status", "--json").stdout)
    assert (state["base"], state["head"], state["mixed"]) == (r0, r2, None)
    assert "nothing was committed" in mint(work, "commit", "-m", "plain", ok=False).stderr


def test_a_checkout_that_cannot_move_head_writes_nothing(tmp_path: Path) -> None:
    # `.mint` the user may not write (another user's; here root without its capabilities),
    # the work tree writable and emptied: checkout wrote the target's files, failed on
    # HEAD.lock, and its rollback left HEAD's files where the user had deleted them. git takes
    # its lock (index.lock) before it touches the work tree.
    work = _two_sizes(tmp_path)
    (work / ".mint" / "mint-worktree.json").unlink()
    for name in (CONFIG, WEIGHTS):
        (work / name).unlink()
    (work / ".mint").chmod(0o555)
    try:
        results = [
            _mint_unprivileged(work, *args)
            for args in (("checkout", "big"), ("checkout", "--force", "big"), ("reset", "--hard"))
        ]
    finally:
        (work / ".mint").chmod(0o755)
    for failed in results:
        lock = work / ".mint" / "HEAD.lock"
        assert (failed.returncode, failed.stderr) == (1, f"error: Permission denied: {lock}\n")
    assert sorted(p.name for p in work.iterdir()) == [".mint"]
    assert json.loads(mint(work, "status", "--json").stdout)["branch"] == "main"


def _signalled_while_writing(
    tmp_path: Path, signum: int, ignored: bool = False
) -> tuple[Path, subprocess.CompletedProcess[str], list[str]]:
    """A commit of 40 MB of new weights in 160 tensors (a pack: store.PACK_THRESHOLD), sent
    `signum` once its temporary pack exists (started with `signum` ignored if `ignored`): the
    work tree, how it ended and the temporaries left."""
    rng = np.random.default_rng(5)
    tensors = {
        f"m{i}.lora_A.weight": ("F32", [64, 1024], random_f32(rng, [64, 1024])) for i in range(160)
    }
    work = handmade_adapter(tmp_path / "work", tensors)
    mint(tmp_path, "init", str(work), "--no-hooks")
    pack_dir = work / ".mint" / "objects" / "pack"

    def prepare() -> None:
        signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)

    proc = subprocess.Popen(
        [*MINT, "commit", "-m", "big", "--no-verify"],
        cwd=work,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=prepare,
    )
    deadline = time.monotonic() + 60
    while not any(pack_dir.glob("tmp_pack_*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no temporary pack appeared"
        time.sleep(0.002)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    left = [p.name for p in (work / ".mint").rglob("*") if p.name.startswith("tmp")]
    left += [p.name for p in (work / ".mint").rglob("*.lock")]
    return work, done, left


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGQUIT"])
def test_a_commit_ended_by_a_signal_leaves_no_temporary_pack(tmp_path: Path, name: str) -> None:
    # Ctrl-C unwound through the writers' cleanup; SIGTERM (timeout, a cancelled CI job, pod
    # eviction) and SIGHUP (a closed ssh session) killed Python outright, leaving a temporary
    # pack of up to the adapter's size that only a full gc removed. git's sigchain removes its
    # temporaries and locks on these signals, then dies of the signal.
    signum = getattr(signal, name)
    work, done, left = _signalled_while_writing(tmp_path, signum)
    assert done.returncode == -signum, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stderr == "", done.stderr
    assert left == []
    assert (
        subprocess.run(
            ["git", "--git-dir", str(work / ".mint"), "fsck", "--strict"], env=ENV, check=False
        ).returncode
        == 0
    )
    mint_fsck_ok(work)


def test_a_signal_the_command_started_with_ignored_stays_ignored(tmp_path: Path) -> None:
    # nohup: the commit goes on through a SIGHUP, as git's does.
    work, done, left = _signalled_while_writing(tmp_path, signal.SIGHUP, ignored=True)
    assert done.returncode == 0, done.stderr
    assert left == []
    assert _clean(work)


def _signal_points(code: types.CodeType) -> frozenset[int]:
    """The offsets in `code` where CPython runs a Python signal handler: its first instruction,
    each one right after a call returns, and each target a loop jumps back to (the eval
    breaker's checks). A KeyboardInterrupt raised there is what a Ctrl-C does there."""
    points = _POINTS.get(code)
    if points is None:
        instructions = list(dis.get_instructions(code))
        found = {instructions[0].offset}
        for before, after in itertools.pairwise(instructions):
            if before.opname == "RESUME" or before.opname.startswith("CALL"):
                found.add(after.offset)
            if "JUMP_BACKWARD" in before.opname or before.opname == "JUMP_ABSOLUTE":
                found.add(before.argval)
        points = _POINTS[code] = frozenset(found)
    return points


_POINTS: dict[types.CodeType, frozenset[int]] = {}


def _interrupt_at(point: int, action: Callable[[], object]) -> bool:
    """Run `action` with a KeyboardInterrupt raised at the `point`-th place (counted from 0, in
    the order they run) that a signal handler could run in the Python code it runs; whether it
    was raised there (False: `action` ended before reaching it)."""
    seen = 0
    fired = False

    def each_instruction(frame: types.FrameType, event: str, arg: object) -> Any:
        nonlocal seen, fired
        if event == "opcode" and not fired and frame.f_lasti in _signal_points(frame.f_code):
            if seen == point:
                fired = True
                raise KeyboardInterrupt
            seen += 1
        return each_instruction

    def each_call(frame: types.FrameType, event: str, arg: object) -> Any:
        if frame.f_code.co_name == "__del__":
            return None  # Python prints and drops an exception raised there: it never unwinds
        frame.f_trace_opcodes = True
        return each_instruction

    sys.settrace(each_call)
    try:
        action()
    except KeyboardInterrupt:
        if not fired:
            raise
    finally:
        sys.settrace(None)
    return fired


def _open_fds() -> list[str]:
    """This process's open file descriptors."""
    return sorted(os.listdir("/proc/self/fd"))


def _interrupted_everywhere(
    folder: Path, action: Callable[[], object], allowed: Collection[str] = ()
) -> int:
    """Run `action` once for each place a Ctrl-C could land in it, interrupted there, and check
    that each run left no descriptor open and no file in `folder` but `allowed`; how many."""
    before_files = {p.name for p in folder.iterdir()}
    point = 0
    while True:
        before_fds = _open_fds()
        fired = _interrupt_at(point, action)
        left = {p.name for p in folder.iterdir()} - before_files - set(allowed)
        assert left == set(), (point, left)
        assert _open_fds() == before_fds, point
        for name in allowed:
            (folder / name).unlink(missing_ok=True)
        if not fired:
            return point
        point += 1


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists descriptors in /proc")
def test_a_temporary_interrupted_anywhere_leaves_no_file_and_no_descriptor(tmp_path: Path) -> None:
    # A signal handler runs as a call returns: tempfile.mkstemp, interrupted as its open()
    # returned, left a file no caller could name (a temporary pack of the adapter's size, until
    # a gc) and its descriptor open; so did the writers, interrupted as the temporary's maker
    # returned, before their try. Every such place is tried, in the writers of the store's
    # files, loose objects and work-tree files.
    from mintvcs.filemodes import TempFile, write_file
    from mintvcs.packs import place_file
    from mintvcs.porcelain import _write_atomic

    def made_and_dropped() -> None:
        with TempFile(tmp_path, "tmp_pack_") as temp:
            os.write(temp.fd, b"x")

    def config_written() -> None:
        write_file(tmp_path / "config", b"[core]\n", None)

    def object_placed() -> None:
        place_file(tmp_path / "ab", tmp_path / "ab" / "cdef", [b"blob"])

    def checked_out() -> None:
        _write_atomic(tmp_path / "adapter_config.json", b"{}", executable=False)

    assert _interrupted_everywhere(tmp_path, made_and_dropped) >= 4
    assert _interrupted_everywhere(tmp_path, config_written, {"config"}) >= 6
    (tmp_path / "ab").mkdir()
    assert _interrupted_everywhere(tmp_path / "ab", object_placed, {"cdef"}) >= 6
    assert _interrupted_everywhere(tmp_path, checked_out, {"adapter_config.json"}) >= 6

    # Uninterrupted: the file is ours alone, and stays open until closed.
    temp = TempFile(tmp_path, "tmp_idx_", ".x")
    assert Path(temp.path).parent == tmp_path and Path(temp.path).name.startswith("tmp_idx_")
    assert Path(temp.path).suffix == ".x" and oct(Path(temp.path).stat().st_mode & 0o777) == "0o600"
    temp.close()
    assert Path(temp.path).exists()
    temp.discard()
    assert list(tmp_path.glob("tmp_*")) == []
