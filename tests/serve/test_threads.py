"""Only the step thread computes with a thread team; token events reach a loop in batches."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import torch

from mintvcs.serve import Engine, EngineConfig, PeftDirSource, SamplingParams
from mintvcs.serve.adapters import AdapterWeights
from mintvcs.serve.engine import LoopMailbox


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
    assert seen == {"caller after init": 2, "step thread": 2, "loader": 1}


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
