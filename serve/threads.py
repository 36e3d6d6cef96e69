"""One thread computes: every other thread of an engine process runs torch on one intra-op thread.

torch's CPU ops run on an OpenMP team owned by the thread that calls them. GNU OpenMP counts the
threads of all teams, and once they outnumber the CPUs it stops spin-waiting between parallel
regions, so each op puts its workers to sleep and wakes them again: a 32-token decode step on two
cores measured 35% slower when the thread that loaded the model had left a team behind. So the
engine's step thread alone gets a team; loading and background adapter work use one thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def one_intraop_thread() -> Iterator[None]:
    """Run the block's torch ops on the calling thread alone; the thread's setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use_one_intraop_thread() -> None:
    """A worker thread's initializer: this thread's torch ops never start an OpenMP team."""
    set_intraop_threads(1)


def set_intraop_threads(count: int) -> None:
    """Set the calling thread's torch thread count, so that it sticks."""
    # torch sets a thread's count from a process-wide value on the thread's first torch call,
    # which would override a count set before it: make that first call here.
    torch.get_num_threads()
    torch.set_num_threads(count)


def available_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path | None = None
) -> int:
    """CPUs this process may keep busy: its affinity mask, capped by a cgroup CPU quota.

    torch sizes its thread team by the CPUs it sees, but a container limited to 2 CPUs on a
    64-core node sees 64: 64 threads then share 2 CPUs' worth of time, and every parallel op
    waits for descheduled workers (decode steps measured 5-10x slower under contention).
    """
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        return max(1, min(count or 1, math.ceil(quota)))
    return max(1, count or 1)


def cgroup_cpu_quota(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path | None = None
) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup or any ancestor, v2 or v1; None when unlimited."""
    membership = _cgroup_paths(proc_cgroup or Path("/proc/self/cgroup"))
    limits = []
    # cgroup v2: <root>/<path>/cpu.max holds "max 100000" or "QUOTA PERIOD", at every level.
    if "" in membership:
        limits += _levels(root, membership[""], "cpu.max", _parse_cpu_max)
    # cgroup v1: the cpu controller's cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us.
    for controllers, path in membership.items():
        if "cpu" in controllers.split(","):
            for mount in (root / "cpu", root / "cpu,cpuacct", root / controllers):
                if mount.is_dir():
                    limits += _levels(mount, path, "cpu.cfs_quota_us", _parse_cfs)
                    break
    return min(limits) if limits else None


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """controllers -> cgroup path from /proc/self/cgroup ("" is the v2 hierarchy)."""
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return {}
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[parts[1]] = parts[2]
    return paths


def _levels(
    mount: Path, path: str, name: str, parse: Callable[[Path], float | None]
) -> list[float]:
    """Quotas found in `name` at `path` and each ancestor up to the mount (a container's own
    cgroup is often its mount point's root)."""
    found = []
    parts = [p for p in path.split("/") if p and p != ".."]
    for depth in range(len(parts), -1, -1):
        quota = parse(mount.joinpath(*parts[:depth], name))
        if quota is not None:
            found.append(quota)
    return found


def _parse_cpu_max(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _parse_cfs(path: Path) -> float | None:
    try:
        quota = int(path.read_text())
        period = int(path.with_name("cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
