"""Counters for long work: shown on a terminal after a second, per phase; fsck and gc report theirs."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time
from pathlib import Path

import numpy as np

from mintvcs import maintenance, porcelain
from tests.mintvcs.storekit import handmade_adapter, random_f32

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


def _on_a_terminal(code: str) -> bytes:
    """Everything `code` writes to a pseudo-terminal 100 columns wide."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        os.execv(sys.executable, [sys.executable, "-c", code])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child exited and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    return out


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
