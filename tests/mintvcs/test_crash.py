"""Crash safety and concurrency: kill -9 in the middle of commits; two processes committing at once."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mintvcs import porcelain
from mintvcs.store import Repository
from tests.mintvcs.storekit import ENV, git_fsck, handmade_adapter, mint_fsck_ok

# A commit loop over an 8 MiB adapter: each iteration changes every tensor and commits it.
COMMIT_LOOP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from mintvcs import porcelain
    from mintvcs.store import Repository
    from tests.mintvcs.storekit import mutate

    repo, src, seed = Repository.open(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    print("ready", flush=True)
    for i in range(1000):
        mutate(src, seed=seed * 1000 + i, scale=1e-3)
        porcelain.commit(repo, f"loop {seed}.{i}", source=src, verify=False, show_progress=False)
        print("committed", flush=True)
    """
)

# Fifty commits of distinct small adapters onto main, started together with another process.
COMMIT_FIFTY = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from mintvcs import porcelain
    from mintvcs.store import Repository
    from tests.mintvcs.storekit import handmade_adapter

    repo, who, go = Repository.open(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    rng = np.random.default_rng(sum(who.encode()))
    dirs = []
    for i in range(50):
        a = (rng.standard_normal((4, 32)) * 0.02).astype("<f4").tobytes()
        d = handmade_adapter(Path(sys.argv[4]) / f"{who}-{i}", {"w.lora_A.weight": ("F32", [4, 32], a)})
        dirs.append(d)
    while not go.exists():
        time.sleep(0.001)
    for i, d in enumerate(dirs):
        porcelain.commit(repo, f"{who} {i}", source=d, verify=False, show_progress=False)
    """
)


def _first_parents(repo: Repository, tip: str | None) -> list[str]:
    return [c.id for c in repo.walk(tip)] if tip else []


_TEMPORARY = re.compile(r".*\.lock|objects/[0-9a-f]{2}/tmp_obj_\w+|objects/pack/tmp_(pack|idx)_\w+")


def _debris(git_dir: Path, known: set[str]) -> list[str]:
    """Files in .mint that are neither objects, refs, logs nor files that were there before."""
    found = []
    for path in git_dir.rglob("*"):
        rel = path.relative_to(git_dir).as_posix()
        if not path.is_file() or rel in known:
            continue
        expected = (
            re.fullmatch(r"objects/[0-9a-f]{2}/[0-9a-f]{38}", rel)
            or re.fullmatch(r"objects/pack/pack-[0-9a-f]{40}\.(pack|idx)", rel)
            or rel.startswith(("refs/heads/", "logs/"))
        )
        if expected and not rel.endswith(".lock"):
            continue
        found.append(rel)
    return found


def test_kill_9_during_commits_leaves_old_or_new_never_torn(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # 8 tensors of 1 MiB: a commit takes long enough to be killed in every phase of it.
    tensors = {
        f"layers.{i}.lora_{ab}.weight": (
            "F32",
            [256, 1024] if ab == "A" else [1024, 256],
            (rng.standard_normal(2**18) * 0.02).astype("<f4").tobytes(),
        )
        for i in range(4)
        for ab in "AB"
    }
    src = handmade_adapter(tmp_path / "src", tensors)
    work = tmp_path / "work"
    repo = porcelain.init(work, None, install_hooks=False)
    repo.close()
    git_dir = work / ".mint"
    known = {p.relative_to(git_dir).as_posix() for p in git_dir.rglob("*") if p.is_file()}
    script = tmp_path / "loop.py"
    script.write_text(COMMIT_LOOP)
    chooser = random.Random(1234)
    tip: str | None = None
    debris: list[str] = []
    commits_seen = 0
    for trial in range(10):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(work), str(src), str(trial)],
            env=ENV,
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        if trial and commits_seen < 3:
            # On a slow or loaded machine the kills came before the commits did (one commit in
            # ten trials beside five busy processes on one core): until the branch has some
            # history, each process commits once before its kill is timed. The first trial is
            # still killed wherever the clock says, even before the branch exists.
            assert proc.stdout.readline().strip() == b"committed"
        time.sleep(chooser.uniform(0.0, 0.7))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert "Traceback" not in stderr, stderr

        # The ref is a whole id (or still absent), and moved only forward from the old tip.
        ref = git_dir / "refs" / "heads" / "main"
        if ref.exists():
            assert re.fullmatch(r"[0-9a-f]{40}\n", ref.read_text()), repr(ref.read_text())
        repo = Repository.open(work)
        new_tip = repo.refs.read("refs/heads/main")
        history = _first_parents(repo, new_tip)
        if tip is not None:
            assert tip in history, (
                f"trial {trial}: branch moved from {tip} to {new_tip}, not a descendant"
            )
        if new_tip is not None:
            repo.read_revision(new_tip).safetensors_bytes()
        commits_seen = len(history)
        repo.close()
        tip = new_tip
        left = _debris(git_dir, known)
        # Allowed debris: lock files and the temporaries of interrupted object writes (both
        # named so that git and `mintvcs fsck` skip them, and `mintvcs gc` removes them).
        assert all(_TEMPORARY.fullmatch(p) for p in left), (
            f"trial {trial}: debris other than lock files and object temporaries: {left}"
        )
        debris += left
        mint_fsck_ok(work)
        git_fsck(work)
        # A stale lock blocks the next writer, as in git; clear it as its error message says to.
        for rel in left:
            (git_dir / rel).unlink(missing_ok=True)
    assert commits_seen >= 3, "the kills should land after some commits went through"
    if debris:
        print(f"lock files left by kill -9: {debris}")


def test_two_processes_committing_fifty_each_lose_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    work = handmade_adapter(
        tmp_path / "work",
        {
            "w.lora_A.weight": (
                "F32",
                [4, 32],
                (rng.standard_normal((4, 32))).astype("<f4").tobytes(),
            )
        },
    )
    repo = porcelain.init(work, None, install_hooks=False)
    root = porcelain.commit(repo, "root", verify=False, show_progress=False).commit
    repo.close()
    script = tmp_path / "fifty.py"
    script.write_text(COMMIT_FIFTY)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(work), who, str(go), str(tmp_path / "adapters")],
            env=ENV,
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("alice", "bob")
    ]
    time.sleep(1.0)  # both have imported and built their adapters
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    repo = Repository.open(work)
    history = list(repo.walk(repo.resolve("main")))
    repo.close()
    messages = [c.message.strip() for c in history]
    assert messages[-1] == "root" and history[-1].id == root
    expected = {f"{who} {i}" for who in ("alice", "bob") for i in range(50)}
    assert set(messages[:-1]) == expected and len(messages) == 101
    # Each process's own commits keep their order along the first-parent chain.
    for who in ("alice", "bob"):
        mine = [int(m.split()[1]) for m in reversed(messages) if m.startswith(who)]
        assert mine == list(range(50))
    mint_fsck_ok(work)
    git_fsck(work)


def test_stale_object_lock_left_by_a_kill_does_not_block_later_commits(
    tmp_path: Path, peft_adapter: Path
) -> None:
    from dulwich.objects import Blob

    from tests.mintvcs.storekit import copy_adapter, mint

    work = copy_adapter(peft_adapter, tmp_path / "work")
    mint(tmp_path, "init", str(work), "--no-hooks")
    # What a kill -9 in the middle of writing the config blob leaves: objects/xx/<rest>.lock, half written.
    oid = Blob.from_string((work / "adapter_config.json").read_bytes()).id.decode()
    lock = work / ".mint" / "objects" / oid[:2] / f"{oid[2:]}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_bytes(b"x\x01")
    out = mint(work, "commit", "-m", "after a crash")
    assert "root-commit" in out.stdout
    mint_fsck_ok(work)
    git_fsck(work)


# `mintvcs checkout REV` that dies (as under kill -9) just before its Nth rename into the work tree.
CHECKOUT_KILLED_AT = textwrap.dedent(
    """
    import os, sys
    from mintvcs import cli, porcelain

    left = int(sys.argv[1])
    replace = os.replace

    def crash_point(src, dst):
        global left
        if os.path.basename(dst) != "mint-worktree.json":
            left -= 1
            if left == 0:
                os._exit(9)
        replace(src, dst)

    porcelain.os.replace = crash_point
    cli.main(["checkout", sys.argv[2]])
    """
)


def test_a_killed_checkout_leaves_no_temporary_in_the_work_tree(tmp_path: Path) -> None:
    # Each temporary was made beside the file it replaced: status listed it as added,
    # checkout --force and gc left it, and the next commit stored it as one of the adapter's files.
    from tests.mintvcs.storekit import handmade_adapter, mint, random_f32

    rng = np.random.default_rng(7)
    work = handmade_adapter(
        tmp_path / "work", {"q.lora_A.weight": ("F32", [4, 64], random_f32(rng, [4, 64]))}
    )
    (work / "notes.txt").write_text("one")
    mint(tmp_path, "init", str(work), "--no-hooks")
    mint(work, "commit", "-m", "small")
    handmade_adapter(work, {"q.lora_A.weight": ("F32", [8, 64], random_f32(rng, [8, 64]))})
    (work / "notes.txt").write_text("two")
    mint(work, "commit", "-m", "big")
    for n in (1, 2, 3):  # config, weights (another size: replaced), notes.txt
        code = subprocess.run(
            [sys.executable, "-c", CHECKOUT_KILLED_AT, str(n), "HEAD~1"], cwd=work, env=ENV
        ).returncode
        assert code == 9
        assert sorted(p.name for p in work.iterdir()) == [
            ".mint",
            "adapter_config.json",
            "adapter_model.safetensors",
            "notes.txt",
        ]
        # The work-tree record claims no base, and lists the revisions the files may be of.
        record = json.loads((work / ".mint" / "mint-worktree.json").read_bytes())
        assert record["commit"] is None and len(record["mixes"]) == 2
        mint(work, "checkout", "--force", "main")
    left = [p for p in (work / ".mint").iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 3
    mint(work, "gc")
    assert all(p.exists() for p in left)  # young: may be a running checkout's
    old = time.time() - 2 * 3600
    for p in left:
        os.utime(p, (old, old))
    mint(work, "gc")
    assert not any(p.exists() for p in left)
    assert json.loads(mint(work, "status", "--json").stdout)["changes"] == []
    mint_fsck_ok(work)
    git_fsck(work)


def test_checkout_writes_across_a_mount_inside_the_work_tree(tmp_path: Path) -> None:
    # Same device number for .mint and the work tree, but a file under a mount point:
    # the rename of the temporary made in .mint failed ("Invalid cross-device link").
    from tests.mintvcs.storekit import handmade_adapter, mint, random_f32

    rng = np.random.default_rng(5)
    work = handmade_adapter(
        tmp_path / "work", {"q.lora_A.weight": ("F32", [4, 64], random_f32(rng, [4, 64]))}
    )
    (work / "data").mkdir()
    (work / "data" / "notes.txt").write_text("one")
    mint(tmp_path, "init", str(work), "--no-hooks")
    mint(work, "commit", "-m", "one")
    (work / "data" / "notes.txt").write_text("two")
    mint(work, "commit", "-m", "two")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(work / "data")],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("needs to mount a tmpfs (root)")
    try:
        (work / "data" / "notes.txt").write_text("two")
        mint(work, "checkout", "HEAD~1")
        assert (work / "data" / "notes.txt").read_text() == "one"
        assert os.listdir(work / "data") == ["notes.txt"]
        assert not [p for p in (work / ".mint").iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(work / "data")], check=True)
