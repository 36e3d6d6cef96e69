"""Only the step thread computes with a thread team; token events reach a loop in batches."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import torch

from mintvcs.serve import Engine, EngineConfig, PeftDirSource, SamplingParams
from mintvcs.serve.adapters import AdapterWeights
from mintvcs.serve.engine import LoopMailbox
from mintvcs.serve.threads import available_cpus, cgroup_cpu_quota


class _RecordingSource(PeftDirSource):
    """A PEFT directory source that notes the loading thread's torch thread count."""

    def __init__(self, directories: dict[str, Path]) -> None:
        super().__init__(directories)
        self.load_threads: list[int] = []

    def load(self, revision: str, *, max_bytes: int | None = None) -> AdapterWeights:
        self.load_threads.append(torch.get_num_threads())
        return super().load(revision)


def test_only_the_step_thread_runs_a_thread_team(tiny_base: Path, peft_adapter: Path) -> None:
    seen: dict[str, int] = {}

    def caller() -> None:  # a fresh thread, so the test runner's own threads are not involved
        torch.set_num_threads(2)
        source = _RecordingSource({"a": peft_adapter})
        engine = Engine(tiny_base, EngineConfig(max_model_len=64), source=source, start=False)
        seen["caller after init"] = torch.get_num_threads()
        step = engine.scheduler.step

        def observed_step() -> bool:
            seen["step thread"] = torch.get_num_threads()
            return step()

        engine.scheduler.step = observed_step
        engine.start()
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        with engine:
            engine.generate([5, 6, 7], "a", params, timeout=60)
        seen["loader"] = source.load_threads[0]

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join()
    # The team is as large as the caller's, up to the CPUs this process may use (a runner
    # with one CPU, or a quota of one, gives it one thread).
    team = min(2, available_cpus())
    assert seen == {"caller after init": 2, "step thread": team, "loader": 1}


def test_mailbox_delivers_in_order_and_reports_a_closed_loop() -> None:
    loop = asyncio.new_event_loop()
    box = LoopMailbox(loop)
    received: asyncio.Queue[Any] = asyncio.Queue()

    def producer() -> None:
        for i in range(200):
            assert box.post(received, i)

    async def consume() -> list[int]:
        thread = threading.Thread(target=producer)
        thread.start()
        got = [await received.get() for _ in range(200)]
        thread.join()
        return got

    assert loop.run_until_complete(consume()) == list(range(200))
    loop.close()
    assert box.post(received, "late") is False


def _cgroup(root: Path, files: dict[str, str], membership: str) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = root / "proc-self-cgroup"
    proc.write_text(membership)
    return proc


def test_cgroup_v2_quota_is_the_tightest_level(tmp_path: Path) -> None:
    """A pod's limit on an ancestor applies to the container's own cgroup below it."""
    proc = _cgroup(
        tmp_path,
        {
            "kubepods/pod1/ctr/cpu.max": "max 100000\n",
            "kubepods/pod1/cpu.max": "150000 100000\n",
            "kubepods/cpu.max": "800000 100000\n",
        },
        "0::/kubepods/pod1/ctr\n",
    )
    assert cgroup_cpu_quota(tmp_path, proc) == 1.5
    assert available_cpus(tmp_path, proc) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "kubepods/pod1/cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods/cpu.max").write_text("garbage")
    assert cgroup_cpu_quota(tmp_path, proc) is None
    assert available_cpus(tmp_path, proc) == len(os.sched_getaffinity(0))


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    proc = _cgroup(
        tmp_path,
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
    )
    assert cgroup_cpu_quota(tmp_path, proc) == 0.5
    assert available_cpus(tmp_path, proc) == 1  # half a CPU still gets one thread
    (tmp_path / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path, proc) is None
    assert cgroup_cpu_quota(tmp_path, tmp_path / "no-such-file") is None


def test_cpu_threads_sets_the_step_threads_team(tiny_base: Path) -> None:
    seen: list[int] = []
    summary: list[str] = []

    def caller() -> None:
        torch.set_num_threads(2)
        engine = Engine(tiny_base, EngineConfig(max_model_len=64, cpu_threads=1), start=False)
        step = engine.scheduler.step

        def observed_step() -> bool:
            seen.append(torch.get_num_threads())
            return step()

        engine.scheduler.step = observed_step
        engine.start()
        with engine:
            engine.generate([5, 6], None, SamplingParams(max_tokens=2), timeout=60)
            summary.append(engine.summary())

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join()
    assert seen and set(seen) == {1}
    assert "on cpu (1 thread);" in summary[0]
